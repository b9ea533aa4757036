"""The interface every segmentor offers the trainer (bida.models), checked on every registered
architecture at a tiny width: ``forward(x, domain) -> SegOutput`` at the family's output
stride, ``num_classes``, ``feature_dim``, ``proj``, ``param_groups``, ``target_stem`` /
``sync_target_stem()``, ``concat_domains_ok``, ``backbone_output_module()``, and the DINOv2
token interface (``token_grid``, ``token_keep``) and its padding of inputs that are not whole
patches."""

from __future__ import annotations

import math

import pytest
import torch

from bida.config import load_config
from bida.models import DINOV2_ARCHS, MIT_ARCHS, RESNET_ARCHS, SegOutput, build_model

K = 5
PROJ_DIM = 8
TINY_WIDTH = {"resnet": ["model.width=0.125"],
              "mit": ["model.width=0.125", "model.decoder_dim=16", "method.feature=decoder"],
              "dinov2": ["model.width=0.0625", "model.decoder_dim=16", "method.feature=decoder"]}
ARCHS = ([("resnet", a) for a in sorted(RESNET_ARCHS)] + [("mit", a) for a in sorted(MIT_ARCHS)]
         + [("dinov2", a) for a in sorted(DINOV2_ARCHS)])


def _cfg(family: str, arch: str, *extra: str):
    return load_config(None, [f"model.backbone={arch}", f"model.proj_dim={PROJ_DIM}", *TINY_WIDTH[family], *extra])


def _model(family: str, arch: str, *extra: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = _cfg(family, arch, *extra)
    return build_model(cfg.model, K, cfg.method.feature)


def _output_size(family: str, h: int, w: int) -> tuple[int, int]:
    """The logit grid of an h x w input, written out from each family's stride: DeepLab-V2's
    stride 2 conv, ceil-mode max pool and stride 2 stage (output stride 8); MiT's stride 4;
    DINOv2's 14-pixel patches at 4 cells per patch side (stride 3.5)."""
    if family == "resnet":
        conv1 = (h + 2 * 3 - 7) // 2 + 1, (w + 2 * 3 - 7) // 2 + 1
        pool = tuple(math.ceil((s + 2 - 3) / 2) + 1 for s in conv1)
        return tuple((s - 1) // 2 + 1 for s in pool)
    if family == "mit":
        return math.ceil(h / 4), math.ceil(w / 4)
    return math.ceil(4 * h / 14), math.ceil(4 * w / 14)


# Sizes that are not multiples of the strides: MiT needs >= 32 px, DINOv2 pads to whole patches.
INPUT = {"resnet": (36, 52), "mit": (34, 46), "dinov2": (30, 44)}


@pytest.mark.parametrize("family, arch", ARCHS, ids=[a for _, a in ARCHS])
def test_every_segmentor_keeps_the_trainer_interface(family, arch):
    model = _model(family, arch).train()
    h, w = INPUT[family]
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(1))
    out = model(x, "source")
    assert isinstance(out, SegOutput)
    size = _output_size(family, h, w)
    assert out.logits.shape == (2, K, *size) and out.features.shape == (2, model.feature_dim, *size)
    assert out.logits.dtype == out.features.dtype == torch.float32
    assert model.num_classes == K
    # the contrast feature: DeepLab-V2's default reads the four ASPP branches (4K channels, no
    # projection); the transformers project their fused decoder feature to proj_dim
    if family == "resnet":
        assert model.proj is None and model.feature_dim == 4 * K
    else:
        assert model.proj is not None and model.feature_dim == PROJ_DIM
    # no separate target stem unless asked for: both domains run the same network
    assert model.target_stem is None and model.concat_domains_ok is True
    model.sync_target_stem()  # a no-op without a target stem
    assert model(x, "target").logits.shape == out.logits.shape

    # param_groups: every trainable parameter exactly once; the head (decoder and projection)
    # at head_lr_mult x lr, the backbone at lr x its multiplier
    groups = model.param_groups(0.01, 10.0)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in trainable}
    for g in groups:
        assert g["lr"] == pytest.approx(0.01 * g["lr_mult"]) and isinstance(g["name"], str)
    head = [g for g in groups if g["name"] == "head"]
    assert len(head) == 1 and head[0]["lr_mult"] == 10.0
    head_ids = {id(p) for p in head[0]["params"]}
    if model.proj is not None:
        assert {id(p) for p in model.proj.parameters()} <= head_ids
    assert {id(p) for p in model.backbone_output_module().parameters() if p.requires_grad}.isdisjoint(head_ids)

    # backbone_output_module: a module the forward runs (the feature distance hooks it)
    seen = []
    handle = model.backbone_output_module().register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        model(x)
    finally:
        handle.remove()
    assert len(seen) == 1

    # a trainable parameter that no forward reaches would leave DDP waiting for its gradient
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out.logits.square().mean() + out.features.square().mean()).backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    allowed = {"backbone.mask_token"}  # DINOv2's: only a token_keep forward reads it (model.mask_token)
    assert set(unused) <= allowed, unused


