"""Inference from Python: :class:`Segmenter` wraps a trained network and its evaluation settings.

A :class:`Segmenter` comes from a training checkpoint, from a model folder written by
``bida export --format folder`` or from an ONNX window model written by ``bida export
--format onnx``. Every path goes through :func:`bida.engine.inference.predict_probs`, the
very function ``bida evaluate`` calls: whole image or sliding windows (``eval.mode``),
flip averaging (``eval.flip``), ``eval.size``. Any input size works: the loop clips its
windows to the image and the networks take any size (DINOv2 pads to its 14-pixel grid).

    from bida import Segmenter
    seg = Segmenter.from_pretrained("exported/bida-gta5")   # or .from_checkpoint("runs/X/checkpoints/last.pt")
    labels = seg.predict(Image.open("street.png"))         # (H, W) class ids
    probs = seg.predict_proba(np.asarray(image))           # (K, H, W) probabilities
    colours = seg.palette[labels]                          # seg.classes: the class names
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from ..config import Config, from_dict, to_dict
from ..data.transforms import CAFFE_MEAN_BGR, IMAGENET_MEAN, IMAGENET_STD
from ..engine.inference import predict_probs
from ..models.weights import MODEL_FOLDER_WEIGHTS, load_model_weights
from ..errors import BidaError, CheckpointError
from ..models import build_model
from ..models.output import SegOutput

# A model folder: the files ``bida export --format folder`` writes (docs/usage.md, "Model folders").
MODEL_FOLDER_CONFIG, MODEL_FOLDER_CLASSES, MODEL_FOLDER_CARD = "config.yaml", "classes.json", "README.md"
# Parameters a network trains with but never predicts with (model.mask_token's): not in a model folder.
TRAINING_ONLY_WEIGHTS = ("backbone.mask_token",)


def inference_config(cfg: Config) -> dict:
    """The part of a config that rebuilds the network and says how it predicts.

    The keys of a model folder's ``config.yaml``: the segmentor (every ``model.*`` key, with
    ``model.mask_token`` off), the contrast head it carries (``method.feature``,
    ``method.pretrain_head``: read by a run that starts from the folder), the input
    normalisation and the evaluation settings. Initial weight files are left out: the
    folder holds the weights.
    """
    # Every model key but the initial weight files, so that a key added to the segmentor
    # (an input resize, a head) is carried without a list here to keep up. MIC's mask token
    # (model.mask_token) masks training inputs only: the predicting network is the one
    # without it, and the folder's weights leave it out (:data:`TRAINING_ONLY_WEIGHTS`).
    model = {k: v for k, v in to_dict(cfg.model).items() if k not in ("pretrained", "init_checkpoint")}
    model["mask_token"] = False
    return {
        "model": model,
        "method": {"feature": cfg.method.feature, "pretrain_head": cfg.method.pretrain_head},
        "data": {"normalize": cfg.data.normalize},
        "eval": {k: v for k, v in to_dict(cfg.eval).items() if k != "max_images"},
    }


def read_model_folder(folder: str | Path, overrides: Sequence[str] = ()) -> tuple[Config, list[str], list]:
    """(config, class names, palette) of a model folder, before its weights are read.

    Raises:
        CheckpointError: not a model folder (a file is missing), or an unreadable config.
    """
    from ..config import load_config
    from ..data.readers import class_info

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder {folder} {'is a file' if folder.exists() else 'does not exist'}")
    lacking = [n for n in (MODEL_FOLDER_WEIGHTS, MODEL_FOLDER_CONFIG, MODEL_FOLDER_CLASSES) if not (folder / n).is_file()]
    if lacking:
        hint = (f"; a training checkpoint is a file, e.g. {folder / 'checkpoints' / 'last.pt'}"
                if (folder / "checkpoints").is_dir() else " (bida export --format folder writes one)")
        raise CheckpointError(f"{folder} is not a bida model folder: no {', '.join(lacking)}{hint}")
    cfg = load_config(folder / MODEL_FOLDER_CONFIG, overrides)
    classes = class_info("folder", folder)
    return cfg, list(classes.names), [tuple(c) for c in classes.palette]


def model_from_folder(folder: str | Path, device: torch.device | str = "cpu",
                      overrides: Sequence[str] = ()) -> tuple[torch.nn.Module, Config, list[str], list]:
    """Rebuild the network of a model folder; as :func:`bida.tools.predict.model_from_checkpoint`.

    Raises:
        CheckpointError: not a model folder, or weights that do not fit its config (one line
            naming the folder and the first keys that differ).
    """
    cfg, names, palette = read_model_folder(folder, overrides)
    model = build_model(cfg.model, len(names), cfg.method.feature)
    load_model_weights(model, Path(folder))
    return model.to(device).eval(), cfg, names, palette


class Normalise(torch.nn.Module):
    """uint8 (or 0..255 float) RGB images -> the network's input, as ``data.normalize`` says.

    The float32 operations of :func:`bida.data.transforms.to_tensor`, in the same order:
    ImageNet ``(x / 255 - mean) / std`` on RGB; caffe (DeepLab-V2's init weights) the
    channels reversed to BGR minus the caffe mean. :meth:`invert` maps back to 0..255 RGB.

    Shape:
        (N, 3, H, W) -> (N, 3, H, W) float32.
    """

    def __init__(self, normalize: str):
        super().__init__()
        self.caffe = normalize == "caffe"
        mean, std = (CAFFE_MEAN_BGR, np.ones(3, np.float32)) if self.caffe else (IMAGENET_MEAN, IMAGENET_STD)
        self.register_buffer("mean", torch.from_numpy(mean.copy()).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.from_numpy(std.copy()).view(1, 3, 1, 1), persistent=False)

    def forward(self, rgb: Tensor) -> Tensor:
        x = rgb.float()
        if self.caffe:
            return x.flip(1) - self.mean
        return (x / 255.0 - self.mean) / self.std

    def invert(self, x: Tensor) -> Tensor:
        """The 0..255 RGB values (float) of a normalised batch."""
        if self.caffe:
            return (x.float() + self.mean).flip(1)
        return (x.float() * self.std + self.mean) * 255.0


class OnnxWindowModel(torch.nn.Module):
    """An exported ONNX graph (uint8 RGB in, logits at the input size out) as a bida segmentor.

    ``forward(x, domain)`` takes the normalised float images that bida's loops pass, turns
    them back into the uint8 RGB the graph takes (exact for pixels that were integers) and
    returns the graph's logits: :func:`~bida.engine.inference.predict_probs` and
    :func:`~bida.engine.inference.evaluate` run it with their own sliding-window and flip
    loop, as they run the PyTorch network.
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise BidaError("running an ONNX model needs onnxruntime: pip install 'bida[export]'") from None
        try:
            self.session = ort.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as err:  # onnxruntime raises its own error types
            raise CheckpointError(f"cannot load ONNX model {path}: {str(err).splitlines()[0]}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "bida.config" not in meta:
            raise CheckpointError(f"{path} was not written by bida export (no bida metadata)")
        if meta.get("bida.output") != "logits":
            raise CheckpointError(f"{path} outputs {meta.get('bida.output')}; the sliding-window and flip loop "
                                  "averages logits: export with --output logits")
        self.meta = meta
        self.num_classes = len(json.loads(meta["bida.classes"])["classes"])
        self.normalise = Normalise(json.loads(meta["bida.config"])["data"]["normalize"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: Tensor, domain: str = "target") -> SegOutput:  # noqa: ARG002 - one network
        """Shape: x (B, 3, H, W) normalised float -> SegOutput(logits (B, K, H, W), features None)."""
        image = self.normalise.to(x.device).invert(x).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
        logits = self.session.run(None, {self.input_name: image})[0]
        return SegOutput(logits=torch.from_numpy(logits).to(x.device), features=None)  # type: ignore[arg-type]


class Segmenter:
    """A trained segmentation network with its classes and evaluation settings.

    Inputs: a PIL image or an (H, W, 3) uint8 RGB array (one image), or a tensor batch
    (N, 3, H, W): uint8 RGB (normalised here) or float already normalised as bida's
    datasets give it (``data.normalize``). Outputs are at the input's size: numpy for one
    image, tensors on the segmenter's device for a batch.

    Args:
        model: a bida segmentor (or :class:`OnnxWindowModel`), in eval mode.
        cfg: its config: ``data.normalize`` and ``eval`` are read.
        classes, palette: class names (empty: the class ids as names) and their RGB colours.
        autocast: ``"bf16"`` (or ``"fp16"``) runs the network under ``torch.autocast``, as
            ``bida evaluate`` does with ``train.amp``; None: float32.
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, classes: Sequence[str], palette: Sequence[Sequence[int]],
                 autocast: Literal["bf16", "fp16"] | None = None):
        if autocast not in (None, "bf16", "fp16"):
            raise BidaError(f"autocast: {autocast!r} is not one of None, 'bf16', 'fp16'")
        self.model, self.cfg = model.eval(), cfg
        self.classes = list(classes) or [str(i) for i in range(model.num_classes)]  # a checkpoint without names
        self.palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
        self.autocast = autocast
        self.device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("cpu"))
        self.normalise = Normalise(cfg.data.normalize).to(self.device)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_checkpoint(cls, path: str | Path, device: torch.device | str = "cpu", overrides: Sequence[str] = (),
                        autocast: Literal["bf16", "fp16"] | None = None) -> "Segmenter":
        """From a bida training checkpoint (``runs/NAME/checkpoints/last.pt``); ``overrides``
        change its config, e.g. ``["eval.flip=true"]``."""
        from .predict import model_from_checkpoint

        model, cfg, names, palette = model_from_checkpoint(path, None, device, overrides=overrides)
        return cls(model, cfg, names, palette, autocast)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: torch.device | str = "cpu", overrides: Sequence[str] = (),
                        autocast: Literal["bf16", "fp16"] | None = None) -> "Segmenter":
        """From a model folder (``bida export --format folder``); nothing is downloaded."""
        model, cfg, names, palette = model_from_folder(folder, device, overrides)
        return cls(model, cfg, names, palette, autocast)

    @classmethod
    def from_onnx(cls, path: str | Path, providers: Sequence[str] | None = None,
                  overrides: Sequence[str] = ()) -> "Segmenter":
        """From an ONNX model of ``bida export --format onnx`` (``--output logits``), run by
        onnxruntime inside the same sliding-window and flip loop; its classes and settings
        come from the file's metadata."""
        model = OnnxWindowModel(path, providers)
        cfg = from_dict(json.loads(model.meta["bida.config"]), overrides)
        classes = json.loads(model.meta["bida.classes"])
        return cls(model, cfg, classes["classes"], classes["palette"])

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu", overrides: Sequence[str] = ()) -> "Segmenter":
        """A model folder, an ``.onnx`` file or a training checkpoint, told apart by the path."""
        path = Path(path)
        if path.is_dir():
            return cls.from_pretrained(path, device, overrides)
        if path.suffix == ".onnx":
            return cls.from_onnx(path, overrides=overrides)
        return cls.from_checkpoint(path, device, overrides)

    # ------------------------------------------------------------------ properties
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to(self, device: torch.device | str) -> "Segmenter":
        """Move the network (in place) and return ``self``."""
        self.device = torch.device(device)
        self.model.to(self.device)
        self.normalise.to(self.device)
        return self

    # ------------------------------------------------------------------ prediction
    def _batch(self, image: Any) -> tuple[Tensor, bool]:
        """(normalised float batch on the device, whether the input was one image)."""
        if isinstance(image, Tensor):
            x = image.unsqueeze(0) if image.dim() == 3 else image
            if x.dim() != 4 or x.shape[1] != 3:
                raise BidaError(f"expected an (N, 3, H, W) tensor, got shape {tuple(image.shape)}")
            x = x.to(self.device)
            return (self.normalise(x) if x.dtype == torch.uint8 else x.float()), image.dim() == 3
        array = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise BidaError(f"expected an (H, W, 3) uint8 RGB image, got {array.dtype} of shape {array.shape}")
        from ..data.transforms import to_tensor

        # The datasets' own conversion, so that an image predicts exactly as bida evaluate sees it.
        return to_tensor(array, self.cfg.data.normalize).unsqueeze(0).to(self.device), True

    @torch.no_grad()
    def _probs(self, x: Tensor) -> Tensor:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.autocast or "")
        with torch.autocast(device_type=x.device.type, dtype=dtype, enabled=dtype is not None):
            return predict_probs(self.model, x, self.cfg.eval, self.num_classes)

    def predict_proba(self, image: Any) -> np.ndarray | Tensor:
        """Class probabilities at the input's size.

        Shape:
            one image (H, W, 3) -> numpy (K, H, W) float32; a batch (N, 3, H, W) -> tensor (N, K, H, W).
        """
        x, single = self._batch(image)
        probs = self._probs(x)
        if isinstance(image, Tensor):
            return probs[0] if single else probs
        return probs[0].cpu().numpy()

    def predict(self, image: Any) -> np.ndarray | Tensor:
        """Class ids at the input's size (the argmax of :meth:`predict_proba`).

        Shape:
            one image (H, W, 3) -> numpy (H, W) int64; a batch (N, 3, H, W) -> tensor (N, H, W) int64.
        """
        x, single = self._batch(image)
        labels = self._probs(x).argmax(1)
        if isinstance(image, Tensor):
            return labels[0] if single else labels
        return labels[0].cpu().numpy()

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        """(H, W) class ids -> (H, W, 3) uint8 colours of :attr:`palette` (ignore and unknown ids black)."""
        from ..labels import colorize

        return colorize(np.asarray(labels).astype(np.uint8), [tuple(c) for c in self.palette.tolist()])
