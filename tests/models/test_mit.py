"""MiT encoders, SegFormer/DAFormer decoders, their weight layouts and the trainer path."""

import json

import pytest
import torch
import torch.nn.functional as F

from bida.checkpoint import save_checkpoint
from bida.config import load_config
from bida.errors import CheckpointError, ConfigError
from bida.models import MiTSegmentor, build_model
from bida.models.deeplabv2 import DeepLabV2
from bida.models.heads import DAFormerHead, SegFormerHead
from bida.models.mit import ARCHS, MixTransformer, scaled_dims
from bida.models.weights import load_model_weights, load_pretrained
from bida.tools.cli import main


# SegFormer (Table 6 and the mmseg mit_b* classes): widths, depths (heads 1/2/5/8, sr 8/4/2/1),
# the encoder's parameter count as published (millions, rounded to 0.1) and exactly (the
# mmseg encoder without its ImageNet classifier).
PUBLISHED = {
    "mit_b0": ((32, 64, 160, 256), (2, 2, 2, 2), 3.3, 3_319_392),
    "mit_b1": ((64, 128, 320, 512), (2, 2, 2, 2), 13.1, 13_151_424),
    "mit_b2": ((64, 128, 320, 512), (3, 4, 6, 3), 24.2, 24_196_288),
    "mit_b3": ((64, 128, 320, 512), (3, 4, 18, 3), 44.0, 44_072_128),
    "mit_b4": ((64, 128, 320, 512), (3, 8, 27, 3), 60.8, 60_842_688),
    "mit_b5": ((64, 128, 320, 512), (3, 6, 40, 3), 81.4, 81_443_008),
}

MIT_TINY = ["model.backbone=mit_b0", "method.feature=decoder", "model.width=0.25", "model.decoder_dim=32",
            "model.proj_dim=16"]


def _segmentor(k=5, seed=0, **kw) -> MiTSegmentor:
    torch.manual_seed(seed)
    args = {"backbone": "mit_b0", "width": 0.25, "decoder_dim": 16, "proj_dim": 8} | kw
    return MiTSegmentor(k, **args)


def test_stage_shapes_and_strides_b0():
    m = MixTransformer("mit_b0").eval()
    levels = m(torch.randn(2, 3, 65, 97))
    # stride 4, 8, 16, 32 with ceil: 65 -> 17 -> 9 -> 5 -> 3; 97 -> 25 -> 13 -> 7 -> 4
    assert [tuple(x.shape) for x in levels] == [(2, 32, 17, 25), (2, 64, 9, 13), (2, 160, 5, 7), (2, 256, 3, 4)]
    block = m.block1[0]
    assert block.attn.sr.kernel_size == (8, 8) and block.attn.sr.stride == (8, 8) and block.attn.heads == 1
    assert not hasattr(m.block4[0].attn, "sr") and m.block4[0].attn.heads == 8  # sr ratio 1: plain attention
    assert m.patch_embed1.proj.kernel_size == (7, 7) and m.patch_embed1.proj.stride == (4, 4)
    assert m.patch_embed2.proj.kernel_size == (3, 3) and m.patch_embed2.proj.stride == (2, 2)
    assert m.block2[0].mlp.fc1.out_features == 4 * 64 and m.block2[0].mlp.dwconv.dwconv.groups == 4 * 64


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_published_variants_and_parameter_counts(arch):
    dims, depths, millions, exact = PUBLISHED[arch]
    spec = ARCHS[arch]
    assert (spec.dims, spec.depths, spec.heads, spec.sr_ratios, spec.mlp_ratio) == (dims, depths, (1, 2, 5, 8),
                                                                                     (8, 4, 2, 1), 4)
    with torch.device("meta"):  # the B5 shapes without allocating its 81M weights
        m = MixTransformer(arch)
    assert [len(getattr(m, f"block{i}")) for i in range(1, 5)] == list(depths)
    count = sum(p.numel() for p in m.parameters())
    assert count == exact and abs(count / 1e6 - millions) <= 0.1


