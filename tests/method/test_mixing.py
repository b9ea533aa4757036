"""bida.method.mixing: ClassMix masks and labels, strong and weak augmentation."""

from __future__ import annotations

import math

import pytest
import torch

from bida.config import load_config
from bida.method.mixing import (WEAK_JITTER_PROB, ClassMix, blur_kernel_size, class_mix_masks, color_jitter,
    from_unit_rgb, gaussian_blur, mix, to_unit_rgb, weak_jitter)
from helpers import TEACHER


def test_class_mix_labels_follow_the_chosen_source_classes():
    g = torch.Generator().manual_seed(0)
    k = 6
    y_src = torch.randint(0, k, (4, 16, 16), generator=g)
    y_src[0, :4] = 255  # ignore pixels are never pasted
    y_src[1] = torch.where(y_src[1] < 3, y_src[1], torch.full_like(y_src[1], 255))  # only 3 classes present
    y_tgt = torch.randint(0, k, (4, 16, 16), generator=g)
    img_src, img_tgt = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    mixer = ClassMix(k, "imagenet", seed=3)
    state = mixer.state_dict()
    quality = torch.tensor(0.25)
    img, labels, weight, mask = mixer(img_src, y_src, img_tgt, y_tgt, quality)
    for b in range(4):
        present = set(y_src[b][y_src[b] != 255].tolist())
        chosen = set(y_src[b][mask[b]].tolist())
        assert 255 not in chosen and chosen <= present
        assert len(chosen) == math.ceil(len(present) / 2)
        # the mask is exactly the pixels of the chosen classes
        assert torch.equal(mask[b], torch.isin(y_src[b], torch.tensor(sorted(chosen))))
    assert torch.equal(labels[mask], y_src[mask]) and torch.equal(labels[~mask], y_tgt[~mask])
    assert torch.equal(weight[mask], torch.ones_like(weight[mask]))
    assert torch.equal(weight[~mask], torch.full_like(weight[~mask], 0.25))
    mixed = mix(mask, img_src, img_tgt)  # image pixels before jitter and blur
    m = mask[:, None].expand_as(img_src)
    assert torch.equal(mixed[m], img_src[m]) and torch.equal(mixed[~m], img_tgt[~m])
    # a restored generator draws the same masks and augmentations
    again = ClassMix(k, "imagenet", seed=99)
    again.load_state_dict(state)
    img2, labels2, _, mask2 = again(img_src, y_src, img_tgt, y_tgt, quality)
    assert torch.equal(mask2, mask) and torch.equal(img2, img) and torch.equal(labels2, labels)


@pytest.mark.parametrize("world", [2, 4])
def test_class_mix_of_each_rank_is_its_rows_of_the_global_batch(world):
    # Under torchrun a rank mixes its slice of the global batch: its masks, jitter and blur must
    # be the rows one process draws for the whole batch, step after step, and its generator
    # must advance as that process's does (rank 0's checkpoint resumes every rank).
    g = torch.Generator().manual_seed(4)
    k, b = 5, 4
    y_src = torch.randint(0, k, (b, 12, 12), generator=g)
    y_tgt = torch.randint(0, k, (b, 12, 12), generator=g)
    img_src, img_tgt = torch.randn(b, 3, 12, 12, generator=g), torch.randn(b, 3, 12, 12, generator=g)
    one = ClassMix(k, "imagenet", seed=3)
    ranks = [ClassMix(k, "imagenet", seed=3, rank=r, world_size=world) for r in range(world)]
    n = b // world
    for _ in range(2):
        ref = one(img_src, y_src, img_tgt, y_tgt, torch.tensor(0.5))
        for r, mixer in enumerate(ranks):
            rows = slice(r * n, (r + 1) * n)
            got = mixer(img_src[rows], y_src[rows], img_tgt[rows], y_tgt[rows], torch.tensor(0.5))
            for a, e in zip(got, ref):
                assert torch.equal(a, e[rows])
            assert torch.equal(mixer.generator.get_state(), one.generator.get_state())


def test_class_mix_masks_choose_half_of_the_classes_in_expectation():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(4).repeat_interleave(4).view(1, 4, 4).expand(2000, 4, 4).contiguous()
    masks = class_mix_masks(y, 4, g)
    picked = torch.stack([masks[:, c == y[0]].all(1) for c in range(4)], 1).float()  # (N, 4)
    assert torch.equal(picked.sum(1), torch.full((2000,), 2.0))
    assert torch.allclose(picked.mean(0), torch.full((4,), 0.5), atol=0.05)


