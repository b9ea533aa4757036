"""Prototypes equal per-class means; absent classes are flagged, not zero-filled and used."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from bida.config import load_config
from bida.errors import CheckpointError
from bida.losses import pixel_prototype_contrast
from bida.method.train_step import adapt_step
from bida.models import SegOutput
from bida.prototypes import (PrototypeMemory, class_prototypes, class_sums, downsample_labels,
    pair_prototypes, prototype_similarity, prototypes_from_sums, scaled_similarity)
from helpers import IGNORE, _features, _holed_batch


def naive_prototypes(features, labels, num_classes, ignore_index=IGNORE):
    """Per-pixel loop reference: sum and count every labelled pixel into its class."""
    batch, dim, height, width = features.shape
    sums = torch.zeros(num_classes, dim, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                label = int(labels[b, i, j])
                if label == ignore_index or not 0 <= label < num_classes:
                    continue
                sums[label] += features[b, :, i, j].double()
                counts[label] += 1
    present = counts > 0
    protos = torch.zeros_like(sums)
    for c in range(num_classes):
        if counts[c] > 0:
            protos[c] = sums[c] / counts[c]
    return protos, present


def random_batch(batch=2, dim=5, height=4, width=6, num_classes=4, seed=0, ignore_share=0.2):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, dim, height, width, generator=gen)
    labels = torch.randint(0, num_classes, (batch, height, width), generator=gen)
    ignored = torch.rand(batch, height, width, generator=gen) < ignore_share
    return features, labels.masked_fill(ignored, IGNORE)


def test_downsample_labels_hand_example():
    labels = torch.arange(16).view(1, 4, 4)
    labels[0, 2, 2] = IGNORE
    out = downsample_labels(labels, (2, 2))
    assert out.dtype == torch.int64
    assert out.tolist() == [[[0, 2], [8, IGNORE]]]


def test_downsample_labels_matches_interpolate_and_same_size_passthrough():
    labels = torch.randint(0, 19, (2, 13, 11))
    labels[:, ::3] = IGNORE
    expected = F.interpolate(labels[:, None].float(), size=(5, 4), mode="nearest")[:, 0].long()
    assert torch.equal(downsample_labels(labels, (5, 4)), expected)
    assert torch.equal(downsample_labels(labels, (13, 11)), labels)


def test_class_prototypes_hand_example():
    # One image, D=2, four pixels: two of class 0, one of class 2, one ignored; class 1 absent.
    features = torch.tensor([[1.0, 3.0, 5.0, 7.0], [2.0, 4.0, 6.0, 8.0]]).view(1, 2, 2, 2)
    labels = torch.tensor([[[0, 0], [2, IGNORE]]])
    protos, present = class_prototypes(features, labels, num_classes=3)
    assert protos.dtype == torch.float32
    assert present.tolist() == [True, False, True]
    assert torch.allclose(protos, torch.tensor([[2.0, 3.0], [0.0, 0.0], [5.0, 6.0]]))


def test_class_prototypes_match_pixel_loop():
    features, labels = random_batch(num_classes=5, seed=1)
    labels[labels == 3] = IGNORE  # class 3 absent
    protos, present = class_prototypes(features, labels, num_classes=5)
    ref_protos, ref_present = naive_prototypes(features, labels, 5)
    assert torch.equal(present, ref_present)
    assert not present[3]
    assert torch.allclose(protos.double(), ref_protos, atol=1e-6)


def test_class_sums_add_up_across_shards():
    # The distributed path: per-process sums and counts add up to the global ones.
    features, labels = random_batch(batch=4, seed=2)
    sums, counts = class_sums(features, labels, 4)
    sums_a, counts_a = class_sums(features[:2], labels[:2], 4)
    sums_b, counts_b = class_sums(features[2:], labels[2:], 4)
    assert torch.allclose(sums, sums_a + sums_b, atol=1e-5)
    assert torch.equal(counts, counts_a + counts_b)
    assert counts.dtype == sums.dtype == torch.float32
    assert int(counts.sum()) == int((labels != IGNORE).sum())
    protos, present = prototypes_from_sums(sums_a + sums_b, counts_a + counts_b)
    ref, ref_present = class_prototypes(features, labels, 4)
    assert torch.allclose(protos, ref, atol=1e-6) and torch.equal(present, ref_present)


def test_all_ignore_and_out_of_range_labels():
    features = torch.randn(2, 3, 2, 2, requires_grad=True)
    labels = torch.full((2, 2, 2), IGNORE)
    labels[0, 0, 0] = 7  # outside [0, K): skipped like ignore
    protos, present = class_prototypes(features, labels, num_classes=3)
    assert not present.any()
    assert torch.isfinite(protos).all() and (protos == 0).all()
    protos.sum().backward()
    assert (features.grad == 0).all()


def test_gradient_flows_to_features():
    features = torch.randn(1, 2, 2, 2, requires_grad=True)
    labels = torch.tensor([[[0, 0], [1, IGNORE]]])
    protos, _ = class_prototypes(features, labels, num_classes=2)
    protos.sum().backward()
    # d mean / d pixel = 1 / count for labelled pixels, 0 for the ignored one.
    expected = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).expand(1, 2, 2, 2)
    assert torch.allclose(features.grad, expected)


def test_permutation_invariance():
    features, labels = random_batch(batch=3, seed=3)
    protos, present = class_prototypes(features, labels, 4)
    # Pixels shuffled (the same way in features and labels) and images reordered.
    order = torch.randperm(4 * 6, generator=torch.Generator().manual_seed(0))
    feats_p = features.flatten(2)[:, :, order].view_as(features)[[2, 0, 1]]
    labels_p = labels.flatten(1)[:, order].view_as(labels)[[2, 0, 1]]
    protos_p, present_p = class_prototypes(feats_p, labels_p, 4)
    assert torch.allclose(protos, protos_p, atol=1e-6) and torch.equal(present, present_p)
    # Renaming class c to perm[c] moves its prototype to row perm[c].
    perm = torch.tensor([2, 0, 3, 1])
    lookup = torch.full((256,), IGNORE, dtype=torch.long)
    lookup[:4] = perm
    protos_r, present_r = class_prototypes(features, lookup[labels], 4)
    assert torch.allclose(protos_r[perm], protos, atol=1e-6)
    assert torch.equal(present_r[perm], present)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_float32(dtype):
    features, labels = random_batch(seed=4)
    half = features.to(dtype)
    protos, present = class_prototypes(half, labels, 4)
    ref, ref_present = class_prototypes(half.float(), labels, 4)
    assert protos.dtype == torch.float32
    assert torch.equal(present, ref_present)
    assert torch.allclose(protos, ref, atol=1e-6)
    assert torch.allclose(protos, class_prototypes(features, labels, 4)[0], atol=2e-2)


def test_pair_prototypes_equal_per_image_loop():
    features, labels = random_batch(batch=3, num_classes=6, seed=5)
    labels[1][labels[1] == 2] = IGNORE  # class 2 absent in image 1 only
    protos, present = pair_prototypes(features, labels, 6)
    assert protos.shape == (3, 6, 5) and present.shape == (3, 6)
    assert not present[1, 2] and present[0, 2]
    for b in range(3):
        ref, ref_present = naive_prototypes(features[b : b + 1], labels[b : b + 1], 6)
        assert torch.equal(present[b], ref_present)
        assert torch.allclose(protos[b].double(), ref, atol=1e-6)


def test_labels_must_match_feature_size():
    with pytest.raises(ValueError, match="downsample_labels"):
        class_prototypes(torch.randn(1, 3, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long), 2)


def test_prototype_similarity_matches_cosine_loop():
    features, _ = random_batch(seed=6)
    protos = torch.randn(4, 5)
    protos[1] = 0.0  # a zero row gives similarity 0, not NaN
    sim = prototype_similarity(features, protos)
    pair = prototype_similarity(features, protos.expand(2, 4, 5))
    assert torch.allclose(sim, pair, atol=1e-6)
    for c in range(4):
        ref = F.cosine_similarity(features, protos[c].view(1, 5, 1, 1), dim=1)
        assert torch.allclose(sim[:, c], ref, atol=1e-6)
    assert torch.allclose(scaled_similarity(features, protos, 10.0), 10.0 * sim, atol=1e-5)
    with pytest.raises(ValueError):
        prototype_similarity(features, torch.randn(3, 4, 5))
    with pytest.raises(ValueError):
        prototype_similarity(features, torch.randn(4, 6))


def test_prototype_similarity_zero_feature_is_finite():
    features = torch.zeros(1, 3, 1, 2, requires_grad=True)
    with torch.no_grad():
        features[0, :, 0, 1] = torch.tensor([1.0, 2.0, 2.0])
    sim = prototype_similarity(features, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
    assert torch.allclose(sim.flatten(), torch.tensor([0.0, 1 / 3, 0.0, 2 / 3]), atol=1e-6)
    sim.sum().backward()
    assert torch.isfinite(features.grad).all()


def test_memory_update_initialises_then_averages():
    memory = PrototypeMemory(num_classes=3, dim=2, momentum=0.9)
    first = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], requires_grad=True)
    memory.update(first, torch.tensor([True, False, True]))
    # First sighting copies the batch prototype instead of averaging it with zeros.
    assert torch.equal(memory.value, torch.tensor([[1.0, 1.0], [0.0, 0.0], [3.0, 3.0]]))
    assert memory.initialized.tolist() == [True, False, True]
    assert not memory.value.requires_grad
    second = torch.tensor([[11.0, 11.0], [5.0, 5.0], [9.0, 9.0]])
    memory.update(second, torch.tensor([True, True, False]))
    expected = torch.tensor([[0.9 * 1 + 0.1 * 11] * 2, [5.0, 5.0], [3.0, 3.0]])
    assert torch.allclose(memory.value, expected)
    assert memory.num_updates.tolist() == [2, 1, 1]
    assert memory.initialized.all()


def test_memory_accepts_half_precision_and_checks_shapes():
    memory = PrototypeMemory(num_classes=2, dim=3)
    memory.update(torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(2, dtype=torch.bool))
    assert memory.value.dtype == torch.float32
    with pytest.raises(ValueError):
        memory.update(torch.ones(3, 3), torch.ones(3, dtype=torch.bool))


def test_memory_state_dict_round_trip():
    memory = PrototypeMemory(num_classes=3, dim=4, momentum=0.5)
    memory.update(torch.randn(3, 4), torch.tensor([True, False, True]))
    memory.update(torch.randn(3, 4), torch.tensor([True, True, False]))
    buffer = io.BytesIO()
    torch.save(memory.state_dict(), buffer)
    buffer.seek(0)
    restored = PrototypeMemory(num_classes=3, dim=4, momentum=0.5).to("cpu")
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.value, memory.value)
    assert torch.equal(restored.initialized, memory.initialized)
    assert torch.equal(restored.num_updates, memory.num_updates)
    # The saved state is a copy: later updates do not change it.
    state = memory.state_dict()
    memory.update(torch.randn(3, 4), torch.ones(3, dtype=torch.bool))
    assert not torch.equal(state["value"], memory.value)
    with pytest.raises(CheckpointError):
        PrototypeMemory(num_classes=4, dim=4).load_state_dict(state)
    with pytest.raises(CheckpointError):
        PrototypeMemory(num_classes=3, dim=4).load_state_dict({"value": state["value"]})


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
