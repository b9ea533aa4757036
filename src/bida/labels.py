"""Class names, palettes and label-id lookup tables, declared once as data.

Every dataset stores its own label ids; training and evaluation use the 19 Cityscapes
*train ids* (0..18) with 255 as ignore. A mapping is a 256-entry ``uint8`` lookup table
``table[raw_id] -> train_id`` applied with :func:`map_ids`, so a label of any size is
converted with one indexing operation.

SYNTHIA is evaluated on subsets of the 19 classes: ``SYNTHIA_16_CLASSES`` (no terrain,
truck, train, which SYNTHIA does not label) and ``SYNTHIA_13_CLASSES`` (also no wall,
fence, pole).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255

Color = tuple[int, int, int]

# train id order = row order: (name, Cityscapes label id, official colour).
# GTA5 labels use the Cityscapes label ids, so this table serves both.
_CITYSCAPES_TABLE: tuple[tuple[str, int, Color], ...] = (
    ("road", 7, (128, 64, 128)),
    ("sidewalk", 8, (244, 35, 232)),
    ("building", 11, (70, 70, 70)),
    ("wall", 12, (102, 102, 156)),
    ("fence", 13, (190, 153, 153)),
    ("pole", 17, (153, 153, 153)),
    ("traffic light", 19, (250, 170, 30)),
    ("traffic sign", 20, (220, 220, 0)),
    ("vegetation", 21, (107, 142, 35)),
    ("terrain", 22, (152, 251, 152)),
    ("sky", 23, (70, 130, 180)),
    ("person", 24, (220, 20, 60)),
    ("rider", 25, (255, 0, 0)),
    ("car", 26, (0, 0, 142)),
    ("truck", 27, (0, 0, 70)),
    ("bus", 28, (0, 60, 100)),
    ("train", 31, (0, 80, 100)),
    ("motorcycle", 32, (0, 0, 230)),
    ("bicycle", 33, (119, 11, 32)),
)

# SYNTHIA-RAND-CITYSCAPES GT/LABELS class id (first channel of the 16-bit PNG) -> train id,
# following the dataset README's class list. SYNTHIA's terrain (16), truck (18) and
# train (20) ids are (almost) never used, so the 16-class protocol leaves them ignored,
# as do void (0), parking-slot (13), road-work (14) and lane-marking (22).
_SYNTHIA_TO_TRAIN_ID: dict[int, int] = {
    3: 0,  # road
    4: 1,  # sidewalk
    2: 2,  # building
    21: 3,  # wall
    5: 4,  # fence
    7: 5,  # pole
    15: 6,  # traffic light
    9: 7,  # traffic sign
    6: 8,  # vegetation
    1: 10,  # sky
    10: 11,  # pedestrian -> person
    17: 12,  # rider
    8: 13,  # car
    19: 15,  # bus
    12: 17,  # motorcycle
    11: 18,  # bicycle
}


def lookup_table(mapping: Mapping[int, int]) -> np.ndarray:
    """A read-only 256-entry ``uint8`` table: ``mapping`` where given, else ignore.

    Shape:
        returns (256,) uint8
    """
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for raw_id, train_id in mapping.items():
        table[raw_id] = train_id
    table.flags.writeable = False  # shared module constant: nobody may patch it in place
    return table


def map_ids(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Raw label ids -> train ids through a 256-entry table; ids outside 0..255 -> ignore.

    Shape:
        ids: (H, W) any integer dtype; table: (256,) uint8; returns (H, W) uint8
    """
    if ids.dtype == np.uint8:
        return table[ids]
    in_range = (ids >= 0) & (ids < 256)
    return np.where(in_range, table[np.where(in_range, ids, 0)], IGNORE_INDEX).astype(np.uint8)


CITYSCAPES_CLASSES: tuple[str, ...] = tuple(name for name, _, _ in _CITYSCAPES_TABLE)
CITYSCAPES_PALETTE: tuple[Color, ...] = tuple(color for _, _, color in _CITYSCAPES_TABLE)
CITYSCAPES_ID_TO_TRAIN_ID = lookup_table(
    {label_id: train_id for train_id, (_, label_id, _) in enumerate(_CITYSCAPES_TABLE)}
)
SYNTHIA_ID_TO_TRAIN_ID = lookup_table(_SYNTHIA_TO_TRAIN_ID)

_TERRAIN, _TRUCK, _TRAIN, _WALL, _FENCE, _POLE = 9, 14, 16, 3, 4, 5
SYNTHIA_16_CLASSES: tuple[int, ...] = tuple(
    c for c in range(len(CITYSCAPES_CLASSES)) if c not in (_TERRAIN, _TRUCK, _TRAIN)
)
SYNTHIA_13_CLASSES: tuple[int, ...] = tuple(
    c for c in SYNTHIA_16_CLASSES if c not in (_WALL, _FENCE, _POLE)
)


@dataclass(frozen=True)
class ClassInfo:
    """The class set of a domain: names in class-index order, colours, ignore value."""

    names: tuple[str, ...]
    palette: tuple[Color, ...]
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.names)


CITYSCAPES = ClassInfo(names=CITYSCAPES_CLASSES, palette=CITYSCAPES_PALETTE)


def _interleaved_colors() -> Iterator[Color]:
    """Distinct colours: the bits of 1, 2, 3, ... dealt round-robin to r, g, b, high bit first.

    Consecutive indices land far apart in colour space; every index below 2**24 gives a
    different colour.
    """
    for index in range(1, 2**24):
        rgb = [0, 0, 0]
        bits = index
        for bit in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= (bits & 1) << bit
                bits >>= 1
        yield (rgb[0], rgb[1], rgb[2])


def default_palette(n: int) -> tuple[Color, ...]:
    """``n`` distinct colours: the Cityscapes palette first, then generated ones.

    Black is never used, since :func:`colorize` paints ignored pixels black.
    """
    if n < 0:
        raise ValueError(f"default_palette needs n >= 0, got {n}")
    colors = list(CITYSCAPES_PALETTE[:n])
    used = set(colors) | {(0, 0, 0)}
    extra = _interleaved_colors()
    while len(colors) < n:
        color = next(extra)
        if color not in used:
            used.add(color)
            colors.append(color)
    return tuple(colors)


def colorize(label: np.ndarray, palette: Sequence[Color]) -> np.ndarray:
    """Paint a class-index map: class c gets ``palette[c]``; ignore (and any index
    without a colour) is black.

    Shape:
        label: (H, W) uint8; returns (H, W, 3) uint8
    """
    if label.ndim != 2 or label.dtype != np.uint8:
        raise ValueError(f"colorize expects an (H, W) uint8 label, got {label.shape} {label.dtype}")
    if len(palette) > IGNORE_INDEX:
        raise ValueError(f"a palette has at most {IGNORE_INDEX} colours, got {len(palette)}")
    table = np.zeros((256, 3), dtype=np.uint8)
    if len(palette):
        table[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    return table[label]
