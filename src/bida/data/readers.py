"""List and read the images and labels of each dataset layout.

Every reader returns images as (H, W, 3) uint8 RGB and labels as (H, W) uint8 class
indices with 255 = ignore; any problem with the data raises :class:`DataError` with a
one-line message naming the file or directory. Samples are listed in sorted order of
their relative path, so a listing is deterministic on every machine.

Layouts (``ROOT`` is the dataset root given in the config):

``gta5``
    ``ROOT/images/NAME.png`` and ``ROOT/labels/NAME.png`` (Cityscapes label ids, usually
    a palette PNG whose indices are the ids), mapped with ``CITYSCAPES_ID_TO_TRAIN_ID``.
    GTA5 has no official split for adaptation: split ``train`` is every image, unless
    ``ROOT/split/train.txt`` exists; any other split ``S`` needs ``ROOT/split/S.txt``.
    A split file holds one image file name per line (``00001.png`` or ``00001``); when
    only ``val.txt`` exists, ``train`` is every image not listed in it. A few GTA5 labels
    differ in size from their image: :func:`read_pair` resizes such a label to the image
    with nearest neighbour and warns (:class:`LabelResizedWarning`) naming the file.
``synthia`` (SYNTHIA-RAND-CITYSCAPES)
    ``ROOT/RGB/NAME.png`` and ``ROOT/GT/LABELS/NAME.png``. Labels are 16-bit PNGs whose
    first channel is the SYNTHIA class id (the others hold instance ids); single-channel
    16-bit labels are accepted too. Pillow would silently keep only the high byte of a
    16-bit multi-channel PNG, so those are decoded by :func:`decode_png` (zlib + numpy).
    Mapped with ``SYNTHIA_ID_TO_TRAIN_ID`` (ids above 255 -> ignore). Splits as gta5.
``cityscapes``
    ``ROOT/leftImg8bit/SPLIT/CITY/STEM_leftImg8bit.png`` and
    ``ROOT/gtFine/SPLIT/CITY/STEM_gtFine_labelIds.png``, mapped with
    ``CITYSCAPES_ID_TO_TRAIN_ID``. The split is a directory name (train, val, test).
``folder`` (any custom domain)
    ``ROOT/classes.json``, ``ROOT/images/SPLIT/NAME.(png|jpg|jpeg)`` and
    ``ROOT/labels/SPLIT/NAME.png`` (8-bit class indices, 255 = ignore, same relative
    name; sub-directories allowed). ``classes.json`` is
    ``{"classes": [names...], "palette": [[r, g, b], ...], "ignore_index": 255}`` with
    ``palette`` and ``ignore_index`` optional.

With ``require_labels=False`` (unlabelled target images) a sample whose label file is
absent gets ``label=None``; a label that exists is still returned.

A sample's ``name`` is its image path relative to the split's image directory, without
the extension, with ``/`` separators (Cityscapes: ``aachen/aachen_000000_000019_leftImg8bit``).
"""

from __future__ import annotations

import errno
import json
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from bida.errors import ConfigError, DataError
from .labels import (
    CITYSCAPES,
    CITYSCAPES_ID_TO_TRAIN_ID,
    IGNORE_INDEX,
    SYNTHIA_ID_TO_TRAIN_ID,
    ClassInfo,
    default_palette,
    map_ids,
)

KINDS = ("gta5", "synthia", "cityscapes", "folder")

# Raw label id -> train id table of each kind; folder labels are class indices already.
ID_TO_TRAIN_ID: dict[str, np.ndarray | None] = {
    "gta5": CITYSCAPES_ID_TO_TRAIN_ID,
    "synthia": SYNTHIA_ID_TO_TRAIN_ID,
    "cityscapes": CITYSCAPES_ID_TO_TRAIN_ID,
    "folder": None,
}

