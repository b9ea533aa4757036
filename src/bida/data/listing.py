"""List the samples of each dataset layout (the layouts: :mod:`bida.data.readers`).

:func:`list_samples` pairs every image of a split with its label file, in sorted order of
their relative path, so that a listing is deterministic on every machine; every problem is
a :class:`~bida.errors.DataError` naming the file or directory.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from bida.errors import ConfigError, DataError


KINDS = ("gta5", "synthia", "cityscapes", "folder")


_FOLDER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit.png"
_CITYSCAPES_LABEL_SUFFIX = "_gtFine_labelIds.png"


@dataclass(frozen=True)
class Sample:
    """One image, its label file (``None`` for an unlabelled image) and a stable id."""

    image: Path
    label: Path | None
    name: str  # unique, stable id: relative image path without extension


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"unknown dataset kind {kind!r}; expected one of {', '.join(KINDS)}")


def _split_dirs(kind: str, root: Path, split: str) -> tuple[Path, Path]:
    """(image directory, label directory) of a split."""
    if kind == "gta5":
        return root / "images", root / "labels"
    if kind == "synthia":
        return root / "RGB", root / "GT" / "LABELS"
    if kind == "cityscapes":
        return root / "leftImg8bit" / split, root / "gtFine" / split
    return root / "images" / split, root / "labels" / split


def _listing_error(err: OSError, path: Path) -> DataError:
    """One line for a directory or file that cannot be listed or looked at."""
    where = err.filename or path
    if err.errno in (errno.EACCES, errno.EPERM):
        return DataError(f"permission denied: {where}")
    return DataError(f"cannot read {where}: {err.strerror or err}")


def _unresolvable_link(path: Path) -> str | None:
    """Why ``path`` is a symlink that cannot be followed ("symlink loop", a missing target), else None."""
    if not path.is_symlink():
        return None
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symlink loop"
        return f"symlink that cannot be resolved ({err.strerror or err})"
    return None


def _walk_files(image_dir: Path, max_depth: int | None, follow_links: bool = False) -> list[Path]:
    """Every non-directory entry under ``image_dir`` down to ``max_depth`` directory levels.

    Unlike ``Path.glob``, which skips what it cannot read, a directory that cannot be
    listed is an error: a chmod-000 directory is "permission denied", never empty.
    Symlinked directories are followed only with ``follow_links`` (as ``Path.glob("*/*")``
    does; ``Path.rglob`` does not).
    """
    def fail(err: OSError) -> None:
        raise _listing_error(err, image_dir)

    found = []
    for dirpath, dirnames, filenames in os.walk(image_dir, onerror=fail, followlinks=follow_links):
        here = Path(dirpath)
        if max_depth is not None and len(here.relative_to(image_dir).parts) >= max_depth:
            dirnames.clear()
        found += [here / name for name in filenames]
    return found


def _image_files(kind: str, image_dir: Path) -> list[Path]:
    """Every image of ``image_dir`` in this kind's layout, relative to it, sorted.

    An image that is a symlink loop (or whose link target is gone) is an error naming it,
    never silently left out of the split.
    """
    if kind in ("gta5", "synthia"):
        found = [p for p in _walk_files(image_dir, 0) if p.name.endswith(".png")]
    elif kind == "cityscapes":
        found = [p for p in _walk_files(image_dir, 1, follow_links=True)  # city folders may be links
                 if p.parent != image_dir and p.name.endswith(_CITYSCAPES_IMAGE_SUFFIX)]
    else:
        found = [p for p in _walk_files(image_dir, None) if p.suffix.lower() in _FOLDER_IMAGE_SUFFIXES]
    files, broken = [], []
    for p in found:
        try:
            if p.is_file():
                files.append(p)
                continue
        except OSError as err:
            raise _listing_error(err, p) from None
        why = _unresolvable_link(p)
        if why is not None:
            broken.append((p, why))
    if broken:
        (first, why), more = broken[0], len(broken) - 1
        raise DataError(f"cannot read image {first}: {why}" + (f" (and {more} more in {image_dir})" if more else ""))
    return sorted((p.relative_to(image_dir) for p in files), key=Path.as_posix)


def _label_path(kind: str, label_dir: Path, image_rel: Path) -> Path:
    """Where the label of the image ``image_rel`` (relative to its image dir) lives."""
    if kind == "cityscapes":
        stem = image_rel.name[: -len(_CITYSCAPES_IMAGE_SUFFIX)]
        return label_dir / image_rel.parent / f"{stem}{_CITYSCAPES_LABEL_SUFFIX}"
    return label_dir / image_rel.with_suffix(".png")


def _read_split_file(path: Path, image_dir: Path, available: list[Path]) -> list[Path]:
    """The images listed in a split file, in sorted order; every one must exist."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read split file {path}: {err}") from None
    names = [line.strip() for line in lines if line.strip()]
    rels = [Path(n) if Path(n).suffix.lower() == ".png" else Path(f"{n}.png") for n in names]
    known = set(available)
    missing = [rel for rel in rels if rel not in known]
    if missing:
        raise DataError(
            f"split file {path} lists {len(missing)} image(s) not in {image_dir}, "
            f"first: {missing[0].as_posix()}"
        )
    if not rels:
        raise DataError(f"no images in split file {path}")
    return sorted(set(rels), key=Path.as_posix)


