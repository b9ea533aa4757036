"""Masked image consistency (MIC): block masks, the masked view, its loss in the teacher step,
weight 0 = the step before MIC, config errors, exact resume and autocast."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from bida.config import load_config
from bida.errors import ConfigError
from bida.losses import seg_cross_entropy
from bida.method.masking import MaskedImageConsistency, block_masks, mask_image
from bida.method.mixing import STRONG_DRAWS, strong_augment
from bida.method.teacher import MeanTeacher, bn_batch_stats_only, teacher_step, weighted_cross_entropy
from bida.method.train_step import adapt_step, forward_domains
from bida.models import SegOutput
from helpers import TEACHER


def test_block_masks_follow_the_block_grid_cut_at_the_border():
    # 5x7 pixels in blocks of 3: a 2x3 grid whose last row and column are cut to 2 and 1 pixels
    draws = torch.rand(2, 2, 3, generator=torch.Generator().manual_seed(4))
    keep = block_masks(2, (5, 7), 3, 0.5, torch.Generator().manual_seed(4))
    assert keep.shape == (2, 5, 7) and keep.dtype == torch.bool
    for b in range(2):
        for i in range(5):
            for j in range(7):
                assert bool(keep[b, i, j]) == bool(draws[b, i // 3, j // 3] >= 0.5), (b, i, j)
    # by hand: seed 0 draws [[0.496, 0.768, 0.089], [0.132, 0.307, 0.634]]; kept where >= 0.5
    expected = torch.tensor([[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(block_masks(1, (5, 7), 3, 0.5, g)[0], expected)
    assert block_masks(3, (5, 7), 3, 0.0, g).all()  # ratio 0 keeps every pixel


def test_block_masks_keep_one_minus_the_ratio_of_blocks_and_are_drawn_from_the_generator():
    g = torch.Generator().manual_seed(1)
    keep = block_masks(4000, (8, 8), 4, 0.7, g)  # 16000 blocks
    blocks = keep[:, ::4, ::4].float()
    assert abs(blocks.mean().item() - 0.3) < 0.015
    assert torch.allclose(blocks.mean(0), torch.full((2, 2), 0.3), atol=0.03)  # every block position alike
    assert torch.equal(keep.float().view(4000, 2, 4, 2, 4).amin((2, 4)), keep.float().view(4000, 2, 4, 2, 4).amax((2, 4)))
    # the same generator state draws the same masks; the next draw differs
    a = block_masks(2, (16, 16), 4, 0.7, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(block_masks(2, (16, 16), 4, 0.7, g), a)
    assert not torch.equal(block_masks(2, (16, 16), 4, 0.7, g), a)


def test_mask_image_zeroes_the_masked_pixels_only():
    img = torch.randn(2, 3, 4, 6, dtype=torch.bfloat16)
    img[0, :, 0, 0] = math.nan  # masked: a NaN there does not survive (a product would keep it)
    keep = torch.ones(2, 4, 6, dtype=torch.bool)
    keep[0, :2, :3] = False
    out = mask_image(img, keep)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[0, :, :2, :3], torch.zeros(3, 2, 3, dtype=torch.bfloat16))
    k = keep[:, None].expand_as(img)
    assert torch.equal(out[k], img[k])


def test_masked_view_is_the_colour_augmented_image_masked_in_blocks_and_resumes_from_its_state():
    img = torch.randn(3, 3, 10, 12, generator=torch.Generator().manual_seed(0))
    masking = MaskedImageConsistency(4, 0.7, "imagenet", seed=11)
    state = copy.deepcopy(masking.state_dict())
    out, keep = masking(img)
    # the same draws by hand: colour augmentation first, then the blocks
    g = torch.Generator().manual_seed(11)
    u = torch.rand(3, STRONG_DRAWS, generator=g)
    ref_keep = block_masks(3, (10, 12), 4, 0.7, g)
    assert torch.equal(keep, ref_keep)
    assert torch.equal(out, mask_image(strong_augment(img, u, "imagenet"), ref_keep))
    assert (out[~keep[:, None].expand_as(out)] == 0).all() and (~keep).any() and keep.any()
    again = MaskedImageConsistency(4, 0.7, "imagenet", seed=99)
    again.load_state_dict(state)
    out2, keep2 = again(img)
    assert torch.equal(out2, out) and torch.equal(keep2, keep)


def test_masked_view_of_each_rank_is_its_rows_of_the_global_batch():
    # Under torchrun: a sample's colour augmentation and blocks depend on its place in the
    # global batch, not on the number of processes.
    img = torch.randn(4, 3, 10, 12, generator=torch.Generator().manual_seed(0))
    one = MaskedImageConsistency(4, 0.7, "imagenet", seed=11)
    ranks = [MaskedImageConsistency(4, 0.7, "imagenet", seed=11, rank=r, world_size=2) for r in range(2)]
    for _ in range(2):
        out, keep = one(img)
        for r, masking in enumerate(ranks):
            out_r, keep_r = masking(img[2 * r:2 * r + 2])
            assert torch.equal(out_r, out[2 * r:2 * r + 2]) and torch.equal(keep_r, keep[2 * r:2 * r + 2])
            assert torch.equal(masking.generator.get_state(), one.generator.get_state())


class _TinySeg(torch.nn.Module):
    """A 1x1 convolution at output stride 2: logits get upsampled to the labels, as a segmentor's."""

    def __init__(self, k: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, k, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.linspace(-2, 2, 3 * k).view(k, 3, 1, 1))

    def forward(self, x, domain="source"):
        logits = self.conv(F.avg_pool2d(x, 2))
        return SegOutput(logits, logits)