@pytest.mark.parametrize("family, arch", [("resnet", "resnet18"), ("mit", "mit_b0"), ("dinov2", "dinov2_vits14")])
def test_eval_forward_is_deterministic_and_batch_independent(family, arch):
    """In eval mode a row's output does not depend on the other rows (no batch statistics)."""
    model = _model(family, arch).eval()
    h, w = INPUT[family]
    x = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole, first = model(x), model(x[:1])
    torch.testing.assert_close(whole.logits[:1], first.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(whole.features[:1], first.features, rtol=1e-4, atol=1e-5)


def test_resnet_backbone_feature_and_target_stem_options():
    model = _model("resnet", "resnet18", "method.feature=backbone", "model.separate_target_stem=true").train()
    assert model.proj is not None and model.feature_dim == PROJ_DIM
    assert model.target_stem is not None
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    out = model(x, "target")
    assert out.features.shape == (2, PROJ_DIM, *_output_size("resnet", 32, 32))
    with torch.no_grad():
        model.conv1.weight.add_(1.0)  # the stems differ until synchronised
    assert not torch.equal(model.target_stem.conv1.weight, model.conv1.weight)
    model.sync_target_stem()
    assert torch.equal(model.target_stem.conv1.weight, model.conv1.weight)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, "target").logits, model(x, "source").logits)
    assert {id(p) for p in model.proj.parameters()} <= {id(p) for g in model.param_groups(1.0)
                                                        if g["name"] == "head" for p in g["params"]}


@pytest.mark.parametrize("arch", ["dinov2_vits14", "dinov2_vits14_reg"])
def test_dinov2_token_interface_and_padding(arch):
    """``token_grid`` is the patch grid of the padded input; ``token_keep`` all True changes
    nothing, masked tokens change the output; padding is cropped from the logits."""
    model = _model("dinov2", arch, "model.mask_token=true", "mic.weight=1", "train.schedule=teacher").eval()
    h, w = INPUT["dinov2"]
    gh, gw = math.ceil(h / 14), math.ceil(w / 14)
    assert model.token_grid(h, w) == (gh, gw)
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model(x)
        kept = model(x, "target", torch.ones(2, gh, gw, dtype=torch.bool))
        keep = torch.ones(2, gh, gw, dtype=torch.bool)
        keep[:, 0, 0] = False
        masked = model(x, "target", keep)
        padded = torch.nn.functional.pad(x, (0, gw * 14 - w, 0, gh * 14 - h))
        whole = model(padded)
    torch.testing.assert_close(kept.logits, plain.logits)
    assert not torch.equal(masked.logits, plain.logits)
    # the input is padded at the bottom right to whole patches, then cropped to ceil(4s/14) cells
    oh, ow = _output_size("dinov2", h, w)
    torch.testing.assert_close(plain.logits, whole.logits[..., :oh, :ow], rtol=1e-4, atol=1e-5)
