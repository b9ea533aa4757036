"""Builders of tiny dataset trees in each real layout, for tests of any module.

Import from a test with ``from fixtures import make_gta5_tree, ...`` (``conftest.py``
puts this directory on ``sys.path``).

Each builder writes under ``root`` and returns a :class:`Tree` holding, per sample name,
the image and the raw label ids it wrote, so tests can check mappings pixel by pixel.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# Raw id -> train id, written out independently of bida.labels from the Cityscapes and
# SYNTHIA-RAND-CITYSCAPES READMEs; every other id is ignore (255).
EXPECTED_CITYSCAPES_TRAIN_IDS = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
EXPECTED_SYNTHIA_TRAIN_IDS = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8,
    1: 10, 10: 11, 17: 12, 8: 13, 19: 15, 12: 17, 11: 18,
}


def expected_train_ids(ids: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    """Reference mapping, one pixel at a time (slow, obviously right)."""
    out = np.empty(ids.shape, np.uint8)
    for index, raw_id in np.ndenumerate(ids):
        out[index] = mapping.get(int(raw_id), 255)
    return out


# Every Cityscapes label id (0..33), ids no dataset uses, and the largest 8-bit value.
CITYSCAPES_RAW_IDS = np.array([*range(34), 34, 100, 254, 255], dtype=np.uint8)
# SYNTHIA ids 0..22 plus 16-bit ids that must map to ignore (256 would alias 0 and
# 258 would alias road if only the low byte were kept).
SYNTHIA_RAW_IDS = np.array([*range(23), 255, 256, 258, 1000, 65535], dtype=np.uint16)


@dataclass
class Tree:
    """What a builder wrote: root, and per sample name the image and raw label ids."""

    root: Path
    images: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (H, W, 3) uint8
    ids: dict[str, np.ndarray] = field(default_factory=dict)  # name -> raw label ids as written
    mismatched: list[str] = field(default_factory=list)  # names whose label size differs


def _chunk(kind: bytes, payload: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + payload))
    return struct.pack(">I", len(payload)) + kind + payload + crc


def _filter_row(row: np.ndarray, prior: np.ndarray, bpp: int, kind: int) -> np.ndarray:
    """Apply PNG filter ``kind`` to one row of bytes (int16 arithmetic, result mod 256)."""
    left = np.concatenate([np.zeros(bpp, np.int16), row[:-bpp]])
    upper_left = np.concatenate([np.zeros(bpp, np.int16), prior[:-bpp]])
    if kind == 0:
        prediction = np.zeros_like(row)
    elif kind == 1:
        prediction = left
    elif kind == 2:
        prediction = prior
    elif kind == 3:
        prediction = (left + prior) >> 1
    else:
        p = left + prior - upper_left
        pa, pb, pc = np.abs(p - left), np.abs(p - prior), np.abs(p - upper_left)
        prediction = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prior, upper_left))
    return ((row - prediction) & 0xFF).astype(np.uint8)


def write_png(path: Path, pixels: np.ndarray, filters: Sequence[int] = (0, 1, 2, 3, 4)) -> None:
    """Write an 8- or 16-bit grey/grey+alpha/RGB/RGBA PNG, which Pillow cannot do for
    16-bit colour. Row r uses filter ``filters[r % len(filters)]``, so a decoder is
    exercised on every filter type.

    Shape:
        pixels: (H, W) or (H, W, C) uint8 or uint16, C in 1..4
    """
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    height, width, channels = pixels.shape
    depth = 8 if pixels.dtype == np.uint8 else 16
    color = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    data = pixels.astype(">u2" if depth == 16 else np.uint8).tobytes()
    rows = np.frombuffer(data, np.uint8).reshape(height, -1).astype(np.int16)
    bpp = channels * depth // 8
    raw = bytearray()
    prior = np.zeros_like(rows[0])
    for r in range(height):
        kind = filters[r % len(filters)]
        raw.append(kind)
        raw += _filter_row(rows[r], prior, bpp, kind).tobytes()
        prior = rows[r]
    header = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(bytes(raw)))
        + _chunk(b"IEND", b"")
    )


def _image(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def _tiled(values: np.ndarray, size: tuple[int, int], shift: int) -> np.ndarray:
    """``values`` repeated over an (H, W) map, rolled by ``shift`` so samples differ."""
    count = size[0] * size[1]
    return np.roll(np.resize(values, count), shift).reshape(size).astype(values.dtype)


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode == "P":  # GTA5 labels are palette PNGs whose indices are the ids
        image = image.convert("L").convert("P")
        image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        image.frombytes(array.tobytes())
    image.save(path)


def make_gta5_tree(
    root: Path, n: int = 3, size: tuple[int, int] = (8, 16), mismatched: int = 1
) -> Tree:
    """GTA5 layout; the last ``mismatched`` labels are twice the image size, built of 2x2
    blocks so that any nearest-neighbour resize gives back ``ids[name]``."""
    rng = np.random.default_rng(5)
    tree = Tree(Path(root))
    for i in range(n):
        name = f"{i + 1:05d}"
        tree.images[name] = _image(rng, size)
        tree.ids[name] = _tiled(CITYSCAPES_RAW_IDS, size, shift=i)
        label = tree.ids[name]
        if i >= n - mismatched:
            label = np.kron(label, np.ones((2, 2), np.uint8))
            tree.mismatched.append(name)
        _save(tree.root / "images" / f"{name}.png", tree.images[name])
        _save(tree.root / "labels" / f"{name}.png", label, mode="P")
    return tree


def make_synthia_tree(
    root: Path, n: int = 3, size: tuple[int, int] = (8, 16), single_channel: bool = False,
    filters: Sequence[int] = (0, 1, 2, 3, 4),
) -> Tree:
    """SYNTHIA-RAND-CITYSCAPES layout with genuine 16-bit PNG labels: RGBA with the class
    id in channel 0 and non-zero instance-like garbage in the others, or (with
    ``single_channel``) 16-bit grey."""
    rng = np.random.default_rng(7)
    tree = Tree(Path(root))
    for i in range(n):
        name = f"{i:07d}"
        tree.images[name] = _image(rng, size)
        ids = _tiled(SYNTHIA_RAW_IDS, size, shift=3 * i)
        tree.ids[name] = ids
        if single_channel:
            label = ids
        else:
            garbage = rng.integers(1, 65536, (*size, 3), dtype=np.uint16)
            label = np.concatenate([ids[:, :, None], garbage], axis=2)
        _save(tree.root / "RGB" / f"{name}.png", tree.images[name])
        write_png(tree.root / "GT" / "LABELS" / f"{name}.png", label, filters)
    return tree


def make_cityscapes_tree(
    root: Path, cities: Sequence[str] = ("aachen", "bochum"), n_per_city: int = 2,
    size: tuple[int, int] = (8, 16), splits: Sequence[str] = ("train", "val"),
    unlabelled_splits: Sequence[str] = (),
) -> Tree:
    """Cityscapes layout; names are ``split/city/stem`` keys of the returned dicts.
    Splits in ``unlabelled_splits`` get no gtFine directory at all. Each label comes
    with a ``_gtFine_color.png`` decoy, as in the real dataset."""
    rng = np.random.default_rng(11)
    tree = Tree(Path(root))
    shift = 0
    for split in splits:
        for city in cities:
            for i in range(n_per_city):
                stem = f"{city}_{i:06d}_000019"
                key = f"{split}/{city}/{stem}"
                tree.images[key] = _image(rng, size)
                image_path = tree.root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"
                _save(image_path, tree.images[key])
                if split in unlabelled_splits:
                    continue
                tree.ids[key] = _tiled(CITYSCAPES_RAW_IDS, size, shift=shift)
                shift += 5
                label_dir = tree.root / "gtFine" / split / city
                _save(label_dir / f"{stem}_gtFine_labelIds.png", tree.ids[key])
                _save(label_dir / f"{stem}_gtFine_color.png", _image(rng, size))
    return tree


def make_folder_tree(
    root: Path, classes: Sequence[str] = ("sky", "tree", "house"), n_train: int = 3,
    n_val: int = 2, size: tuple[int, int] = (8, 12), target_without_train_labels: bool = False,
    palette: Sequence[Sequence[int]] | None = None, n_test: int = 0,
) -> Tree:
    """Folder layout; names are ``split/NAME`` keys. The second train image is a JPEG.
    With ``target_without_train_labels`` there is no ``labels/train`` directory; ``n_test``
    images (and labels) go to ``images/test`` and ``labels/test``."""
    rng = np.random.default_rng(13)
    tree = Tree(Path(root))
    tree.root.mkdir(parents=True, exist_ok=True)
    spec: dict[str, object] = {"classes": list(classes), "ignore_index": 255}
    if palette is not None:
        spec["palette"] = [list(c) for c in palette]
    (tree.root / "classes.json").write_text(json.dumps(spec))
    values = np.array([*range(len(classes)), 255], dtype=np.uint8)
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(count):
            name = f"img_{i:03d}"
            key = f"{split}/{name}"
            tree.images[key] = _image(rng, size)
            suffix = ".jpg" if split == "train" and i == 1 else ".png"
            _save(tree.root / "images" / split / f"{name}{suffix}", tree.images[key])
            if split == "train" and target_without_train_labels:
                continue
            tree.ids[key] = _tiled(values, size, shift=i)
            _save(tree.root / "labels" / split / f"{name}.png", tree.ids[key])
    return tree