@pytest.mark.parametrize("normalize", ["imagenet", "caffe"])
def test_strong_augmentation_pieces(normalize):
    g = torch.Generator().manual_seed(2)
    rgb = torch.rand(3, 3, 12, 16, generator=g)
    assert torch.allclose(to_unit_rgb(from_unit_rgb(rgb, normalize), normalize), rgb, atol=1e-5)
    # zero factors (u = 0.5) change nothing; random ones stay in range
    assert torch.allclose(color_jitter(rgb, torch.full((3, 4), 0.5)), rgb, atol=1e-5)
    out = color_jitter(rgb, torch.rand(3, 4, generator=g))
    assert out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, rgb)
    flat = torch.full((2, 3, 12, 16), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([0.15, 1.15])), flat, atol=1e-6)
    assert [blur_kernel_size(h) for h in (512, 64, 12)] == [51, 7, 1]  # about a tenth of the height, odd
    big = torch.rand(2, 3, 64, 32, generator=g)
    blurred = gaussian_blur(big, torch.tensor([0.15, 1.15]))
    # sigma 0.15 barely changes a pixel; sigma 1.15 matches a dense 2-D Gaussian with reflect padding
    assert torch.allclose(blurred[0], big[0], atol=1e-3)
    pos = torch.arange(7.0) - 3
    k1 = torch.exp(-0.5 * (pos / 1.15) ** 2)
    k2 = torch.outer(k1, k1) / k1.sum() ** 2
    padded = torch.nn.functional.pad(big[1:], (3, 3, 3, 3), mode="reflect")
    ref = torch.nn.functional.conv2d(padded.transpose(0, 1), k2[None, None]).transpose(0, 1)
    assert torch.allclose(blurred[1:], ref, atol=1e-5) and blurred[1].std() < big[1].std()


def _daformer_class_masks(labels, gen):
    """Naive reference of DAFormer's get_class_masks: for each image, torch.unique over the
    whole batch's labels (ignore included), ceil(n / 2) of them without replacement, the
    image's own pixels of those."""
    masks = []
    for label in labels:
        classes = torch.unique(labels)
        n = classes.numel()
        chosen = classes[torch.randperm(n, generator=gen)[:(n + n % 2) // 2]]
        masks.append(sum(label == c for c in chosen).bool())
    return torch.stack(masks)


def test_batch_class_mix_draws_from_the_batch_labels_including_ignore():
    from bida.method.mixing import batch_class_mix_masks

    # image A holds classes 0 and 1, image B class 2 and ignore: 4 candidates, 2 chosen per image
    a = torch.tensor([[0, 0, 1], [1, 1, 0]])
    b = torch.tensor([[2, 255, 255], [2, 2, 255]])
    n = 3000
    y = torch.stack([a, b]).repeat(n // 2, 1, 1)  # repeating the pair keeps the batch's values

    def patterns(masks):
        """Share of images of each kind (A, B) that paste nothing, the first value only, the second only, both."""
        out = []
        for img, (c1, c2) in ((slice(0, None, 2), (0, 1)), (slice(1, None, 2), (2, 255))):
            m, lab = masks[img], y[img]
            first, second = (m & (lab == c1)).flatten(1).any(1), (m & (lab == c2)).flatten(1).any(1)
            assert torch.equal(m, (first[:, None, None] & (lab == c1)) | (second[:, None, None] & (lab == c2)))
            out += [(~first & ~second).float().mean().item(), (first & ~second).float().mean().item(),
                    (~first & second).float().mean().item(), (first & second).float().mean().item()]
        return out

    ours = patterns(batch_class_mix_masks(y, 19, torch.Generator().manual_seed(0)))
    ref = patterns(_daformer_class_masks(y, torch.Generator().manual_seed(1)))
    exact = [1 / 6, 2 / 6, 2 / 6, 1 / 6] * 2  # pairs of {0, 1, 2, 255}: {2, 255}, {0, 2}/{0, 255}, ...
    assert ours == pytest.approx(exact, abs=0.04) and ref == pytest.approx(exact, abs=0.04)
    assert ours == pytest.approx(ref, abs=0.05)
    # ClassMix's per-image rule never leaves an image empty and never pastes ignore
    image_rule = patterns(class_mix_masks(y, 19, torch.Generator().manual_seed(0)))
    assert image_rule[0] == 0 and image_rule[4] == 0 and image_rule[6] == 0 and image_rule[7] == 0


def test_batch_class_mix_is_the_global_batch_rule_on_every_rank():
    """Two ranks with half the batch each (their candidates summed over ranks) draw exactly the
    masks one process draws for the whole batch: same seed, same rows."""
    from bida.method.mixing import batch_class_mix_masks

    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 10, (16, 6, 6), generator=g)  # rank 0's 8 images: classes 0-9
    y[0, :2] = 255
    y[8:] = torch.randint(0, 2, (8, 6, 6), generator=g)  # rank 1's: 0 and 1 only (choosing 1 of 2 alone)
    whole = batch_class_mix_masks(y, 19, torch.Generator().manual_seed(5))  # 11 values: 6 chosen per image

    def present(part):
        ids = torch.where(part == 255, 19, part).flatten()
        return torch.zeros(20, dtype=torch.long).scatter_(0, ids, 1)

    for rank in (0, 1):
        other = present(y[8 * (1 - rank): 8 * (2 - rank)])
        part = batch_class_mix_masks(y[8 * rank: 8 * rank + 8], 19, torch.Generator().manual_seed(5), rank=rank,
                                     world_size=2, reduce=lambda t: t + other)
        assert torch.equal(part, whole[8 * rank: 8 * rank + 8])
    alone = batch_class_mix_masks(y[8:], 19, torch.Generator().manual_seed(5), rank=1, world_size=2)
    assert not torch.equal(alone, whole[8:])  # without the reduce rank 1 would draw from its own values


def test_class_mix_batch_rule_is_deterministic_and_resumes(tiny_overrides):
    from bida.method.teacher import MeanTeacher

    cfg = load_config(None, tiny_overrides + ["method=self_training", *TEACHER, "train.mix_classes=batch"])
    assert load_config(None, tiny_overrides + ["method=self_training", *TEACHER]).train.mix_classes == "image"
    state = MeanTeacher(cfg, 19, "cpu")
    assert state.mixer.classes == "batch"
    g = torch.Generator().manual_seed(0)
    img, y = torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 19, (2, 8, 8), generator=g)
    state.mixer(img, y, img, y, torch.tensor(1.0))
    saved = state.state_dict()
    first = state.mixer(img, y, img, y, torch.tensor(1.0))[3]
    again = MeanTeacher(cfg, 19, "cpu")
    again.mixer.load_state_dict(saved["mixer"])
    assert torch.equal(again.mixer(img, y, img, y, torch.tensor(1.0))[3], first)
    with pytest.raises(ValueError, match="classes"):
        ClassMix(19, "imagenet", 0, classes="daformer")


def _torchvision_like_jitter(rgb, b, c, s):
    """torchvision's ColorJitter, brightness -> contrast -> saturation, written out by hand:
    blends with black, the image's mean grey and the per-pixel grey (ITU-R 601 weights)."""
    x = (rgb * b).clamp(0, 1)
    grey = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    x = (c * x + (1 - c) * grey.mean()).clamp(0, 1)
    grey = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]
    return (s * x + (1 - s) * grey).clamp(0, 1)


