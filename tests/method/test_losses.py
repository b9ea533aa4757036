"""Losses against torch.nn.functional and naive per-pixel references, including edge cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bida.losses import entropy, pixel_prototype_contrast, seg_cross_entropy
from bida.method.losses import (inverse_sqrt_frequency_weights,
    seg_cross_entropy as seg_cross_entropy_class_weights)
from bida.prototypes import class_prototypes, pair_prototypes
from helpers import IGNORE

TAU = 0.1


def naive_contrast(features, labels, prototypes, present, temperature, ignore_index=IGNORE):
    """Per-pixel loop reference of METHOD.md section 2 (float64).

    ``prototypes``/``present`` are (K, D)/(K,) or, for the pair scope, (B, K, D)/(B, K).
    """
    batch, _, height, width = features.shape
    if prototypes.dim() == 2:
        prototypes = prototypes.expand(batch, *prototypes.shape)
        present = present.expand(batch, *present.shape)
    num_classes = prototypes.shape[1]
    total, count = 0.0, 0
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                label = int(labels[b, i, j])
                if label == ignore_index or not 0 <= label < num_classes or not present[b, label]:
                    continue
                f = features[b, :, i, j].double()
                scores = {
                    c: F.cosine_similarity(f, prototypes[b, c].double(), dim=0).item() / temperature
                    for c in range(num_classes)
                    if present[b, c]
                }
                denominator = sum(math.exp(s) for s in scores.values())
                total -= math.log(math.exp(scores[label]) / denominator)
                count += 1
    return total / count if count else 0.0


def random_inputs(batch=2, dim=6, height=3, width=4, num_classes=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, dim, height, width, generator=gen)
    labels = torch.randint(0, num_classes, (batch, height, width), generator=gen)
    labels[torch.rand(batch, height, width, generator=gen) < 0.2] = IGNORE
    prototypes = torch.randn(num_classes, dim, generator=gen)
    return features, labels, prototypes


# --- seg_cross_entropy -------------------------------------------------------------------


def test_seg_cross_entropy_matches_functional():
    logits = torch.randn(2, 4, 5, 5)
    labels = torch.randint(0, 4, (2, 5, 5))
    labels[0, 0] = IGNORE
    ref = F.cross_entropy(logits, labels, ignore_index=IGNORE)
    assert torch.allclose(seg_cross_entropy(logits, labels), ref, atol=1e-6)


def test_seg_cross_entropy_upsamples_logits_bilinearly():
    logits = torch.randn(2, 4, 3, 3)
    labels = torch.randint(0, 4, (2, 12, 12))
    labels[:, :2] = IGNORE
    up = F.interpolate(logits, size=(12, 12), mode="bilinear", align_corners=False)
    ref = F.cross_entropy(up, labels, ignore_index=IGNORE)
    assert torch.allclose(seg_cross_entropy(logits, labels), ref, atol=1e-6)


def test_seg_cross_entropy_all_ignore_is_zero_with_graph():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = seg_cross_entropy(logits, torch.full((1, 4, 4), IGNORE))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_seg_cross_entropy_half_precision(dtype):
    logits = torch.randn(2, 4, 5, 5)
    labels = torch.randint(0, 4, (2, 5, 5))
    loss = seg_cross_entropy(logits.to(dtype), labels)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, seg_cross_entropy(logits, labels), atol=2e-2)


# --- entropy -----------------------------------------------------------------------------


def test_entropy_matches_definition():
    logits = torch.randn(2, 5, 3, 4)
    p = logits.softmax(1)
    assert torch.allclose(entropy(logits), -(p * p.log()).sum(1).mean(), atol=1e-6)


def test_entropy_uniform_and_saturated():
    assert math.isclose(entropy(torch.zeros(2, 7, 3, 3)).item(), math.log(7), rel_tol=1e-6)
    saturated = torch.tensor([1000.0, 0.0, -1000.0]).view(1, 3, 1, 1).requires_grad_()
    value = entropy(saturated)  # p*log p at p=0 must give 0, not NaN
    value.backward()
    assert value.item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(saturated.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_entropy_half_precision(dtype):
    logits = torch.randn(2, 5, 3, 4)
    value = entropy(logits.to(dtype))
    assert value.dtype == torch.float32
    assert torch.allclose(value, entropy(logits), atol=1e-2)


# --- pixel_prototype_contrast ------------------------------------------------------------


def test_contrast_hand_example():
    # Pixel f = (1, 0) of class 0; prototypes (1, 0) and (0, 1): cosines 1 and 0, so
    # logits 1/tau and 0 and loss = log(1 + exp(-1/tau)). Class 2 is absent: although its
    # zero-filled row would add exp(0) to the denominator, it must not count.
    features = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    labels = torch.zeros(1, 1, 1, dtype=torch.long)
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    present = torch.tensor([True, True, False])
    tau = 0.5
    loss = pixel_prototype_contrast(features, labels, prototypes, present, tau)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1 / tau)), rel=1e-6)
    all_three = torch.ones(3, dtype=torch.bool)
    wrong = pixel_prototype_contrast(features, labels, prototypes, all_three, tau)
    assert wrong.item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / tau)), rel=1e-6)


def test_contrast_matches_naive_reference():
    features, labels, prototypes = random_inputs(seed=1)
    present = torch.tensor([True, True, False, True, True])
    loss = pixel_prototype_contrast(features, labels, prototypes, present, TAU)
    ref = naive_contrast(features, labels, prototypes, present, TAU)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_contrast_absent_class_is_excluded_not_zero_filled():
    # Excluding an absent class equals deleting it from the problem altogether.
    features, labels, prototypes = random_inputs(seed=2)
    prototypes[2] = 0.0
    present = torch.tensor([True, True, False, True, True])
    loss = pixel_prototype_contrast(features, labels, prototypes, present, TAU)
    keep = torch.tensor([0, 1, 3, 4])
    lookup = torch.full((256,), IGNORE, dtype=torch.long)
    lookup[keep] = torch.arange(4)
    reduced = pixel_prototype_contrast(
        features, lookup[labels], prototypes[keep], torch.ones(4, dtype=torch.bool), TAU
    )
    assert torch.allclose(loss, reduced, atol=1e-6)
    zero_filled = pixel_prototype_contrast(
        features, labels, prototypes, torch.ones(5, dtype=torch.bool), TAU
    )
    assert not torch.allclose(loss, zero_filled)


def test_contrast_all_ignore_or_nothing_present_is_zero_with_graph():
    features, labels, prototypes = random_inputs(seed=3)
    features.requires_grad_()
    prototypes.requires_grad_()
    cases = [
        (torch.full_like(labels, IGNORE), torch.ones(5, dtype=torch.bool)),
        (labels, torch.zeros(5, dtype=torch.bool)),
    ]
    for case_labels, present in cases:
        loss = pixel_prototype_contrast(features, case_labels, prototypes, present, TAU)
        assert loss.item() == 0.0 and torch.isfinite(loss) and loss.requires_grad
        loss.backward()
        assert torch.isfinite(features.grad).all() and torch.isfinite(prototypes.grad).all()


def test_contrast_single_present_class_is_exactly_zero():
    features, labels, prototypes = random_inputs(seed=4)
    present = torch.tensor([False, False, True, False, False])
    loss = pixel_prototype_contrast(features, labels, prototypes, present, TAU)
    assert loss.item() == 0.0


def test_contrast_permutation_invariance():
    features, labels, prototypes = random_inputs(batch=3, seed=5)
    present = torch.tensor([True, False, True, True, True])
    loss = pixel_prototype_contrast(features, labels, prototypes, present, TAU)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    feats_p = features.flatten(2)[:, :, order].view_as(features)[[1, 2, 0]]
    labels_p = labels.flatten(1)[:, order].view_as(labels)[[1, 2, 0]]
    shuffled = pixel_prototype_contrast(feats_p, labels_p, prototypes, present, TAU)
    assert torch.allclose(loss, shuffled, atol=1e-6)
    # Renaming classes consistently (labels, prototype rows, present) changes nothing.
    perm = torch.tensor([3, 0, 4, 1, 2])
    lookup = torch.full((256,), IGNORE, dtype=torch.long)
    lookup[:5] = perm
    renamed_protos = torch.empty_like(prototypes)
    renamed_protos[perm] = prototypes
    renamed_present = torch.empty_like(present)
    renamed_present[perm] = present
    renamed = pixel_prototype_contrast(
        features, lookup[labels], renamed_protos, renamed_present, TAU
    )
    assert torch.allclose(loss, renamed, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_contrast_half_precision(dtype):
    features, labels, prototypes = random_inputs(seed=6)
    present = torch.ones(5, dtype=torch.bool)
    loss = pixel_prototype_contrast(features.to(dtype), labels, prototypes.to(dtype), present, TAU)
    ref = pixel_prototype_contrast(features, labels, prototypes, present, TAU)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, ref, atol=5e-2)


def test_contrast_gradients_through_features_and_prototypes():
    # End to end as in training: prototypes pooled from the other domain's features.
    gen = torch.Generator().manual_seed(7)
    feats_src = torch.randn(2, 6, 3, 4, generator=gen, requires_grad=True)
    feats_tgt = torch.randn(2, 6, 3, 4, generator=gen, requires_grad=True)
    labels_src = torch.randint(0, 4, (2, 3, 4), generator=gen)
    labels_tgt = torch.randint(0, 4, (2, 3, 4), generator=gen)
    protos_src, present_src = class_prototypes(feats_src, labels_src, 4)
    loss = pixel_prototype_contrast(feats_tgt, labels_tgt, protos_src, present_src, TAU)
    loss.backward()
    for grad in (feats_src.grad, feats_tgt.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_contrast_pair_scope_equals_per_image_loop():
    features, labels, _ = random_inputs(batch=3, seed=8)
    gen = torch.Generator().manual_seed(9)
    partner = torch.randn(3, 6, 3, 4, generator=gen)
    partner_labels = torch.randint(0, 5, (3, 3, 4), generator=gen)
    partner_labels[1][partner_labels[1] == 0] = IGNORE  # class 0 absent in partner 1
    protos, present = pair_prototypes(partner, partner_labels, 5)
    assert not present[1, 0]
    loss = pixel_prototype_contrast(features, labels, protos, present, TAU)
    ref = naive_contrast(features, labels, protos, present, TAU)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    # With the same prototypes for every image the pair scope reduces to the batch scope.
    shared = pixel_prototype_contrast(
        features, labels, protos[0].expand(3, 5, 6), present[0].expand(3, 5), TAU
    )
    batch = pixel_prototype_contrast(features, labels, protos[0], present[0], TAU)
    assert torch.allclose(shared, batch, atol=1e-6)


def test_contrast_per_image_averages_each_images_mean():
    """Pair scope: the mean of each image's pixel mean (the official code's average of its
    per-pair losses), not one mean over every pixel; images without a pixel do not count."""
    protos = torch.eye(2)  # rho_0 = e0, rho_1 = e1
    present = torch.ones(3, 2, dtype=torch.bool)
    f = torch.zeros(3, 2, 1, 2)
    f[0, :, 0, 0] = torch.tensor([1.0, 0.0])  # image 0: one pixel of class 0, at e0
    f[1, :, 0, :] = torch.tensor([0.0, 1.0])[:, None]  # image 1: two pixels of class 0, at e1
    y = torch.tensor([[[0, IGNORE]], [[0, 0]], [[IGNORE, IGNORE]]])  # image 2: nothing
    near, far = math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(1.0))  # tau = 1
    loss, count = pixel_prototype_contrast(f, y, protos.expand(3, 2, 2), present, 1.0,
                                           return_count=True, per_image=True)
    assert loss.item() == pytest.approx((near + far) / 2, rel=1e-6) and int(count) == 2
    pooled, pixels = pixel_prototype_contrast(f, y, protos.expand(3, 2, 2), present, 1.0, return_count=True)
    assert pooled.item() == pytest.approx((near + 2 * far) / 3, rel=1e-6) and int(pixels) == 3
    none = pixel_prototype_contrast(f, torch.full_like(y, IGNORE), protos, present[0], 1.0, per_image=True)
    assert none.item() == 0.0


def test_contrast_label_resolution_equals_upsampled_logits():
    features, _, prototypes = random_inputs(seed=10)
    present = torch.tensor([True, True, True, False, True])
    labels = torch.randint(0, 5, (2, 7, 9))  # not a multiple of the 3x4 feature map
    labels[:, 0] = IGNORE
    loss = pixel_prototype_contrast(features, labels, prototypes, present, TAU, resolution="label")
    # Reference: the official code's order, upsample the similarity logits then the loss.
    sim = F.cosine_similarity(features[:, None], prototypes[None, :, :, None, None], dim=2)
    logits = F.interpolate(sim / TAU, size=(7, 9), mode="nearest")
    logits = logits[:, present]
    remap = torch.full((256,), IGNORE, dtype=torch.long)
    remap[torch.nonzero(present).flatten()] = torch.arange(4)
    ref = F.cross_entropy(logits, remap[labels], ignore_index=IGNORE)
    assert torch.allclose(loss, ref, atol=1e-5)


def test_contrast_label_resolution_with_replicated_labels_equals_feature_resolution():
    features, labels, prototypes = random_inputs(seed=11)
    present = torch.ones(5, dtype=torch.bool)
    big = labels.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
    at_label = pixel_prototype_contrast(features, big, prototypes, present, TAU, resolution="label")
    at_feature = pixel_prototype_contrast(features, labels, prototypes, present, TAU)
    assert torch.allclose(at_label, at_feature, atol=1e-6)


def test_contrast_rejects_mismatched_shapes():
    features, labels, prototypes = random_inputs()
    present = torch.ones(5, dtype=torch.bool)
    big = torch.zeros(2, 6, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="downsample_labels"):
        pixel_prototype_contrast(features, big, prototypes, present, TAU)
    with pytest.raises(ValueError, match="resolution"):
        pixel_prototype_contrast(features, labels, prototypes, present, TAU, resolution="crop")
    with pytest.raises(ValueError):
        pixel_prototype_contrast(features, labels, prototypes, present[:4], TAU)


def test_seg_cross_entropy_mean_over_all_pixels():
    """loss.source_ce_mean=all (mmseg's mean): sum of CE / every pixel, ignored ones counting 0;
    equal to the labelled mean times the labelled share."""
    from bida.losses import ce_pixel_count

    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 0] = torch.tensor([math.log(3.0), 0.0, 0.0, 0.0])  # p(class 0) = 3/4 at pixel 0, 1/2 elsewhere
    labels = torch.tensor([[[0, 1, IGNORE, IGNORE]]])
    total = -math.log(0.75) - math.log(0.5)
    labelled = seg_cross_entropy(logits, labels)
    everything = seg_cross_entropy(logits, labels, mean_over="all")
    assert labelled.item() == pytest.approx(total / 2) and everything.item() == pytest.approx(total / 4)
    assert everything.item() == pytest.approx(labelled.item() * 2 / 4)
    assert seg_cross_entropy(logits, torch.full_like(labels, IGNORE), mean_over="all").item() == 0.0
    assert ce_pixel_count(labels, "all").item() == 4 and ce_pixel_count(labels, "labelled").item() == 2
    with pytest.raises(ValueError, match="mean_over"):
        seg_cross_entropy(logits, labels, mean_over="none")


def test_source_ce_mean_is_read_by_every_step(tiny_overrides):
    """source_step, adapt_step and the teacher step: seg_src with all = with labelled x labelled share."""
    import copy

    from bida.config import load_config
    from bida.models import build_model
    from bida.method.teacher import MeanTeacher, teacher_step
    from bida.method.train_step import adapt_step, source_step

    g = torch.Generator().manual_seed(0)
    src = {"image": torch.randn(2, 3, 32, 64, generator=g), "label": torch.randint(0, 19, (2, 32, 64), generator=g)}
    src["label"][:, :8] = IGNORE  # a quarter unlabelled
    src["label"][1, 8:, 48:] = IGNORE
    share = (src["label"] != IGNORE).float().mean().item()
    tgt = {"image": torch.randn(2, 3, 32, 64, generator=g), "label": torch.randint(0, 19, (2, 32, 64), generator=g)}
    teacher = ["train.schedule=teacher", "method=self_training", "pseudo.teacher_threshold=0.01"]
    steps = {
        "source": ([], lambda m, c: source_step(m, src, c)),
        "adapt": (["method=self_training"], lambda m, c: adapt_step(m, src, tgt, c, None, 19)),
        "teacher": (teacher, lambda m, c: teacher_step(m, src, tgt, c, _state(c, m), None, 19)),
    }

    def _state(cfg, model):
        state = MeanTeacher(cfg, 19, "cpu")
        state.start(model)
        return state

    for name, (over, step) in steps.items():
        seg = {}
        for mean in ("labelled", "all"):
            cfg = load_config(None, tiny_overrides + over + [f"loss.source_ce_mean={mean}"])
            torch.manual_seed(0)
            model = build_model(cfg.model, 19, cfg.method.feature).train()
            seg[mean] = step(copy.deepcopy(model), cfg).logs["loss/seg_src"].item()
        assert seg["all"] == pytest.approx(seg["labelled"] * share, rel=1e-5), name


def test_entropy_over_valid_pixels():
    logits = torch.randn(2, 5, 4, 6)
    valid = torch.rand(2, 4, 6) > 0.4
    p = logits.softmax(1)
    ref = -(p * p.log()).sum(1)[valid].mean()
    torch.testing.assert_close(entropy(logits, valid), ref)
    assert float(entropy(logits, torch.zeros_like(valid))) == 0.0


def test_inverse_sqrt_frequency_weights_by_hand():
    # f = (0.81, 0.09, 0.09, 0, 0.01): 1/sqrt(f) = (10/9, 10/3, 10/3, -, 10), sum sqrt(f) = 1.6
    w = inverse_sqrt_frequency_weights(torch.tensor([81, 9, 9, 0, 1]))
    expected = torch.tensor([10 / 9, 10 / 3, 10 / 3, 0.0, 10.0]) / 1.6
    torch.testing.assert_close(w, expected)
    assert w.dtype == torch.float32
    f = torch.tensor([81, 9, 9, 0, 1.0]) / 100
    assert math.isclose(float((f * w).sum()), 1.0, rel_tol=1e-6)  # the mean weight of a pixel is 1
    # one class only: weight 1 for it, 0 for the absent ones; no pixels at all: all 0, finite
    torch.testing.assert_close(inverse_sqrt_frequency_weights(torch.tensor([0, 7, 0])), torch.tensor([0.0, 1.0, 0.0]))
    assert torch.equal(inverse_sqrt_frequency_weights(torch.zeros(3, dtype=torch.int64)), torch.zeros(3))


def test_weighted_source_ce_is_the_hand_computed_weighted_sum_over_the_pixel_count():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    y = torch.randint(0, 3, (2, 4, 5))
    y[0, 0, :3] = 255  # ignored pixels
    w = torch.tensor([0.5, 2.0, 3.0])
    logp = F.log_softmax(logits, 1)
    valid = y != 255
    nll = -logp.gather(1, y.clamp(max=2)[:, None])[:, 0]  # (2, 4, 5)
    expected = (w[y.clamp(max=2)] * nll)[valid].sum() / valid.sum()
    torch.testing.assert_close(seg_cross_entropy_class_weights(logits, y, class_weights=w), expected)
    expected_all = (w[y.clamp(max=2)] * nll)[valid].sum() / y.numel()
    torch.testing.assert_close(seg_cross_entropy_class_weights(logits, y, mean_over="all", class_weights=w), expected_all)
    # weights of 1 are the unweighted loss; nothing labelled gives an exact 0
    assert torch.equal(seg_cross_entropy_class_weights(logits, y, class_weights=torch.ones(3)), seg_cross_entropy_class_weights(logits, y))
    assert seg_cross_entropy_class_weights(logits, torch.full_like(y, 255), class_weights=w) == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(seg_cross_entropy_class_weights(logits, y, class_weights=w), expected)
