"""An embedded synthetic domain pair: procedural street scenes in two styles.

Every bida command defaults to this data set so that domain adaptation can be
watched working on a laptop CPU in minutes with nothing to download.  A scene is
laid out in a tiny perspective "world" (a flat ground plane seen from a camera
one unit above it) and then rendered in one of two styles:

``source`` ("game engine")
    flat, saturated per-class colours, hard edges, no noise; the labels are
    used for training.
``target`` ("real camera")
    a different, duller palette (grey sky, dark olive vegetation, lighter
    road, ...), per-class textures (window grids, tiles, stripes, foliage
    noise, clouds), an illumination gradient, a global colour cast, lens blur
    and sensor noise; object sizes and frequencies differ too (more persons
    and poles, smaller cars).  Its labels are written but are meant only for
    validation.

Layout cues (sky on top, road at the bottom converging to a vanishing point,
buildings as facades along the street, thin vertical poles carrying signs,
cars as boxes on the road, persons as small upright blobs on the sidewalks)
are shared by both domains, so the colour/texture gap is real but can be
bridged by self-training.

The data set is written on first use to ``default_cache_dir()`` in the bida
folder-domain layout::

    ROOT/manifest.json
    ROOT/{source,target}/classes.json
    ROOT/{source,target}/images/{train,val,test}/NAME.png   (RGB)
    ROOT/{source,target}/labels/{train,val,test}/NAME.png   (L, Cityscapes train ids, 255 = ignore)

Image ``i`` of split ``s`` of domain ``d`` is drawn from
``np.random.default_rng([seed, d, s, i])``, so the result is deterministic and
does not depend on generation order. The ``test`` split (``num_test`` images, none by
default) has its own stream (``s = 2``): adding test images changes no train or val
image, and a pair without test images keeps the cache name it always had.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ..checkpoint import pid_alive
from ..errors import ConfigError, DataError

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_PALETTE",
    "DOMAINS",
    "GENERATOR_VERSION",
    "IGNORE_INDEX",
    "SPLITS",
    "SyntheticSpec",
    "default_cache_dir",
    "ensure_synthetic",
    "render_scene",
]

log = logging.getLogger(__name__)

#: Bumped whenever the generator's output changes, so old caches are not reused.
GENERATOR_VERSION = 3

IGNORE_INDEX = 255

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)

CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

DOMAINS: tuple[str, ...] = ("source", "target")
SPLITS: tuple[str, ...] = ("train", "val", "test")  # generation stream s = position here

# Cityscapes train ids used by the generator.
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN = 0, 1, 2, 3, 4, 5, 6, 7
VEGETATION, TERRAIN, SKY, PERSON, CAR = 8, 9, 10, 11, 13
UNLABELLED = IGNORE_INDEX

# Detail codes: parts of an object that are drawn in their own colour but keep
# the object's label (lane markings are road, windows are car, ...).
_D_NONE, _D_MARKING, _D_GLASS, _D_WHEEL, _D_SKIN, _D_LAMP, _D_TRUNK = range(7)


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of the synthetic domain pair (the cache key)."""

    num_train: int = 200  # per domain
    num_val: int = 60  # per domain
    height: int = 64
    width: int = 128
    seed: int = 0
    num_test: int = 0  # per domain; last, so that positional construction keeps its meaning

    def __post_init__(self) -> None:
        for name in ("num_train", "num_val", "num_test", "height", "width", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"synthetic.{name} must be an integer, got {value!r}")
        if self.num_train < 1:
            raise ConfigError(f"synthetic.num_train must be >= 1, got {self.num_train}")
        if self.num_val < 0:
            raise ConfigError(f"synthetic.num_val must be >= 0, got {self.num_val}")
        if self.num_test < 0:
            raise ConfigError(f"synthetic.num_test must be >= 0, got {self.num_test}")
        if self.height < 16 or self.width < 16:
            raise ConfigError(
                f"synthetic images must be at least 16x16, got {self.height}x{self.width}"
            )
        if self.height > 4096 or self.width > 4096:
            raise ConfigError(
                f"synthetic images must be at most 4096x4096, got {self.height}x{self.width}"
            )
        if self.seed < 0:
            raise ConfigError(f"synthetic.seed must be >= 0, got {self.seed}")


