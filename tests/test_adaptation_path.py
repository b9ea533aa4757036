"""Regressions on the adaptation path: numerics under autocast, fp32 round confidences,
crop padding kept out of every target loss, prototype and moving average."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import bida.engine.round_labels as round_labels
from bida.config import load_config
from bida.data.datasets import SegmentationDataset
from bida.data.listing import Sample
from bida.models import SegOutput
from bida.losses import entropy, pixel_prototype_contrast
from bida.prototypes import class_sums, scaled_similarity
from bida.pseudo_labels import Calibration, label_transfer
from bida.method.train_step import adapt_step


# ----------------------------------------------------------------- autocast (bug 3)
def _features(seed=0, b=2, d=76, h=23, w=23, offset=30.0):
    g = torch.Generator().manual_seed(seed)
    # a large shared component, as the ASPP class scores have: what half precision loses
    return torch.randn(b, d, h, w, generator=g) + offset, torch.randint(0, 5, (b, h, w), generator=g)


def test_class_sums_exact_in_fp32_under_autocast():
    f, y = _features()
    ref_sums, ref_counts = class_sums(f, y, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums, counts = class_sums(f, y, 5)
        half_sums, _ = class_sums(f.bfloat16(), y, 5)  # the network's output dtype under autocast
    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums, ref_sums, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(counts, ref_counts)
    torch.testing.assert_close(half_sums, class_sums(f.bfloat16().float(), y, 5)[0], rtol=1e-6, atol=1e-4)


def test_similarity_label_transfer_and_contrast_exact_under_autocast():
    f, y = _features(1)
    protos = torch.randn(5, 76) + 30.0
    present = torch.tensor([True, True, False, True, True])
    ref_sim = scaled_similarity(f, protos, 10.0)
    ref_loss = pixel_prototype_contrast(f, y, protos, present, 0.1)
    ref_lab = label_transfer(f, protos, present, 0.1, 0.8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sim = scaled_similarity(f, protos, 10.0)
        loss = pixel_prototype_contrast(f, y, protos, present, 0.1)
        lab = label_transfer(f, protos, present, 0.1, 0.8)
    assert sim.dtype == torch.float32
    torch.testing.assert_close(sim, ref_sim, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(lab, ref_lab)


# ------------------------------------------------------- round confidences (bug 2)
def test_static_labels_stay_class_balanced_for_confident_classes(tmp_path, monkeypatch):
    """Confidences in (0.9995, 1): the class rule keeps ~10%, not every pixel that fp16 rounds to 1."""
    n, h, w, k = 6, 16, 16, 3
    samples = [Sample(name=f"img{i}", image=tmp_path / f"img{i}.png", label=None) for i in range(n)]

    class Images(SegmentationDataset):
        def __getitem__(self, index):
            return {"image": torch.zeros(3, h, w), "label": torch.full((h, w), 255), "index": index}

    ds = Images(samples, "folder", k, train=False)
    gen = torch.Generator().manual_seed(0)

    def fake_probs(model, image, eval_cfg, num_classes, out_size):
        conf = 1 - 5e-4 * torch.rand(out_size, generator=gen)  # half of them are 1.0 in fp16
        probs = torch.zeros(1, num_classes, *out_size)
        probs[0, 0] = conf
        probs[0, 1] = 1 - conf
        return probs

    monkeypatch.setattr(round_labels, "predict_probs", fake_probs)
    cfg = load_config(None, [])
    stats = round_labels.generate_static_labels(torch.nn.Identity(), ds, cfg, tmp_path / "round_0",
                                                ["a", "b", "c"], seed=0)
    # class rule: top 10% of the set; image rule: top 10% of each image; their union <= 20%
    assert 0.1 <= stats["labelled_fraction"] <= 0.2, stats["labelled_fraction"]


def test_classes_the_source_never_labels_get_no_static_label(tmp_path, monkeypatch):
    """SYNTHIA on the rounds schedule: a class without source pixels (class 2 here) is never
    pseudo-labelled, however confident; the official code sets such classes' thresholds to 1."""
    h, w, k = 4, 4, 3
    samples = [Sample(name=f"img{i}", image=tmp_path / f"img{i}.png", label=None) for i in range(2)]

    class Images(SegmentationDataset):
        def __getitem__(self, index):
            return {"image": torch.zeros(3, h, w), "label": torch.full((h, w), 255), "index": index}

    def fake_probs(model, image, eval_cfg, num_classes, out_size):
        probs = torch.zeros(1, num_classes, *out_size)
        probs[0, 0], probs[0, 1] = 0.6, 0.4  # class 0 everywhere, at 0.6 ...
        probs[0, :, 0, :2] = torch.tensor([0.0, 0.01, 0.99])[:, None]  # ... but class 2 at 0.99 on two pixels
        return probs

    monkeypatch.setattr(round_labels, "predict_probs", fake_probs)
    cfg = load_config(None, ["pseudo.class_fraction=0.5", "pseudo.image_fraction=0.125"])
    ds = Images(samples, "folder", k, train=False)
    for source_pixels, class_2 in ((None, 4), (np.array([5, 3, 0]), 0)):
        out = tmp_path / f"round_{class_2}"
        stats = round_labels.generate_static_labels(torch.nn.Identity(), ds, cfg, out, ["a", "b", "c"], seed=0,
                                                    source_pixels=source_pixels)
        labels = np.stack([np.array(Image.open(out / f"img{i}.png")) for i in range(2)])
        # image rule: the 2 most confident pixels of each image (class 2); class rule: class 0 at 0.6
        assert int((labels == 2).sum()) == class_2 and int((labels == 0).sum()) == 2 * 14
        assert stats["classes_without_source_pixels"] == ([] if source_pixels is None else ["c"])
        assert (stats["class_thresholds"]["c"] is None) == (source_pixels is not None)


