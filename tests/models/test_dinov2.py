"""DINOv2 backbones: the ViT against Hugging Face's reference, the weight layouts, the
segmentor's padding, layer-wise LR decay and a BiDA + teacher run.

``transformers`` is a dev dependency (pyproject's ``dev`` extra): imported here only.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.errors import CheckpointError, ConfigError
from bida.models import DINOv2Segmentor, MiTSegmentor, build_model
from bida.models.dinov2 import ARCHS, LightHead, VisionTransformer
from bida.models.heads import DAFormerHead, SegFormerHead
from bida.models.weights import load_pretrained
from bida.tools.cli import main


# DINOv2 (Oquab et al., Table 17 and the released models): width, depth, heads, FFN, and the
# parameter count of the release file (its mask_token included).
PUBLISHED = {
    "dinov2_vits14": (384, 12, 6, False, 22_056_576),
    "dinov2_vitb14": (768, 12, 12, False, 86_580_480),
    "dinov2_vitl14": (1024, 24, 16, False, 304_368_640),
    "dinov2_vitg14": (1536, 40, 24, True, 1_136_480_768),
}

DINO_TINY = ["model.backbone=dinov2_vits14", "model.width=0.125", "model.decoder=daformer", "model.decoder_dim=16",
             "model.proj_dim=8"]


def release_shapes(dim: int, depth: int, swiglu: bool, registers: int = 0, grid: int = 37) -> dict[str, tuple]:
    """The keys and shapes of a DINOv2 release file, written out from dinov2/models/vision_transformer.py."""
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 1 + grid * grid, dim), "mask_token": (1, dim),
              "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,)}
    if registers:
        shapes["register_tokens"] = (1, registers, dim)
    hidden = (int(dim * 4 * 2 / 3) + 7) // 8 * 8
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim),
                   b + "attn.qkv.bias": (3 * dim,), b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                   b + "ls1.gamma": (dim,), b + "norm2.weight": (dim,), b + "norm2.bias": (dim,), b + "ls2.gamma": (dim,)}
        if swiglu:
            shapes |= {b + "mlp.w12.weight": (2 * hidden, dim), b + "mlp.w12.bias": (2 * hidden,),
                       b + "mlp.w3.weight": (dim, hidden), b + "mlp.w3.bias": (dim,)}
        else:
            shapes |= {b + "mlp.fc1.weight": (4 * dim, dim), b + "mlp.fc1.bias": (4 * dim,),
                       b + "mlp.fc2.weight": (dim, 4 * dim), b + "mlp.fc2.bias": (dim,)}
    return shapes


def _release_file(path, shapes: dict[str, tuple], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    torch.save(state, path)
    return state


def _segmentor(arch="dinov2_vits14", width=0.125, seed=0, **kw) -> DINOv2Segmentor:
    torch.manual_seed(seed)
    return DINOv2Segmentor(5, arch, width=width, decoder_dim=16, proj_dim=8, **kw)


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_published_sizes_and_release_shapes(arch):
    dim, depth, heads, swiglu, count = PUBLISHED[arch]
    for name in (arch, arch + "_reg"):
        spec = ARCHS[name]
        assert (spec.dim, spec.depth, spec.heads, spec.swiglu) == (dim, depth, heads, swiglu)
        with torch.device("meta"):  # ViT-g's shapes without allocating its 1.1B weights
            m = VisionTransformer(name)
        registers = 4 if name.endswith("_reg") else 0
        expected = release_shapes(dim, depth, swiglu, registers)
        del expected["mask_token"]  # pretraining only (iBOT), not a parameter here
        assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
        assert sum(p.numel() for p in m.parameters()) == count - dim + registers * dim
    assert max(spec.levels) == depth - 1 and len(set(spec.levels)) == 4


def test_vitg_swiglu_hidden_width_is_dinov2s():
    with torch.device("meta"):
        m = VisionTransformer("dinov2_vitg14")
    assert tuple(m.blocks[0].mlp.w12.weight.shape) == (2 * 4096, 1536)
    assert tuple(m.blocks[0].mlp.w3.weight.shape) == (1536, 4096)


def _hf_reference(arch: str, width: float, pos_grid: int, seed: int = 0):
    """A random Hugging Face Dinov2Model / Dinov2WithRegistersModel of bida's tiny ``arch``."""
    spec = ARCHS[arch]
    dim = max(spec.heads, round(spec.dim * width / spec.heads) * spec.heads)
    kw = dict(hidden_size=dim, num_hidden_layers=spec.depth, num_attention_heads=spec.heads, patch_size=14,
              image_size=14 * pos_grid, use_swiglu_ffn=spec.swiglu, layerscale_value=0.5,
              attn_implementation="eager")
    torch.manual_seed(seed)
    if spec.registers:
        ref = transformers.Dinov2WithRegistersModel(
            transformers.Dinov2WithRegistersConfig(num_register_tokens=spec.registers, **kw))
    else:
        ref = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
    with torch.no_grad():  # move everything off its neutral initialisation
        for name, p in ref.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
            elif "position_embeddings" in name or "token" in name:
                p.normal_()
    return ref.eval()