def test_weak_jitter_factors_probability_and_stream():
    rgb = torch.rand(4, 3, 5, 7, generator=torch.Generator().manual_seed(3))
    img = from_unit_rgb(rgb, "imagenet")
    # u: [apply?, brightness, contrast, saturation, hue]; hue 0.5 = no rotation
    u = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.5],    # brightness 1 + 32/255, contrast 0.5, saturation 1.5
                      [0.5, 0.0, 1.0, 0.0, 0.5],    # brightness 1 - 32/255, contrast 1.5, saturation 0.5
                      [0.95, 0.0, 0.0, 0.0, 0.5],   # not applied (probability 0.9)
                      [0.0, 0.5, 0.5, 0.5, 0.5]])   # applied with neutral factors
    out = to_unit_rgb(weak_jitter(img, u, "imagenet"), "imagenet")
    d = 32 / 255
    for i, (b, c, s) in enumerate([(1 + d, 0.5, 1.5), (1 - d, 1.5, 0.5)]):
        assert torch.allclose(out[i], _torchvision_like_jitter(rgb[i], b, c, s), atol=1e-5), i
    assert torch.allclose(out[2:], rgb[2:], atol=1e-5)
    assert WEAK_JITTER_PROB == 0.9
    # hue: an extreme draw (0.05 turn) moves colours but keeps the grey level (YIQ's Y)
    hue = to_unit_rgb(weak_jitter(img[:1], torch.tensor([[0.0, 0.5, 0.5, 0.5, 1.0]]), "imagenet"), "imagenet")
    grey = lambda t: (t * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)  # noqa: E731
    assert (hue - rgb[:1]).abs().max() > 1e-3
    inside = (hue > 1e-4).all(1) & (hue < 1 - 1e-4).all(1)  # unclamped pixels
    assert torch.allclose(grey(hue)[inside], grey(rgb[:1])[inside], atol=1e-5)
    # the mixer draws from its own generator: same seed, same jitter; the state restores it
    a, b = ClassMix(3, "imagenet", seed=5), ClassMix(3, "imagenet", seed=5)
    assert torch.equal(a.weak_jitter(img), b.weak_jitter(img))
    state = a.state_dict()
    first = a.weak_jitter(img)
    a.load_state_dict(state)
    assert torch.equal(a.weak_jitter(img), first)