def _tiny_step_inputs(threshold: float, weight: float, valid_rows: int = 8):
    cfg = load_config(None, ["method=self_training", "train.schedule=teacher", f"mic.weight={weight}",
                             "mic.block_size=2", "mic.mask_ratio=0.5", f"pseudo.teacher_threshold={threshold}"])
    g = torch.Generator().manual_seed(3)
    k = 4
    model = _TinySeg(k)
    batch_src = {"image": torch.randn(2, 3, 8, 8, generator=g), "label": torch.randint(0, k, (2, 8, 8), generator=g)}
    valid = torch.zeros(2, 8, 8, dtype=torch.bool)
    valid[:, :valid_rows] = True  # the rows below are crop padding
    batch_tgt = {"image": torch.randn(2, 3, 8, 8, generator=g), "label": torch.full((2, 8, 8), 255), "valid": valid}
    state = MeanTeacher(cfg, k, "cpu")
    state.start(model)
    return cfg, model, batch_src, batch_tgt, state


def test_mic_loss_is_the_quality_weighted_cross_entropy_on_the_masked_image():
    cfg, model, batch_src, batch_tgt, state = _tiny_step_inputs(threshold=0.4, weight=0.5, valid_rows=6)
    masking_state = copy.deepcopy(state.masking.state_dict())
    result = teacher_step(model, batch_src, batch_tgt, cfg, state)
    assert set(result.logs) >= {"loss/mic", "loss/seg_mix", "loss/seg_src"}
    assert result.logs["loss/mic"].requires_grad is False

    # naive reference: teacher labels and confidence pixel by pixel, the same masked image
    img_tgt = batch_tgt["image"]
    with torch.no_grad():
        t_logits = F.interpolate(state.teacher.model(img_tgt).logits, size=(8, 8), mode="bilinear", align_corners=False)
        ref_masking = MaskedImageConsistency(2, 0.5, "imagenet", seed=0)
        ref_masking.load_state_dict(masking_state)
        masked, _ = ref_masking(img_tgt)
        s_logits = F.interpolate(model(masked).logits, size=(8, 8), mode="bilinear", align_corners=False)
    total, labelled, confident = 0.0, 0, 0
    for b in range(2):
        for i in range(6):  # the valid rows; padding carries no label
            for j in range(8):
                p = t_logits[b, :, i, j].softmax(0)
                label = int(p.argmax())
                confident += int(p.max() >= 0.4)
                total += -math.log(s_logits[b, :, i, j].softmax(0)[label].item())
                labelled += 1
    quality = confident / labelled
    assert 0 < quality < 1  # the weight is neither trivial case
    expected = quality * total / labelled
    assert result.logs["loss/mic"].item() == pytest.approx(expected, rel=1e-5)
    assert result.logs["pseudo/teacher_quality"].item() == pytest.approx(quality)
    parts = result.logs["loss/seg_src"] + result.logs["loss/seg_mix"] + 0.5 * result.logs["loss/mic"]
    assert result.loss.item() == pytest.approx(parts.item(), rel=1e-6)


def _step_before_mic(model, batch_src, batch_tgt, cfg, state, calibration=None, num_classes=None):
    """The teacher step without MIC (no feature distance): the reference of weight 0.

    bida forwards the unmixed target crop apart, after the source and mixed images, on its
    own BN batch without touching the running statistics (bida.method.teacher.bn_batch_stats_only).
    """
    img_src, y_src, img_tgt = batch_src["image"], batch_src["label"], batch_tgt["image"]
    valid_tgt = batch_tgt.get("valid")
    y_teacher, conf, quality = state.teacher.pseudo_labels(img_tgt, valid_tgt, cfg.pseudo.teacher_threshold)
    img_mix, y_mix, w_mix, _ = state.mixer(img_src, y_src, img_tgt, y_teacher, quality)
    out_src, out_mix = forward_domains(model, [img_src, img_mix], ["source", "target"], True)
    if cfg.method.name == "bida":
        with bn_batch_stats_only(model):
            out_tgt = model(img_tgt, "target")
        y_static = torch.where(conf >= cfg.pseudo.teacher_threshold, y_teacher, torch.full_like(y_teacher, 255))
        tgt = {"image": img_tgt, "label": y_static, "gt": batch_tgt["label"], "valid": valid_tgt}
        loss = adapt_step(model, batch_src, tgt, cfg, calibration, num_classes, outputs=(out_src, out_tgt),
                          seg_terms=False).loss
    else:
        loss = seg_cross_entropy(out_src.logits, y_src)
    return loss + cfg.loss.mix_weight * weighted_cross_entropy(out_mix.logits, y_mix, w_mix)


