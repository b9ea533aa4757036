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

import json
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from bida.errors import DataError
from .listing import Sample, _check_kind
from .png import _PNG_GRAY, _PNG_SIGNATURE, decode_png
from ..labels import (
    CITYSCAPES,
    CITYSCAPES_ID_TO_TRAIN_ID,
    IGNORE_INDEX,
    SYNTHIA_ID_TO_TRAIN_ID,
    ClassInfo,
    default_palette,
    map_ids,
)


# Raw label id -> train id table of each kind; folder labels are class indices already.
ID_TO_TRAIN_ID: dict[str, np.ndarray | None] = {
    "gta5": CITYSCAPES_ID_TO_TRAIN_ID,
    "synthia": SYNTHIA_ID_TO_TRAIN_ID,
    "cityscapes": CITYSCAPES_ID_TO_TRAIN_ID,
    "folder": None,
}

_CLASSES_JSON_KEYS = {"classes", "palette", "ignore_index"}


class LabelResizedWarning(UserWarning):
    """A label whose size differed from its image was resized with nearest neighbour."""


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
