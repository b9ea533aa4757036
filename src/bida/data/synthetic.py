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
from PIL import Image

from ..checkpoint import pid_alive
from ..errors import ConfigError, DataError
from .synthetic_render import render_scene

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
