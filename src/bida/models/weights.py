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
* bida model folders (``bida export --format folder``): their ``model.safetensors``.

Keys that fit nowhere, backbone keys that are missing, shapes that differ, or a file of
another segmentor family (ResNet weights for a MiT, MiT weights for a DINOv2 ViT...) are
errors that name the file and the first offending keys.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint
from ..errors import CheckpointError

HEAD_PREFIXES = ("layer5.", "proj.", "decode_head.", "neck.", "scale_attention.")
SKIPPED_PREFIXES = ("fc.",)
# The classifier bias of each segmentor: its length is the class count.
CLASSIFIER_BIASES = ("layer5.conv2d_list.0.bias", "decode_head.classifier.bias")
MIT_KEY = "backbone.patch_embed1.proj.weight"  # a MiT segmentor's state dict has it
DINOV2_KEY = "backbone.pos_embed"  # a DINOv2 segmentor's state dict has it
MODEL_FOLDER_WEIGHTS = "model.safetensors"  # the weights of a model folder (bida export --format folder)

# Hugging Face segformer -> mmseg MiT names, inside one block (``key``/``value`` are merged apart).
_HF_BLOCK_NAMES = {
    "layer_norm_1.": "norm1.", "layer_norm_2.": "norm2.",
    "attention.self.query.": "attn.q.", "attention.self.sr.": "attn.sr.",
    "attention.self.layer_norm.": "attn.norm.", "attention.output.dense.": "attn.proj.",
    "mlp.dense1.": "mlp.fc1.", "mlp.dwconv.dwconv.": "mlp.dwconv.dwconv.", "mlp.dense2.": "mlp.fc2.",
}
_HF_PATCH = re.compile(r"encoder\.patch_embeddings\.(\d+)\.(proj|layer_norm)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(\d+)\.(.+)")
_HF_NORM = re.compile(r"encoder\.layer_norm\.(\d+)\.(.+)")
_HF_KV = re.compile(r"attention\.self\.(key|value)\.(weight|bias)")


def weights_file(path: str | Path) -> Path:
    """The file that holds the weights: ``path`` itself, or a model folder's ``model.safetensors``."""
    path = Path(path)
    return path / MODEL_FOLDER_WEIGHTS if path.is_dir() and (path / MODEL_FOLDER_WEIGHTS).is_file() else path


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

