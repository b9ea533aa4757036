"""Loading initial weights from local files (never downloaded).

These layouts are recognised:

* the DeepLab-V2 ResNet-101 init checkpoint of AdaptSegNet/ADVENT/IAST and the official BiDA
  code (``DeepLab_init.pth``): keys prefixed ``Scale.``; its classifier (``layer5``) is for
  another label set and is skipped;
* torchvision ResNet ImageNet state dicts (``conv1.weight`` ... ``fc.bias``): ``fc`` skipped;
* the SegFormer/mmseg MiT ImageNet files (``mit_b0.pth`` ... ``mit_b5.pth``: ``patch_embed1``,
  ``block1.0.attn.kv``, ``norm1``..., an ImageNet ``head`` skipped), loaded into the MiT
  encoder (``backbone.``); mmseg segmentation checkpoints already use ``backbone.``;
* the Hugging Face ``segformer`` layout (``segformer.encoder.patch_embeddings.0.proj``,
  ``segformer.encoder.block.0.0.attention.self.query``..., usually ``.safetensors``),
  renamed to the mmseg names, with the separate ``key`` and ``value`` layers concatenated
  into ``kv`` (keys first); its ImageNet ``classifier`` and any ``decode_head`` are skipped;
* the DINOv2 release files (``dinov2_vits14_pretrain.pth``, ``dinov2_vitl14_reg4_pretrain.pth``...:
  ``cls_token``, ``pos_embed``, ``register_tokens``, ``patch_embed.proj``, ``blocks.N.attn.qkv``,
  ``blocks.N.ls1.gamma``, ``blocks.N.mlp.fc1`` or, ViT-g, ``blocks.N.mlp.w12``/``w3``, ``norm``),
  loaded into the ViT encoder (``backbone.``); block names of DINOv2's chunked FSDP layout
  (``blocks.C.N.``, C the chunk) are read as ``blocks.N.``; ``mask_token`` (iBOT's
  pretraining token, unused when fine-tuning) is skipped;
* the Hugging Face ``dinov2`` and ``dinov2_with_registers`` layouts (``embeddings.*``,
  ``encoder.layer.N.*``, ``layernorm.*``, optionally prefixed ``dinov2.``; usually
  ``.safetensors``), with the separate ``query``/``key``/``value`` layers stacked into ``qkv``
  and SwiGLU's ``weights_in``/``weights_out`` as ``w12``/``w3`` (transformers' in-memory names
  ``q_proj``..., ``gate_proj``/``up_proj``/``down_proj`` too); ``mask_token`` and an ImageNet
  ``classifier`` are skipped;
* bida checkpoints (a dict with ``model``) and safetensors files;
* folders: a bida model folder (``bida export --format folder``) or a Hugging Face one
  (``config.json`` + ``model.safetensors``, or ``pytorch_model.bin``): the weights file inside.

Keys that fit nowhere, backbone keys that are missing, shapes that differ, or a file of
another segmentor family (ResNet weights for a MiT, MiT weights for a DINOv2 ViT...) are
errors that name the file and the first offending keys.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import load_checkpoint
from ..errors import CheckpointError
from .dinov2 import ARCHS as DINOV2_ARCHS
from .dinov2 import from_dinov2_release, from_hf_dinov2
from .mit import ARCHS as MIT_ARCHS
from .mit import from_hf_segformer, from_mit_imagenet

HEAD_PREFIXES = ("layer5.", "proj.", "decode_head.", "neck.", "scale_attention.")
SKIPPED_PREFIXES = ("fc.",)
# The classifier bias of each segmentor: its length is the class count.
CLASSIFIER_BIASES = ("layer5.conv2d_list.0.bias", "decode_head.classifier.bias")
MIT_KEY = "backbone.patch_embed1.proj.weight"  # a MiT segmentor's state dict has it
DINOV2_KEY = "backbone.pos_embed"  # a DINOv2 segmentor's state dict has it
MODEL_FOLDER_WEIGHTS = "model.safetensors"  # the weights of a model folder (bida export --format folder)
# The weights file of a folder, in the order looked for: bida's and Hugging Face's safetensors,
# then the pickled PyTorch file of older Hugging Face folders (save_pretrained(safe_serialization=False)).
FOLDER_WEIGHTS = (MODEL_FOLDER_WEIGHTS, "pytorch_model.bin")



def weights_file(path: str | Path) -> Path:
    """The file that holds the weights: ``path`` itself, or the weights file of a model folder
    (a bida or Hugging Face folder: the first of :data:`FOLDER_WEIGHTS` it holds)."""
    path = Path(path)
    if path.is_dir():
        for name in FOLDER_WEIGHTS:
            if (path / name).is_file():
                return path / name
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensor state dict inside a weight file (``.pt``/``.pth`` or ``.safetensors``) or a model folder."""
    path = weights_file(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise CheckpointError(f"weight file {path} {'is a directory' if path.is_dir() else 'does not exist'}")
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"weight file {path} is corrupt: {err}") from None
    return tensor_state(load_checkpoint(path), path)