def hub_pos_embed(pos: torch.Tensor, gh: int, gw: int, registers: bool, dtype=torch.float32) -> torch.Tensor:
    """DINOv2's ``interpolate_pos_encoding`` with the hub's settings, written out here from
    dinov2/models/vision_transformer.py and dinov2/hub/backbones.py: unchanged at the
    pretraining grid; otherwise the patch part resampled bicubically in float32, by
    ``scale_factor = ((gh + 0.1) / M, (gw + 0.1) / M)`` without antialiasing
    (``interpolate_offset=0.1``, the variants without registers) or to the size (gh, gw) with
    antialiasing (``interpolate_offset=0``, ``interpolate_antialias=True``, the ``_reg`` ones).
    ``dtype``: float64 gives the formula's exact values (float32 source coordinates are off by
    up to about 1e-6 of a grid step)."""
    m = math.isqrt(pos.shape[1] - 1)
    if (gh, gw) == (m, m):
        return pos
    grid = pos[:, 1:].to(dtype).reshape(1, m, m, -1).permute(0, 3, 1, 2)
    if registers:
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True)
    else:
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / m, (gw + 0.1) / m), mode="bicubic", antialias=False)
    assert grid.shape[-2:] == (gh, gw)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)], 1).to(pos.dtype)


@pytest.mark.parametrize("arch", ["dinov2_vits14", "dinov2_vits14_reg"])
@pytest.mark.parametrize("grid", [(6, 6), (12, 12), (4, 9), (13, 5)])
def test_position_embeddings_follow_the_dinov2_hub_interpolation(arch, grid):
    """bida's resampled position embeddings against the hub formula above, on a random 6 x 6
    grid of embeddings: up, down, mixed and the identity (the pretraining grid itself)."""
    vit = VisionTransformer(arch, width=0.125, pos_grid=6)
    with torch.no_grad():
        vit.pos_embed.normal_(generator=torch.Generator().manual_seed(4))
    registers = arch.endswith("_reg")
    got = vit.position_embedding(*grid)
    want = hub_pos_embed(vit.pos_embed.detach(), *grid, registers)  # the hub model's own, in float32
    assert torch.allclose(got, want, rtol=0, atol=1e-5)
    exact = hub_pos_embed(vit.pos_embed.detach(), *grid, registers, torch.float64)
    assert torch.allclose(got, exact.float(), rtol=0, atol=1e-6 if not registers else 1e-5)
    if grid == (6, 6):
        assert got is vit.pos_embed
    elif not registers:  # the offset is not vacuous: resampling to the size differs
        to_size = F.interpolate(vit.pos_embed[:, 1:].reshape(1, 6, 6, -1).permute(0, 3, 1, 2), size=grid,
                                mode="bicubic").permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
        assert (got[:, 1:] - to_size).abs().max() > 1e-3


