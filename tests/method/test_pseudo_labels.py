"""Pseudo labels: label transfer, fusion, calibration, class-balanced static labels."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import bida.engine.round_labels as round_labels
from bida.config import load_config
from bida.data.datasets import SegmentationDataset
from bida.data.listing import Sample
from bida.errors import CheckpointError
from bida.losses import pixel_prototype_contrast
from bida.prototypes import PrototypeMemory, scaled_similarity
from bida.pseudo_labels import (Calibration, calibrated_prototypes, calibration_weight, class_thresholds,
    fuse_labels, image_thresholds, label_transfer, sample_confidences, static_labels)
from helpers import IGNORE, _features


# --- label transfer and fusion -----------------------------------------------------------


def test_label_transfer_hand_example():
    # Pixels (1,0), (1,1), (0,1), (-1,0); prototypes (1,0) and (0,1); tau = 0.1.
    features = torch.tensor([[1.0, 1.0, 0.0, -1.0], [0.0, 1.0, 1.0, 0.0]]).view(1, 2, 1, 4)
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    both = torch.tensor([True, True])
    out = label_transfer(features, prototypes, both, temperature=0.1, threshold=0.8)
    # q = 1/(1+e^-10) for pixels 0 and 2; q = 0.5 (a tie) for pixel 1; pixel 3 has cosines
    # -1 and 0, so q(class 1) = 1/(1+e^-10).
    assert out.tolist() == [[[0, IGNORE, 1, 1]]]
    assert out.dtype == torch.int64
    # With class 1 absent, class 0 is the only candidate (q = 1) everywhere.
    only_0 = label_transfer(features, prototypes, torch.tensor([True, False]), 0.1, 0.8)
    assert only_0.tolist() == [[[0, 0, 0, 0]]]
    # The threshold compares probabilities: q = 0.5 passes a threshold of exactly 0.5.
    assert label_transfer(features, prototypes, both, 0.1, 0.5)[0, 0, 1] != IGNORE


def naive_label_transfer(features, prototypes, present, temperature, threshold):
    batch, _, height, width = features.shape
    out = torch.full((batch, height, width), IGNORE, dtype=torch.long)
    classes = [c for c in range(prototypes.shape[0]) if present[c]]
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                scores = torch.stack(
                    [F.cosine_similarity(features[b, :, i, j], prototypes[c], dim=0)
                     for c in classes]
                )
                q = (scores / temperature).softmax(0)
                if q.max() >= threshold:
                    out[b, i, j] = classes[int(q.argmax())]
    return out


def test_label_transfer_matches_naive_loop_and_has_no_grad():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 4, 3, 5, generator=gen, requires_grad=True)
    prototypes = torch.randn(5, 4, generator=gen)
    present = torch.tensor([True, False, True, True, False])
    out = label_transfer(features, prototypes, present, temperature=0.3, threshold=0.5)
    assert not out.requires_grad
    ref = naive_label_transfer(features.detach(), prototypes, present, 0.3, 0.5)
    assert torch.equal(out, ref)
    assert (out != IGNORE).any() and (out == IGNORE).any()
    assert not ((out == 1) | (out == 4)).any()  # absent classes are never predicted


def test_label_transfer_nothing_present_and_half_precision():
    features = torch.randn(2, 4, 3, 3)
    prototypes = torch.randn(3, 4)
    # K = 1 absent: a uniform softmax over masked classes would give q = 1 >= threshold.
    none = label_transfer(features, prototypes[:1], torch.tensor([False]), 0.1, 0.8)
    assert (none == IGNORE).all()
    present = torch.ones(3, dtype=torch.bool)
    ref = label_transfer(features, prototypes, present, 0.1, 0.0)
    for dtype in (torch.float16, torch.bfloat16):
        half = label_transfer(features.to(dtype), prototypes.to(dtype), present, 0.1, 0.0)
        assert (half == ref).float().mean() > 0.9  # argmax may flip only on near-ties


def test_label_transfer_pair_prototypes():
    features = torch.randn(2, 4, 3, 3)
    prototypes = torch.randn(2, 3, 4)
    present = torch.tensor([[True, True, False], [False, True, True]])
    out = label_transfer(features, prototypes, present, 0.2, 0.4)
    for b in range(2):
        single = label_transfer(features[b : b + 1], prototypes[b], present[b], 0.2, 0.4)
        assert torch.equal(out[b : b + 1], single)


def test_fuse_labels():
    static = torch.tensor([[[1, IGNORE], [IGNORE, 4]]])
    dynamic = torch.tensor([[[2, 3], [IGNORE, 5]]])
    assert fuse_labels(static, dynamic).tolist() == [[[1, 3], [IGNORE, 4]]]
    with pytest.raises(ValueError):
        fuse_labels(static, dynamic[:, :1])


# --- calibration -------------------------------------------------------------------------


def test_calibration_weight_ramp():
    assert calibration_weight(0, 100, 2.0) == 0.0
    assert calibration_weight(25, 100, 2.0) == 0.5
    assert calibration_weight(100, 100, 2.0) == 2.0
    assert calibration_weight(1000, 100, 2.0) == 2.0
    assert calibration_weight(0, 0, 1.5) == 1.5
    assert calibration_weight(3, -1, 1.5) == 1.5


def memories():
    """Class 0: both EMAs; class 1: source only; class 2: target only; class 3: neither."""
    src, tgt = PrototypeMemory(4, 2), PrototypeMemory(4, 2)
    src.update(torch.tensor([[1.0, 0.0], [0.0, 2.0], [9.0, 9.0], [9.0, 9.0]]),
               torch.tensor([True, True, False, False]))
    tgt.update(torch.tensor([[3.0, 1.0], [9.0, 9.0], [5.0, 5.0], [9.0, 9.0]]),
               torch.tensor([True, False, True, False]))
    return src, tgt


def test_calibrated_prototypes_formula():
    src, tgt = memories()
    batch = torch.tensor([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0], [40.0, 40.0]])
    w = 0.5
    # Every class in the batch: batch prototype, shifted only where both EMAs exist.
    protos, present = calibrated_prototypes(batch, torch.ones(4, dtype=torch.bool), src, tgt, w)
    shift_0 = torch.tensor([3.0 - 1.0, 1.0 - 0.0])
    assert torch.allclose(protos[0], batch[0] + w * shift_0)
    assert torch.equal(protos[1:], batch[1:])
    assert present.all()
    # No class in the batch: the source EMA stands in where it exists.
    protos, present = calibrated_prototypes(batch, torch.zeros(4, dtype=torch.bool), src, tgt, w)
    assert torch.allclose(protos[0], torch.tensor([1.0, 0.0]) + w * shift_0)
    assert torch.equal(protos[1], torch.tensor([0.0, 2.0]))
    assert present.tolist() == [True, True, False, False]


def test_calibration_state_machine():
    calibration = Calibration(num_classes=3, dim=2, ramp_iters=4, max_weight=1.0, momentum=0.5)
    assert calibration.mean_shift() == 0.0 and calibration.weight() == 0.0
    src = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    tgt = torch.tensor([[3.0, 4.0], [1.0, 1.0], [0.0, 0.0]])
    present_src, present_tgt = torch.tensor([True, True, False]), torch.tensor([True, False, True])
    calibration.update(src, present_src, tgt, present_tgt)
    assert calibration.step == 1 and calibration.weight() == 0.25
    # Only class 0 is initialised in both: shift (3, 4), norm 5.
    assert calibration.mean_shift() == pytest.approx(5.0)
    batch, present = src + 1, torch.tensor([True, True, True])
    protos, out_present = calibration.calibrate(batch, present)
    ref, ref_present = calibrated_prototypes(
        batch, present, calibration.source, calibration.target, 0.25
    )
    assert torch.equal(protos, ref) and torch.equal(out_present, ref_present)
    assert torch.allclose(protos[0], batch[0] + 0.25 * torch.tensor([3.0, 4.0]))


def test_calibration_state_dict_round_trip():
    calibration = Calibration(num_classes=3, dim=2, ramp_iters=10)
    for _ in range(3):
        calibration.update(torch.randn(3, 2), torch.ones(3, dtype=torch.bool),
                           torch.randn(3, 2), torch.tensor([True, False, True]))
    buffer = io.BytesIO()
    torch.save(calibration.state_dict(), buffer)
    buffer.seek(0)
    restored = Calibration(num_classes=3, dim=2, ramp_iters=10)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.step == 3 and restored.weight() == calibration.weight()
    assert torch.equal(restored.source.value, calibration.source.value)
    assert torch.equal(restored.target.initialized, calibration.target.initialized)
    assert restored.mean_shift() == calibration.mean_shift()
    with pytest.raises(CheckpointError):
        restored.load_state_dict({"step": 1})


# --- class-balanced static labels --------------------------------------------------------


def naive_class_thresholds(conf, pred, num_classes, fraction):
    out = torch.full((num_classes,), math.inf)
    for k in range(num_classes):
        values = sorted(conf[pred == k].tolist(), reverse=True)
        if values:
            out[k] = values[max(1, math.ceil(round(fraction * len(values), 9))) - 1]
    return out


def test_class_thresholds_hand_example():
    conf = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.3, 0.8])
    pred = torch.tensor([0, 0, 0, 2, 2, 0])
    # Class 0 has [0.9, 0.8, 0.5, 0.1]: ceil(0.5 * 4) = 2 -> 0.8. Class 2 has [0.7, 0.3]:
    # ceil(0.5 * 2) = 1 -> 0.7. Class 1 has no pixel -> +inf.
    thr = class_thresholds(conf, pred, num_classes=3, fraction=0.5)
    assert thr.dtype == torch.float32
    assert thr.tolist() == pytest.approx([0.8, math.inf, 0.7])
    assert class_thresholds(conf, pred, 3, 1.0).tolist() == pytest.approx([0.1, math.inf, 0.3])
    assert torch.isinf(class_thresholds(conf, pred, 3, 0.0)).all()
    assert torch.isinf(class_thresholds(conf[:0], pred[:0], 3, 0.5)).all()


def test_class_thresholds_match_per_class_sort():
    gen = torch.Generator().manual_seed(1)
    conf = torch.rand(500, generator=gen)
    pred = torch.randint(0, 6, (500,), generator=gen)
    pred[pred == 4] = 5  # class 4 empty
    for fraction in (0.1, 0.25, 0.5, 1.0):
        thr = class_thresholds(conf, pred, 6, fraction)
        assert torch.equal(thr, naive_class_thresholds(conf, pred, 6, fraction))
        assert math.isinf(thr[4])
        # Distinct confidences: exactly ceil(fraction * n_k) pixels of each class pass.
        for k in (0, 1, 2, 3, 5):
            n_k = int((pred == k).sum())
            selected = int(((pred == k) & (conf >= thr[k])).sum())
            assert selected == max(1, math.ceil(round(fraction * n_k, 9)))


def test_class_thresholds_round_binary_fractions_exactly():
    # 0.1 * 30 is 3.0000000000000004 in floating point: three pixels, not four.
    conf = torch.linspace(1.0, 0.01, 30)
    thr = class_thresholds(conf, torch.zeros(30, dtype=torch.long), 1, 0.1)
    assert thr.item() == conf[2].item()


def test_image_thresholds():
    conf = torch.tensor([[[0.1, 0.2], [0.3, 0.4]], [[0.9, 0.5], [0.7, 0.6]]])
    assert image_thresholds(conf, 0.5).tolist() == pytest.approx([0.3, 0.7])
    assert image_thresholds(conf, 0.1).tolist() == pytest.approx([0.4, 0.9])
    assert image_thresholds(conf, 1.0).tolist() == pytest.approx([0.1, 0.5])
    assert torch.isinf(image_thresholds(conf, 0.0)).all()
    gen = torch.Generator().manual_seed(2)
    big = torch.rand(3, 7, 9, generator=gen)
    for fraction in (0.1, 0.33):
        keep = math.ceil(fraction * 63)
        ref = big.flatten(1).sort(dim=1, descending=True).values[:, keep - 1]
        assert torch.equal(image_thresholds(big, fraction), ref)


def test_static_labels_union_rule():
    conf = torch.tensor([[[0.95, 0.40, 0.30], [0.60, 0.20, 0.10]]])
    pred = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
    class_thr = torch.tensor([0.99, 0.35, 0.70])
    # Image rule with fraction 1/6 keeps the single most confident pixel (0.95, class 0,
    # which fails its class threshold 0.99). Class rule keeps 0.40 (class 1 >= 0.35).
    # 0.30 (class 1) and 0.60 (class 2 < 0.70) fail both rules.
    out = static_labels(conf, pred, class_thr, image_fraction=1 / 6)
    assert out.tolist() == [[[0, 1, IGNORE], [IGNORE, IGNORE, IGNORE]]]
    assert out.dtype == torch.int64


def test_static_labels_never_label_a_class_outside_labelled_classes():
    conf = torch.tensor([[[0.95, 0.40, 0.30], [0.60, 0.20, 0.10]]])
    pred = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
    class_thr = torch.tensor([0.99, 0.35, 0.50])
    # Without a restriction: 0.95 by the image rule, 0.40 (class 1) and 0.60 (class 2) by the class rule.
    assert static_labels(conf, pred, class_thr, 1 / 6).tolist() == [[[0, 1, IGNORE], [2, IGNORE, IGNORE]]]
    # Class 0 not labelled by the source: its pixel kept by the image rule goes too.
    allowed = torch.tensor([False, True, True])
    out = static_labels(conf, pred, class_thr, 1 / 6, labelled_classes=allowed)
    assert out.tolist() == [[[IGNORE, 1, IGNORE], [2, IGNORE, IGNORE]]]


def test_static_labels_match_pixel_loop():
    gen = torch.Generator().manual_seed(3)
    conf = torch.rand(2, 5, 6, generator=gen)
    pred = torch.randint(0, 4, (2, 5, 6), generator=gen)
    class_thr = class_thresholds(conf.flatten(), pred.flatten(), 4, 0.2)
    class_thr[3] = math.inf
    out = static_labels(conf, pred, class_thr, image_fraction=0.1)
    image_thr = image_thresholds(conf, 0.1)
    for b in range(2):
        for i in range(5):
            for j in range(6):
                keep = conf[b, i, j] >= class_thr[pred[b, i, j]] or conf[b, i, j] >= image_thr[b]
                assert out[b, i, j] == (pred[b, i, j] if keep else IGNORE)


def test_sample_confidences_bounded_deterministic_and_paired():
    conf = torch.arange(100, dtype=torch.float32).view(10, 10) / 100
    pred = torch.arange(100).view(10, 10) % 7
    first = sample_confidences(conf, pred, 20, torch.Generator().manual_seed(5))
    again = sample_confidences(conf, pred, 20, torch.Generator().manual_seed(5))
    other = sample_confidences(conf, pred, 20, torch.Generator().manual_seed(6))
    assert first[0].shape == (20,) and first[1].shape == (20,)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert len(set(first[0].tolist())) == 20  # without replacement
    assert torch.equal(first[1], (first[0] * 100).round().long() % 7)  # pairs kept together
    whole = sample_confidences(conf, pred, 1000)
    assert torch.equal(whole[0], conf.flatten()) and torch.equal(whole[1], pred.flatten())


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
