"""Loading initial weights from local files (never downloaded).

Three layouts are recognised:

* the DeepLab-V2 ResNet-101 init checkpoint of AdaptSegNet/ADVENT/IAST and the official BiDA
  code (``DeepLab_init.pth``): keys prefixed ``Scale.``; its classifier (``layer5``) is for
  another label set and is skipped;
* torchvision ResNet ImageNet state dicts (``conv1.weight`` ... ``fc.bias``): ``fc`` skipped;
* bida checkpoints (a dict with ``model``) and safetensors files.

Keys that fit nowhere, backbone keys that are missing, or shapes that differ are errors
that name the file and the first offending keys.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .errors import CheckpointError

HEAD_PREFIXES = ("layer5.", "proj.")
SKIPPED_PREFIXES = ("fc.",)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensor state dict inside a weight file (``.pt``/``.pth`` or ``.safetensors``)."""
    path = Path(path)
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


def load_pretrained(model: torch.nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load ImageNet / DeepLab-init / bida weights into the backbone (and the head when it fits).

    Returns:
        ``{"loaded": [...], "skipped": [...], "missing": [...]}`` key lists.

    Raises:
        CheckpointError: unexpected keys, missing backbone keys or shape mismatches.
    """
    state = _normalise_keys(read_state_dict(path))
    own = model.state_dict()
    skipped = [k for k in state if k.startswith(SKIPPED_PREFIXES)]
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
    source stem. With ``fresh_projection`` (``model.init_checkpoint``), a checkpoint without
    the contrast projection head (``method.feature=backbone``; a source-only run has none)
    is accepted too: the head keeps its fresh initialisation.

    Returns:
        True when the target stem was initialised from the source stem that way.

    Raises:
        CheckpointError: naming the file when class count or architecture differ.
    """
    state = _normalise_keys(read_state_dict(path) if checkpoint is None else tensor_state(checkpoint, path))
    own = model.state_dict()
    # Parts the model has and the checkpoint may lack: they are left out of the strict check.
    optional = [prefix for prefix, allowed in (("target_stem.", True), ("proj.", fresh_projection))
                if allowed and any(k.startswith(prefix) for k in own) and not any(k.startswith(prefix) for k in state)]
    own = {k: v for k, v in own.items() if not k.startswith(tuple(optional))}
    sync_stem = "target_stem." in optional
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and own[k].shape != state[k].shape]
    bias_key = "layer5.conv2d_list.0.bias"
    if bias_key in mismatched:
        k = bias_key
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