def test_mmseg_parameter_names():
    keys = set(MixTransformer("mit_b0", width=0.25).state_dict())
    for k in ["patch_embed1.proj.weight", "patch_embed1.norm.bias", "block1.0.norm1.weight", "block1.0.attn.q.weight",
              "block1.0.attn.kv.weight", "block1.0.attn.sr.weight", "block1.0.attn.norm.weight",
              "block1.0.attn.proj.bias", "block1.1.norm2.weight", "block1.0.mlp.fc1.weight",
              "block1.0.mlp.dwconv.dwconv.weight", "block1.0.mlp.fc2.bias", "block4.1.attn.kv.bias",
              "norm1.weight", "norm4.bias"]:
        assert k in keys, k
    assert not any(k.startswith("block4.0.attn.sr") for k in keys)


def test_width_keeps_stage_widths_multiples_of_their_heads():
    assert scaled_dims(ARCHS["mit_b0"], 0.25) == (8, 16, 40, 64)
    assert scaled_dims(ARCHS["mit_b5"], 1.0) == (64, 128, 320, 512)
    assert scaled_dims(ARCHS["mit_b0"], 0.01) == (1, 2, 5, 8)


def test_drop_path_rates_deterministic_under_seeds_and_off_in_eval():
    m = _segmentor(drop_path=0.5)
    rates = [b.drop_path.p for i in range(1, 5) for b in getattr(m.backbone, f"block{i}")]
    assert rates == pytest.approx([0.5 * i / 7 for i in range(8)])
    m.train()
    x = torch.randn(4, 3, 32, 64)
    feats = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        feats.append(m.backbone(x)[-1])
    assert torch.equal(feats[0], feats[1]) and not torch.equal(feats[0], feats[2])
    no_drop = _segmentor(drop_path=0.0)
    no_drop.load_state_dict(m.state_dict())
    m.eval(), no_drop.eval()
    torch.testing.assert_close(m(x).logits, no_drop(x).logits, rtol=0, atol=0)


def test_segmentor_interface_and_param_groups():
    m = _segmentor(k=6, proj_dim=12)
    out = m(torch.randn(2, 3, 40, 72), "target")
    assert out.logits.shape == (2, 6, 10, 18) and out.features.shape == (2, 12, 10, 18)  # stride 4
    assert m.feature_dim == 12 and m.num_classes == 6 and m.target_stem is None and m.concat_domains_ok
    m.sync_target_stem()  # the trainer calls it after every source step
    groups = m.param_groups(0.01, 10.0)
    assert [g["name"] for g in groups] == ["backbone", "head", "backbone_norm"] and groups[1]["lr"] == pytest.approx(0.1)
    head = {id(p) for p in groups[1]["params"]}
    assert head == {id(p) for mod in (m.decode_head, m.proj) for p in mod.parameters()}
    norms = {id(p) for n, p in m.backbone.named_parameters() if "norm" in n}
    assert norms and {id(p) for p in groups[2]["params"]} == norms and groups[2]["weight_decay"] == 0.0
    assert {id(p) for p in groups[0]["params"]} | norms == {id(p) for p in m.backbone.parameters()}