def _split_images(kind: str, root: Path, split: str, image_dir: Path) -> list[Path]:
    available = _image_files(kind, image_dir)
    if not available:
        raise DataError(f"no images in {image_dir}")
    if kind not in ("gta5", "synthia"):
        return available
    split_file = root / "split" / f"{split}.txt"
    if split_file.is_file():
        return _read_split_file(split_file, image_dir, available)
    if split != "train":
        raise DataError(
            f"missing split file {split_file}: {kind} split {split!r} needs one "
            "(only 'train' defaults to every image)"
        )
    val_file = root / "split" / "val.txt"
    if val_file.is_file():  # keep held-out images out of training
        held_out = set(_read_split_file(val_file, image_dir, available))
        available = [rel for rel in available if rel not in held_out]
        if not available:
            raise DataError(f"no images in {image_dir} left for 'train' after {val_file}")
    return available


def _check_duplicate_names(rels: list[Path], image_dir: Path) -> None:
    seen: dict[str, Path] = {}
    for rel in rels:
        name = rel.with_suffix("").as_posix()
        if name in seen:
            raise DataError(
                f"images {seen[name].as_posix()} and {rel.as_posix()} in {image_dir} "
                "share a name; keep one"
            )
        seen[name] = rel


def list_samples(
    kind: str, root: Path | str, split: str, require_labels: bool = True
) -> list[Sample]:
    """The samples of one split, sorted by relative path.

    Raises DataError when the root or the split's image directory is missing, the split
    has no images, or (with ``require_labels``) an image has no label.
    """
    _check_kind(kind)
    if not split or "/" in split or "\\" in split or split in (".", ".."):
        raise ConfigError(f"invalid split name {split!r}: expected a plain name such as 'train'")
    root = Path(root)
    image_dir, label_dir = _split_dirs(kind, root, split)
    try:  # a directory that cannot be looked into is "permission denied", not missing
        if not root.is_dir():
            raise DataError(f"dataset root {root} does not exist or is not a directory")
        if not image_dir.is_dir():
            raise DataError(f"missing image directory {image_dir} ({kind} layout, split {split!r})")
    except OSError as err:
        raise _listing_error(err, root) from None
    rels = _split_images(kind, root, split, image_dir)
    if kind == "folder":
        _check_duplicate_names(rels, image_dir)

    samples: list[Sample] = []
    unlabelled: list[Sample] = []
    for rel in rels:
        label = _label_path(kind, label_dir, rel)
        try:
            labelled = label.is_file()
        except OSError as err:
            raise _listing_error(err, label) from None
        why = None if labelled else _unresolvable_link(label)
        if why is not None:  # a label that cannot be followed is not a missing one
            raise DataError(f"cannot read label {label}: {why}")
        sample = Sample(
            image=image_dir / rel,
            label=label if labelled else None,
            name=rel.with_suffix("").as_posix(),
        )
        if sample.label is None:
            unlabelled.append(sample)
        samples.append(sample)
    if require_labels and unlabelled:
        first = unlabelled[0]
        expected = _label_path(kind, label_dir, first.image.relative_to(image_dir))
        raise DataError(
            f"{len(unlabelled)} of {len(samples)} images in {image_dir} have no label, "
            f"first: {first.image} (expected {expected})" + non_png_label_hint(kind, root, split, first)
        )
    return samples


_NON_PNG_LABEL_SUFFIXES = (".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".JPG", ".JPEG")


def non_png_label_hint(kind: str, root: Path | str, split: str, sample: Sample) -> str:
    """``": found NAME.jpg, but labels must be PNG ..."`` when the missing label exists in
    another format (lossy JPEG would blur class indices); else an empty string."""
    image_dir, label_dir = _split_dirs(kind, Path(root), split)
    expected = _label_path(kind, label_dir, sample.image.relative_to(image_dir))
    for suffix in _NON_PNG_LABEL_SUFFIXES:
        other = expected.with_suffix(suffix)
        if other.is_file():
            return (f": found {other}, but labels must be PNG (lossless class indices; "
                    f"a JPEG changes the values at edges)")
    return ""


def orphan_labels(kind: str, root: Path | str, split: str) -> list[Path]:
    """Label files of a split's label directory that match no image (sorted)."""
    _check_kind(kind)
    image_dir, label_dir = _split_dirs(kind, Path(root), split)
    if not label_dir.is_dir():
        return []
    expected = {_label_path(kind, label_dir, rel) for rel in _image_files(kind, image_dir)}
    if kind in ("gta5", "synthia"):
        found = label_dir.glob("*.png")
    elif kind == "cityscapes":
        found = label_dir.glob(f"*/*{_CITYSCAPES_LABEL_SUFFIX}")
    else:
        found = label_dir.rglob("*.png")
    return sorted((p for p in found if p.is_file() and p not in expected), key=Path.as_posix)
