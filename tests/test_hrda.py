"""HRDA (bida.models.hrda): fusion, crop geometry, attention shapes, sliding fused inference,
the two losses' weights and the config checks, against references written from the paper's
equations (Hoyer et al., ECCV 2022, eq. 5-8)."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from bida.config import load_config
from bida.errors import ConfigError
from bida.models import build_model
from bida.models.hrda import HRDASegmentor, crop_boxes, draw_detail_boxes, fuse

TINY_MIT = ["model.backbone=mit_b0", "model.width=0.25", "model.decoder=daformer", "model.decoder_dim=16",
            "model.proj_dim=8", "model.drop_path=0", "train.schedule=teacher", "method.name=self_training",
            "train.student_forwards=separate", "data.crop=[64,64]", "model.hrda.enabled=true",
            "model.hrda.detail_crop=[32,32]"]


def tiny_hrda(*extra: str, num_classes: int = 5) -> HRDASegmentor:
    torch.manual_seed(0)
    cfg = load_config(None, [*TINY_MIT, *extra])
    return build_model(cfg.model, num_classes)


def reference_fusion(context, attention, detail, box, os_, scale):
    """The paper's fusion, one image at a time with plain slicing: the attention is zeroed
    outside the detail crop on the context grid, then
    fused = up(a) * detail_inserted + up((1 - a) * context) with bilinear ``up`` by 1/scale."""
    out = []
    r = int(round(1 / scale))
    for i in range(context.shape[0]):
        y, x = (int(v) for v in box[i])
        cy, cx = int(y * scale / os_), int(x * scale / os_)  # the box on the context grid
        dh, dw = detail.shape[-2:]
        a = torch.zeros_like(attention[i:i + 1])
        a[..., cy:cy + dh // r, cx:cx + dw // r] = attention[i:i + 1, :, cy:cy + dh // r, cx:cx + dw // r]
        low = F.interpolate((1 - a) * context[i:i + 1], scale_factor=r, mode="bilinear", align_corners=False)
        a_up = F.interpolate(a, scale_factor=r, mode="bilinear", align_corners=False)
        ins = torch.zeros_like(low)
        fy, fx = int(y / os_), int(x / os_)  # the box on the full-resolution grid
        ins[..., fy:fy + dh, fx:fx + dw] = detail[i:i + 1]
        out.append(a_up * ins + low)
    return torch.cat(out)


@pytest.mark.parametrize("classwise", [True, False])
def test_training_forward_matches_the_papers_fusion(classwise):
    model = tiny_hrda(f"model.hrda.attention_classwise={str(classwise).lower()}").eval()
    x = torch.randn(2, 3, 64, 64)
    box = torch.tensor([[8, 24], [32, 0]])
    out = model(x, "source", detail_box=box)
    base = model.base
    with torch.no_grad():
        small = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        levels = base.backbone(small)
        context = base.decode_head(levels)[0]
        attention = torch.sigmoid(model.scale_attention(levels)[0])
        # the detail crops, sliced one by one (the model gathers them in one go)
        crops = torch.stack([x[i, :, y:y + 32, c:c + 32] for i, (y, c) in enumerate(box.tolist())])
        detail = base.decode_head(base.backbone(crops))[0]
    assert attention.shape == (2, 5 if classwise else 1, 8, 8)  # one map per class, or one for all
    assert out.detail_logits.shape == (2, 5, 8, 8) and out.logits.shape == (2, 5, 16, 16)
    assert out.features.shape == (2, 8, 8, 8)  # the context crop's contrast features
    torch.testing.assert_close(out.detail_logits, detail)
    torch.testing.assert_close(out.logits, reference_fusion(context, attention, detail, box, 4, 0.5))
    # far from the detail crop the fused prediction is the upsampled context alone
    up = F.interpolate(context, scale_factor=2, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out.logits[1, :, 13:, 10:], up[1, :, 13:, 10:])


def test_fuse_is_float32_under_bf16_autocast():
    torch.manual_seed(1)
    ctx, att, det = torch.randn(1, 3, 4, 4), torch.rand(1, 3, 4, 4), torch.randn(1, 3, 8, 8)
    ref = fuse(ctx, att, det, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fuse(ctx, att, det, 2)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_detail_boxes_lie_inside_and_on_the_grid():
    u = torch.rand(4000, 2, generator=torch.Generator().manual_seed(0))
    box = draw_detail_boxes(u, (1024, 768), (512, 512), 8)
    assert (box % 8 == 0).all() and (box >= 0).all()
    assert (box[:, 0] + 512 <= 1024).all() and (box[:, 1] + 512 <= 768).all()
    # HRDA's get_crop_bbox: offsets d * randint(0, (margin + 1) // d)
    assert set(box[:, 0].tolist()) == {8 * i for i in range(513 // 8)}
    assert set(box[:, 1].tolist()) == {8 * i for i in range(257 // 8)}
    assert draw_detail_boxes(torch.rand(3, 2), (64, 64), (64, 64), 8).eq(0).all()  # detail = context


def test_crop_boxes_slices_each_sample_at_its_corner():
    x = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).reshape(2, 3, 10, 12)
    box = torch.tensor([[2, 4], [0, 6]])
    crops = crop_boxes(x, box, (4, 6))
    for i, (y, c) in enumerate(box.tolist()):
        assert torch.equal(crops[i], x[i, :, y:y + 4, c:c + 6])
        assert torch.equal(crop_boxes(x[:, 0], box, (4, 6))[i], x[i, 0, y:y + 4, c:c + 6])


@torch.no_grad()
def naive_fused(model, x):
    """HRDA's prediction of a whole input (sides multiples of 16, 32-pixel detail crops): the
    context at half resolution, the detail on 32-pixel windows at stride 16 (one forward
    each), averaged where they overlap, fused with the unmasked attention (paper eq. 5)."""
    base, (h, w) = model.base, x.shape[-2:]
    small = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
    levels = base.backbone(small)
    context = base.decode_head(levels)[0]
    attention = torch.sigmoid(model.scale_attention(levels)[0])
    total, count = torch.zeros(x.shape[0], model.num_classes, h // 4, w // 4), torch.zeros(1, 1, h // 4, w // 4)
    for y in range(0, h - 16, 16):
        for c in range(0, w - 16, 16):
            total[..., y // 4:y // 4 + 8, c // 4:c // 4 + 8] += base.decode_head(
                base.backbone(x[..., y:y + 32, c:c + 32]))[0]
            count[..., y // 4:y // 4 + 8, c // 4:c // 4 + 8] += 1
    a_up = F.interpolate(attention, scale_factor=2, mode="bilinear", align_corners=False)
    low = F.interpolate((1 - attention) * context, scale_factor=2, mode="bilinear", align_corners=False)
    return a_up * (total / count) + low


def test_fused_inference_slides_detail_windows_like_a_naive_loop():
    model = tiny_hrda().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model(x, "target").logits
    torch.testing.assert_close(out, naive_fused(model, x))


def test_fused_inference_on_any_size_pads_and_crops_back():
    model = tiny_hrda().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 70, 101), "target")
    assert out.logits.shape == (1, 5, 18, 26)  # ceil(70 / 4), ceil(101 / 4)
    assert out.features.shape == (1, 8, 9, 13)  # ceil(70 / 8), ceil(101 / 8)
    with torch.no_grad():  # below the 64 pixels whose context MiT takes: padded up to them
        assert model(torch.randn(1, 3, 23, 37), "target").logits.shape == (1, 5, 6, 10)


def test_state_dict_is_the_segmentors_plus_the_attention():
    model = tiny_hrda()
    torch.manual_seed(0)
    plain = build_model(load_config(None, [*TINY_MIT, "model.hrda.enabled=false"]).model, 5)
    keys = set(model.state_dict())
    assert set(plain.state_dict()) == {k for k in keys if not k.startswith("scale_attention.")}
    assert any(k.startswith("scale_attention.") for k in keys)
    # the segmentor's weights start as without HRDA (the attention is drawn after them)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    head = next(g for g in model.param_groups(1.0, 10.0) if g["name"] == "head")
    assert {id(p) for p in model.scale_attention.parameters()} <= {id(p) for p in head["params"]}


@pytest.mark.parametrize("override, needle", [
    ("model.hrda.detail_crop=[128,32]", "model.hrda.detail_crop: [128, 32] is larger than the context crop"),
    ("model.hrda.crop_divisible=4", "model.hrda.crop_divisible: 4 must be a multiple of 8"),
    ("data.crop=[60,64]", "data.crop: [60, 64] must be a multiple of 8"),
    ("model.hrda.detail_crop=[36,36]", "model.hrda.detail_crop: [36, 36] must be a multiple of 8"),
    ("model.hrda.context_scale=0.3", "model.hrda.context_scale: 0.3"),
    ("model.backbone=resnet18", "model.hrda.enabled: HRDA wraps a MiT or DINOv2 segmentor"),
    ("train.student_forwards=joint", "model.hrda.enabled: each student forward draws its own detail crop"),
    ("train.source_iters=10", "model.hrda.enabled: HRDA trains on the mean-teacher schedule"),
    ("method.name=source_only", "model.hrda.enabled: HRDA trains on the mean-teacher schedule"),
    ("model.hrda.detail_loss_weight=1", "model.hrda.detail_loss_weight"),
])
def test_bad_hrda_settings_fail_at_load(override, needle):
    with pytest.raises(ConfigError, match="^" + re.escape(needle)):
        load_config(None, [*TINY_MIT, override])


# --------------------------------------------------------------------------- the teacher schedule

def hrda_run_overrides(cache) -> list[str]:
    """A tiny HRDA teacher run: 64x64 context crops (MiT needs 32 pixels a side at half
    resolution), 32x32 detail crops, of the synthetic pair at 64x128."""
    from conftest import TINY

    return TINY + [f"data.synthetic.cache_dir={cache}", "data.synthetic.height=64", "data.synthetic.width=128",
                   "method.feature=decoder", "data.normalize=imagenet", "train.optimizer=adamw", "train.lr=6e-4",
                   "train.iters=3", *TINY_MIT]


class Recorder(torch.nn.Module):
    """Calls the model and keeps every output (to check the losses against them)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.calls.append((args, kwargs, out))
        return out