def _hub_interpolation(embeddings, registers: bool):
    """Hugging Face's embeddings module resampling as DINOv2's hub model (:func:`hub_pos_embed`)."""
    def interpolate(tokens, height, width):
        return hub_pos_embed(embeddings.position_embeddings, height // 14, width // 14, registers)
    return interpolate


@pytest.mark.parametrize("arch, width", [("dinov2_vits14", 0.125), ("dinov2_vitb14_reg", 1 / 16),
                                         ("dinov2_vitg14", 1 / 32)])
@pytest.mark.parametrize("files", ["save_pretrained", "state_dict"])
def test_matches_hugging_face_dinov2(tmp_path, arch, width, files):
    """Last hidden state and the four levels bida reads, at an input whose grid (4 x 8) is not
    the position embeddings' (6 x 6): max abs difference <= 1e-5 in fp32.

    The register variants match Hugging Face's ``Dinov2WithRegistersModel`` as it is (its
    resampling is the hub's). ``Dinov2Model`` resamples to the grid size where DINOv2's hub
    model (and bida) resample by the offset scale factor: for the variants without registers
    the reference's position-embedding resampling is replaced by the hub formula, the rest of
    the network is Hugging Face's."""
    ref = _hf_reference(arch, width, pos_grid=6)
    registers = ARCHS[arch].registers > 0
    hf_resampling = ref.embeddings.interpolate_pos_encoding
    if not registers:
        ref.embeddings.interpolate_pos_encoding = _hub_interpolation(ref.embeddings, registers)
    if files == "save_pretrained":  # the Hub's names: query/key/value, weights_in/out, lambda1
        ref.save_pretrained(tmp_path)
        path = tmp_path / "model.safetensors"
    else:  # transformers' in-memory names: q_proj/k_proj/v_proj, gate/up/down_proj
        path = tmp_path / "state.safetensors"
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    seg = _segmentor(arch, width, seed=1, pos_grid=6)
    report = load_pretrained(seg, path)
    assert report["skipped"] == ["embeddings.mask_token"]
    assert set(report["loaded"]) == {f"backbone.{k}" for k in seg.backbone.state_dict()}
    vit = seg.backbone.eval()
    x = torch.randn(2, 3, 56, 112, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)
        raw, gh, gw = vit.tokens(x, tuple(range(vit.depth)))
        levels = vit(x)
    assert (gh, gw) == (4, 8)
    prefix = 1 + ARCHS[arch].registers
    assert torch.allclose(vit.norm(raw[-1]), out.last_hidden_state, rtol=0, atol=1e-5)
    for i, level in zip(vit.levels, levels):
        assert torch.allclose(raw[i], out.hidden_states[i + 1], rtol=0, atol=1e-5), i
        want = ref.layernorm(out.hidden_states[i + 1])[:, prefix:].transpose(1, 2).reshape(2, -1, gh, gw)
        assert torch.allclose(level, want, rtol=0, atol=1e-5), i
    assert (out.last_hidden_state - out.hidden_states[-1]).abs().max() > 0.1  # the final norm is not vacuous
    with torch.no_grad():  # where the two references differ, bida follows the hub
        pos_hf = hf_resampling(torch.zeros(1, 33, ref.config.hidden_size), 56, 112)
    gap = (pos_hf - vit.position_embedding(4, 8)).abs().max()
    assert gap < 1e-6 if registers else gap > 1e-3


def _release_of_hf(ref) -> dict[str, torch.Tensor]:
    """A release-layout state dict of a Hugging Face model, renamed here by hand."""
    out = {}
    for k, v in ref.state_dict().items():
        name = (k.replace("embeddings.patch_embeddings.projection", "patch_embed.proj")
                .replace("embeddings.position_embeddings", "pos_embed").replace("embeddings.", "")
                .replace("encoder.layer.", "blocks.").replace("layer_scale1.lambda1", "ls1.gamma")
                .replace("layer_scale2.lambda1", "ls2.gamma").replace("attention.o_proj", "attn.proj")
                .replace("layernorm.", "norm."))
        if ".attention.q_proj." in name:
            parts = [ref.state_dict()[k.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            out[name.replace("attention.q_proj", "attn.qkv")] = torch.cat(parts)
        elif "mlp.gate_proj" in name:
            out[name.replace("gate_proj", "w12")] = torch.cat([v, ref.state_dict()[k.replace("gate_proj", "up_proj")]])
        elif "mlp.down_proj" in name:
            out[name.replace("down_proj", "w3")] = v
        elif not any(p in name for p in ("k_proj", "v_proj", "up_proj")):
            out[name] = v
    return out


@pytest.mark.parametrize("chunked", [False, True])
def test_release_layout_round_trip(tmp_path, chunked):
    """A release file written from the reference loads and computes the reference's features
    (plain ``blocks.N.`` names or DINOv2's FSDP chunks ``blocks.C.N.``)."""
    ref = _hf_reference("dinov2_vits14_reg", 0.125, pos_grid=6)
    state = _release_of_hf(ref)
    assert {k: tuple(v.shape) for k, v in state.items()} == release_shapes(48, 12, False, 4, grid=6)
    if chunked:  # 4 chunks of 3 blocks; a block keeps its own index inside its chunk
        state = {(f"blocks.{int(k.split('.')[1]) // 3}.{k[len('blocks.'):]}" if k.startswith("blocks.") else k): v
                 for k, v in state.items()}
    torch.save(state, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    seg = _segmentor("dinov2_vits14_reg", seed=1, pos_grid=6)
    report = load_pretrained(seg, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    assert report["skipped"] == ["mask_token"]
    x = torch.randn(1, 3, 70, 42, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(pixel_values=x).last_hidden_state
        got = seg.backbone.eval().norm(seg.backbone.tokens(x, (11,))[0][0])
    assert torch.allclose(got, want, rtol=0, atol=1e-5)


def test_full_size_vits14_release_file_loads_exactly(tmp_path):
    state = _release_file(tmp_path / "dinov2_vits14_pretrain.pth", release_shapes(384, 12, False))
    seg = DINOv2Segmentor(19, "dinov2_vits14", decoder_dim=16, proj_dim=8)
    report = load_pretrained(seg, tmp_path / "dinov2_vits14_pretrain.pth")
    assert report["skipped"] == ["mask_token"]
    assert all(k.startswith(("neck.", "decode_head.", "proj.")) for k in report["missing"])
    own = seg.backbone.state_dict()
    assert own.keys() == state.keys() - {"mask_token"}
    assert all(torch.equal(own[k], state[k]) for k in own)


def test_wrong_weight_files_give_one_line_errors(tmp_path):
    shapes = release_shapes(48, 12, False)
    _release_file(tmp_path / "vits.pth", shapes)
    lacking = {k: v for k, v in _release_file(tmp_path / "x.pth", shapes).items() if k != "blocks.3.ls1.gamma"}
    torch.save(lacking, tmp_path / "lacking.pth")
    _release_file(tmp_path / "wide.pth", release_shapes(96, 12, False))
    _release_file(tmp_path / "grid.pth", release_shapes(48, 12, False, grid=16))
    _release_file(tmp_path / "reg.pth", release_shapes(48, 12, False, registers=4))
    hf = {k: v for k, v in _hf_reference("dinov2_vits14", 0.125, 6).state_dict().items() if "layer.2.attention.v_" not in k}
    save_file({k: v.contiguous() for k, v in hf.items()}, str(tmp_path / "novalue.safetensors"))
    mit = MiTSegmentor(19, "mit_b0", width=0.125, decoder_dim=16, proj_dim=8)
    torch.save({k[len("backbone."):]: v for k, v in mit.state_dict().items() if k.startswith("backbone.")},
               tmp_path / "mit_b0.pth")
    cases = [
        ("mit_b0.pth", _segmentor(), r"mit_b0\.pth holds SegFormer/mmseg MiT weights; model\.backbone=dinov2_vits14 "
                                     r"needs DINOv2 weights"),
        ("vits.pth", mit, r"vits\.pth holds DINOv2 release \(ViT\) weights; model\.backbone=mit_b0 needs MiT"),
        ("lacking.pth", _segmentor(), r"lacking\.pth lacks backbone keys: backbone\.blocks\.3\.ls1\.gamma"),
        ("wide.pth", _segmentor(), r"wide\.pth: backbone\.\w+ has shape"),
        ("grid.pth", _segmentor(), r"grid\.pth: backbone\.pos_embed has shape \(1, 257, 48\), model expects "
                                   r"\(1, 1370, 48\)"),
        ("reg.pth", _segmentor(), r"reg\.pth has unexpected keys: backbone\.register_tokens"),
        ("vits.pth", _segmentor("dinov2_vits14_reg"), r"vits\.pth lacks backbone keys: backbone\.register_tokens"),
        ("novalue.safetensors", _segmentor(pos_grid=6), r"novalue\.safetensors: the value part of "
                                                        r"blocks\.2\.attn\.qkv\.\w+ is missing"),
    ]
    for name, model, pattern in cases:
        with pytest.raises(CheckpointError, match=pattern) as err:
            load_pretrained(model, tmp_path / name)
        assert "\n" not in str(err.value)


def test_inputs_not_multiple_of_14_are_padded_at_bottom_right():
    """30 x 17 runs as its zero-padded 42 x 28 (a 3 x 2 grid); outputs are cropped to ceil(2H/7) x ceil(2W/7)."""
    seg = _segmentor("dinov2_vits14_reg").eval()
    x = torch.randn(2, 3, 30, 17, generator=torch.Generator().manual_seed(0))
    padded = F.pad(x, (0, 28 - 17, 0, 42 - 30))
    with torch.no_grad():
        levels, levels_padded = seg.backbone(x), seg.backbone(padded)
        out, out_padded = seg(x), seg(padded)
    assert [tuple(t.shape[-2:]) for t in levels] == [(3, 2)] * 4
    assert all(torch.equal(a, b) for a, b in zip(levels, levels_padded))
    assert tuple(out.logits.shape) == (2, 5, math.ceil(60 / 7), math.ceil(34 / 7)) == (2, 5, 9, 5)
    assert tuple(out_padded.logits.shape) == (2, 5, 12, 8)  # 42 x 28 is a whole grid: 4 cells a patch
    assert torch.equal(out.logits, out_padded.logits[..., :9, :5])
    assert torch.equal(out.features, out_padded.features[..., :9, :5])
    assert out.features.shape[1] == seg.feature_dim == 8


def test_pyramid_levels_and_head():
    seg = _segmentor(decoder="segformer").eval()
    x = torch.randn(1, 3, 70, 98)
    with torch.no_grad():
        levels = seg.neck(seg.backbone(x))
    assert [tuple(t.shape) for t in levels] == [(1, 48, 20, 28), (1, 48, 10, 14), (1, 48, 5, 7), (1, 48, 3, 4)]
    assert isinstance(seg.decode_head, SegFormerHead)


def test_layer_decay_param_groups_hand_computed():
    """lr 1, head x10, decay 0.5, depth 12: embeddings 0.5^13, block i 0.5^(12 - i), final norm 1, head 10."""
    seg = _segmentor("dinov2_vits14_reg")
    groups = seg.param_groups(1.0, 10.0, layer_decay=0.5)
    lr_of = {id(p): (g["lr"], g["lr_mult"], g.get("weight_decay")) for g in groups for p in g["params"]}
    assert len(lr_of) == sum(1 for _ in seg.parameters())  # every parameter in exactly one group
    named = dict(seg.named_parameters())
    expected = {"backbone.pos_embed": 0.5 ** 13, "backbone.cls_token": 0.5 ** 13, "backbone.register_tokens": 0.5 ** 13,
                "backbone.patch_embed.proj.weight": 0.5 ** 13, "backbone.blocks.0.attn.qkv.weight": 0.5 ** 12,
                "backbone.blocks.0.ls1.gamma": 0.5 ** 12, "backbone.blocks.5.mlp.fc1.weight": 0.5 ** 7,
                "backbone.blocks.11.norm2.bias": 0.5, "backbone.norm.weight": 1.0,
                "neck.up4.0.weight": 10.0, "decode_head.classifier.bias": 10.0, "proj.0.weight": 10.0}
    for name, lr in expected.items():
        assert lr_of[id(named[name])][:2] == (lr, lr), name
    no_wd = ["backbone.blocks.0.ls1.gamma", "backbone.blocks.11.norm2.bias", "backbone.norm.weight",
             "backbone.patch_embed.proj.bias"]
    assert all(lr_of[id(named[n])][2] == 0.0 for n in no_wd)
    assert lr_of[id(named["backbone.blocks.0.attn.qkv.weight"])][2] is None  # the optimizer's weight decay
    # decay 1.0: one decayed and one undecayed backbone group, and the head
    assert [g["lr_mult"] for g in seg.param_groups(1.0, 10.0)] == [1.0, 1.0, 10.0]


def test_decay_norms_biases_puts_every_parameter_under_the_optimizer_weight_decay():
    """train.decay_norms_biases (VFM-UDA: one AdamW weight decay for every group): no group
    overrides the weight decay, so biases, norms, LayerScale gammas and tokens decay at 0.01."""
    seg = _segmentor("dinov2_vits14_reg")
    groups = seg.param_groups(1.0, 10.0, layer_decay=0.5, decay_norms_biases=True)
    assert all("weight_decay" not in g for g in groups)
    opt = torch.optim.AdamW(groups, lr=1.0, weight_decay=0.01)
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert len(wd_of) == sum(1 for _ in seg.parameters())
    assert set(wd_of.values()) == {0.01}
    # the default: exactly the biases, norms and gammas of the encoder are exempt
    opt = torch.optim.AdamW(seg.param_groups(1.0, 10.0), lr=1.0, weight_decay=0.01)
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in seg.named_parameters():
        exempt = name.startswith("backbone.") and (name.endswith((".bias", ".gamma")) or "norm" in name)
        assert wd_of[id(p)] == (0.0 if exempt else 0.01), name
    # the LRs do not depend on the switch
    lrs = lambda gs: sorted((g["lr"], len(g["params"])) for g in gs)  # noqa: E731
    merged = lrs(seg.param_groups(1.0, 10.0, 0.5, decay_norms_biases=True))
    split = seg.param_groups(1.0, 10.0, 0.5)
    per_lr: dict[float, int] = {}
    for g in split:
        per_lr[g["lr"]] = per_lr.get(g["lr"], 0) + len(g["params"])
    assert merged == sorted(per_lr.items())


@pytest.mark.parametrize("override, key", [
    (["train.layer_decay=0"], "train.layer_decay"),
    (["train.layer_decay=1.5"], "train.layer_decay"),
    (["model.backbone=mit_b0", "train.layer_decay=0.9"], "train.layer_decay"),
    (["model.backbone=resnet18", "train.layer_decay=0.9"], "train.layer_decay"),
    (["model.backbone=mit_b0", "train.decay_norms_biases=true"], "train.decay_norms_biases"),
    (["model.backbone=resnet18", "train.decay_norms_biases=true"], "train.decay_norms_biases"),
    (["method.feature=aspp_branches"], "method.feature"),
    (["model.freeze_bn=true"], "model.freeze_bn"),
    (["data.normalize=caffe"], "data.normalize"),
])
def test_config_rejects_options_that_do_not_fit_dinov2(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_config(None, ["model.backbone=dinov2_vits14"] + override)
    assert "\n" not in str(err.value)


def test_config_builds_dinov2_with_decoder_feature_by_default():
    cfg = load_config(None, DINO_TINY + ["model.backbone=dinov2_vitl14_reg", "data.crop=[20,30]"])
    assert cfg.method.feature == "decoder" and cfg.train.layer_decay == 1.0
    m = build_model(cfg.model, 4, cfg.method.feature)
    assert isinstance(m, DINOv2Segmentor) and isinstance(m.decode_head, DAFormerHead)
    assert m.backbone.dim == 128 and m.backbone.levels == (7, 11, 15, 23) and m.backbone.num_prefix == 5


@pytest.mark.slow
def test_bida_teacher_phase_on_a_vits14_release_file(tmp_path, tiny_overrides):
    """A full-size ViT-S/14 release-layout file loads as model.pretrained and a BiDA + teacher
    phase (ClassMix, MIC, feature distance, layer decay, checkpointing) runs on it at 56 x 56."""
    _release_file(tmp_path / "dinov2_vits14_pretrain.pth", release_shapes(384, 12, False))
    run = tmp_path / "run"
    overrides = tiny_overrides + [
        "model.backbone=dinov2_vits14", "model.width=1.0", "model.decoder=daformer", "model.decoder_dim=16",
        "model.proj_dim=8", "model.drop_path=0.1", "model.grad_checkpoint=true",
        f"model.pretrained={tmp_path / 'dinov2_vits14_pretrain.pth'}",
        "data.synthetic.height=56", "data.synthetic.width=84", "data.crop=[56,56]",
        "method=bida", "train.schedule=teacher", "train.iters=2", "train.optimizer=adamw", "train.lr=1e-5",
        "train.weight_decay=0.01", "train.layer_decay=0.9", "mic.weight=1.0", "mic.block_size=14",
        "loss.feature_distance_weight=0.005", "loss.feature_distance_classes=null", "eval.max_images=1",
    ]
    assert main(["train", "--out", str(run), "--quiet", *overrides]) == 0
    steps = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r.get("phase") == "teacher"]
    assert len(steps) == 2 and all(v == v for r in steps for k, v in r.items() if k.startswith("loss/"))
    assert {"loss/contrast_t2s", "loss/contrast_s2t", "loss/mic", "loss/feature_distance", "loss/seg_mix"} <= set(steps[0])
    groups = load_checkpoint(run / "checkpoints" / "last.pt")["optimizer"]["param_groups"]
    assert sorted({round(g["lr_mult"], 12) for g in groups}) == sorted(
        {round(0.9 ** k, 12) for k in range(14)} | {10.0})  # embeddings 0.9^13 ... final norm 1, head 10


def test_bf16_autocast_forward_and_backward():
    seg = _segmentor("dinov2_vits14_reg")
    x = torch.randn(2, 3, 42, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = seg.eval()(x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = seg(x).logits.float()
    assert torch.isfinite(got).all() and (got - want).abs().max() < 0.05 * want.abs().max()
    seg.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = seg(F.interpolate(x, size=(30, 40)))  # an interpolated, padded grid under autocast
    (out.logits.float().square().mean() + out.features.float().square().mean()).backward()
    for p in (seg.backbone.pos_embed, seg.backbone.register_tokens, seg.backbone.blocks[0].ls1.gamma):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_light_head_is_vfm_udas_on_the_last_block():
    """decoder=light against a hand-written forward: two 2x2 transposed convs (no bias), channel
    LayerNorms (eps 1e-6), GELU after the first, a 3x3 conv, LayerNorm, a 1x1 classifier."""
    seg = _segmentor(decoder="light").eval()
    dim = seg.backbone.dim
    assert not list(seg.neck.parameters()) and seg.backbone.levels == (11,)
    head = seg.decode_head
    with torch.no_grad():  # off the neutral LayerNorm initialisation
        for m in head.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    x = torch.randn(2, 3, 42, 56, generator=torch.Generator().manual_seed(5))

    def ln(t, m):
        return F.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), m.weight, m.bias, 1e-6).permute(0, 3, 1, 2)

    with torch.no_grad():
        out = seg(x)
        raw, gh, gw = seg.backbone.tokens(x, (11,))
        tokens = seg.backbone.norm(raw[0])[:, 1:].transpose(1, 2).reshape(2, dim, gh, gw)
        u = head.upscale
        t = F.gelu(ln(F.conv_transpose2d(tokens, u[0].weight, stride=2), u[1]))
        t = ln(F.conv_transpose2d(t, u[3].weight, stride=2), u[4])
        fused = ln(F.conv2d(t, u[5].weight, padding=1), u[6])
        logits = F.conv2d(fused, head.classifier.weight)
    assert out.logits.shape == (2, 5, 12, 16) and out.features.shape == (2, 8, 12, 16)
    assert torch.allclose(out.logits, logits, rtol=0, atol=1e-5)
    assert torch.allclose(out.features, seg.proj(fused), rtol=0, atol=1e-5)
    assert all(m.bias is None for m in (u[0], u[3], u[5], head.classifier))
    assert seg.proj[0].in_channels == dim // 4
    groups = seg.param_groups(1.0, 10.0)
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in seg.parameters())
    assert {id(p) for p in head.parameters()} <= {id(p) for p in groups[-1]["params"]}


def test_input_scale_resizes_to_whole_patches_as_vfm_uda():
    """input_scale 1.1: a 40 x 60 input goes to the ViT at floor(44/14)*14 x floor(66/14)*14 =
    42 x 56, bilinearly; the outputs are that input's (12 x 16), and a 1024 crop goes in at 1120."""
    seg = _segmentor(input_scale=1.1).eval()
    plain = _segmentor()
    plain.load_state_dict(seg.state_dict())
    plain.eval()
    x = torch.randn(2, 3, 40, 60, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out = seg(x)
        want = plain(F.interpolate(x, size=(42, 56), mode="bilinear", align_corners=False))
    assert out.logits.shape[-2:] == (12, 16)
    assert torch.equal(out.logits, want.logits) and torch.equal(out.features, want.features)
    assert int(1024 * 1.1) // 14 * 14 == 1120


@pytest.mark.parametrize("override, key", [
    (["model.backbone=mit_b0", "model.decoder=light"], "model.decoder"),
    (["model.backbone=mit_b0", "model.input_scale=1.1"], "model.input_scale"),
    (["model.backbone=dinov2_vits14", "model.input_scale=0"], "model.input_scale"),
])
def test_config_rejects_vit_only_options_elsewhere(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_config(None, override)
    assert "\n" not in str(err.value)


def test_config_builds_the_light_head_and_input_scale():
    cfg = load_config(None, DINO_TINY + ["model.decoder=light", "model.input_scale=1.1", "data.crop=[20,30]"])
    m = build_model(cfg.model, 4, cfg.method.feature)
    assert isinstance(m.decode_head, LightHead) and m.input_scale == 1.1


def test_token_masking_swaps_patch_tokens_for_the_mask_token():
    """token_keep against the same ViT whose patch embedding itself outputs the mask token on
    the withheld cells: the two must agree (the swap happens before the position embeddings)."""
    seg = _segmentor(mask_token=True, input_scale=1.1).eval()
    vit = seg.backbone
    with torch.no_grad():
        vit.mask_token.normal_(generator=torch.Generator().manual_seed(7))
    x = torch.randn(2, 3, 40, 60, generator=torch.Generator().manual_seed(8))
    grid = seg.token_grid(40, 60)
    assert grid == (3, 4)  # 42 x 56 after the 1.1 resize
    keep = torch.rand(2, *grid, generator=torch.Generator().manual_seed(9)) >= 0.5
    assert keep.any() and not keep.all()
    with torch.no_grad():
        out = seg(x, "target", token_keep=keep)
        unmasked = seg(x, "target")
        conv = vit.patch_embed.proj

        class MaskedEmbed(torch.nn.Module):
            def forward(self, img):
                patches = conv(img)
                return torch.where(keep[:, None], patches, vit.mask_token[0].view(1, -1, 1, 1))

        vit.patch_embed = MaskedEmbed()
        want = seg(x, "target")
    assert torch.allclose(out.logits, want.logits, rtol=0, atol=1e-6)
    assert (out.logits - unmasked.logits).abs().max() > 1e-3
    with pytest.raises(ValueError, match="token_keep"):
        seg(x, "target", token_keep=keep[:, :2])


def test_mask_token_loads_from_the_release_file_only_when_kept(tmp_path):
    shapes = release_shapes(48, 12, False, grid=6)
    state = _release_file(tmp_path / "release.pth", shapes)
    state["mask_token"] = torch.randn(1, 48)
    torch.save(state, tmp_path / "release.pth")
    kept = _segmentor(pos_grid=6, mask_token=True)
    report = load_pretrained(kept, tmp_path / "release.pth")
    assert "backbone.mask_token" in report["loaded"] and report["skipped"] == []
    assert torch.equal(kept.backbone.mask_token, state["mask_token"])
    assert load_pretrained(_segmentor(pos_grid=6), tmp_path / "release.pth")["skipped"] == ["mask_token"]
    groups = kept.param_groups(1.0, 10.0, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(kept.backbone.mask_token)] == 0.5 ** 13  # with the embeddings, as VFM-UDA's stems


def test_token_masks_draw_like_pixel_blocks_of_one_token():
    from bida.method.masking import MaskedImageConsistency

    a = MaskedImageConsistency(14, 0.7, "imagenet", seed=3)
    b = MaskedImageConsistency(1, 0.7, "imagenet", seed=3)
    img = torch.randn(4, 3, 28, 42, generator=torch.Generator().manual_seed(1))
    aug, keep = a.tokens(img, (5, 6))
    masked, keep_px = b(img[..., :5, :6])  # the same draws: colour augmentation, then one number per cell
    assert keep.shape == (4, 5, 6) and torch.equal(keep, keep_px)
    assert 0.1 < 1 - keep.float().mean() < 0.95
    assert torch.allclose(aug[..., :5, :6], masked, atol=1e-6) or not keep_px.all()  # pixels: zeros where withheld
    state = a.state_dict()
    first = a.tokens(img, (5, 6))[1]
    a.load_state_dict(state)
    assert torch.equal(a.tokens(img, (5, 6))[1], first)


@pytest.mark.parametrize("override, key", [
    (["model.mask_token=true"], "model.mask_token"),  # no MIC: nothing uses it
    (["model.backbone=mit_b0", "model.mask_token=true", "train.schedule=teacher", "method=self_training",
      "mic.weight=1"], "model.mask_token"),
])
def test_config_rejects_a_mask_token_nothing_uses(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_config(None, ["model.backbone=dinov2_vits14"] + override)
    assert "\n" not in str(err.value)
