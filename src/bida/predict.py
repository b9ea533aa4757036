"""Prediction on image files or folders: label PNGs, colour maps and overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from .checkpoint import load_checkpoint
from .config import Config, from_dict
from .deeplabv2 import DeepLabV2, build_model
from .errors import BidaError, CheckpointError, DataError
from .evaluate import predict_probs
from .labels import colorize, default_palette, CITYSCAPES
from .readers import read_image
from .transforms import to_tensor
from .weights import load_model_weights

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def model_from_checkpoint(path: str | Path, cfg: Config | None = None, device: torch.device | str = "cpu",
                          overrides: Sequence[str] = ()) -> tuple[DeepLabV2, Config, list[str], list]:
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
    palette = list(state.get("palette") or (CITYSCAPES.palette if tuple(names) == tuple(CITYSCAPES.names) else default_palette(k)))
    return model.to(device).eval(), cfg, names, palette


def collect_images(inputs: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(path, output stem) of every image among files and folders (folders walked recursively)."""
    found: list[tuple[Path, str]] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            found += [(f, str(f.relative_to(p).with_suffix("")).replace("/", "__")) for f in files]
        elif p.is_file():
            found.append((p, p.stem))
        else:
            raise DataError(f"input {p} does not exist")
    if not found:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}")
    return found


@torch.no_grad()
def predict(checkpoint: str | Path, inputs: Sequence[str | Path], out_dir: str | Path, overwrite: bool = False,
            quiet: bool = False, cfg: Config | None = None) -> list[Path]:
    """Write ``NAME.png`` (class indices), ``NAME_color.png`` and ``NAME_overlay.png`` per image."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg, names, palette = model_from_checkpoint(checkpoint, cfg, device)
    images = collect_images(inputs)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BidaError(f"output directory {out} is not writable: {err.strerror}") from None
    if not overwrite:
        clash = [out / f"{stem}.png" for _, stem in images if (out / f"{stem}.png").exists()]
        if clash:
            raise BidaError(f"{clash[0]} already exists; use --overwrite to replace predictions")
    written = []
    for path, stem in tqdm(images, desc="predict", disable=quiet, dynamic_ncols=True):
        image = read_image(path)
        x = to_tensor(image, cfg.data.normalize).unsqueeze(0).to(device)
        pred = predict_probs(model, x, cfg.eval, len(names) or model.num_classes).argmax(1)[0].cpu().numpy().astype(np.uint8)
        color = colorize(pred, palette)
        overlay = (0.5 * image.astype(np.float32) + 0.5 * color.astype(np.float32)).astype(np.uint8)
        Image.fromarray(pred).save(out / f"{stem}.png")
        Image.fromarray(color).save(out / f"{stem}_color.png")
        Image.fromarray(overlay).save(out / f"{stem}_overlay.png")
        written.append(out / f"{stem}.png")
    return written