@pytest.mark.parametrize("method", ["self_training", "bida"])
def test_weight_zero_is_the_step_before_mic_bit_for_bit(method, tiny_overrides, monkeypatch):
    from bida.models import build_model
    from bida.pseudo_labels import Calibration

    cfg = load_config(None, tiny_overrides + TEACHER + [f"method={method}", "pseudo.teacher_threshold=0.0"])
    assert cfg.mic.weight == 0.0  # the default: off

    def never(*args, **kwargs):
        raise AssertionError("MIC's masking ran with mic.weight=0")

    monkeypatch.setattr("bida.method.teacher.MaskedImageConsistency", never)
    torch.manual_seed(0)
    model = build_model(cfg.model, 19, cfg.method.feature).train()
    g = torch.Generator().manual_seed(2)
    batch_src = {"image": torch.randn(2, 3, 32, 64, generator=g), "label": torch.randint(0, 19, (2, 32, 64), generator=g)}
    batch_tgt = {"image": torch.randn(2, 3, 32, 64, generator=g), "label": torch.full((2, 32, 64), 255),
                 "valid": torch.ones(2, 32, 64, dtype=torch.bool)}
    results = []
    for step in (teacher_step, _step_before_mic):
        net = copy.deepcopy(model)
        state = MeanTeacher(cfg, 19, "cpu")
        state.start(net)
        cal = Calibration(19, net.feature_dim, momentum=0.99, max_weight=1.0, ramp_iters=4) if method == "bida" else None
        out = step(net, batch_src, batch_tgt, cfg, state, cal, 19)
        loss = out if isinstance(out, torch.Tensor) else out.loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None],
                        state.mixer.generator.get_state(), state.state_dict().keys()))
    (la, ga, sa, ka), (lb, gb, sb, kb) = results
    assert torch.equal(la, lb) and len(ga) == len(gb) and all(torch.equal(a, b) for a, b in zip(ga, gb))
    assert torch.equal(sa, sb) and set(ka) == set(kb) == {"teacher", "mixer"}


@pytest.mark.parametrize("override, match", [
    ("mic.mask_ratio=1", r"mic.mask_ratio: 1.0 is out of range \(must be in \[0, 1\)"),
    ("mic.mask_ratio=1.5", "mic.mask_ratio"),
    ("mic.mask_ratio=-0.1", "mic.mask_ratio"),
    ("mic.block_size=0", "mic.block_size"),
    ("mic.block_size=2.5", "mic.block_size: expected an integer"),
    ("mic.weight=-1", "mic.weight"),
])
def test_bad_mic_values_are_one_line_config_errors(override, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config(None, ["method=self_training", "train.schedule=teacher", "mic.weight=1", override])
    assert "\n" not in str(err.value)


def test_mic_needs_the_teacher_schedule():
    with pytest.raises(ConfigError, match="mic.weight: .*train.schedule=teacher") as err:
        load_config(None, ["method=bida", "mic.weight=1"])  # rounds schedule
    assert "\n" not in str(err.value)
    load_config(None, ["method=bida", "mic.weight=0"])  # off: fine with rounds
    cfg = load_config(None, ["method=bida", "train.schedule=teacher", "mic.weight=1", "mic.mask_ratio=0"])
    assert (cfg.mic.weight, cfg.mic.mask_ratio, cfg.mic.block_size) == (1.0, 0.0, 64)


def test_mic_loss_under_bf16_autocast_stays_finite_and_close_to_fp32():
    cfg, model, batch_src, batch_tgt, state = _tiny_step_inputs(threshold=0.4, weight=1.0)
    saved = copy.deepcopy(state.state_dict())
    ref = teacher_step(model, batch_src, batch_tgt, cfg, state).logs["loss/mic"]
    state.load_state_dict(saved, model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = teacher_step(model, batch_src, batch_tgt, cfg, state)
    assert low.logs["loss/mic"].dtype == torch.float32 and torch.isfinite(low.loss)
    assert ref.item() > 0 and low.logs["loss/mic"].item() == pytest.approx(ref.item(), rel=0.03)