def test_rounds_read_the_source_class_counts(tmp_path, tiny_overrides):
    """The embedded source never draws rider, truck, bus, train, motorcycle or bicycle."""
    from bida.engine.train import train

    cfg = load_config(None, tiny_overrides + ["method=self_training", "train.rounds=1", "train.iters=2",
                                              "train.iters_per_round=1"])
    train(cfg, tmp_path / "run")
    stats = json.loads((tmp_path / "run" / "pseudo_labels" / "round_0" / "stats.json").read_text())
    assert stats["classes_without_source_pixels"] == ["rider", "truck", "bus", "train", "motorcycle", "bicycle"]
    labels = np.stack([np.array(Image.open(p)) for p in (tmp_path / "run" / "pseudo_labels" / "round_0").glob("*.png")])
    assert not np.isin(labels, [12, 14, 15, 16, 17, 18]).any()


# ------------------------------------------------------------ crop padding (bug 4)
def test_training_items_mark_crop_padding_invalid(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((10, 12, 3), 200, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.ones((10, 12), np.uint8)).save(tmp_path / "a_label.png")
    samples = [Sample(name="a", image=tmp_path / "a.png", label=tmp_path / "a_label.png")]
    ds = SegmentationDataset(samples, "folder", 3, train=True, crop=(16, 16), scale_range=(1.0, 1.0),
                             flip=False, resize=8)  # resize: the path the paper configs take
    item = ds[(0, 0)]
    valid, label = item["valid"], item["label"]
    assert valid.shape == label.shape == (16, 16) and valid.dtype == torch.bool
    assert int(valid.sum()) == 8 * 10  # resized to 8x10, padded to the 16x16 crop
    assert torch.all(label[~valid] == 255) and torch.all(label[valid] == 1)


class _Replay(torch.nn.Module):
    """A "network" that returns fixed outputs per domain, so that the test controls features."""

    def __init__(self, src: SegOutput, tgt: SegOutput):
        super().__init__()
        self.src, self.tgt = src, tgt
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, domain="source"):
        if x.shape[0] == 2 * self.src.logits.shape[0]:  # both domains in one call
            logits, features = torch.cat([self.src.logits, self.tgt.logits]), torch.cat([self.src.features, self.tgt.features])
        else:
            out = self.src if bool(x[0, 0, 0, 0] == 0) else self.tgt  # source images are zeros
            logits, features = out.logits, out.features
        return SegOutput(logits * self.weight, features * self.weight)


