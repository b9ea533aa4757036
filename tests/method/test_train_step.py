"""bida.method.train_step: one iteration of each method, padding, scopes and designs."""

from __future__ import annotations

import json

import pytest
import torch

from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.engine.train import Trainer, train
from bida.errors import ConfigError
from bida.losses import pixel_prototype_contrast
from bida.method.train_step import adapt_step
from bida.models import SegOutput
from bida.pseudo_labels import Calibration
from helpers import _bida_batch, _holed_batch


@pytest.mark.parametrize("method", ["minent", "self_training", "bida"])
def test_padding_never_reaches_a_target_loss_prototype_or_ema(method):
    cfg = load_config(None, [f"method={method}", "calibration.ramp_iters=0", "pseudo.transfer_threshold=0.3",
                             "pseudo.dynamic_for_segmentation=true"])
    results = []
    for pad in (torch.zeros(16), torch.linspace(-3, 3, 16)):  # two different paddings
        model, bs, bt, k, d = _bida_batch(pad)
        cal = Calibration(k, d, ramp_iters=0)
        # a calibration with history, so that label transfer runs on calibrated prototypes
        g = torch.Generator().manual_seed(1)
        seen = torch.ones(k, dtype=torch.bool)
        cal.update(torch.randn(k, d, generator=g), seen, torch.randn(k, d, generator=g), seen)
        result = adapt_step(model, bs, bt, cfg, cal, k)
        results.append((result, cal))
    (a, cal_a), (b, cal_b) = results
    # seg_tgt is left out: the logits are upsampled bilinearly to the labels, so valid pixels
    # next to the padding blend its scores (as a real network's receptive field does).
    for key in a.logs:
        if key.startswith("loss/") and key not in ("loss/seg_tgt", "loss/total"):
            assert float(a.logs[key]) == pytest.approx(float(b.logs[key]), rel=1e-6, abs=1e-7), key
    torch.testing.assert_close(cal_a.target.value, cal_b.target.value)


def test_labels_brought_to_label_size_keep_padding_ignored():
    """Nearest upsampling 2 -> 5 columns copies feature column 1 onto label columns 3 and 4;
    column 4 is padding and must stay ignore (static labels are ignore there too)."""
    from bida.method.train_step import _fused_at_label_size

    y_f = torch.tensor([[[1, 2]]])  # (1, 1, 2) at feature size
    y_static = torch.tensor([[[255, 0, 255, 255, 255]]])  # (1, 1, 5)
    valid = torch.tensor([[[True, True, True, True, False]]])
    fused = _fused_at_label_size(y_static, y_f, {"valid": valid})
    assert fused.tolist() == [[[1, 0, 1, 2, 255]]]


# ------------------------------------------------- label-size contrast, pair scope (issue 20.3)
def test_label_size_holes_are_filled_from_dynamic_labels_only():
    """y_D reaches a hole of y_F in its own cell; y_F's own samples never do."""
    from bida.method.train_step import _fused_at_label_size

    y_static = torch.tensor([[[0, 255, 1, 255], [255, 255, 255, 255]]])  # (1, 2, 4): two 2x2 cells
    assert torch.equal(_fused_at_label_size(y_static, torch.full((1, 1, 2), 255), {}), y_static)
    filled = _fused_at_label_size(y_static, torch.tensor([[[255, 2]]]), {})
    assert filled.tolist() == [[[0, 255, 1, 2], [255, 255, 2, 2]]]


def test_label_size_contrast_without_dynamic_labels_scores_only_static_pixels():
    """Before: with dynamic_labels=false L_t2s at contrast_resolution=label filled every hole of
    y_F from the upsampled fused map, i.e. from y_F's own nearest-neighbour samples."""
    model, bs, bt, k = _holed_batch()
    cfg = load_config(None, ["method=bida", "method.dynamic_labels=false", "method.calibration=false",
                             "loss.contrast_resolution=label"])
    result = adapt_step(model, bs, bt, cfg, None, k)
    from bida.prototypes import class_prototypes, downsample_labels

    protos, present = class_prototypes(model.src.features, downsample_labels(bs["label"], (8, 8)), k)
    y_static = torch.where(bt["valid"], bt["label"], torch.full_like(bt["label"], 255))
    expected = pixel_prototype_contrast(model.tgt.features, y_static, protos, present, cfg.loss.temperature,
                                        resolution="label")
    assert float(result.logs["loss/contrast_t2s"]) == pytest.approx(float(expected), rel=1e-6)


# ----------------------------------------------- memory partners without calibration (issue 18.5)
def _batch_lacking_classes():
    """A bida batch whose source labels hold classes 0 and 1 only (2 and 3 absent), and
    moving averages that have seen every class."""
    model, bs, bt, k, d = _bida_batch(torch.zeros(16))
    bs["label"] = bs["label"] % 2
    cal = Calibration(k, d, ramp_iters=0)
    g = torch.Generator().manual_seed(2)
    seen = torch.ones(k, dtype=torch.bool)
    cal.update(torch.randn(k, d, generator=g), seen, torch.randn(k, d, generator=g), seen)
    return model, bs, bt, k, cal