@pytest.mark.parametrize("lam, mix_weight", [(0.1, 0.0), (0.3, 1.0)])
def test_teacher_step_weighs_fused_and_detail_ces_one_minus_lambda_and_lambda(synthetic_cache, lam, mix_weight):
    from bida.method.teacher import MeanTeacher, teacher_step

    cfg = load_config(None, hrda_run_overrides(synthetic_cache) + [
        f"model.hrda.detail_loss_weight={lam}", f"loss.mix_weight={mix_weight}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 5).train()
    state = MeanTeacher(cfg, 5, "cpu")
    state.start(model)
    g = torch.Generator().manual_seed(3)
    src = {"image": torch.randn(2, 3, 64, 64, generator=g), "label": torch.randint(0, 5, (2, 64, 64), generator=g)}
    src["label"][0, :10] = 255
    tgt = {"image": torch.randn(2, 3, 64, 64, generator=g), "label": torch.full((2, 64, 64), 255)}
    rec = Recorder(model)
    logs = teacher_step(rec, src, tgt, cfg, state, None, 5).logs
    (args, kwargs, out), = [c for c in rec.calls if c[0][1] == "source"]
    assert kwargs["detail_box"].shape == (2, 2)
    fused = F.cross_entropy(F.interpolate(out.logits, size=(64, 64), mode="bilinear", align_corners=False),
                            src["label"], ignore_index=255)
    crops = [src["label"][i, y:y + 32, c:c + 32] for i, (y, c) in enumerate(out.detail_box.tolist())]
    detail = F.cross_entropy(F.interpolate(out.detail_logits, size=(32, 32), mode="bilinear", align_corners=False),
                             torch.stack(crops), ignore_index=255)
    torch.testing.assert_close(logs["loss/seg_src"], fused)
    if mix_weight == 0:  # the mixed forward weighs nothing: the detail log is the source's alone
        torch.testing.assert_close(logs["loss/hrda_detail"], detail)
    expected = (1 - lam) * (logs["loss/seg_src"] + mix_weight * logs["loss/seg_mix"]) + lam * logs["loss/hrda_detail"]
    torch.testing.assert_close(logs["loss/total"], expected)


def test_detail_crops_follow_the_global_sample_index_and_restore():
    from bida.method.hrda import DetailCrops

    hcfg = load_config(None, TINY_MIT).model.hrda
    img = torch.zeros(4, 3, 64, 64)
    one = DetailCrops(hcfg, seed=5)
    ref = [one(img), one(img)]
    for rank in range(2):
        part = DetailCrops(hcfg, seed=5, rank=rank, world_size=2)
        for r in ref:
            assert torch.equal(part(img[:2]), r[2 * rank:2 * rank + 2])
    again = DetailCrops(hcfg, seed=0)
    again.load_state_dict(DetailCrops(hcfg, seed=5).state_dict())
    assert torch.equal(again(img), ref[0])


def test_hrda_bida_mic_teacher_run_stopped_mid_phase_resumes_exactly(tmp_path, synthetic_cache):
    """BiDA + MIC + feature distance under HRDA, in bf16: a run stopped after its first step
    and resumed ends bit-identical to the uninterrupted one (model, teacher, every generator)."""
    from bida.checkpoint import load_checkpoint
    from bida.engine.train import Trainer, train

    base = hrda_run_overrides(synthetic_cache) + ["method=bida", "mic.weight=1", "mic.block_size=16",
                                                  "model.drop_path=0.1", "train.amp=bf16",
                                                  "pseudo.teacher_threshold=0.2"]
    weights = tmp_path / "imagenet.pth"
    torch.save(build_model(load_config(None, base).model, 19).state_dict(), weights)
    cfg = load_config(None, base + [f"model.pretrained={weights}", "loss.feature_distance_weight=0.005"])
    train(cfg, tmp_path / "full")
    records = [line for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines() if '"teacher"' in line]
    assert len(records) == 3 and all('"loss/hrda_detail"' in r for r in records)
    assert Trainer(cfg, tmp_path / "part").fit(stop_after=1) is None
    Trainer(cfg, tmp_path / "part", resume=True).fit()
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("full", "part"))
    assert any(k.startswith("scale_attention.") for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ta, tb = a["mean_teacher"], b["mean_teacher"]
    for k in ta["teacher"]["model"]:
        assert torch.equal(ta["teacher"]["model"][k], tb["teacher"]["model"][k]), k
    for part in ("mixer", "masking", "detail_crops"):
        assert torch.equal(ta[part]["generator"], tb[part]["generator"]), part


def test_bida_predict_on_an_unseen_size_uses_the_sliding_fused_prediction(tmp_path, synthetic_cache):
    """An HRDA checkpoint predicts a 70x101 image (trained on 64x64 crops) with 64-pixel
    evaluation windows at stride 32, each fused as HRDA fuses (context + sliding detail
    crops + attention), batched; the reference loops over the windows one by one."""
    import numpy as np
    from PIL import Image

    from bida.tools.cli import main
    from bida.engine.train import train
    from bida.tools.predict import model_from_checkpoint

    cfg = load_config(None, hrda_run_overrides(synthetic_cache) + [
        "train.iters=1", "eval.mode=slide", "eval.crop=[64,64]", "eval.stride=[32,32]"])
    train(cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    image = rng.integers(0, 256, (70, 101, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in" / "a.png")
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                 "--quiet"]) == 0
    model, _, _, _ = model_from_checkpoint(ckpt)
    assert isinstance(model, HRDASegmentor) and model.batched_slide
    from bida.data.transforms import to_tensor

    x = to_tensor(image, "imagenet").unsqueeze(0)
    total, count = torch.zeros(1, model.num_classes, 70, 101), torch.zeros(1, 1, 70, 101)
    for y in (0, 6):  # 64-pixel windows at stride 32, the last flush with the border
        for c in (0, 32, 37):
            logits = naive_fused(model, x[..., y:y + 64, c:c + 64])
            total[..., y:y + 64, c:c + 64] += F.interpolate(logits, size=(64, 64), mode="bilinear",
                                                            align_corners=False)
            count[..., y:y + 64, c:c + 64] += 1
    expected = (total / count).argmax(1)[0].numpy()
    written = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert written.shape == (70, 101) and (written == expected).mean() > 0.999


# --------------------------------------------------------------------------- pseudo-label margins (v2)

def test_pseudo_margins_are_marked_on_the_image_before_the_crop(tmp_path):
    """Each crop pixel knows its image row and column (encoded in the colours): pseudo_keep is
    False exactly on the image's [top, bottom, left, right] margins, wherever the crop fell
    and whether or not it was flipped."""
    import numpy as np
    from PIL import Image

    from bida.data.datasets import SegmentationDataset
    from bida.data.listing import Sample
    from bida.data.transforms import denormalize

    h, w = 20, 24
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    image = np.stack([cols * 8, rows * 8, np.zeros_like(rows)], -1).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(np.ones((h, w), np.uint8)).save(tmp_path / "a_label.png")
    samples = [Sample(name="a", image=tmp_path / "a.png", label=tmp_path / "a_label.png")]
    ds = SegmentationDataset(samples, "folder", 3, train=True, crop=(8, 12), scale_range=(1.0, 1.0), flip=True,
                             pseudo_margins=(2, 5, 3, 1))
    seen = set()
    for seed in range(12):
        item = ds[(0, seed)]
        rgb = denormalize(item["image"], "imagenet").astype(int)
        r, c = (rgb[..., 1] + 4) // 8, (rgb[..., 0] + 4) // 8
        expected = (r >= 2) & (r < h - 5) & (c >= 3) & (c < w - 1)
        assert np.array_equal(item["pseudo_keep"].numpy(), expected), seed
        seen.add(bool(expected.all()))
    assert seen == {True, False}  # some crops inside the margins, some touching them
    plain = SegmentationDataset(samples, "folder", 3, train=True, crop=(8, 12), scale_range=(1.0, 1.0))
    assert "pseudo_keep" not in plain[(0, 0)]


def test_pseudo_margins_weigh_the_teacher_labels_zero(synthetic_cache):
    """MIC's masked loss reads the teacher labels alone: 0 when the whole crop is margin,
    the plain loss when none of it is."""
    from bida.method.teacher import MeanTeacher, teacher_step

    cfg = load_config(None, hrda_run_overrides(synthetic_cache) + ["mic.weight=1", "mic.block_size=16",
                                                                  "pseudo.teacher_threshold=0",
                                                                  "pseudo.margins=[2,2,2,2]"])
    out = {}
    for keep in (None, True, False):
        torch.manual_seed(0)
        model = build_model(cfg.model, 5).train()
        state = MeanTeacher(cfg, 5, "cpu")
        state.start(model)
        g = torch.Generator().manual_seed(3)
        src = {"image": torch.randn(2, 3, 64, 64, generator=g), "label": torch.randint(0, 5, (2, 64, 64), generator=g)}
        tgt = {"image": torch.randn(2, 3, 64, 64, generator=g), "label": torch.full((2, 64, 64), 255)}
        if keep is not None:
            tgt["pseudo_keep"] = torch.full((2, 64, 64), keep)
        out[keep] = teacher_step(model, src, tgt, cfg, state, None, 5).logs
    assert out[None]["loss/mic"] > 0
    assert torch.equal(out[True]["loss/mic"], out[None]["loss/mic"])
    assert out[False]["loss/mic"] == 0


def test_pseudo_margins_config_checks():
    with pytest.raises(ConfigError, match=r"^pseudo\.margins: the image margins .* replace the crop bands"):
        load_config(None, [*TINY_MIT, "pseudo.margins=[1,2,1,1]", "pseudo.ignore_top=3"])
    with pytest.raises(ConfigError, match=r"^pseudo\.margins: only the teacher schedule"):
        load_config(None, ["pseudo.margins=[1,2,1,1]"])
    with pytest.raises(ConfigError, match=r"^pseudo\.margins\[1\]: -2 is out of range"):
        load_config(None, [*TINY_MIT, "pseudo.margins=[1,-2,1,1]"])


# --------------------------------------------------------------------------- guarantees

def test_grad_checkpoint_gives_the_same_hrda_step(synthetic_cache):
    from bida.method.teacher import MeanTeacher, teacher_step

    got = {}
    for ckpt in ("false", "true"):
        cfg = load_config(None, hrda_run_overrides(synthetic_cache) + ["method=bida", "mic.weight=1",
                                                                      "mic.block_size=16",
                                                                      f"model.grad_checkpoint={ckpt}"])
        torch.manual_seed(0)
        model = build_model(cfg.model, 5).train()
        state = MeanTeacher(cfg, 5, "cpu")
        state.start(model)
        g = torch.Generator().manual_seed(3)
        src = {"image": torch.randn(2, 3, 64, 64, generator=g), "label": torch.randint(0, 5, (2, 64, 64), generator=g)}
        tgt = {"image": torch.randn(2, 3, 64, 64, generator=g), "label": torch.full((2, 64, 64), 255)}
        torch.manual_seed(1)
        result = teacher_step(model, src, tgt, cfg, state, None, 5)
        result.loss.backward()
        got[ckpt] = (result.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (la, ga), (lb, gb) = got["false"], got["true"]
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    assert ga.keys() == gb.keys() and any(k.startswith("scale_attention.") for k in ga)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-5, atol=1e-7, msg=k)


def test_hrda_teacher_on_two_ranks_gives_the_losses_of_one_process(tmp_path, synthetic_cache):
    """BiDA + MIC under HRDA, global batch 2 (one image per rank): every detail crop, mix and
    mask is drawn by global sample index and the BatchNorms see the global batch, so two
    ranks log one process's losses (head dropout and drop path off: each rank draws its own)."""
    import json

    from test_distributed import _assert_same_states, _spawn_teacher, _teacher_run

    overrides = hrda_run_overrides(synthetic_cache) + [
        "method=bida", "mic.weight=1", "mic.block_size=16", "train.iters=2", "model.drop_path=0",
        "pseudo.teacher_threshold=0.1", "train.batch_size=2", "train.checkpoint_every=1000"]
    ranks = _spawn_teacher(overrides, tmp_path / "ddp", "ddp", head_dropout=False)
    _teacher_run(0, 1, overrides, str(tmp_path / "single"), "single", head_dropout=False)
    _assert_same_states(ranks[0], ranks[1], "rank 0 vs rank 1")
    records = {name: [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()
                      if '"teacher"' in line] for name in ("ddp", "single")}
    assert [r["step"] for r in records["ddp"]] == [r["step"] for r in records["single"]] == [1, 2]
    for got, ref in zip(records["ddp"], records["single"]):
        keys = [k for k in ref if k.startswith(("loss/", "pseudo/")) and not k.endswith("_acc")]
        assert "loss/hrda_detail" in keys and "loss/mic" in keys
        for key in keys:
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (ref["step"], key)


# --------------------------------------------------------------------------- HRDA's "HR" datasets

@pytest.mark.parametrize("native, shorter, hrda", [
    ((1052, 1914), 1407, (1407, 2560)),  # GTA5: mmseg's keep-ratio fit into 2560x1440
    ((760, 1280), 1520, (1520, 2560)),   # SYNTHIA: into 2560x1520
    ((1024, 2048), 1024, (1024, 2048)),  # Cityscapes: 2048x1024, as it is
])
def test_the_configs_resize_gives_hrdas_hr_sizes(native, shorter, hrda):
    from bida.data.transforms import shorter_side_size

    # mmseg's Resize(img_scale=(W, H), keep_ratio=True): scale = min(W / w, H / h), sides rounded
    box = {(1052, 1914): (2560, 1440), (760, 1280): (2560, 1520), (1024, 2048): (2048, 1024)}[native]
    scale = min(box[0] / native[1], box[1] / native[0])
    assert (int(native[0] * scale + 0.5), int(native[1] * scale + 0.5)) == hrda
    assert shorter_side_size(native, shorter) == hrda


def test_a_full_size_gta5_image_serves_1024_context_crops(tmp_path):
    from fixtures import make_gta5_tree

    from bida.data.datasets import SegmentationDataset
    from bida.data.listing import list_samples

    make_gta5_tree(tmp_path / "gta", n=1, size=(1052, 1914), mismatched=0)
    samples = list_samples("gta5", tmp_path / "gta", "train", require_labels=True)
    ds = SegmentationDataset(samples, "gta5", 19, train=True, crop=(1024, 1024), resize=1407, flip=True)
    item = ds[(0, 7)]
    assert item["image"].shape == (3, 1024, 1024) and bool(item["valid"].all())  # inside the 1407x2560 image


def test_bida_under_hrda_contrasts_the_context_crops_features(synthetic_cache):
    """BiDA's design under HRDA: the source side reads the source forward's context features,
    the target side one extra forward of the unmixed target's context crop alone (no detail
    crop, no fused prediction); the contrast terms are BiDA's on exactly these features."""
    from bida.method.teacher import IGNORE, MeanTeacher, teacher_step
    from bida.method.train_step import adapt_step

    cfg = load_config(None, hrda_run_overrides(synthetic_cache) + [
        "method=bida", "method.calibration=false", "pseudo.teacher_threshold=0.1"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 5).train()
    state = MeanTeacher(cfg, 5, "cpu")
    state.start(model)
    g = torch.Generator().manual_seed(3)
    src = {"image": torch.randn(2, 3, 64, 64, generator=g), "label": torch.randint(0, 5, (2, 64, 64), generator=g)}
    tgt = {"image": torch.randn(2, 3, 64, 64, generator=g), "label": torch.full((2, 64, 64), 255)}
    rec = Recorder(model)
    logs = teacher_step(rec, src, tgt, cfg, state, None, 5).logs
    kinds = [(args[1], "detail_box" in kw, kw.get("context_only", False)) for args, kw, _ in rec.calls]
    assert kinds == [("source", True, False), ("target", True, False), ("target", False, True)]
    out_src, out_tgt = rec.calls[0][2], rec.calls[2][2]
    assert out_src.features.shape[-2:] == out_tgt.features.shape[-2:] == (8, 8)  # the context grid (64 / 8)
    assert out_tgt.logits.shape[-2:] == (8, 8)  # no fused prediction of the target
    labels, conf, _ = state.teacher.pseudo_labels(tgt["image"], None, cfg.pseudo.teacher_threshold)
    y_static = torch.where(conf >= cfg.pseudo.teacher_threshold, labels, torch.full_like(labels, IGNORE))
    ref = adapt_step(model, src, {"image": tgt["image"], "label": y_static}, cfg, None, 5,
                     outputs=(out_src, out_tgt), seg_terms=False).logs
    assert logs["loss/contrast_t2s"] > 0 and logs["loss/contrast_s2t"] > 0
    for key in ("loss/contrast_t2s", "loss/contrast_s2t", "pseudo/dynamic_coverage"):
        torch.testing.assert_close(logs[key], ref[key])


def test_dinov2_training_forward_matches_the_papers_fusion():
    """DINOv2 (3.5 input pixels a cell): crops on multiples of 7 fall on whole cells of both grids."""
    torch.manual_seed(0)
    cfg = load_config(None, [*TINY_MIT, "model.backbone=dinov2_vits14", "model.width=0.125", "data.crop=[56,84]",
                             "model.hrda.detail_crop=[28,28]", "model.hrda.crop_divisible=7"])
    model = build_model(cfg.model, 5).eval()
    x, box = torch.randn(2, 3, 56, 84), torch.tensor([[7, 14], [28, 49]])
    out = model(x, "source", detail_box=box)
    base = model.base
    with torch.no_grad():
        small = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        levels = base.encode(small)
        context = base.decode(levels, (28, 42)).logits
        attention = torch.sigmoid(model.scale_attention(levels)[0][..., :8, :12])
        crops = torch.stack([x[i, :, y:y + 28, c:c + 28] for i, (y, c) in enumerate(box.tolist())])
        detail = base(crops).logits
    assert out.logits.shape == (2, 5, 16, 24) and detail.shape == (2, 5, 8, 8)
    torch.testing.assert_close(out.logits, reference_fusion(context, attention, detail, box, 3.5, 0.5))


def test_an_hrda_checkpoint_exports_as_a_folder_and_refuses_a_graph(tmp_path, synthetic_cache, capsys):
    pytest.importorskip("onnxruntime")
    from bida.engine.train import train
    from bida.tools.cli import main

    train(load_config(None, hrda_run_overrides(synthetic_cache) + ["train.iters=1"]), tmp_path / "run")
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.pt")
    assert main(["export", "--checkpoint", ckpt, "--format", "folder", "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main(["export", "--checkpoint", ckpt, "--format", "onnx", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "exports as a model folder only" in err and not (tmp_path / "o").exists()


def test_bida_under_hrda_with_mixed_target_features_reads_the_mixed_forwards_context_features(synthetic_cache):
    """``method.target_features: mixed`` under HRDA: no forward of its own; the target side is the
    mixed forward's context features at its target-origin pixels (the ClassMix mask sampled to
    the context grid as the labels are), the source side the source forward's."""
    from bida.method.teacher import IGNORE, MeanTeacher, mixed_target_batch, teacher_step
    from bida.method.train_step import adapt_step

    cfg = load_config(None, hrda_run_overrides(synthetic_cache) + [
        "method=bida", "method.calibration=false", "pseudo.teacher_threshold=0.1", "method.target_features=mixed"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 5).train()
    state = MeanTeacher(cfg, 5, "cpu")
    state.start(model)
    g = torch.Generator().manual_seed(3)
    src = {"image": torch.randn(2, 3, 64, 64, generator=g), "label": torch.randint(0, 5, (2, 64, 64), generator=g)}
    tgt = {"image": torch.randn(2, 3, 64, 64, generator=g), "label": torch.full((2, 64, 64), 255)}
    mixer_state = state.mixer.state_dict()
    rec = Recorder(model)
    logs = teacher_step(rec, src, tgt, cfg, state, None, 5).logs
    kinds = [(args[1], "detail_box" in kw, kw.get("context_only", False)) for args, kw, _ in rec.calls]
    assert kinds == [("source", True, False), ("target", True, False)]  # self-training's forwards alone
    out_src, out_mix = rec.calls[0][2], rec.calls[1][2]
    assert out_mix.features.shape[-2:] == (8, 8)  # the context grid
    # the reference: the same mix, redrawn from the mixer's state before the step
    state.mixer.load_state_dict(mixer_state)
    labels, conf, _ = state.teacher.pseudo_labels(tgt["image"], None, cfg.pseudo.teacher_threshold)
    w = torch.ones(2, 64, 64)
    img_mix, _, _, mask = state.mixer(src["image"], src["label"], tgt["image"], labels, w)
    assert torch.equal(img_mix, rec.calls[1][0][0])
    assert mask.any() and (~mask).any()
    y_static = torch.where(conf >= cfg.pseudo.teacher_threshold, labels, torch.full_like(labels, IGNORE))
    batch = mixed_target_batch({"image": tgt["image"], "label": y_static, "gt": tgt["label"]}, img_mix, mask)
    ref = adapt_step(model, src, batch, cfg, None, 5, outputs=(out_src, out_mix), seg_terms=False).logs
    assert logs["loss/contrast_t2s"] > 0 and logs["loss/contrast_s2t"] > 0
    for key in ("loss/contrast_t2s", "loss/contrast_s2t", "pseudo/dynamic_coverage"):
        torch.testing.assert_close(logs[key], ref[key])