def _bida_batch(pad_feature: torch.Tensor):
    g = torch.Generator().manual_seed(0)
    b, k, d, h, w = 2, 4, 16, 8, 8
    f_src = torch.randn(b, d, h, w, generator=g)
    y_src = torch.randint(0, k, (b, h * 8, w * 8), generator=g)
    f_tgt = torch.randn(b, d, h, w, generator=g)
    f_tgt[:, :, :, 6:] = pad_feature.view(1, d, 1, 1)  # the padded columns' features
    logits_tgt = torch.randn(b, k, h, w, generator=g)
    logits_tgt[:, :, :, 6:] = pad_feature[:k].view(1, k, 1, 1) * 5
    y_static = torch.randint(0, k, (b, h * 8, w * 8), generator=g)
    y_static[..., 24:] = 255
    valid = torch.ones(b, h * 8, w * 8, dtype=torch.bool)
    valid[..., 48:] = False  # crop padding: the last two feature columns
    src = SegOutput(torch.randn(b, k, h, w, generator=g), f_src)
    tgt = SegOutput(logits_tgt, f_tgt)
    batch_src = {"image": torch.zeros(b, 3, h * 8, w * 8), "label": y_src}
    batch_tgt = {"image": torch.ones(b, 3, h * 8, w * 8), "label": y_static, "valid": valid}
    return _Replay(src, tgt), batch_src, batch_tgt, k, d


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


def test_entropy_over_valid_pixels():
    logits = torch.randn(2, 5, 4, 6)
    valid = torch.rand(2, 4, 6) > 0.4
    p = logits.softmax(1)
    ref = -(p * p.log()).sum(1)[valid].mean()
    torch.testing.assert_close(entropy(logits, valid), ref)
    assert float(entropy(logits, torch.zeros_like(valid))) == 0.0


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


def _holed_batch():
    model, bs, bt, k, d = _bida_batch(torch.zeros(16))
    g = torch.Generator().manual_seed(5)
    holes = torch.rand(bt["label"].shape, generator=g) < 0.1  # scattered holes inside labelled cells
    bt["label"] = torch.where(holes, torch.full_like(bt["label"], 255), bt["label"])
    return model, bs, bt, k


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


def test_pair_scope_averages_the_per_pair_means():
    """Before: one mean over both pairs' pixels; the official code averages the pairs' losses."""
    from bida.prototypes import downsample_labels, pair_prototypes

    model, bs, bt, k = _holed_batch()
    bt["label"][0, :, :16] = 255  # pair 0's target holds far fewer labelled pixels than pair 1's
    cfg = load_config(None, ["method=bida", "method.dynamic_labels=false", "method.calibration=false",
                             "method.prototype_scope=pair"])
    result = adapt_step(model, bs, bt, cfg, None, k)
    f_src, f_tgt = model.src.features, model.tgt.features
    y_src, y_tgt = downsample_labels(bs["label"], (8, 8)), downsample_labels(bt["label"], (8, 8))
    ps_src, pp_src = pair_prototypes(f_src, y_src, k)
    ps_tgt, pp_tgt = pair_prototypes(f_tgt, y_tgt, k)
    tau = cfg.loss.temperature
    for key, f, y, protos, present in (("s2t", f_src, y_src, ps_tgt, pp_tgt), ("t2s", f_tgt, y_tgt, ps_src, pp_src)):
        per_pair = [float(pixel_prototype_contrast(f[b:b + 1], y[b:b + 1], protos[b:b + 1], present[b:b + 1], tau))
                    for b in range(2)]
        pooled = float(pixel_prototype_contrast(f, y, protos, present, tau))
        assert float(result.logs[f"loss/contrast_{key}"]) == pytest.approx(sum(per_pair) / 2, rel=1e-6), key
        assert sum(per_pair) / 2 != pytest.approx(pooled, rel=1e-3), key  # the case tells the two apart


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


def test_trainer_keeps_moving_averages_for_memory_partners_alone(tmp_path, tiny_overrides):
    from bida.engine.train import Trainer

    for partners, built in (("false", False), ("true", True)):
        cfg = load_config(None, tiny_overrides + ["method=bida", "method.calibration=false",
                                                  f"method.memory_partners={partners}"])
        trainer = Trainer(cfg, tmp_path / partners)
        trainer.close()
        assert (trainer.calibration is not None) == built