@pytest.mark.parametrize("extra", [["method.calibration=false"], ["method.prototype_scope=pair"],
                                   ["method.calibration=false", "method.prototype_scope=pair"]])
def test_memory_partners_work_without_calibration_and_per_pair(extra, monkeypatch):
    # before: with calibration=false the moving averages were never built or updated, and
    # with prototype_scope=pair they were never read: memory_partners did nothing, silently
    base = ["method=bida", "pseudo.transfer_threshold=0.3", *extra]
    losses = {}
    for partners in ("false", "true"):
        model, bs, bt, k, cal = _batch_lacking_classes()
        if "method.calibration=false" in extra:  # label transfer must stay uncalibrated
            monkeypatch.setattr(cal, "calibrate", lambda *a: pytest.fail("calibrated with calibration=false"))
        result = adapt_step(model, bs, bt, load_config(None, base + [f"method.memory_partners={partners}"]), cal, k)
        losses[partners] = float(result.logs["loss/contrast_s2t"]), float(result.logs["loss/contrast_t2s"])
        assert cal.step == 2  # the moving averages follow the batch
        assert ("calibration/weight" in result.logs) == ("method.calibration=false" not in extra)
    assert losses["true"][1] != pytest.approx(losses["false"][1])  # source classes 2, 3 come from memory


def _records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_warm_up_keeps_the_contrast_out_of_the_loss(tmp_path, tiny_overrides):
    """During the warm-up the total is the self-training terms; after it the contrast counts."""
    # from a tiny source-only model, one round of 3 steps, warm-up 2
    so = tmp_path / "so"
    train(load_config(None, tiny_overrides + ["train.iters=2"]), so)
    cfg = load_config(None, tiny_overrides + ["method=bida", f"model.init_checkpoint={so}/checkpoints/last.pt",
                                              "train.rounds=1", "train.iters_per_round=3",
                                              "loss.contrast_warmup_iters=2"])
    run = tmp_path / "bida"
    train(cfg, run)
    lw = cfg.loss
    steps = [r for r in _records(run) if r.get("phase") == "round"]
    assert len(steps) == 3
    for r in steps:
        seg = (r["loss/seg_src"] + lw.seg_tgt_weight * r["loss/seg_tgt"] + lw.entropy_weight * r["loss/ent_src"]
               + lw.entropy_weight * lw.seg_tgt_weight * r["loss/ent_tgt"])
        contrast = lw.contrast_t2s_weight * r["loss/contrast_t2s"] + lw.contrast_s2t_weight * r["loss/contrast_s2t"]
        expected = seg + (contrast if r["step"] > 2 else 0.0)
        assert r["loss/total"] == pytest.approx(expected, rel=1e-5), r["step"]
        assert r["loss/contrast_t2s"] > 0


def test_trained_head_leaves_the_segmentation_weights_unchanged(tmp_path, tiny_overrides):
    base = tiny_overrides + ["method.feature=backbone", "train.iters=3", "model.proj_dim=8"]
    plain, head = tmp_path / "plain", tmp_path / "head"
    train(load_config(None, base), plain)
    train(load_config(None, base + ["method.pretrain_head=true"]), head)
    a, b = (load_checkpoint(r / "checkpoints" / "last.pt")["model"] for r in (plain, head))
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith("proj."):
            assert not torch.equal(a[k], b[k]), k  # the head learnt
        else:
            assert torch.equal(a[k], b[k]), k
    steps = [r for r in _records(head) if r.get("phase") == "source"]
    assert all(r["loss/head_contrast"] > 0 for r in steps)
    # the default DeepLab-V2 source-only model (ASPP features, no head): the same segmentation weights
    aspp = tmp_path / "aspp"
    train(load_config(None, tiny_overrides + ["train.iters=3"]), aspp)
    c = load_checkpoint(aspp / "checkpoints" / "last.pt")["model"]
    for k in c:
        assert torch.equal(c[k], b[k]), k

    # adaptation keeps the trained head; a checkpoint without one is refused
    ckpt = head / "checkpoints" / "last.pt"
    over = tiny_overrides + ["method=bida", "method.feature=backbone", "model.proj_dim=8", "train.rounds=1",
                             "method.pretrain_head=true", "train.iters_per_round=1"]
    run = tmp_path / "adapt"
    t = Trainer(load_config(None, over + [f"model.init_checkpoint={ckpt}"]), run)
    assert torch.equal(t.model.state_dict()["proj.0.weight"], b["proj.0.weight"])
    with pytest.raises(ConfigError, match="method.pretrain_head"):
        Trainer(load_config(None, over + [f"model.init_checkpoint={plain}/checkpoints/last.pt"]), tmp_path / "x")
    # a row without a head (ASPP features) adapts from the checkpoint with a head
    Trainer(load_config(None, tiny_overrides + ["method=bida", f"model.init_checkpoint={ckpt}"]), tmp_path / "y")
    # a row with a head that does not ask for the trained one starts with the untrained head of its
    # seed (the one a source-only run without head training passes on: no gradient reaches it)
    t = Trainer(load_config(None, [o for o in over if o != "method.pretrain_head=true"]
                            + [f"model.init_checkpoint={ckpt}"]), tmp_path / "z")
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, a[k] if k.startswith("proj.") else b[k]), k