def tensor_state(state: dict, path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict inside a loaded checkpoint dict (``model``/``state_dict`` or itself)."""
    for key in ("model", "state_dict"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"weight file {path} does not hold a state dict of tensors")
    return state


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in ("Scale.", "module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """``hf_segformer``, ``mit`` (mmseg ``mit_b*.pth``), ``mit_segmentor`` (``backbone.`` prefixed),
    ``hf_dinov2``, ``dinov2`` (a DINOv2 release file), ``dinov2_segmentor``, ``resnet``
    (torchvision / DeepLab-V2 / bida DeepLab-V2) or ``unknown``."""
    keys = list(state)
    if any(k.startswith(("segformer.encoder.", "encoder.patch_embeddings.")) for k in keys):
        return "hf_segformer"
    if any(k.startswith(("embeddings.patch_embeddings.", "dinov2.embeddings.", "dinov2_with_registers.embeddings."))
           for k in keys):
        return "hf_dinov2"
    if "pos_embed" in state and any(k.startswith("patch_embed.") for k in keys):
        return "dinov2"
    if DINOV2_KEY in state:
        return "dinov2_segmentor"
    if any(k.startswith("patch_embed1.") for k in keys):
        return "mit"
    if MIT_KEY in state:
        return "mit_segmentor"
    if "conv1.weight" in state or any(k.startswith("layer1.") for k in keys):
        return "resnet"
    return "unknown"


LAYOUT_NAMES = {
    "hf_segformer": "Hugging Face segformer (MiT)", "mit": "SegFormer/mmseg MiT",
    "mit_segmentor": "MiT segmentor", "resnet": "ResNet/DeepLab-V2",
    "hf_dinov2": "Hugging Face dinov2 (ViT)", "dinov2": "DINOv2 release (ViT)", "dinov2_segmentor": "DINOv2 segmentor",
}
LAYOUT_FAMILIES = {"hf_segformer": "mit", "mit": "mit", "mit_segmentor": "mit", "resnet": "resnet",
                   "hf_dinov2": "dinov2", "dinov2": "dinov2", "dinov2_segmentor": "dinov2"}
FAMILY_NEEDS = {
    "mit": "MiT weights (a SegFormer/mmseg mit_b*.pth or a Hugging Face segformer .safetensors)",
    "dinov2": "DINOv2 weights (a release dinov2_*_pretrain.pth or a Hugging Face facebook/dinov2-* .safetensors)",
    "resnet": "ResNet weights (torchvision, DeepLab_init.pth or a bida DeepLab-V2 checkpoint)",
}


class ArchitectureError(CheckpointError):
    """A checkpoint of another backbone than the model it is loaded into."""


# What each family's segmentor is called in messages.
FAMILY_MODELS = {"resnet": "DeepLab-V2", "mit": "MiT (SegFormer/DAFormer)", "dinov2": "DINOv2 ViT"}


def arch_family(backbone: str) -> str:
    """``mit``, ``dinov2`` or ``resnet``: the family of a ``model.backbone`` name."""
    return "mit" if backbone in MIT_ARCHS else "dinov2" if backbone in DINOV2_ARCHS else "resnet"


def saved_backbone(path: str | Path, checkpoint: dict | None = None) -> str | None:
    """``model.backbone`` of the config saved with a bida checkpoint or model folder, else None
    (a bare weight file, or a checkpoint written without its config)."""
    path = Path(path)
    if checkpoint is None and path.is_dir() and (path / "config.yaml").is_file():
        import yaml

        try:
            checkpoint = {"config": yaml.safe_load((path / "config.yaml").read_text())}
        except (OSError, yaml.YAMLError):
            return None
    elif checkpoint is None and path.is_file() and path.suffix != ".safetensors":
        checkpoint = load_checkpoint(path)
    model = ((checkpoint or {}).get("config") or {}).get("model") or {}
    backbone = model.get("backbone") if isinstance(model, dict) else None
    return backbone if isinstance(backbone, str) else None


def architecture_mismatch(state: dict[str, torch.Tensor], saved: str | None, arch: str) -> str | None:
    """What a checkpoint holds when it is not a model of ``arch`` (``model.backbone``), else None.

    ``state``: the checkpoint's model state dict (keys normalised); ``saved``: the backbone its
    saved config names (:func:`saved_backbone`), if any. The family comes from the key layout
    (:func:`detect_layout`), so that a checkpoint without a config is still named.

    Returns:
        e.g. ``"a DeepLab-V2 (resnet101)"``, ``"a MiT (SegFormer/DAFormer) (key layout of a mit
        segmentor)"``; None when the family and the saved backbone agree with ``arch``.
    """
    layout = detect_layout(state)
    family = LAYOUT_FAMILIES.get(layout)
    if saved == arch or (saved is None and family in (None, arch_family(arch))):
        return None
    if saved is not None:  # the saved config names it exactly
        return f"a {FAMILY_MODELS[arch_family(saved)]} ({saved})"
    return f"a {FAMILY_MODELS[family]} (the key layout of a {LAYOUT_NAMES[layout]})"


# Hugging Face's size names of the DINOv2 ViTs (facebook/dinov2-small ...).
_HF_DINOV2_SIZES = {"vits14": "small", "vitb14": "base", "vitl14": "large", "vitg14": "giant"}


def pretrained_recipe(backbone: str) -> str:
    """Where the ImageNet / DINOv2 weights of ``backbone`` come from, which file and key to set:
    one sentence for the warning of a run that starts from random weights (bida never downloads)."""
    family = arch_family(backbone)
    if family == "mit":
        return (f"model.pretrained=pretrained/{backbone}.pth, SegFormer's ImageNet-1k {backbone} encoder "
                f"(NVlabs SegFormer release, mmseg layout), or the Hugging Face folder nvidia/{backbone.replace('_', '-')} "
                "(its model.safetensors); data.normalize=imagenet (docs/datasets.md, 'MiT weights')")
    if family == "dinov2":
        size = backbone.split("_")[1]
        reg = backbone.endswith("_reg")
        release = f"dinov2_{size}{'_reg4' if reg else ''}_pretrain.pth"
        hf = f"facebook/dinov2-{'with-registers-' if reg else ''}{_HF_DINOV2_SIZES[size]}"
        return (f"model.pretrained=pretrained/{release}, the DINOv2 release file "
                f"(https://dl.fbaipublicfiles.com/dinov2/dinov2_{size}/{release}), or the Hugging Face folder {hf} "
                "(its model.safetensors); data.normalize=imagenet (docs/datasets.md, 'DINOv2 weights')")
    return ("model.backbone=resnet101 model.pretrained=weights/DeepLab_init.pth data.normalize=caffe "
            "(docs/datasets.md, 'Initial weights')")


def random_init_warning(backbone: str) -> str:
    """The line a run from random weights prints (on real data: on the embedded synthetic pair
    random weights are the design)."""
    return (f"bida: warning: training {backbone} from random weights (model.pretrained and model.init_checkpoint "
            f"are not set); for real data start from pretrained weights: {pretrained_recipe(backbone)}")


def _family(own: dict[str, torch.Tensor]) -> str:
    return "mit" if MIT_KEY in own else "dinov2" if DINOV2_KEY in own else "resnet"


def _to_model_layout(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], path: str | Path,
                     arch: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``state`` renamed to the model's key layout, and the keys skipped on the way.

    Raises:
        CheckpointError: a file of another segmentor family.
    """
    layout = detect_layout(state)
    family = _family(own)
    if layout != "unknown" and LAYOUT_FAMILIES[layout] != family:
        raise CheckpointError(f"pretrained file {path} holds {LAYOUT_NAMES[layout]} weights; "
                              f"model.backbone={arch} needs {FAMILY_NEEDS[family]}")
    if layout == "hf_segformer":
        return from_hf_segformer(state, path)
    mask_token = "backbone.mask_token" in own  # model.mask_token: the pretraining mask token is trained on
    if layout == "hf_dinov2":
        return from_hf_dinov2(state, path, mask_token)
    if layout == "dinov2":
        return from_dinov2_release(state, mask_token)
    if layout == "mit":
        return from_mit_imagenet(state)
    return state, []