def test_segformer_head_matches_its_definition():
    torch.manual_seed(0)
    head = SegFormerHead((8, 16, 40, 64), 16, 5).eval()
    levels = [torch.randn(2, c, 16 // 2**i, 32 // 2**i) for i, c in enumerate((8, 16, 40, 64))]
    logits, fused = head(levels)
    # Reference: linear per level, bilinear to 1/4, concat c4..c1, 1x1 conv + BN + ReLU, 1x1 classifier.
    emb = [F.interpolate(torch.einsum("bchw,oc->bohw", x, e.proj.weight) + e.proj.bias[:, None, None],
                         size=(16, 32), mode="bilinear", align_corners=False) for x, e in zip(levels, head.embed)]
    ref = F.relu(head.fuse.bn(F.conv2d(torch.cat(emb[::-1], 1), head.fuse.conv.weight)))
    torch.testing.assert_close(fused, ref)
    torch.testing.assert_close(logits, head.classifier(ref))
    assert logits.shape == (2, 5, 16, 32)


def test_daformer_head_structure():
    head = DAFormerHead((8, 16, 40, 64), 16, 5)
    branches = head.fuse.branches
    assert branches[0].conv.kernel_size == (1, 1)
    for branch, d in zip(branches[1:], (6, 12, 18)):
        dw, pw = branch.depthwise.conv, branch.pointwise.conv
        assert dw.dilation == (d, d) and dw.padding == (d, d) and dw.groups == 4 * 16 and pw.kernel_size == (1, 1)
    assert head.fuse.bottleneck.conv.kernel_size == (3, 3) and head.fuse.bottleneck.conv.in_channels == 4 * 16
    m = _segmentor(decoder="daformer")
    out = m(torch.randn(2, 3, 32, 64))
    assert out.logits.shape == (2, 5, 8, 16) and out.features.shape == (2, 8, 8, 16)


def test_bf16_autocast_forward_and_backward():
    m = _segmentor(decoder="daformer").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(torch.randn(2, 3, 32, 64))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    (out.logits.float().mean() + out.features.float().mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_small_inputs_are_refused_clearly():
    with pytest.raises(ValueError, match="at least 32x32"):
        _segmentor()(torch.randn(1, 3, 16, 64))


def _mmseg_state(model: MiTSegmentor) -> dict:
    """The encoder as a SegFormer mit_b*.pth: mmseg names, no prefix, an ImageNet classifier."""
    state = {k[len("backbone."):]: v.clone() for k, v in model.state_dict().items() if k.startswith("backbone.")}
    state["head.weight"], state["head.bias"] = torch.randn(1000, model.backbone.dims[-1]), torch.zeros(1000)
    return state


# Hugging Face segformer names, written out from transformers' modeling_segformer.py.
HF_BLOCK = {"norm1": "layer_norm_1", "norm2": "layer_norm_2", "attn.q": "attention.self.query",
            "attn.sr": "attention.self.sr", "attn.norm": "attention.self.layer_norm",
            "attn.proj": "attention.output.dense", "mlp.fc1": "mlp.dense1", "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
            "mlp.fc2": "mlp.dense2"}


def _hf_state(model: MiTSegmentor) -> dict:
    out = {}
    for key, value in _mmseg_state(model).items():
        if key.startswith("head."):
            out["classifier." + key.split(".")[1]] = value
            continue
        module, param = key.rsplit(".", 1)
        top = module.split(".")[0]
        if top.startswith("patch_embed"):
            i, sub = int(top[len("patch_embed"):]) - 1, {"proj": "proj", "norm": "layer_norm"}[module.split(".")[1]]
            out[f"segformer.encoder.patch_embeddings.{i}.{sub}.{param}"] = value
        elif top.startswith("block"):
            i, j, inner = int(top[len("block"):]) - 1, module.split(".")[1], module.split(".", 2)[2]
            prefix = f"segformer.encoder.block.{i}.{j}."
            if inner == "attn.kv":  # HF keeps keys and values apart
                k, v = value.chunk(2, 0)
                out[prefix + f"attention.self.key.{param}"] = k.clone()
                out[prefix + f"attention.self.value.{param}"] = v.clone()
            else:
                out[prefix + f"{HF_BLOCK[inner]}.{param}"] = value
        else:
            out[f"segformer.encoder.layer_norm.{int(top[len('norm'):]) - 1}.{param}"] = value
    return out


def _same_encoder(a: MiTSegmentor, b: MiTSegmentor) -> None:
    for k, v in a.backbone.state_dict().items():
        assert torch.equal(v, b.backbone.state_dict()[k]), k
    x = torch.randn(1, 3, 32, 64)
    a.eval(), b.eval()
    for la, lb in zip(a.backbone(x), b.backbone(x)):
        torch.testing.assert_close(la, lb, rtol=0, atol=0)


def test_mmseg_and_hugging_face_layouts_load_exactly(tmp_path):
    from safetensors.torch import save_file

    src = _segmentor(seed=1)
    torch.save(_mmseg_state(src), tmp_path / "mit_b0.pth")
    save_file(_hf_state(src), str(tmp_path / "model.safetensors"))
    for name in ("mit_b0.pth", "model.safetensors"):
        dst = _segmentor(seed=2)
        report = load_pretrained(dst, tmp_path / name)
        _same_encoder(src, dst)
        assert set(report["loaded"]) == {f"backbone.{k}" for k in src.backbone.state_dict()}
        assert all(k.startswith(("decode_head.", "proj.")) for k in report["missing"])
    # A bida MiT checkpoint loads whole, the head included.
    save_checkpoint({"model": src.state_dict()}, tmp_path / "run.pt")
    dst = _segmentor(seed=2)
    load_pretrained(dst, tmp_path / "run.pt")
    assert torch.equal(dst.decode_head.classifier.weight, src.decode_head.classifier.weight)


def test_a_hugging_face_folder_loads_its_weights_file(tmp_path):
    """``model.pretrained=<folder>``: a Hugging Face model folder (config.json + model.safetensors,
    or the older pytorch_model.bin) loads the file inside; a folder without one is named."""
    import json

    from safetensors.torch import save_file

    src = _segmentor(seed=1)
    for name in ("model.safetensors", "pytorch_model.bin"):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "segformer"}))
        if name.endswith(".safetensors"):
            save_file(_hf_state(src), str(folder / name))
        else:
            torch.save(_hf_state(src), folder / name)
        dst = _segmentor(seed=2)
        load_pretrained(dst, folder)
        _same_encoder(src, dst)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"pretrained folder .*empty holds no model\.safetensors or "
                                              r"pytorch_model\.bin \(it holds config\.json\)") as err:
        load_pretrained(_segmentor(), empty)
    assert "\n" not in str(err.value)


