"""The synthetic pair's rendering: the source and target styles of a scene layout.

:func:`render_scene` lays out a scene (:mod:`bida.data.synthetic_layout`) and paints it in
the flat colours of the source domain or the textured, shifted ones of the target.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter

from .synthetic_layout import (
    _D_GLASS, _D_LAMP, _D_MARKING, _D_SKIN, _D_TRUNK, _D_WHEEL, _LAYOUT, BUILDING, CAR, FENCE, LIGHT, PERSON, POLE, ROAD,
    SIDEWALK, SIGN, SKY, TERRAIN, UNLABELLED, VEGETATION, WALL, _Canvas, _layout,
)

if TYPE_CHECKING:
    from .synthetic import SyntheticSpec


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