def _shape_error(path: str | Path, key: str, shape: tuple[int, ...], expected: tuple[int, ...], arch: str,
                 width: float) -> CheckpointError:
    """A backbone tensor of another shape, named by the config key that explains it: ``model.width``
    when the model is scaled and the file is wider by a factor that makes it a width of at most 1
    (a width left from a demo config: pretrained weights are full width), else ``model.backbone``
    (another depth or size of the family)."""
    detail = f"pretrained file {path}: {key} has shape {shape}, model expects {expected}"
    differ = [(a, b) for a, b in zip(shape, expected) if a != b]
    file_width = width * differ[0][0] / differ[0][1] if len(shape) == len(expected) and differ else None
    if width != 1.0 and file_width is not None and file_width <= 1.0 + 1e-6:
        return CheckpointError(f"model.width={width:g}: {detail}, as the file holds {arch} weights of model.width="
                               f"{file_width:.3g}; set model.width={file_width:.3g} (a width below 1 is for training "
                               "from random weights, as the demo configs do) or leave out model.pretrained")
    return CheckpointError(f"model.backbone={arch}: {detail} (weights of another depth or size: set the "
                           "model.backbone and model.width they were trained with)")


def load_pretrained(model: torch.nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load ImageNet / DeepLab-init / MiT / DINOv2 / bida weights into the backbone (and the head when it fits).

    Returns:
        ``{"loaded": [...], "skipped": [...], "missing": [...]}`` key lists.

    Raises:
        CheckpointError: a file of the other segmentor family, unexpected keys, missing
            backbone keys or shape mismatches.
    """
    if Path(path).is_dir() and weights_file(path) == Path(path):  # a folder without a weights file
        found = sorted(p.name for p in Path(path).iterdir())
        raise CheckpointError(f"pretrained folder {path} holds no {' or '.join(FOLDER_WEIGHTS)} (it holds "
                              + (", ".join(found[:5]) + (f" +{len(found) - 5} more" if len(found) > 5 else "")
                                 if found else "nothing") + "); give the weights file or its folder")
    own = model.state_dict()
    state, skipped = _to_model_layout(_normalise_keys(read_state_dict(path)), own, path,
                                      getattr(model, "arch", type(model).__name__))
    skipped += [k for k in state if k.startswith(SKIPPED_PREFIXES)]
    unexpected = [k for k in state if k not in own and k not in skipped and not k.startswith(HEAD_PREFIXES)]
    if unexpected:
        raise CheckpointError(f"pretrained file {path} has unexpected keys: {', '.join(unexpected[:5])}"
                              + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else ""))
    load = {}
    for key, value in state.items():
        if key in skipped or key not in own:
            if key not in skipped:
                skipped.append(key)
            continue
        if own[key].shape != value.shape:
            if key.startswith(HEAD_PREFIXES):  # another label set: keep the fresh classifier
                skipped.append(key)
                continue
            raise _shape_error(path, key, tuple(value.shape), tuple(own[key].shape),
                               getattr(model, "arch", type(model).__name__), getattr(model, "width", 1.0))
        load[key] = value
    backbone_missing = [k for k in own if k not in load and not k.startswith(HEAD_PREFIXES)
                        and not k.startswith("target_stem.") and not k.endswith("num_batches_tracked")]
    if backbone_missing:
        raise CheckpointError(f"pretrained file {path} lacks backbone keys: {', '.join(backbone_missing[:5])}"
                              + (f" (+{len(backbone_missing) - 5} more)" if len(backbone_missing) > 5 else ""))
    model.load_state_dict(load, strict=False)
    if hasattr(model, "sync_target_stem") and not any(k.startswith("target_stem.") for k in load):
        model.sync_target_stem()
    missing = [k for k in own if k not in load]
    return {"loaded": sorted(load), "skipped": sorted(skipped), "missing": missing}


def load_model_weights(model: torch.nn.Module, path: str | Path, checkpoint: dict | None = None,
                       fresh_projection: bool = False) -> bool:
    """Strictly load a bida checkpoint's model (``model.init_checkpoint``, evaluation, prediction).

    ``checkpoint``: the already loaded contents of ``path`` (saves reading it twice).

    A model with a separate target stem also takes a checkpoint without one (a shared-stem
    run): everything else loads strictly and the target stem starts as a copy of the loaded
    source stem. With ``fresh_projection`` (``model.init_checkpoint`` without
    ``method.pretrain_head``) the contrast projection head keeps its fresh initialisation:
    the checkpoint's head, if it has one, is not loaded (a source-only run that trained its
    head with ``method.pretrain_head`` gives it only to the runs that ask for it).

    Returns:
        True when the target stem was initialised from the source stem that way.

    Raises:
        CheckpointError: naming the file when class count or architecture differ.
    """
    state = _normalise_keys(read_state_dict(path) if checkpoint is None else tensor_state(checkpoint, path))
    own = model.state_dict()
    # Parts the model has and the checkpoint may lack: they are left out of the strict check.
    optional = [prefix for prefix in ("target_stem.",)
                if any(k.startswith(prefix) for k in own) and not any(k.startswith(prefix) for k in state)]
    own = {k: v for k, v in own.items() if not k.startswith(tuple(optional))}
    if fresh_projection:  # the head starts fresh: a checkpoint's head (trained or not) is not loaded
        own = {k: v for k, v in own.items() if not k.startswith("proj.")}
        state = {k: v for k, v in state.items() if not k.startswith("proj.")}
    sync_stem = "target_stem." in optional
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or mismatched:  # the cause first: another backbone, then another class count
        arch = getattr(model, "arch", type(model).__name__)
        if (other := architecture_mismatch(state, saved_backbone(path, checkpoint), arch)) is not None:
            raise ArchitectureError(f"checkpoint {path} holds {other} model and the config asks for model.backbone={arch}")
    for k in CLASSIFIER_BIASES:
        if k in mismatched:
            raise CheckpointError(
                f"checkpoint {path} was trained for {state[k].shape[0]} classes, the config has {own[k].shape[0]}")
    if missing or unexpected or mismatched:
        detail = "; ".join(f"{name}: {', '.join(keys[:3])}" for name, keys in
                           (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys)
        raise CheckpointError(f"checkpoint {path} does not fit this model architecture ({detail})")
    model.load_state_dict(state, strict=False)
    if sync_stem:
        model.sync_target_stem()
    return sync_stem


def check_trained_head(path: str | Path) -> None:
    """``model.init_checkpoint`` holds a projection head trained in its source stage
    (``method.pretrain_head``), as an adaptation run with ``method.pretrain_head`` expects.

    Raises:
        ConfigError: naming the key and the checkpoint.
    """
    from ..errors import ConfigError

    if Path(path).is_dir():  # a model folder: its config.yaml says how the head was trained
        from ..config import load_config

        trained = load_config(Path(path) / "config.yaml").method.pretrain_head
        keys = list(read_state_dict(path))
    else:
        state = load_checkpoint(Path(path))
        trained = bool(state.get("config", {}).get("method", {}).get("pretrain_head", False))
        keys = list(tensor_state(state, path))
    if not trained or not any(k.startswith("proj.") for k in _normalise_keys(dict.fromkeys(keys))):
        raise ConfigError(f"method.pretrain_head: model.init_checkpoint {path} has no projection head trained in its "
                          "source stage; train the source-only model with method.pretrain_head=true "
                          "(bida demo and bida ablate do so when a row needs it)")