def test_wrong_weight_files_give_one_line_errors(tmp_path):
    from safetensors.torch import save_file

    torch.save(DeepLabV2(19, "resnet18", width=0.125).state_dict(), tmp_path / "deeplab.pth")
    torch.save(_mmseg_state(_segmentor(backbone="mit_b1")), tmp_path / "b1.pth")  # b2's widths, fewer blocks
    torch.save(_mmseg_state(_segmentor(width=0.5)), tmp_path / "wide.pth")
    lacking = _mmseg_state(_segmentor())
    del lacking["block2.1.attn.kv.weight"]
    torch.save(lacking, tmp_path / "lacking.pth")
    no_value = {k: v for k, v in _hf_state(_segmentor()).items() if "block.0.1.attention.self.value" not in k}
    save_file(no_value, str(tmp_path / "novalue.safetensors"))
    cases = [
        ("deeplab.pth", r"deeplab\.pth holds ResNet/DeepLab-V2 weights; model\.backbone=mit_b0 needs MiT"),
        ("wide.pth", r"wide\.pth: backbone\.patch_embed1\.proj\.weight has shape"),
        ("lacking.pth", r"lacking\.pth lacks backbone keys: backbone\.block2\.1\.attn\.kv\.weight"),
        ("novalue.safetensors", r"novalue\.safetensors: the attention value layer of block1\.1\.attn\.kv"),
    ]
    for name, pattern in cases:
        with pytest.raises(CheckpointError, match=pattern) as err:
            load_pretrained(_segmentor(), tmp_path / name)
        assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=r"b1\.pth lacks backbone keys: backbone\.block1\.2\."):
        load_pretrained(_segmentor(backbone="mit_b2"), tmp_path / "b1.pth")  # b2: 3 blocks in stage 1
    with pytest.raises(CheckpointError, match=r"b1\.pth holds SegFormer/mmseg MiT weights; model\.backbone=resnet18"):
        load_pretrained(DeepLabV2(19, "resnet18", width=0.125), tmp_path / "b1.pth")


def test_checkpoint_of_another_class_count(tmp_path):
    save_checkpoint({"model": _segmentor(k=7).state_dict()}, tmp_path / "k7.pt")
    with pytest.raises(CheckpointError, match="7 classes, the config has 5"):
        load_model_weights(_segmentor(k=5), tmp_path / "k7.pt")


