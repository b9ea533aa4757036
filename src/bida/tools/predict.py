"""Prediction on image files or folders: label PNGs, colour maps and overlays.

The loop over files of ``bida predict``; each image is predicted by :class:`bida.Segmenter`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from ..checkpoint import atomic_write_text, ensure_writable, load_checkpoint
from ..config import Config, from_dict, to_dict
from ..labels import default_palette, CITYSCAPES
from ..data.readers import read_image
from ..models import DeepLabV2, MiTSegmentor, build_model
from ..errors import BidaError, CheckpointError, DataError
from ..models.weights import load_model_weights, weights_file
from ..progress import progress_bar

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def model_from_checkpoint(path: str | Path, cfg: Config | None = None, device: torch.device | str = "cpu",
                          overrides: Sequence[str] = ()) -> tuple[DeepLabV2 | MiTSegmentor, Config, list[str], list]:
    """Rebuild the network of a bida checkpoint (its own config, with ``overrides``, unless ``cfg`` is given).

    Returns:
        (model in eval mode, config, class names, palette).
    """
    state = load_checkpoint(path)
    if "config" not in state or "num_classes" not in state:
        raise CheckpointError(f"{path} is not a bida checkpoint (no config); use model.pretrained for weight files")
    if cfg is None:
        cfg = from_dict(state["config"], overrides)
    names = list(state.get("class_names") or [])
    k = int(state["num_classes"])
    model = build_model(cfg.model, k, cfg.method.feature)
    load_model_weights(model, path, checkpoint=state)
    palette = list(state.get("palette") or _config_palette(cfg, names) or
                   (CITYSCAPES.palette if tuple(names) == tuple(CITYSCAPES.names) else default_palette(k)))
    return model.to(device).eval(), cfg, names, palette


def _config_palette(cfg: Config, names: Sequence[str]) -> list | None:
    """The palette of the config's target classes (``classes.json``) when they are the
    checkpoint's; for checkpoints written before the palette was saved in them."""
    from ..data.datasets import resolve_domain

    if cfg.data.target.kind != "folder":  # the other kinds use the Cityscapes classes
        return None
    try:
        classes = resolve_domain(cfg, "target").classes
    except BidaError:  # data moved or not reachable here: fall back to the default colours
        return None
    return list(classes.palette) if tuple(classes.names) == tuple(names) else None


def collect_images(inputs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(path, output name) of every image among files and folders (folders walked recursively).

    A folder's images keep their path relative to it (``IN/a/b.jpg`` -> ``a/b``), a file
    given by itself is named by its stem. A file met twice (given twice, or also inside a
    given folder) is predicted once. Two different files that would write the same output
    (``x.jpg`` and ``x.png``, or two ``x.png`` in different inputs) are refused, naming both:
    nothing is overwritten silently.
    """
    found: list[tuple[Path, str]] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            found += [(f, f.relative_to(p).with_suffix("").as_posix()) for f in files]
        elif p.is_file():
            found.append((p, p.stem))
        else:
            raise DataError(f"input {p} does not exist")
    if not found:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}")
    unique: list[tuple[Path, str]] = []
    seen_files: set[Path] = set()
    by_name: dict[str, Path] = {}
    for path, name in found:
        real = path.resolve()
        if real in seen_files:
            continue
        if name in by_name:
            raise DataError(f"{by_name[name]} and {path} would both be written as {name}.png; "
                            "rename one or predict them into different --out directories")
        seen_files.add(real)
        by_name[name] = path
        unique.append((path, name))
    return unique


def _save_png(array: np.ndarray, path: Path) -> None:
    """Write a PNG via a temporary file and a rename (no 0-byte file on a full disk)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise BidaError(f"cannot write {path}: {err.strerror or err}") from None


def predict(checkpoint: str | Path, inputs: Sequence[str | Path], out_dir: str | Path, overwrite: bool = False,
            quiet: bool = False, cfg: Config | None = None) -> list[Path]:
    """Write ``NAME.png`` (class indices), ``NAME_color.png`` and ``NAME_overlay.png`` per image.

    ``checkpoint``: a training checkpoint, or a model folder (``bida export --format folder``).
    Each image goes through :meth:`bida.Segmenter.predict`, so the files hold what the Python
    API returns. ``NAME`` mirrors the image's path inside a folder input (see
    :func:`collect_images`); colours come from the training classes' palette
    (``classes.json`` of a folder domain).
    """
    from .segmenter import Segmenter

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg is None:
        seg = Segmenter.load(checkpoint, device)
    else:  # another config for the checkpoint's network
        model, cfg, names, palette = model_from_checkpoint(checkpoint, cfg, device)
        seg = Segmenter(model, cfg, names, palette)
    images = collect_images(inputs)
    out = Path(out_dir)
    ensure_writable(out)
    # A rerun with the same checkpoint continues a stopped or failed run: the images already
    # predicted are kept. Another checkpoint's predictions are never replaced silently.
    manifest = out / ".bida-predict.json"
    ckpt = Path(checkpoint).resolve()
    stat = weights_file(ckpt).stat()
    mine = {"checkpoint": str(ckpt), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "eval": to_dict(seg.cfg.eval)}
    try:
        same_run = json.loads(manifest.read_text()) == mine
    except (OSError, ValueError):
        same_run = False
    done = {stem for _, stem in images if same_run and not overwrite and all(
        (out / f"{stem}{suffix}.png").is_file() for suffix in ("", "_color", "_overlay"))}
    outputs = [out / f"{stem}{suffix}.png" for _, stem in images if stem not in done for suffix in ("", "_color", "_overlay")]
    if not overwrite:
        clash = [out / f"{stem}.png" for _, stem in images if stem not in done and (out / f"{stem}.png").exists()]
        if clash:
            raise BidaError(f"{clash[0]} already exists; use --overwrite to replace predictions")
    else:  # --overwrite replaces earlier predictions, never an input image or a file of another kind
        inputs_real = {path.resolve() for path, _ in images}
        clash = [o for o in outputs if o.exists()]
        mine_before = manifest.is_file()
        for o in clash:
            if o.resolve() in inputs_real:
                raise BidaError(f"refusing to --overwrite {o}: it is one of the input images; choose another --out")
            if not mine_before:
                raise BidaError(f"refusing to --overwrite {o}: {out} holds no bida predictions "
                                f"(no {manifest.name}); remove the file yourself or choose another --out")
    atomic_write_text(manifest, json.dumps(mine))
    written = [out / f"{stem}.png" for _, stem in images if stem in done]
    for path, stem in progress_bar(images, desc="predict", disable=quiet):
        if stem in done:
            continue
        image = read_image(path)
        pred = seg.predict(image).astype(np.uint8)
        color = seg.colorize(pred)
        overlay = (0.5 * image.astype(np.float32) + 0.5 * color.astype(np.float32)).astype(np.uint8)
        # The class-index PNG last and each file atomically: a PNG that exists is complete.
        (out / stem).parent.mkdir(parents=True, exist_ok=True)
        _save_png(color, out / f"{stem}_color.png")
        _save_png(overlay, out / f"{stem}_overlay.png")
        _save_png(pred, out / f"{stem}.png")
        written.append(out / f"{stem}.png")
    return written