def default_cache_dir() -> Path:
    """``$BIDA_CACHE`` if set, else ``~/.cache/bida``."""
    env = os.environ.get("BIDA_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "bida"


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _LayoutParams:
    """Per-domain layout distribution (object sizes and frequencies)."""

    persons: float  # Poisson mean
    poles: float
    cars: float
    trees: float
    car_scale: tuple[float, float]
    person_scale: tuple[float, float]
    pole_height: tuple[float, float]
    building_height: tuple[float, float]
    sidewalk_width: tuple[float, float]
    unlabelled_p: float


_LAYOUT = {
    "source": _LayoutParams(
        persons=1.5, poles=2.0, cars=2.2, trees=1.5,
        car_scale=(1.0, 1.2), person_scale=(1.0, 1.15), pole_height=(3.0, 4.5),
        building_height=(3.0, 8.0), sidewalk_width=(0.7, 1.3), unlabelled_p=0.25,
    ),
    "target": _LayoutParams(
        persons=3.5, poles=4.0, cars=2.6, trees=2.0,
        car_scale=(0.75, 0.95), person_scale=(0.85, 1.05), pole_height=(3.5, 5.5),
        building_height=(4.0, 10.0), sidewalk_width=(0.5, 1.1), unlabelled_p=0.4,
    ),
}


class _Canvas:
    """Label, instance and detail maps plus the projection of the scene's world.

    World units are camera heights.  ``t`` is inverse depth (t = 1 at the
    bottom image row on the ground), ``u`` the lateral offset, ``z`` the height
    above ground.  A point (u, t, z) projects to
    ``x = vx + u * t * S`` and ``y = hz + S * t * (1 - z)`` with ``S`` the
    number of pixels between horizon and bottom row.
    """

    def __init__(self, height: int, width: int, horizon: float, vanish: float) -> None:
        self.h, self.w = height, width
        self.hz = horizon * height
        self.vx = vanish * width
        self.S = height - self.hz
        self.label = np.full((height, width), SKY, np.uint8)
        self.inst = np.zeros((height, width), np.int32)
        self.detail = np.zeros((height, width), np.uint8)
        self.classes: list[int] = [SKY]  # class of each instance id
        self.ys = np.arange(height, dtype=np.float32)[:, None] + 0.5
        self.xs = np.arange(width, dtype=np.float32)[None, :] + 0.5

    def new(self, cls: int) -> int:
        self.classes.append(cls)
        return len(self.classes) - 1

    def px(self, u: float, t: float) -> float:
        return self.vx + u * t * self.S

    def py(self, z: float, t: float) -> float:
        return self.hz + self.S * t * (1.0 - z)

    def _slices(self, x0: float, x1: float, y0: float, y1: float):
        """Pixel slices covering [x0, x1) x [y0, y1); at least one pixel wide/high."""
        ix0, ix1 = int(round(x0)), int(round(x1))
        iy0, iy1 = int(round(y0)), int(round(y1))
        if ix1 <= ix0:
            ix0 = int(np.floor((x0 + x1) / 2))
            ix1 = ix0 + 1
        if iy1 <= iy0:
            iy0 = int(np.floor((y0 + y1) / 2))
            iy1 = iy0 + 1
        ix0, ix1 = max(ix0, 0), min(ix1, self.w)
        iy0, iy1 = max(iy0, 0), min(iy1, self.h)
        if ix1 <= ix0 or iy1 <= iy0:
            return None
        return slice(iy0, iy1), slice(ix0, ix1)

    def rect(self, x0, x1, y0, y1, cls, iid, detail=_D_NONE) -> None:
        sl = self._slices(x0, x1, y0, y1)
        if sl is None:
            return
        if cls is not None:
            self.label[sl] = cls
            self.inst[sl] = iid
        self.detail[sl] = detail

    def ellipse(self, cx, cy, rx, ry, cls, iid, detail=_D_NONE) -> None:
        rx, ry = max(rx, 0.5), max(ry, 0.5)
        sl = self._slices(cx - rx, cx + rx, cy - ry, cy + ry)
        if sl is None:
            return
        m = ((self.xs[:, sl[1]] - cx) / rx) ** 2 + ((self.ys[sl[0]] - cy) / ry) ** 2 <= 1.0
        if cls is not None:
            self.label[sl][m] = cls
            self.inst[sl][m] = iid
        self.detail[sl][m] = detail

    def mask(self, m: np.ndarray, cls: int, iid: int, detail=_D_NONE) -> None:
        self.label[m] = cls
        self.inst[m] = iid
        self.detail[m] = detail

    # ---- world-space primitives
    def box(self, u, t, width, z0, z1, cls, iid, detail=_D_NONE) -> None:
        self.rect(self.px(u - width / 2, t), self.px(u + width / 2, t),
                  self.py(z1, t), self.py(z0, t), cls, iid, detail)

    def blob(self, u, t, rx, zc, rz, cls, iid, detail=_D_NONE) -> None:
        self.ellipse(self.px(u, t), self.py(zc, t), rx * t * self.S, rz * t * self.S,
                     cls, iid, detail)

    def facade(self, u_f, t0, t1, z0, z1, cls, iid, detail=_D_NONE) -> None:
        """A vertical plane at lateral offset ``u_f`` between inverse depths t0 < t1."""
        x_a, x_b = self.px(u_f, t0), self.px(u_f, t1)
        lo, hi = max(int(np.floor(min(x_a, x_b))), 0), min(int(np.ceil(max(x_a, x_b))) + 1, self.w)
        if hi <= lo:
            return
        xs = self.xs[:, lo:hi]
        t = (xs - self.vx) / (u_f * self.S)
        ok = (t >= t0) & (t <= t1)
        top = self.hz + self.S * t * (1.0 - z1)
        bot = self.hz + self.S * t * (1.0 - z0)
        m = ok & (self.ys >= top) & (self.ys < bot)
        if not m.any():
            return
        sub = (slice(None), slice(lo, hi))
        if cls is not None:
            self.label[sub][m] = cls
            self.inst[sub][m] = iid
        self.detail[sub][m] = detail


def _layout(rng: np.random.Generator, height: int, width: int, style: str) -> _Canvas:
    """Draw one scene's geometry (labels, instances, details)."""
    P = _LAYOUT[style]
    U = rng.uniform
    c = _Canvas(height, width, horizon=U(0.36, 0.5), vanish=U(0.38, 0.62))

    # --- far background along the horizon: buildings, some trees, gaps of sky
    x = -U(0.0, 0.1) * width
    while x < width:
        seg = U(0.12, 0.5) * height
        kind = rng.random()
        top = c.hz - U(0.04, 0.28) * height
        if kind < 0.7:
            c.rect(x, x + seg, top, c.hz + 1, BUILDING, c.new(BUILDING))
        elif kind < 0.88:
            iid = c.new(VEGETATION)
            r = seg / 2
            c.ellipse(x + r, c.hz - 0.3 * r, r, min(r, (c.hz - top) + 1), VEGETATION, iid)
            c.rect(x + 0.1 * seg, x + 0.9 * seg, c.hz - 0.3 * r, c.hz + 1, VEGETATION, iid)
        x += seg

    # --- ground: road, sidewalks, optional terrain strips, fill beyond
    road_l, road_r = -U(1.1, 2.2), U(1.1, 2.2)
    sw_l, sw_r = U(*P.sidewalk_width), U(*P.sidewalk_width)
    ter_l = U(0.6, 2.0) if rng.random() < 0.45 else 0.0
    ter_r = U(0.6, 2.0) if rng.random() < 0.45 else 0.0
    beyond_l = TERRAIN if rng.random() < 0.5 else SIDEWALK
    beyond_r = TERRAIN if rng.random() < 0.5 else SIDEWALK
    below = c.ys > c.hz
    t_img = np.maximum((c.ys - c.hz) / c.S, 1e-3)
    u = (c.xs - c.vx) / (t_img * c.S)
    bands = [
        (u >= road_l) & (u <= road_r), ROAD,
        (u < road_l) & (u >= road_l - sw_l), SIDEWALK,
        (u > road_r) & (u <= road_r + sw_r), SIDEWALK,
        (u < road_l - sw_l) & (u >= road_l - sw_l - ter_l), TERRAIN,
        (u > road_r + sw_r) & (u <= road_r + sw_r + ter_r), TERRAIN,
        u < road_l - sw_l - ter_l, beyond_l,
        u > road_r + sw_r + ter_r, beyond_r,
    ]
    for m, cls in zip(bands[::2], bands[1::2]):
        c.mask(m & below, cls, c.new(cls))
    # lane markings (still road): a dashed centre line
    if rng.random() < 0.8:
        centre = road_l + (road_r - road_l) * U(0.4, 0.6)
        inv_depth = 1.0 / t_img
        dash = (np.floor(inv_depth * U(0.25, 0.4) + U(0, 1)) % 2) == 0
        m = below & (np.abs(u - centre) < 0.06) & dash & (c.label == ROAD)
        c.detail[m] = _D_MARKING
    # rarely a zebra crossing
    if rng.random() < 0.15:
        t0 = U(0.25, 0.6)
        m = below & (c.label == ROAD) & (t_img > t0) & (t_img < t0 * 1.25)
        m &= (np.floor(u / 0.3) % 2) == 0
        c.detail[m] = _D_MARKING

    objects: list[tuple[float, str, tuple]] = []  # (t, kind, params)

    # --- side facades (street canyon), walls/fences along the sidewalk
    for side, edge, sw, ter in ((-1, road_l, sw_l, ter_l), (1, road_r, sw_r, ter_r)):
        outer = edge + side * (sw + ter)
        kind = rng.random()
        if kind < 0.6:  # row of buildings
            d = U(1.0, 4.0)  # depth (1/t) of the nearest building's front
            d_far = U(18.0, 40.0)
            while d < d_far:
                length = U(3.0, 12.0)
                if rng.random() > 0.12:
                    zh = U(*P.building_height)
                    c.facade(outer, 1.0 / (d + length), 1.0 / d, -0.05, zh, BUILDING, c.new(BUILDING))
                d += length
        elif kind < 0.85:  # hedge / park with trees behind the sidewalk
            zh = U(1.2, 3.5)
            c.facade(outer + side * U(0.0, 1.0), U(0.02, 0.06), 6.0, -0.05, zh, VEGETATION,
                     c.new(VEGETATION))
            for _ in range(rng.poisson(3)):
                t = 1.0 / U(1.5, 25.0)
                objects.append((t, "tree", (outer + side * U(0.5, 1.5),)))
        if rng.random() < 0.35:  # low wall or fence between sidewalk and what lies beyond
            cls = WALL if rng.random() < 0.5 else FENCE
            d0 = U(1.0, 5.0)
            d1 = d0 + U(5.0, 30.0)
            c.facade(edge + side * sw, 1.0 / d1, 1.0 / d0, -0.05, U(0.45, 0.9), cls, c.new(cls))

    # --- objects, sorted far to near later
    def depth(lo, hi):  # log-uniform depth: near and far objects equally common
        return float(np.exp(U(np.log(lo), np.log(hi))))

    def side_pick():
        s = -1 if rng.random() < 0.5 else 1
        edge, sw = (road_l, sw_l) if s < 0 else (road_r, sw_r)
        return s, edge, sw

    for _ in range(rng.poisson(P.poles)):
        s, edge, sw = side_pick()
        objects.append((1.0 / depth(1.1, 20.0), "pole", (edge + s * sw * U(0.2, 0.5), s)))
    for _ in range(rng.poisson(P.persons)):
        s, edge, sw = side_pick()
        if rng.random() < 0.12:  # crossing the road
            uu = U(road_l + 0.3, road_r - 0.3)
        else:
            uu = edge + s * sw * U(0.25, 0.85)
        objects.append((1.0 / depth(1.2, 16.0), "person", (uu,)))
    for _ in range(rng.poisson(P.cars)):
        uu = U(road_l + 0.6, road_r - 0.6)
        objects.append((1.0 / depth(1.1, 20.0), "car", (uu,)))
    for _ in range(rng.poisson(P.trees)):
        s, edge, sw = side_pick()
        objects.append((1.0 / depth(1.5, 20.0), "tree", (edge + s * sw * U(0.5, 1.0),)))
    if rng.random() < P.unlabelled_p:
        s, edge, sw = side_pick()
        objects.append((1.0 / depth(1.2, 10.0), "thing", (edge + s * sw * U(0.3, 0.8),)))

    objects.sort(key=lambda o: o[0])
    for t, kind, p in objects:
        if kind == "pole":
            uu, s = p
            zh = U(*P.pole_height)
            iid = c.new(POLE)
            c.box(uu, t, 0.12, 0.0, zh, POLE, iid)
            r = rng.random()
            if r < 0.55:  # traffic sign, plate or disc, hanging towards the road
                sid = c.new(SIGN)
                size = U(0.4, 0.7)
                off = -s * size * 0.5 if rng.random() < 0.6 else 0.0
                zc = zh - U(0.3, 1.2)
                if rng.random() < 0.5:
                    c.box(uu + off, t, size, zc - size / 2, zc + size / 2, SIGN, sid)
                else:
                    c.blob(uu + off, t, size / 2, zc, size / 2, SIGN, sid)
            elif r < 0.8:  # traffic light with a lit lamp
                lid = c.new(LIGHT)
                zc = zh - U(0.2, 0.8)
                c.box(uu, t, 0.35, zc - 0.5, zc + 0.5, LIGHT, lid)
                lamp = rng.integers(3)
                lz = zc + 0.3 - 0.3 * lamp  # red, amber or green, inside the housing
                c.box(uu, t, 0.18, lz - 0.1, lz + 0.1, None, 0, _D_LAMP)
            if rng.random() < 0.3:  # street-lamp arm (pole)
                c.box(uu - s * 0.5, t, 1.0, zh - 0.06, zh + 0.02, POLE, iid)
        elif kind == "person":
            (uu,) = p
            sc = U(*P.person_scale)
            iid = c.new(PERSON)
            c.box(uu, t, 0.3 * sc, 0.0, 0.5 * sc, PERSON, iid)
            c.blob(uu, t, 0.24 * sc, 0.72 * sc, 0.28 * sc, PERSON, iid)
            c.blob(uu, t, 0.11 * sc, 1.05 * sc, 0.12 * sc, PERSON, iid, _D_SKIN)
        elif kind == "car":
            (uu,) = p
            sc = U(*P.car_scale)
            iid = c.new(CAR)
            wd = 1.35 * sc
            c.box(uu, t, wd, 0.12 * sc, 0.62 * sc, CAR, iid)
            c.box(uu, t, wd * 0.78, 0.6 * sc, 0.98 * sc, CAR, iid)
            c.box(uu, t, wd * 0.62, 0.64 * sc, 0.92 * sc, CAR, iid, _D_GLASS)
            for sx in (-1, 1):
                c.box(uu + sx * wd * 0.36, t, wd * 0.2, 0.0, 0.14 * sc, CAR, iid, _D_WHEEL)
        elif kind == "tree":
            (uu,) = p
            iid = c.new(VEGETATION)
            trunk = U(1.0, 2.0)
            rx = U(0.7, 1.5)
            c.box(uu, t, 0.16, 0.0, trunk + 0.2, VEGETATION, iid, _D_TRUNK)
            c.blob(uu, t, rx, trunk + rx * 0.8, rx * U(0.9, 1.3), VEGETATION, iid)
        elif kind == "thing":  # unlabelled clutter: bins, boxes, benches
            (uu,) = p
            c.box(uu, t, U(0.4, 0.9), 0.0, U(0.4, 1.0), UNLABELLED, c.new(UNLABELLED))
    return c


# --------------------------------------------------------------------------- styles

# Per style and class: colour alternatives (one is chosen per instance) and the
# per-instance brightness jitter.  RGB in 0..255.
_SOURCE_COLOURS: dict[int, tuple[list[tuple[int, int, int]], float]] = {
    ROAD: ([(72, 72, 88)], 0.04),
    SIDEWALK: ([(232, 150, 110)], 0.04),
    BUILDING: ([(205, 105, 65), (215, 185, 115), (150, 95, 170)], 0.08),
    WALL: ([(165, 170, 225)], 0.05),
    FENCE: ([(235, 205, 50)], 0.05),
    POLE: ([(40, 40, 52)], 0.05),
    LIGHT: ([(25, 25, 25)], 0.05),
    SIGN: ([(25, 90, 250), (240, 40, 40)], 0.05),
    VEGETATION: ([(25, 185, 45)], 0.06),
    TERRAIN: ([(165, 220, 55)], 0.05),
    SKY: ([(85, 170, 250)], 0.03),
    PERSON: ([(230, 35, 60), (40, 60, 225), (250, 200, 35)], 0.06),
    CAR: ([(220, 25, 30), (30, 70, 225), (245, 225, 30), (235, 235, 235), (30, 30, 30)], 0.05),
}
_SOURCE_DETAILS = {
    _D_MARKING: (250, 250, 250), _D_GLASS: (70, 210, 245), _D_WHEEL: (15, 15, 15),
    _D_SKIN: (245, 190, 150), _D_LAMP: (255, 60, 20), _D_TRUNK: (120, 70, 30),
}

_TARGET_COLOURS: dict[int, tuple[list[tuple[int, int, int]], float]] = {
    ROAD: ([(118, 115, 114)], 0.08),
    SIDEWALK: ([(184, 160, 140)], 0.07),
    BUILDING: ([(150, 104, 82), (170, 152, 122), (112, 100, 124)], 0.12),
    WALL: ([(150, 150, 178)], 0.08),
    FENCE: ([(164, 144, 72)], 0.08),
    POLE: ([(84, 84, 90)], 0.1),
    LIGHT: ([(36, 36, 30)], 0.1),
    SIGN: ([(40, 90, 180), (196, 60, 50)], 0.08),
    VEGETATION: ([(68, 112, 40)], 0.12),
    TERRAIN: ([(150, 160, 84)], 0.08),
    SKY: ([(140, 176, 214)], 0.05),
    PERSON: ([(150, 44, 58), (54, 64, 130), (170, 146, 52), (50, 50, 60)], 0.12),
    CAR: ([(160, 40, 40), (48, 68, 146), (180, 168, 66), (200, 200, 204), (40, 40, 46)], 0.08),
}
_TARGET_DETAILS = {
    _D_MARKING: (212, 212, 200), _D_GLASS: (42, 52, 62), _D_WHEEL: (14, 14, 14),
    _D_SKIN: (200, 158, 128), _D_LAMP: (240, 170, 60), _D_TRUNK: (70, 55, 40),
}


def _instance_colours(rng, classes, table) -> np.ndarray:
    n = len(classes)
    pick = rng.random(n)
    bright = rng.standard_normal(n)
    out = np.empty((n, 3), np.float32)
    for i, cls in enumerate(classes):
        if cls == UNLABELLED:
            out[i] = rng.uniform(30, 220, 3)
            continue
        alts, jit = table[cls]
        base = np.asarray(alts[int(pick[i] * len(alts))], np.float32)
        out[i] = base * (1.0 + jit * bright[i])
    return out


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Zero-mean, unit-ish variance value noise with features about ``cell`` pixels wide."""
    gh, gw = int(np.ceil(h / cell)) + 2, int(np.ceil(w / cell)) + 2
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    yy = (np.arange(h, dtype=np.float32) + 0.5) / cell
    xx = (np.arange(w, dtype=np.float32) + 0.5) / cell
    y0, x0 = yy.astype(np.int64), xx.astype(np.int64)
    fy, fx = (yy - y0)[:, None], (xx - x0)[None, :]
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)
    a = g[y0][:, x0]
    b = g[y0][:, x0 + 1]
    cc = g[y0 + 1][:, x0]
    d = g[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (cc * (1 - fx) + d * fx) * fy


def _render_source(rng: np.random.Generator, c: _Canvas) -> np.ndarray:
    cols = _instance_colours(rng, c.classes, _SOURCE_COLOURS)
    img = cols[c.inst]
    for code, rgb in _SOURCE_DETAILS.items():
        m = c.detail == code
        if m.any():
            img[m] = rgb
    # per-image lighting of the game engine: exposure and a slight tint
    img *= (rng.uniform(0.85, 1.15) * rng.uniform(0.94, 1.06, 3)).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _render_target(rng: np.random.Generator, c: _Canvas) -> np.ndarray:
    H, W = c.h, c.w
    scale = H / 64.0
    cols = _instance_colours(rng, c.classes, _TARGET_COLOURS)
    img = cols[c.inst]
    lab = c.label
    ys = np.arange(H)[:, None]
    xs = np.arange(W)[None, :]
    fine = rng.standard_normal((H, W)).astype(np.float32)
    mid = _smooth_noise(rng, H, W, 2.5 * scale)
    coarse = _smooth_noise(rng, H, W, 14.0 * scale)
    tex = np.ones((H, W), np.float32)

    def mul(cls, field):
        m = lab == cls
        if m.any():
            tex[m] *= np.broadcast_to(np.asarray(field, np.float32), (H, W))[m]

    # sky: brighter towards the horizon, soft clouds
    mul(SKY, 1.0 + 0.1 * (ys / max(c.hz, 1.0)).clip(0, 1) + 0.06 * coarse + 0.04 * mid)
    # buildings: grid of dark windows, weathering
    wp = max(2, int(round(rng.uniform(3.0, 5.0) * scale)))
    hp = max(2, int(round(rng.uniform(3.0, 5.0) * scale)))
    ox, oy = rng.integers(wp), rng.integers(hp)
    windows = (((xs + ox) % wp) < max(1, wp // 2)) & (((ys + oy) % hp) < max(1, hp // 2))
    mul(BUILDING, np.where(windows, 0.72, 1.0) * (1.0 + 0.06 * coarse + 0.05 * fine))
    # road: asphalt grain and patches; sidewalk: paving tiles
    mul(ROAD, 1.0 + 0.07 * fine + 0.08 * coarse + 0.04 * mid)
    tp = max(2, int(round(3 * scale)))
    tiles = ((ys % tp) == 0) | (((xs + (ys // tp) * 2) % (2 * tp)) == 0)
    mul(SIDEWALK, np.where(tiles, 0.87, 1.0) * (1.0 + 0.05 * fine + 0.05 * coarse))
    # vegetation and terrain: foliage blotches
    mul(VEGETATION, np.clip(1.0 + 0.25 * mid + 0.1 * fine + 0.08 * coarse, 0.3, 2.0))
    mul(TERRAIN, 1.0 + 0.18 * mid + 0.08 * fine)
    # fence: vertical slats; wall: plaster
    sp = max(2, int(round(2 * scale)))
    mul(FENCE, np.where((xs % sp) == 0, 0.7, 1.05))
    mul(WALL, 1.0 + 0.08 * mid + 0.05 * fine)
    mul(PERSON, 1.0 + 0.1 * mid)
    mul(CAR, 1.0 + 0.04 * fine)
    img *= tex[..., None]

    for code, rgb in _TARGET_DETAILS.items():
        m = c.detail == code
        if m.any():
            img[m] = np.asarray(rgb, np.float32) * (1.0 + 0.05 * fine[m, None])

    # camera: illumination gradient, exposure, colour cast
    gx, gy = rng.uniform(-0.35, 0.35), rng.uniform(-0.25, 0.25)
    illum = 1.0 + gx * (xs / W - 0.5) + gy * (ys / H - 0.5)
    img *= (illum * rng.uniform(0.8, 1.15))[..., None].astype(np.float32)
    cast = rng.uniform(0.88, 1.12, 3).astype(np.float32)
    img *= cast / cast.mean()
    img = np.clip(img, 0, 255).astype(np.uint8)
    # lens blur then sensor noise
    radius = rng.uniform(0.4, 0.8) * scale
    img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)), np.float32)
    sigma = rng.uniform(2.0, 6.0)
    img += rng.standard_normal((H, W, 1)).astype(np.float32) * sigma
    img += rng.standard_normal((H, W, 3)).astype(np.float32) * (0.4 * sigma)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render_scene(rng: np.random.Generator, spec: SyntheticSpec, style: str) -> tuple[np.ndarray, np.ndarray]:
    """Draw one random scene in ``style`` ("source" or "target").

    Returns an (H, W, 3) uint8 RGB image and an (H, W) uint8 label map of
    Cityscapes train ids (255 = ignore).  The layout distribution depends on
    the style (the target has more persons and poles and smaller cars).
    """
    if style not in _LAYOUT:
        raise ValueError(f"style must be one of {sorted(_LAYOUT)}, got {style!r}")
    canvas = _layout(rng, spec.height, spec.width, style)
    if style == "source":
        image = _render_source(rng, canvas)
    else:
        image = _render_target(rng, canvas)
    return image, canvas.label.copy()


# --------------------------------------------------------------------------- cache


def _split_sizes(spec: SyntheticSpec) -> dict[str, int]:
    return {"train": spec.num_train, "val": spec.num_val, "test": spec.num_test}


def _manifest(spec: SyntheticSpec) -> dict:
    # Without test images the manifest (hence the cache name) is what it was before test splits.
    fields = {k: v for k, v in asdict(spec).items() if k != "num_test" or v}
    splits = {k: v for k, v in _split_sizes(spec).items() if k != "test" or v}
    return {
        "generator": "bida.synthetic",
        "version": GENERATOR_VERSION,
        "spec": fields,
        "domains": list(DOMAINS),
        "splits": splits,
        "name_format": "{index:05d}.png",
        "seeding": "np.random.default_rng([seed, domain_id, split_id, index])",
    }


def _classes_json() -> dict:
    return {
        "classes": list(CITYSCAPES_CLASSES),
        "ignore_index": IGNORE_INDEX,
        "palette": [list(rgb) for rgb in CITYSCAPES_PALETTE],
    }


def _root_name(spec: SyntheticSpec) -> str:
    key = json.dumps(_manifest(spec), sort_keys=True).encode()
    return f"synthetic-{spec.height}x{spec.width}-{hashlib.sha256(key).hexdigest()[:12]}"


def _is_complete(root: Path, manifest: dict) -> bool:
    try:
        stored = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return stored == manifest and all((root / d / "classes.json").is_file() for d in DOMAINS)


def _write_domain(out: Path, spec: SyntheticSpec, domain_id: int, style: str) -> None:
    out.mkdir()
    (out / "classes.json").write_text(json.dumps(_classes_json(), indent=2) + "\n")
    sizes = _split_sizes(spec)
    for split_id, split in enumerate(SPLITS):
        n = sizes[split]
        if split == "test" and n == 0:
            continue
        img_dir = out / "images" / split
        lab_dir = out / "labels" / split
        img_dir.mkdir(parents=True)
        lab_dir.mkdir(parents=True)
        for i in range(n):
            rng = np.random.default_rng([spec.seed, domain_id, split_id, i])
            image, label = render_scene(rng, spec, style)
            name = f"{i:05d}.png"
            Image.fromarray(image, "RGB").save(img_dir / name)
            Image.fromarray(label, "L").save(lab_dir / name)


def _remove_leftovers(cache: Path, name: str) -> None:
    """Remove ``<name>.tmp-<pid>`` / ``.stale-<pid>`` directories of processes that no longer
    exist (killed while generating); a live process's directory is left to it."""
    for path in cache.glob(f"{name}.*-*"):
        kind, _, pid = path.name[len(name) + 1:].partition("-")
        # A live process (another one generating the same data) keeps its directory.
        if kind in ("tmp", "stale") and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def ensure_synthetic(spec: SyntheticSpec = SyntheticSpec(), cache_dir: Path | None = None) -> Path:
    """Return the root of the synthetic domain pair for ``spec``, generating it on first use.

    The root lives under ``cache_dir`` (default: ``default_cache_dir()``) in a
    directory named from a hash of the parameters, and is reused only when its
    ``manifest.json`` matches them exactly.  Generation goes to a temporary
    directory that is renamed into place, so concurrent callers never see a
    half-written data set (when another process wins the race, its copy is used).
    """
    if not isinstance(spec, SyntheticSpec):
        raise ConfigError(f"spec must be a SyntheticSpec, got {type(spec).__name__}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    manifest = _manifest(spec)
    root = cache / _root_name(spec)
    if _is_complete(root, manifest):
        return root
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the synthetic data cache {cache}: {exc} "
                        "(set BIDA_CACHE to a writable directory)") from exc

    tmp = cache / f"{root.name}.tmp-{os.getpid()}"
    log.info("generating synthetic domain pair %s in %s", asdict(spec), root)
    _remove_leftovers(cache, root.name)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for domain_id, style in enumerate(DOMAINS):
            _write_domain(tmp / style, spec, domain_id, style)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if root.exists() and not _is_complete(root, manifest):
            # An incomplete or foreign directory under our name: move it aside, then drop it.
            stale = cache / f"{root.name}.stale-{os.getpid()}"
            try:
                os.rename(root, stale)
                shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass
        try:
            os.rename(tmp, root)
        except OSError:
            if _is_complete(root, manifest):  # another process finished first: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
                return root
            raise
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"cannot write the synthetic data set to {root}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