@pytest.mark.parametrize("override, key", [
    (["method.feature=aspp_branches"], "method.feature"),
    (["method.feature=backbone"], "method.feature"),
    (["method.feature=decoder", "model.separate_target_stem=true"], "model.separate_target_stem"),
    (["method.feature=decoder", "model.freeze_bn=true", "model.bn_batch_stats=true"], "model.bn_batch_stats"),
    (["method.feature=decoder", "model.freeze_bn=true"], "model.freeze_bn"),
    (["method.feature=decoder", "data.normalize=caffe"], "data.normalize"),
    (["method.feature=decoder", "data.crop=[16,64]"], "data.crop"),
    (["method.feature=decoder", "eval.mode=slide", "eval.crop=[24,24]"], "eval.crop"),
    (["method.feature=decoder", "model.drop_path=1.0"], "model.drop_path"),
    (["method.feature=decoder", "model.decoder=aspp"], "model.decoder"),
])
def test_config_rejects_options_that_do_not_fit_mit(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["model.backbone=mit_b0"] + override)


def test_config_builds_each_family():
    cfg = load_config(None, MIT_TINY + ["model.decoder=daformer", "model.drop_path=0.2"])
    m = build_model(cfg.model, 4, cfg.method.feature)
    assert isinstance(m, MiTSegmentor) and isinstance(m.decode_head, DAFormerHead)
    assert m.backbone.dims == (8, 16, 40, 64) and m.backbone.block4[1].drop_path.p == pytest.approx(0.2)
    with pytest.raises(ConfigError, match=r"method\.feature=decoder"):
        load_config(None, ["method.feature=decoder"])  # resnet18: no decoder feature
    assert isinstance(build_model(load_config().model, 4), DeepLabV2)


@pytest.mark.parametrize("extra", [[], ["loss.contrast_resolution=label", "method.prototype_scope=pair",
                                        "method.memory_partners=true", "pseudo.dynamic_for_segmentation=true"]])
def test_adapt_step_at_stride_4_with_padded_crops(extra):
    """A BiDA step with features at 1/4 of sizes that are no multiple of 4, padded target crops, bf16."""
    from bida.pseudo_labels import Calibration
    from bida.method.train_step import adapt_step

    cfg = load_config(None, MIT_TINY + ["method=bida", "data.crop=[38,70]"] + extra)
    m = build_model(cfg.model, 4, cfg.method.feature)
    g = torch.Generator().manual_seed(0)
    valid = torch.ones(2, 38, 70, dtype=torch.bool)
    valid[:, 30:] = False  # padding at the bottom of the target crops
    batch_src = {"image": torch.randn(2, 3, 38, 70, generator=g), "label": torch.randint(0, 4, (2, 38, 70), generator=g)}
    y_static = torch.randint(0, 4, (2, 38, 70), generator=g).masked_fill(~valid, 255)
    batch_tgt = {"image": torch.randn(2, 3, 38, 70, generator=g), "label": y_static, "valid": valid}
    cal = Calibration(4, m.feature_dim, momentum=0.9, max_weight=1.0, ramp_iters=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = adapt_step(m, batch_src, batch_tgt, cfg, cal, 4)
    assert torch.isfinite(result.loss) and result.logs["loss/contrast_t2s"] > 0
    result.loss.backward()
    assert m.proj[0].weight.grad is not None and m.backbone.patch_embed1.proj.weight.grad.abs().sum() > 0


def test_bida_train_runs_mit(tmp_path, tiny_overrides, capsys):
    """`bida train` with a MiT: the source stage (the source_only path), then a BiDA round at stride 4."""
    run = tmp_path / "bida"
    overrides = tiny_overrides + MIT_TINY + ["method=bida", "train.iters=2", "train.iters_per_round=2", "train.rounds=1"]
    assert main(["train", "--out", str(run), "--quiet", *overrides]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss/seg_src" in r]
    assert [r["phase"] for r in steps] == ["source", "source", "round", "round"]
    assert all(v == v for r in steps for k, v in r.items() if k.startswith("loss/"))  # no NaN
    assert {"loss/contrast_t2s", "loss/contrast_s2t", "pseudo/dynamic_coverage"} <= set(steps[-1])
    assert 0.0 <= json.loads((run / "metrics.json").read_text())["mIoU"] <= 1.0
    # The run's checkpoint rebuilds the same segmentor (evaluation, prediction, init_checkpoint).
    from bida.tools.predict import model_from_checkpoint

    model = model_from_checkpoint(run / "checkpoints" / "last.pt")[0]
    assert isinstance(model, MiTSegmentor) and model.backbone.dims == (8, 16, 40, 64)
