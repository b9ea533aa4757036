"""bida.method.hrda and HRDA in the teacher step: detail crops, losses, BiDA's features, resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bida.config import load_config
from bida.models import build_model
from helpers import SEGMENTORS, TINY_MIT, hrda_run_overrides


def step_inputs(cfg):
    """A seeded tiny HRDA student (5 classes) with its started mean teacher, and a random
    64x64 source batch and target batch (no target labels)."""
    from bida.method.teacher import MeanTeacher

    torch.manual_seed(0)
    model = build_model(cfg.model, 5).train()
    state = MeanTeacher(cfg, 5, "cpu")
    state.start(model)
    g = torch.Generator().manual_seed(3)
    src = {"image": torch.randn(2, 3, 64, 64, generator=g), "label": torch.randint(0, 5, (2, 64, 64), generator=g)}
    tgt = {"image": torch.randn(2, 3, 64, 64, generator=g), "label": torch.full((2, 64, 64), 255)}
    return model, state, src, tgt


class Recorder(torch.nn.Module):
    """Calls the model and keeps every output (to check the losses against them)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.calls.append((args, kwargs, out))
        return out


@pytest.mark.parametrize("segmentor, lam, mix_weight", [("mit", 0.1, 0.0), ("mit", 0.3, 1.0), ("deeplabv2", 0.3, 1.0)])
def test_teacher_step_weighs_fused_and_detail_ces_one_minus_lambda_and_lambda(synthetic_cache, segmentor, lam,
                                                                               mix_weight):
    from bida.method.teacher import teacher_step

    cfg = load_config(None, hrda_run_overrides(synthetic_cache, segmentor) + [
        f"model.hrda.detail_loss_weight={lam}", f"loss.mix_weight={mix_weight}"])
    model, state, src, tgt = step_inputs(cfg)
    src["label"][0, :10] = 255
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_hrda_deeplabv2_bida_mic_run_stopped_mid_phase_resumes_exactly(tmp_path, synthetic_cache):
    """BiDA + MIC under HRDA on DeepLab-V2 (a target stem of its own, ASPP attention), in bf16:
    a run stopped after its first step and resumed ends bit-identical to the uninterrupted one."""
    from bida.checkpoint import load_checkpoint
    from bida.engine.train import Trainer, train

    cfg = load_config(None, hrda_run_overrides(synthetic_cache, "deeplabv2") + [
        "method=bida", "mic.weight=1", "mic.block_size=16", "train.amp=bf16", "pseudo.teacher_threshold=0.2",
        "model.separate_target_stem=true"])
    train(cfg, tmp_path / "full")
    records = [line for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines() if '"teacher"' in line]
    assert len(records) == 3 and all('"loss/hrda_detail"' in r and '"loss/contrast_t2s"' in r for r in records)
    assert Trainer(cfg, tmp_path / "part").fit(stop_after=1) is None
    Trainer(cfg, tmp_path / "part", resume=True).fit()
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("full", "part"))
    assert any(k.startswith("scale_attention.") for k in a["model"])
    assert any(k.startswith("target_stem.") for k in a["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ta, tb = a["mean_teacher"], b["mean_teacher"]
    for k in ta["teacher"]["model"]:
        assert torch.equal(ta["teacher"]["model"][k], tb["teacher"]["model"][k]), k


def test_pseudo_margins_weigh_the_teacher_labels_zero(synthetic_cache):
    """MIC's masked loss reads the teacher labels alone: 0 when the whole crop is margin,
    the plain loss when none of it is."""
    from bida.method.teacher import teacher_step

    cfg = load_config(None, hrda_run_overrides(synthetic_cache) + ["mic.weight=1", "mic.block_size=16",
                                                                  "pseudo.teacher_threshold=0",
                                                                  "pseudo.margins=[2,2,2,2]"])
    out = {}
    for keep in (None, True, False):
        model, state, src, tgt = step_inputs(cfg)
        if keep is not None:
            tgt["pseudo_keep"] = torch.full((2, 64, 64), keep)
        out[keep] = teacher_step(model, src, tgt, cfg, state, None, 5).logs
    assert out[None]["loss/mic"] > 0
    assert torch.equal(out[True]["loss/mic"], out[None]["loss/mic"])
    assert out[False]["loss/mic"] == 0


def test_grad_checkpoint_gives_the_same_hrda_step(synthetic_cache):
    from bida.method.teacher import teacher_step

    got = {}
    for ckpt in ("false", "true"):
        cfg = load_config(None, hrda_run_overrides(synthetic_cache) + ["method=bida", "mic.weight=1",
                                                                      "mic.block_size=16",
                                                                      f"model.grad_checkpoint={ckpt}"])
        model, state, src, tgt = step_inputs(cfg)
        torch.manual_seed(1)
        result = teacher_step(model, src, tgt, cfg, state, None, 5)
        result.loss.backward()
        got[ckpt] = (result.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (la, ga), (lb, gb) = got["false"], got["true"]
    torch.testing.assert_close(la, lb, rtol=0, atol=0)
    assert ga.keys() == gb.keys() and any(k.startswith("scale_attention.") for k in ga)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-5, atol=1e-7, msg=k)


@pytest.mark.parametrize("segmentor", list(SEGMENTORS))
def test_bida_under_hrda_contrasts_the_context_crops_features(synthetic_cache, segmentor):
    """BiDA's design under HRDA: the source side reads the source forward's context features,
    the target side one extra forward of the unmixed target's context crop alone (no detail
    crop, no fused prediction); the contrast terms are BiDA's on exactly these features
    (MiT's decoder feature; DeepLab-V2's ASPP branches)."""
    from bida.method.teacher import IGNORE, teacher_step
    from bida.method.train_step import adapt_step

    cfg = load_config(None, hrda_run_overrides(synthetic_cache, segmentor) + [
        "method=bida", "method.calibration=false", "pseudo.teacher_threshold=0.1"])
    model, state, src, tgt = step_inputs(cfg)
    rec = Recorder(model)
    logs = teacher_step(rec, src, tgt, cfg, state, None, 5).logs
    kinds = [(args[1], "detail_box" in kw, kw.get("context_only", False)) for args, kw, _ in rec.calls]
    assert kinds == [("source", True, False), ("target", True, False), ("target", False, True)]
    out_src, out_tgt = rec.calls[0][2], rec.calls[2][2]
    cells = 64 // SEGMENTORS[segmentor][1]  # the context grid
    assert out_src.features.shape[-2:] == out_tgt.features.shape[-2:] == (cells, cells)
    assert out_tgt.logits.shape[-2:] == (cells, cells)  # no fused prediction of the target
    if segmentor == "deeplabv2":
        assert out_src.features.shape[1] == 4 * 5  # the ASPP branches, as without HRDA
    labels, conf, _ = state.teacher.pseudo_labels(tgt["image"], None, cfg.pseudo.teacher_threshold)
    y_static = torch.where(conf >= cfg.pseudo.teacher_threshold, labels, torch.full_like(labels, IGNORE))
    ref = adapt_step(model, src, {"image": tgt["image"], "label": y_static}, cfg, None, 5,
                     outputs=(out_src, out_tgt), seg_terms=False).logs
    assert logs["loss/contrast_t2s"] > 0 and logs["loss/contrast_s2t"] > 0
    for key in ("loss/contrast_t2s", "loss/contrast_s2t", "pseudo/dynamic_coverage"):
        torch.testing.assert_close(logs[key], ref[key])


def test_bida_under_hrda_with_mixed_target_features_reads_the_mixed_forwards_context_features(synthetic_cache):
    """``method.target_features: mixed`` under HRDA: no forward of its own; the target side is the
    mixed forward's context features at its target-origin pixels (the ClassMix mask sampled to
    the context grid as the labels are), the source side the source forward's."""
    from bida.method.teacher import IGNORE, mixed_target_batch, teacher_step
    from bida.method.train_step import adapt_step

    cfg = load_config(None, hrda_run_overrides(synthetic_cache) + [
        "method=bida", "method.calibration=false", "pseudo.teacher_threshold=0.1", "method.target_features=mixed"])
    model, state, src, tgt = step_inputs(cfg)
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