_FOLDER_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit.png"
_CITYSCAPES_LABEL_SUFFIX = "_gtFine_labelIds.png"
_CLASSES_JSON_KEYS = {"classes", "palette", "ignore_index"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_GRAY, _PNG_RGB, _PNG_GRAY_ALPHA, _PNG_RGBA = 0, 2, 4, 6
_PNG_CHANNELS = {_PNG_GRAY: 1, _PNG_RGB: 3, _PNG_GRAY_ALPHA: 2, _PNG_RGBA: 4}


class LabelResizedWarning(UserWarning):
    """A label whose size differed from its image was resized with nearest neighbour."""


@dataclass(frozen=True)
class Sample:
    """One image, its label file (``None`` for an unlabelled image) and a stable id."""

    image: Path
    label: Path | None
    name: str  # unique, stable id: relative image path without extension


# ---------------------------------------------------------------------------- listing


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


# --------------------------------------------------------------------------- reading


# Pillow modes of single-channel images with more than 8 bits per pixel. ``convert("RGB")``
# clips them at 255 (a 16-bit photo becomes all white), so they are scaled here instead.
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _high_depth_to_rgb(array: np.ndarray, path: Path) -> np.ndarray:
    """A 16-bit grayscale image as 8-bit RGB: values scaled from 0..65535 to 0..255."""
    values = array.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DataError(f"cannot read image {path}: 32-bit integer pixels (range {values.min()}..{values.max()}); "
                        "save it as an 8-bit or 16-bit image")
    gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def read_image(path: Path) -> np.ndarray:
    """An image file as RGB; 16-bit grayscale is scaled to 8 bits, float images are refused.

    Shape:
        returns (H, W, 3) uint8
    """
    try:
        with Image.open(path) as im:
            if im.mode in _HIGH_DEPTH_MODES:
                return _high_depth_to_rgb(np.array(im), path)
            if im.mode == "F":
                raise DataError(f"cannot read image {path}: floating-point pixels (mode F) have no defined "
                                "range; save it as an 8-bit or 16-bit image")
            return np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}") from None