# Hugging Face dinov2 -> DINOv2 release names, inside one block; q/k/v and SwiGLU's gate/up are stacked apart.
_HF_DINO_BLOCK_NAMES = {
    "norm1.": "norm1.", "norm2.": "norm2.", "attention.output.dense.": "attn.proj.", "attention.o_proj.": "attn.proj.",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.", "mlp.weights_in.": "mlp.w12.", "mlp.weights_out.": "mlp.w3.",
    "mlp.down_proj.": "mlp.w3.",
}
_HF_DINO_EMBED_NAMES = {
    "embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens", "embeddings.patch_embeddings.projection.weight":
    "patch_embed.proj.weight", "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}
_HF_DINO_BLOCK = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
# Parts stacked into one release tensor, in the release's order: qkv = [q; k; v], w12 = [gate; up].
_HF_DINO_STACKED = {
    **{f"attention.attention.{p}.": ("attn.qkv", i) for i, p in enumerate(("query", "key", "value"))},
    **{f"attention.{p}.": ("attn.qkv", i) for i, p in enumerate(("q_proj", "k_proj", "v_proj"))},
    "mlp.gate_proj.": ("mlp.w12", 0), "mlp.up_proj.": ("mlp.w12", 1),
}
_STACK_PARTS = {"attn.qkv": ("query", "key", "value"), "mlp.w12": ("gate", "up")}
_CHUNKED_BLOCK = re.compile(r"blocks\.\d+\.(\d+\..+)")


def _hf_to_mmseg(key: str) -> str | None:
    """The mmseg MiT name of a Hugging Face encoder key (``segformer.`` already removed), else None."""
    if m := _HF_PATCH.fullmatch(key):
        return f"patch_embed{int(m[1]) + 1}.{'proj' if m[2] == 'proj' else 'norm'}.{m[3]}"
    if m := _HF_NORM.fullmatch(key):
        return f"norm{int(m[1]) + 1}.{m[2]}"
    if m := _HF_BLOCK.fullmatch(key):
        for old, new in _HF_BLOCK_NAMES.items():
            if m[3].startswith(old):
                return f"block{int(m[1]) + 1}.{m[2]}.{new}{m[3][len(old):]}"
    return None


def _from_hf_segformer(state: dict[str, torch.Tensor], path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Hugging Face segformer keys as the bida MiT segmentor's (``backbone.`` + mmseg names).

    Returns:
        (converted state, skipped keys: the ImageNet classifier and any decode head).
    """
    out: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    kv: dict[str, dict[str, torch.Tensor]] = {}  # "block1.0.attn.kv.weight" -> {"key": ..., "value": ...}
    for key, value in state.items():
        if key.startswith(("classifier.", "decode_head.")):
            skipped.append(key)
            continue
        name = key[len("segformer."):] if key.startswith("segformer.") else key
        block = _HF_BLOCK.fullmatch(name)
        if block and (m := _HF_KV.fullmatch(block[3])):
            kv.setdefault(f"block{int(block[1]) + 1}.{block[2]}.attn.kv.{m[2]}", {})[m[1]] = value
            continue
        new = _hf_to_mmseg(name)
        out[f"backbone.{new}" if new is not None else key] = value  # unknown keys stay, to be reported
    for name, parts in kv.items():
        if set(parts) != {"key", "value"}:
            lacking = "value" if "key" in parts else "key"
            raise CheckpointError(f"pretrained file {path}: the attention {lacking} layer of {name} is missing")
        out[f"backbone.{name}"] = torch.cat([parts["key"], parts["value"]], 0)  # mmseg kv: keys, then values
    return out, skipped


def _from_dinov2_release(state: dict[str, torch.Tensor],
                         mask_token: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A DINOv2 release file's keys as the bida DINOv2 segmentor's (``backbone.`` prefixed).

    ``mask_token``: the model keeps the pretraining mask token (``model.mask_token``), so it loads.

    Returns:
        (converted state, skipped keys: ``mask_token`` unless the model has one).
    """
    out: dict[str, torch.Tensor] = {}
    skipped = [k for k in state if k == "mask_token" and not mask_token]
    for key, value in state.items():
        if key in skipped:
            continue
        if m := _CHUNKED_BLOCK.fullmatch(key):  # FSDP chunks: blocks.C.N.* with N the block's own index
            key = f"blocks.{m[1]}"
        out[f"backbone.{key}"] = value
    return out, skipped


def _hf_dinov2_name(key: str) -> str | None:
    """The release name of a Hugging Face dinov2 key (prefix removed), else None."""
    if key in _HF_DINO_EMBED_NAMES:
        return _HF_DINO_EMBED_NAMES[key]
    if m := _HF_DINO_BLOCK.fullmatch(key):
        for old, new in _HF_DINO_BLOCK_NAMES.items():
            if m[2].startswith(old):
                return f"blocks.{m[1]}.{new}{m[2][len(old):]}"
    return None


def _from_hf_dinov2(state: dict[str, torch.Tensor], path: str | Path,
                    mask_token: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Hugging Face dinov2 keys as the bida DINOv2 segmentor's (``backbone.`` + release names).

    ``mask_token``: the model keeps the pretraining mask token (``model.mask_token``), so it loads.

    Returns:
        (converted state, skipped keys: ``mask_token`` unless the model has one, and an
        ImageNet ``classifier``).
    """
    out: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    stacked: dict[str, dict[int, torch.Tensor]] = {}  # "blocks.0.attn.qkv.weight" -> {0: q, 1: k, 2: v}
    for key, value in state.items():
        name = key.split(".", 1)[1] if key.startswith(("dinov2.", "dinov2_with_registers.")) else key
        if name == "embeddings.mask_token" and mask_token:
            out["backbone.mask_token"] = value
            continue
        if name == "embeddings.mask_token" or key.startswith("classifier."):
            skipped.append(key)
            continue
        block = _HF_DINO_BLOCK.fullmatch(name)
        part = next(((old, target) for old, target in _HF_DINO_STACKED.items()
                     if block and block[2].startswith(old)), None)
        if part:
            (old, (target, index)) = part
            stacked.setdefault(f"blocks.{block[1]}.{target}.{block[2][len(old):]}", {})[index] = value
            continue
        new = _hf_dinov2_name(name)
        out[f"backbone.{new}" if new is not None else key] = value  # unknown keys stay, to be reported
    for name, parts in stacked.items():
        labels = _STACK_PARTS[".".join(name.split(".")[2:4])]
        if len(parts) != len(labels):
            lacking = [labels[i] for i in range(len(labels)) if i not in parts]
            raise CheckpointError(f"pretrained file {path}: the {'/'.join(lacking)} part of {name} is missing")
        out[f"backbone.{name}"] = torch.cat([parts[i] for i in range(len(labels))], 0)
    return out, skipped


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
        return _from_hf_segformer(state, path)
    mask_token = "backbone.mask_token" in own  # model.mask_token: the pretraining mask token is trained on
    if layout == "hf_dinov2":
        return _from_hf_dinov2(state, path, mask_token)
    if layout == "dinov2":
        return _from_dinov2_release(state, mask_token)
    if layout == "mit":  # ImageNet mit_b*.pth: encoder keys without a prefix, maybe an ImageNet head
        skipped = [k for k in state if k.startswith("head.")]
        return {f"backbone.{k}": v for k, v in state.items() if k not in skipped}, skipped
    return state, []


def load_pretrained(model: torch.nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load ImageNet / DeepLab-init / MiT / DINOv2 / bida weights into the backbone (and the head when it fits).

    Returns:
        ``{"loaded": [...], "skipped": [...], "missing": [...]}`` key lists.

    Raises:
        CheckpointError: a file of the other segmentor family, unexpected keys, missing
            backbone keys or shape mismatches.
    """
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
            raise CheckpointError(
                f"pretrained file {path}: {key} has shape {tuple(value.shape)}, model expects {tuple(own[key].shape)} "
                "(another backbone depth or width?)")
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
