"""The synthetic pair's scene layout: which class is where, before any colour.

:func:`_layout` draws a street scene (road, sidewalks, buildings, vegetation, poles,
signs, people and cars, with their detail parts) into a :class:`_Canvas` of class ids;
the two domains share it and differ in their rendering (:mod:`bida.data.synthetic_render`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..labels import IGNORE_INDEX


# Cityscapes train ids used by the generator.
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN = 0, 1, 2, 3, 4, 5, 6, 7
VEGETATION, TERRAIN, SKY, PERSON, CAR = 8, 9, 10, 11, 13
UNLABELLED = IGNORE_INDEX


# Detail codes: parts of an object that are drawn in their own colour but keep
# the object's label (lane markings are road, windows are car, ...).
_D_NONE, _D_MARKING, _D_GLASS, _D_WHEEL, _D_SKIN, _D_LAMP, _D_TRUNK = range(7)


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