def _png_header(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) of a PNG file, or None for another format."""
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError as err:
        raise DataError(f"cannot read label {path}: {err}") from None
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _read_label_ids(path: Path, kind: str) -> np.ndarray:
    """The raw ids stored in a label file (first channel of a multi-channel SYNTHIA label).

    Shape:
        returns (H, W) integer array (uint8, uint16 or int32)
    """
    header = _png_header(path)
    multi_channel_16_bit = header is not None and header[0] == 16 and header[1] != _PNG_GRAY
    if multi_channel_16_bit:
        if kind != "synthia":
            raise DataError(
                f"label {path} is a 16-bit multi-channel PNG; expected single-channel ids"
            )
        try:
            return decode_png(path.read_bytes())[:, :, 0]
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read label {path}: {err}") from None
    try:
        with Image.open(path) as im:
            mode = im.mode
            ids = np.array(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read label {path}: {err}") from None
    if ids.ndim == 3 and kind == "synthia":
        ids = ids[:, :, 0]
    if ids.ndim != 2 or ids.dtype.kind not in "uib":
        raise DataError(
            f"label {path} has image mode {mode}; expected single-channel integer ids "
            "(a colour-coded label is not a label-id map)"
        )
    if ids.dtype.kind == "b":
        ids = ids.astype(np.uint8)
    return ids


def check_label_values(label: np.ndarray, num_classes: int, path: Path) -> None:
    """DataError naming ``path`` and the bad values if ``label`` has any value outside
    0..num_classes-1 other than ignore.

    Shape:
        label: (H, W) uint8
    """
    counts = np.bincount(label.ravel(), minlength=256)
    counts[:num_classes] = 0
    counts[IGNORE_INDEX] = 0
    bad = np.nonzero(counts)[0]
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if bad.size > 10 else "")
        raise DataError(
            f"label {path} has values {shown} outside classes 0..{num_classes - 1} "
            f"and ignore {IGNORE_INDEX}"
        )


def read_label(path: Path, kind: str, num_classes: int | None = None) -> np.ndarray:
    """A label file as train ids (class indices for ``folder``), 255 = ignore.

    With ``num_classes`` = K, any value outside 0..K-1 other than 255 is a DataError.

    Shape:
        returns (H, W) uint8
    """
    _check_kind(kind)
    path = Path(path)
    ids = _read_label_ids(path, kind)
    table = ID_TO_TRAIN_ID[kind]
    if table is not None:
        label = map_ids(ids, table)
    else:
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise DataError(
                f"label {path} has values outside 0..255 (min {ids.min()}, max {ids.max()})"
            )
        label = ids.astype(np.uint8)
    if num_classes is not None:
        check_label_values(label, num_classes, path)
    return label


def size_mismatch_message(
    sample: Sample, image_hw: tuple[int, ...], label_hw: tuple[int, ...]
) -> str:
    """The one-line description of an image/label size mismatch."""
    (h, w), (lh, lw) = image_hw[:2], label_hw[:2]
    return f"label {sample.label} is {lw}x{lh} but image {sample.image} is {w}x{h}"


def read_pair(
    sample: Sample, kind: str, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """An image and its label (None for an unlabelled sample), the same size.

    A gta5 label of another size is resized with nearest neighbour (with a
    :class:`LabelResizedWarning`); for other kinds a size mismatch is a DataError.

    Shape:
        returns (H, W, 3) uint8, (H, W) uint8
    """
    image = read_image(sample.image)
    if sample.label is None:
        return image, None
    label = read_label(sample.label, kind, num_classes)
    if label.shape != image.shape[:2]:
        message = size_mismatch_message(sample, image.shape, label.shape)
        if kind != "gta5":
            raise DataError(message)
        warnings.warn(f"{message}: resized with nearest", LabelResizedWarning, stacklevel=2)
        height, width = image.shape[:2]
        label = np.array(Image.fromarray(label).resize((width, height), Image.Resampling.NEAREST))
    return image, label


# ---------------------------------------------------------------------------- classes


def _classes_json_error(path: Path, what: str) -> DataError:
    return DataError(f"malformed {path}: {what}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def class_info(kind: str, root: Path | str) -> ClassInfo:
    """The class set of a domain: ``ROOT/classes.json`` for ``folder``, else Cityscapes'.

    Folder labels must mark ignored pixels with 255, as every bida label does; a
    classes.json ``ignore_index`` other than 255 is therefore rejected.
    """
    _check_kind(kind)
    if kind != "folder":
        return CITYSCAPES
    path = Path(root) / "classes.json"
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"missing {path}: a folder domain lists its classes there") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise _classes_json_error(path, f"invalid JSON ({err})") from None
    if not isinstance(spec, dict):
        raise _classes_json_error(path, "expected a JSON object with a 'classes' list")
    unknown = sorted(set(spec) - _CLASSES_JSON_KEYS)
    if unknown:
        raise _classes_json_error(
            path, f"unknown key(s) {', '.join(unknown)}; allowed: classes, palette, ignore_index"
        )

    names = spec.get("classes")
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise _classes_json_error(path, "'classes' must be a list of non-empty strings")
    if not 1 <= len(names) <= IGNORE_INDEX:
        raise _classes_json_error(
            path, f"'classes' must hold 1..{IGNORE_INDEX} names, got {len(names)}"
        )
    if len(set(names)) != len(names):
        raise _classes_json_error(path, "'classes' has duplicate names")

    ignore_index = spec.get("ignore_index", IGNORE_INDEX)
    if not _is_int(ignore_index):
        raise _classes_json_error(path, f"'ignore_index' must be an integer, got {ignore_index!r}")
    if ignore_index != IGNORE_INDEX:
        raise _classes_json_error(
            path,
            f"'ignore_index' is {ignore_index}; folder labels must mark ignored pixels with 255",
        )

    palette = spec.get("palette")
    if palette is None:
        colors = default_palette(len(names))
    else:
        valid = isinstance(palette, list) and all(
            isinstance(c, list) and len(c) == 3 and all(_is_int(v) and 0 <= v <= 255 for v in c)
            for c in palette
        )
        if not valid:
            raise _classes_json_error(
                path, "'palette' must be a list of [r, g, b] with ints 0..255"
            )
        if len(palette) != len(names):
            raise _classes_json_error(
                path, f"'palette' has {len(palette)} colours for {len(names)} classes"
            )
        colors = tuple((c[0], c[1], c[2]) for c in palette)
    return ClassInfo(names=tuple(names), palette=colors, ignore_index=IGNORE_INDEX)


# ------------------------------------------------------------------------ PNG decoder


def _png_chunks(data: bytes) -> tuple[bytes, bytes]:
    """(IHDR payload, concatenated IDAT payloads), checking signature and CRCs."""
    if data[:8] != _PNG_SIGNATURE:
        raise ValueError("not a PNG file")
    pos, header, idat = 8, b"", []
    while True:
        if pos + 8 > len(data):
            raise ValueError("truncated PNG (no IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        shown = kind.decode("latin-1")
        end = pos + 12 + length
        if end > len(data):
            raise ValueError(f"truncated PNG ({shown!r} chunk cut short)")
        payload = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(kind + payload) != crc:
            raise ValueError(f"corrupt PNG ({shown!r} chunk fails its CRC)")
        if kind == b"IHDR":
            header = payload
        elif kind == b"IDAT":
            idat.append(payload)
        elif kind == b"IEND":
            break
        pos = end
    if len(header) != 13:
        raise ValueError("PNG without a valid IHDR chunk")
    return header, b"".join(idat)


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """PNG Paeth predictor on int16 arrays: the neighbour closest to a + b - c."""
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _unfilter_rowwise(filtered: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """Undo filters None/Sub/Up, each row vectorised (Sub is a per-byte-lane cumsum).

    Shape:
        filtered: (H, W, bpp) uint8; filters: (H,); returns (H, W, bpp) uint8
    """
    out = np.empty_like(filtered)
    prior = np.zeros_like(filtered[0])
    for row, kind in enumerate(filters):
        if kind == 0:
            out[row] = filtered[row]
        elif kind == 1:
            out[row] = np.cumsum(filtered[row], axis=0, dtype=np.uint8)  # wraps mod 256
        else:
            out[row] = filtered[row] + prior
        prior = out[row]
    return out


def _unfilter_wavefront(filtered: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """Undo any mix of the five PNG filters.

    Average and Paeth make each pixel depend on its left, upper and upper-left
    neighbours, so pixels are reconstructed one anti-diagonal (row + column = d) at a
    time: H + W - 1 vectorised steps instead of H * W scalar ones.

    Shape:
        filtered: (H, W, bpp) uint8; filters: (H,); returns (H, W, bpp) uint8
    """
    height, width, bpp = filtered.shape
    recon = np.zeros((height + 1, width + 1, bpp), dtype=np.int16)  # zero row/column = outside
    source = filtered.astype(np.int16)
    for d in range(height + width - 1):
        rows = np.arange(max(0, d - width + 1), min(height - 1, d) + 1)
        cols = d - rows
        a, b, c = recon[rows + 1, cols], recon[rows, cols + 1], recon[rows, cols]
        kind = filters[rows][:, None]
        prediction = np.select(
            [kind == 1, kind == 2, kind == 3, kind == 4],
            [a, b, (a + b) >> 1, _paeth(a, b, c)],
            default=0,
        )
        recon[rows + 1, cols + 1] = (source[rows, cols] + prediction) & 0xFF
    return recon[1:, 1:].astype(np.uint8)


def decode_png(data: bytes) -> np.ndarray:
    """Decode a non-interlaced 8- or 16-bit grey/grey+alpha/RGB/RGBA PNG, losslessly.

    Used for 16-bit multi-channel labels, which Pillow reduces to their high byte.
    Raises ValueError for anything malformed or unsupported.

    Shape:
        returns (H, W, C) uint8 or uint16, C = 1, 2, 3 or 4
    """
    header, compressed = _png_chunks(data)
    width, height, depth, color, compression, filter_method, interlace = struct.unpack(
        ">IIBBBBB", header
    )
    if color not in _PNG_CHANNELS or depth not in (8, 16):
        raise ValueError(f"unsupported PNG (colour type {color}, bit depth {depth})")
    if compression != 0 or filter_method != 0 or interlace != 0:
        raise ValueError("unsupported PNG (interlaced or non-standard compression/filter)")
    if width == 0 or height == 0:
        raise ValueError("PNG with zero width or height")
    channels = _PNG_CHANNELS[color]
    bpp = channels * depth // 8
    try:
        raw = zlib.decompress(compressed)
    except zlib.error as err:
        raise ValueError(f"corrupt PNG image data ({err})") from None
    stride = 1 + width * bpp
    if len(raw) != height * stride:
        raise ValueError(f"PNG image data has {len(raw)} bytes, expected {height * stride}")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride)
    filters = rows[:, 0]
    if filters.max() > 4:
        raise ValueError(f"PNG row filter {filters.max()} is not one of 0..4")
    filtered = rows[:, 1:].reshape(height, width, bpp)
    if filters.max() <= 2:
        pixels = _unfilter_rowwise(filtered, filters)
    else:
        pixels = _unfilter_wavefront(filtered, filters)
    if depth == 8:
        return pixels.reshape(height, width, channels)
    return pixels.reshape(height, width, channels, 2).view(">u2")[..., 0].astype(np.uint16)
