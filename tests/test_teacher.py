"""Mean-teacher schedule: EMA maths, ClassMix labels, rare-class sampling, LR schedule, runs and exact resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.models.deeplabv2 import SegOutput
from bida.errors import ConfigError
from bida.method.mixing import (ClassMix, blur_kernel_size, class_mix_masks, color_jitter, from_unit_rgb, gaussian_blur, mix,
                         to_unit_rgb, WEAK_JITTER_PROB, weak_jitter)
from bida.engine.optim import WARMUP_RATIO, warmup_factor
from bida.data.rare_class import RareClassSampler, class_probabilities
from bida.method.feature_distance import downscale_labels_by_ratio
from bida.method.teacher import EMATeacher, ema_alpha, quality_weight, weighted_cross_entropy
from bida.engine.schedules import plan_phases
from bida.engine.train import Trainer, train

TEACHER = ["train.schedule=teacher", "train.iters=4", "train.optimizer=adamw", "train.weight_decay=0.01",
           "train.lr=6e-4", "train.warmup_iters=2", "train.poly_power=1.0", "data.rare_class_sampling=true",
           "data.rcs_min_pixels=2"]


# --------------------------------------------------------------------------- EMA teacher

def _tiny_net():
    net = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[1].running_mean.fill_(0.0)
    return net


def _set(net, w, mean, batches):
    with torch.no_grad():
        net[0].weight.fill_(w)
        net[1].running_mean.fill_(mean)
        net[1].num_batches_tracked.fill_(batches)


def test_ema_alpha_warm_up_rule():
    assert ema_alpha(1, 0.999) == 0.5
    assert ema_alpha(2, 0.999) == pytest.approx(2 / 3)
    assert ema_alpha(999, 0.999) == pytest.approx(0.999)
    assert ema_alpha(5000, 0.999) == 0.999


def test_ema_update_matches_hand_computed_values():
    student = _tiny_net()
    teacher = EMATeacher(momentum=0.6)
    teacher.reset(student)
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    _set(student, 3.0, 2.0, 5)
    assert teacher.update(student) == 0.5  # update 1: alpha = min(1 - 1/2, 0.6)
    # teacher = 0.5 * 1 + 0.5 * 3 = 2; running mean 0.5 * 0 + 0.5 * 2 = 1; counter copied
    assert teacher.model[0].weight.item() == 2.0
    assert teacher.model[1].running_mean.item() == 1.0
    assert teacher.model[1].num_batches_tracked.item() == 5
    _set(student, 7.0, 6.0, 9)
    assert teacher.update(student) == 0.6  # update 2: min(1 - 1/3, 0.6) = 0.6
    # 0.6 * 2 + 0.4 * 7 = 4.0; 0.6 * 1 + 0.4 * 6 = 3.0
    assert teacher.model[0].weight.item() == pytest.approx(4.0, abs=1e-6)
    assert teacher.model[1].running_mean.item() == pytest.approx(3.0, abs=1e-6)
    # state round trip
    other = EMATeacher(momentum=0.6)
    other.load_state_dict(teacher.state_dict(), student)
    assert other.updates == 2 and torch.equal(other.model[0].weight, teacher.model[0].weight)


def test_quality_weight_and_teacher_labels_ignore_padding():
    conf = torch.tensor([[[0.99, 0.5], [0.968, 0.97]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    # confident valid pixels: 0.99 and 0.968 (at least the threshold) of 3 valid ones
    assert quality_weight(conf, valid, 0.968).item() == pytest.approx(2 / 3)
    assert quality_weight(conf, torch.zeros_like(valid), 0.968).item() == 0.0

    class Fixed(torch.nn.Module):
        def forward(self, x, domain):
            logits = torch.zeros(x.shape[0], 3, *x.shape[-2:])
            logits[:, 1, :, :1] = 10.0  # class 1, confident, on the left column
            return SegOutput(logits, logits)

    teacher = EMATeacher(0.999)
    teacher.reset(Fixed())
    labels, conf, quality = teacher.pseudo_labels(torch.zeros(1, 3, 2, 2), valid, 0.968)
    assert labels.tolist() == [[[1, 0], [1, 255]]]
    assert quality.item() == pytest.approx(2 / 3)  # left column confident, (0, 1) uniform


def test_weighted_cross_entropy_and_label_downscaling():
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [255, 2]]])
    w = torch.tensor([[[1.0, 0.5], [1.0, 0.25]]])
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([[[0, 1], [0, 2]]]), reduction="none")[0]
    ref = (ce[0, 0] + 0.5 * ce[0, 1] + 0.25 * ce[1, 1]) / 3
    assert weighted_cross_entropy(logits, labels, w).item() == pytest.approx(ref.item(), rel=1e-6)
    y = torch.tensor([[[1, 1, 2, 2], [1, 255, 0, 0], [3, 3, 0, 0], [3, 3, 0, 0]]])
    # 2x2 cells: 3/4 of class 1 (kept), 2/4 of class 2 (< 0.75: ignore), all 3, all 0
    assert downscale_labels_by_ratio(y, (2, 2), 4).tolist() == [[[1, 255], [3, 0]]]


# --------------------------------------------------------------------------- ClassMix

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


def test_quality_weight_over_ranks_counts_the_global_batch():
    conf = torch.tensor([[[0.9, 0.1], [0.95, 0.2]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    other = torch.tensor([5.0, 6.0])  # another rank's (confident, valid) counts
    assert quality_weight(conf, valid, 0.5).item() == pytest.approx(2 / 3)
    assert quality_weight(conf, valid, 0.5, reduce=lambda c: c + other).item() == pytest.approx(7 / 9)


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


# --------------------------------------------------------------------------- rare-class sampling

def test_rare_class_probabilities_and_draws():
    # 4 images x 4 classes; totals 340, 330, 330, 0 pixels
    counts = np.array([[300, 0, 30, 0], [40, 10, 300, 0], [0, 300, 0, 0], [0, 20, 0, 0]])
    probs = class_probabilities(counts, 0.01)
    freq = torch.tensor([340.0, 330.0, 330.0]) / 1000
    expected = torch.softmax((1 - freq) / 0.01, 0).double().numpy()
    assert np.allclose(probs[:3], expected) and probs[3] == 0.0
    sampler = RareClassSampler(counts, 0.01, min_pixels=25, batch_size=2, seed=0)
    draws = [d for t in range(5000) for d in sampler.batch(t)]
    classes = np.array([c for _, _, c in draws])
    assert np.allclose(np.bincount(classes, minlength=4) / len(draws), probs, atol=0.02)
    for index, _, c in draws:
        assert counts[index, c] > 25  # an image holding more than min_pixels of the class
    # the position is the whole state: a sampler started at batch 7 continues the same stream
    later = RareClassSampler(counts, 0.01, 25, 2, 0, start=7)
    assert next(iter(later)) == sampler.batch(7)
    with pytest.raises(ConfigError, match="data.rcs_min_pixels"):
        RareClassSampler(counts, 0.01, min_pixels=400, batch_size=2, seed=0)


# --------------------------------------------------------------------------- config, optimizer, LR

def test_teacher_phases_and_config_errors(tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["method=bida", *TEACHER, "train.source_iters=3"])
    assert [(p.kind, p.iters) for p in plan_phases(cfg)] == [("source", 3), ("teacher", 4)]
    cfg = load_config(None, tiny_overrides + ["method=self_training", *TEACHER])
    assert [(p.kind, p.iters) for p in plan_phases(cfg)] == [("teacher", 4)]
    with pytest.raises(ConfigError, match="minent"):
        load_config(None, ["method=minent", "train.schedule=teacher"])
    with pytest.raises(ConfigError, match="model.pretrained"):
        load_config(None, ["method=bida", "train.schedule=teacher", "loss.feature_distance_weight=0.005"])
    with pytest.raises(ConfigError, match="train.schedule=teacher"):
        load_config(None, ["method=bida", "loss.feature_distance_weight=0.005", "model.pretrained=x.pth"])


def test_adamw_warm_up_and_poly_lr(tiny_overrides):
    from bida.engine.distributed import DistContext
    from bida.engine.optim import phase_optimizer, set_lr
    from bida.engine.schedules import build_schedule
    from bida.engine.state import RunState
    from bida.models import build_model

    cfg = load_config(None, tiny_overrides + ["method=self_training", *TEACHER, "train.iters=10",
                                              "train.warmup_iters=4"])
    model = build_model(cfg.model, 4, cfg.method.feature)
    schedule = build_schedule(plan_phases(cfg)[-1], cfg, model, DistContext(), 4, RunState(), source_iters=0)
    opt = phase_optimizer(model, cfg.train, schedule.base_lr)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["weight_decay"] == 0.01
    for it, warm in [(0, WARMUP_RATIO), (1, 0.25 + 0.75 * WARMUP_RATIO), (3, 0.75 + 0.25 * WARMUP_RATIO),
                     (4, 1.0), (7, 1.0)]:
        lr = schedule.lr(it)
        set_lr(opt, lr)
        expected = 6e-4 * (1 - it / 10) * warm  # poly power 1.0 times the linear warm-up
        assert lr == pytest.approx(expected, rel=1e-9) and warmup_factor(it, 4) == pytest.approx(warm)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr, 10 * lr])


# --------------------------------------------------------------------------- runs

def _records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_teacher_runs_self_training(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["method=self_training", *TEACHER, "train.iters=2", "train.source_iters=1"])
    metrics = train(cfg, tmp_path / "st")
    assert 0.0 <= metrics["mIoU"] <= 1.0
    steps = [r for r in _records(tmp_path / "st") if r.get("phase") == "teacher"]
    assert len(steps) == 2
    assert {"loss/seg_src", "loss/seg_mix", "pseudo/teacher_quality", "pseudo/teacher_acc"} <= set(steps[-1])
    assert not any(k.startswith("loss/contrast") or k.startswith("loss/ent") for k in steps[-1])
    state = load_checkpoint(tmp_path / "st" / "checkpoints" / "last.pt")
    assert state["mean_teacher"]["teacher"]["updates"] == 2
    assert (tmp_path / "st" / "rare_class_stats.json").is_file()


def test_bida_teacher_run_with_feature_distance_stopped_mid_way_resumes_exactly(tmp_path, tiny_overrides):
    # "ImageNet" weights: any weight file of the architecture
    from bida.models import build_model

    weights = tmp_path / "init.pth"
    torch.save(build_model(load_config(None, tiny_overrides).model, 19).state_dict(), weights)
    cfg = load_config(None, tiny_overrides + ["method=bida", *TEACHER, f"model.pretrained={weights}",
                                              "loss.feature_distance_weight=0.005", "train.iters=3"])
    full = tmp_path / "full"
    ref = train(cfg, full)
    steps = [r for r in _records(full) if r.get("phase") == "teacher"]
    assert len(steps) == 3
    assert {"loss/seg_src", "loss/seg_mix", "loss/contrast_t2s", "loss/contrast_s2t", "loss/feature_distance",
            "pseudo/dynamic_coverage", "calibration/weight", "pseudo/teacher_quality"} <= set(steps[-1])
    assert not any(k.startswith("loss/ent") or k == "loss/seg_tgt" for k in steps[-1])
    assert all(math.isfinite(r["loss/total"]) for r in steps) and steps[-1]["loss/feature_distance"] > 0

    part = tmp_path / "part"
    assert Trainer(cfg, part).fit(stop_after=1) is None
    stopped = load_checkpoint(part / "checkpoints" / "last.pt")
    assert stopped["step"] == 1 and stopped["mean_teacher"]["teacher"]["updates"] == 1
    resumed = Trainer(cfg, part, resume=True).fit()
    a, b = (load_checkpoint(r / "checkpoints" / "last.pt") for r in (full, part))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ta, tb = a["mean_teacher"]["teacher"], b["mean_teacher"]["teacher"]
    assert ta["updates"] == tb["updates"] == 3
    for k in ta["model"]:
        assert torch.equal(ta["model"][k], tb["model"][k]), k
    assert torch.equal(a["mean_teacher"]["mixer"]["generator"], b["mean_teacher"]["mixer"]["generator"])
    assert torch.equal(a["optimizer"]["state"][0]["exp_avg_sq"], b["optimizer"]["state"][0]["exp_avg_sq"])
    assert resumed["mIoU"] == ref["mIoU"]


def test_feature_distance_reads_the_backbone_output_on_the_chosen_classes(tiny_overrides):
    import copy

    from bida.models import build_model
    from bida.method.feature_distance import FeatureDistance

    student = build_model(load_config(None, tiny_overrides).model, 19).eval()
    fd = FeatureDistance(copy.deepcopy(student), [11, 13], 19)
    x = torch.randn(2, 3, 32, 64)
    y = torch.full((2, 32, 64), 13)
    y[1] = 0  # road: not a chosen class

    def distance(labels):
        with fd.capture(student):
            student(x, "source")
        return fd.loss(x, labels)

    assert distance(y).item() == 0.0  # the student is still the frozen copy
    with torch.no_grad():
        student.layer4[-1].conv2.weight.mul_(1.5)
    d = distance(y)
    assert d.item() > 0
    feat = []
    handle = student.layer4.register_forward_hook(lambda m, i, o: feat.append(o))
    with torch.no_grad():
        student(x[:1], "source")
        fd.model.layer4.register_forward_hook(lambda m, i, o: feat.append(o))
        fd.model(x[:1], "source")
    handle.remove()
    ref = (feat[0] - feat[1]).norm(dim=1).mean()  # image 0: every pixel is a chosen class
    assert d.item() == pytest.approx(ref.item(), rel=1e-5)
    assert distance(torch.zeros_like(y)).item() == 0.0  # no chosen class: no distance


def test_rare_class_crops_are_drawn_again_until_they_show_the_class():
    from bida.data.rare_class import MAX_RECROPS, RareClassCrops

    class Crops:
        calls = 0

        def __getitem__(self, key):
            Crops.calls += 1
            index, seed = key
            label = torch.zeros(4, 4, dtype=torch.long)
            label[: (seed % 5)] = 3  # 0 to 16 pixels of class 3, depending on the crop
            return {"label": label, "seed": seed}

    crops = RareClassCrops(Crops(), min_crop_pixels=10)
    item = crops[(0, 0, 3)]  # seed 0: no pixel of class 3, drawn again
    assert int((item["label"] == 3).sum()) > 10 and Crops.calls > 1
    Crops.calls = 0
    never = crops[(0, 0, 7)]  # class 7 never shows: the last of 1 + MAX_RECROPS crops is kept
    assert Crops.calls == 1 + MAX_RECROPS and never["label"].max() < 7


def test_teacher_run_with_drop_path_and_rare_class_sampling_resumes_exactly_mid_phase(tmp_path, tiny_overrides):
    """A mid-phase stop of a MiT teacher run (rare-class sampling, ClassMix, stochastic depth)
    resumes bit-exactly: the rare-class loader must not draw its seed from the global generator
    that the resume restores (drop path reads that generator)."""
    mit = ["model.backbone=mit_b0", "method.feature=decoder", "model.width=0.25", "model.decoder_dim=32",
           "model.proj_dim=16", "model.drop_path=0.3", "data.normalize=imagenet"]
    cfg = load_config(None, tiny_overrides + mit + ["method=bida", *TEACHER, "train.iters=4", "train.source_iters=2"])
    train(cfg, tmp_path / "full")
    assert Trainer(cfg, tmp_path / "part").fit(stop_after=4) is None  # step 2 of the teacher phase
    assert load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["iter"] == 2
    Trainer(cfg, tmp_path / "part", resume=True).fit()
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("full", "part"))
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ta, tb = a["mean_teacher"]["teacher"]["model"], b["mean_teacher"]["teacher"]["model"]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


# --------------------------------------------------------------------------- fair rows

BIDA_OFF = ["method=bida", "method.t2s=false", "method.s2t=false", "method.dynamic_labels=false",
            "method.calibration=false"]
MIT = ["model.backbone=mit_b0", "method.feature=decoder", "model.width=0.25", "model.decoder_dim=32",
       "model.proj_dim=16"]


@pytest.mark.parametrize("backbone", [[], MIT], ids=["deeplab", "mit"])
def test_bida_with_its_components_off_trains_bit_identically_to_self_training(tmp_path, tiny_overrides, backbone):
    base = tiny_overrides + backbone + [*TEACHER, "train.iters=3", "seed=5"]
    for name, method in (("st", ["method=self_training"]), ("off", BIDA_OFF)):
        train(load_config(None, base + method), tmp_path / name)
    a, b = (load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("st", "off"))
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    ta, tb = a["mean_teacher"]["teacher"]["model"], b["mean_teacher"]["teacher"]["model"]
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    ra, rb = ([r for r in _records(tmp_path / run) if r.get("phase") == "teacher"] for run in ("st", "off"))
    assert len(ra) == len(rb) == 3
    for x, y in zip(ra, rb):
        assert x["loss/seg_src"] == y["loss/seg_src"] and x["loss/seg_mix"] == y["loss/seg_mix"]
        assert x["loss/total"] == y["loss/total"]
    assert not any(k.startswith(("loss/contrast", "pseudo/dynamic", "calibration/")) for k in rb[-1])


def _step_inputs(cfg, seed=0):
    from bida.models import build_model
    from bida.method.teacher import MeanTeacher

    torch.manual_seed(seed)
    model = build_model(cfg.model, 19, cfg.method.feature).train()
    state = MeanTeacher(cfg, 19, "cpu")
    state.start(model)
    g = torch.Generator().manual_seed(seed)
    src = {"image": torch.randn(2, 3, 32, 64, generator=g), "label": torch.randint(0, 19, (2, 32, 64), generator=g)}
    tgt = {"image": torch.randn(2, 3, 32, 64, generator=g), "label": torch.full((2, 32, 64), 255)}
    return model, state, src, tgt


def _bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_bida_teacher_step_differs_from_self_training_by_its_terms_alone(tiny_overrides):
    """Same start, same batch: bida (components on) logs its terms, and its source and mix
    losses and the BN running statistics equal self_training's (the target forward leaves them)."""
    from bida.method.teacher import teacher_step

    base = tiny_overrides + [*TEACHER, "pseudo.teacher_threshold=0.01"]
    out = {}
    for name in ("self_training", "bida"):
        cfg = load_config(None, base + [f"method={name}"])
        model, state, src, tgt = _step_inputs(cfg)
        result = teacher_step(model, src, tgt, cfg, state, None, 19)
        result.loss.backward()
        out[name] = (result.logs, _bn_buffers(model))
    (logs_st, bn_st), (logs_b, bn_b) = out["self_training"], out["bida"]
    assert {"loss/contrast_t2s", "loss/contrast_s2t", "pseudo/dynamic_coverage"} <= set(logs_b)
    assert torch.equal(logs_st["loss/seg_src"], logs_b["loss/seg_src"])
    assert torch.equal(logs_st["loss/seg_mix"], logs_b["loss/seg_mix"])
    assert bn_st.keys() == bn_b.keys() and all(torch.equal(bn_st[k], bn_b[k]) for k in bn_st)
    assert not torch.equal(logs_st["loss/total"], logs_b["loss/total"])


def test_bn_batch_stats_only_normalises_by_the_batch_and_keeps_running_statistics():
    from bida.method.teacher import bn_batch_stats_only

    net = torch.nn.Sequential(torch.nn.BatchNorm1d(1), torch.nn.BatchNorm1d(1).eval())
    with torch.no_grad():
        net[1].running_mean.fill_(1.0)
        net[1].running_var.fill_(4.0)
    x = torch.tensor([[1.0], [3.0]])  # batch mean 2, biased variance 1
    with bn_batch_stats_only(net):
        y = net(x)
    # first BN: (x - 2) / sqrt(1 + eps); second (eval): (y - 1) / sqrt(4 + eps)
    eps = 1e-5
    first = (x - 2.0) / math.sqrt(1.0 + eps)
    assert torch.allclose(y, (first - 1.0) / math.sqrt(4.0 + eps), atol=1e-6)
    assert net[0].running_mean.item() == 0.0 and net[0].running_var.item() == 1.0
    assert net[0].num_batches_tracked.item() == 0 and net[0].track_running_stats
    net(x)  # outside: the ordinary update, 0.9 * 0 + 0.1 * 2
    assert net[0].running_mean.item() == pytest.approx(0.2) and net[0].num_batches_tracked.item() == 1


def test_pseudo_ce_mean_all_divides_by_every_pixel():
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 0] = torch.tensor([math.log(3.0), 0.0, 0.0, 0.0])  # p(class 0) = 3/4 at pixel 0, 1/2 elsewhere
    labels = torch.tensor([[[0, 1, 255, 255]]])
    w = torch.tensor(0.5)
    total = 0.5 * (-math.log(0.75) - math.log(0.5))
    assert weighted_cross_entropy(logits, labels, w).item() == pytest.approx(total / 2)
    assert weighted_cross_entropy(logits, labels, w, mean_over="all").item() == pytest.approx(total / 4)
    assert weighted_cross_entropy(logits, torch.full_like(labels, 255), w, mean_over="all").item() == 0.0
    with pytest.raises(ValueError, match="mean_over"):
        weighted_cross_entropy(logits, labels, w, mean_over="none")


@pytest.mark.parametrize("forwards", ["joint", "separate"])
def test_student_forwards_and_pseudo_ce_mean_switches(tiny_overrides, forwards):
    """joint: one forward of source and mixed images (one BN batch); separate (DAFormer): two,
    so the source CE equals that of a forward of the source images alone. pseudo_ce_mean=all
    scales the mix CE by the labelled share of its pixels."""
    import copy

    from bida.losses import seg_cross_entropy
    from bida.method.teacher import teacher_step

    over = [f"train.student_forwards={forwards}", "pseudo.teacher_threshold=0.01"]
    logs = {}
    for mean in ("labelled", "all"):
        cfg = load_config(None, tiny_overrides + ["method=self_training", *TEACHER, *over, f"loss.pseudo_ce_mean={mean}"])
        model, state, src, tgt = _step_inputs(cfg)
        tgt["valid"] = torch.ones(2, 32, 64, dtype=torch.bool)
        tgt["valid"][:, :, :24] = False  # crop padding: the teacher labels it ignore
        alone = seg_cross_entropy(copy.deepcopy(model)(src["image"], "source").logits, src["label"])
        sizes = []
        model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
        logs[mean] = teacher_step(model, src, tgt, cfg, state, None, 19).logs
        assert sizes == ([2, 2] if forwards == "separate" else [4])
        assert torch.equal(logs[mean]["loss/seg_src"], alone) == (forwards == "separate")
    assert torch.equal(logs["labelled"]["loss/seg_src"], logs["all"]["loss/seg_src"])
    # The same mixed labels again (a fresh mixer of the same seed): "all" is smaller by their labelled share.
    _, state, src, tgt = _step_inputs(cfg)
    valid = torch.ones(2, 32, 64, dtype=torch.bool)
    valid[:, :, :24] = False
    y_t, _, quality = state.teacher.pseudo_labels(tgt["image"], valid, 0.01)
    y_mix = state.mixer(src["image"], src["label"], tgt["image"], y_t, quality)[1]
    share = (y_mix != 255).float().mean().item()
    assert 0.3 < share < 0.99
    ratio = logs["all"]["loss/seg_mix"] / logs["labelled"]["loss/seg_mix"]
    assert ratio.item() == pytest.approx(share, rel=1e-5)
    with pytest.raises(ConfigError, match="train.student_forwards"):
        load_config(None, ["train.student_forwards=separate"])
    with pytest.raises(ConfigError, match="loss.pseudo_ce_mean"):
        load_config(None, ["loss.pseudo_ce_mean=all"])
    with pytest.raises(ConfigError, match="student_forwards"):
        load_config(None, ["train.schedule=teacher", "method=self_training", "train.student_forwards=both"])


def test_teacher_bn_batch_labels_with_batch_statistics_and_keeps_dropout_off():
    """Two classes straight from a BatchNorm: running statistics (mean 0 / 5, var 1) make
    class 0 win everywhere; the batch's own (channel 0: values 0 and 2, mean 1, var 1;
    channel 1: constant) give class 1, then class 0."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(2, affine=False)
            self.drop = torch.nn.Dropout2d(0.9)

        def forward(self, x, domain):
            logits = self.drop(self.bn(x))
            return SegOutput(logits, logits)

    net = Net()
    with torch.no_grad():
        net.bn.running_mean.copy_(torch.tensor([0.0, 5.0]))
    x = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]]])  # (1, 2, 1, 2)
    eps = 1e-5
    margins = {"running": [(0.0 + 4.0) / math.sqrt(1 + eps), (2.0 + 4.0) / math.sqrt(1 + eps)],  # ch1: (1 - 5) / sd
               "batch": [1.0 / math.sqrt(1 + eps)] * 2}  # ch0: (0 - 1, 2 - 1) / sd, ch1: 0
    for bn, labels in [("running", [0, 0]), ("batch", [1, 0])]:
        top = margins[bn]
        teacher = EMATeacher(0.999, bn)
        teacher.reset(net)
        y, conf, _ = teacher.pseudo_labels(x, None, 0.5)
        assert y.tolist() == [[labels]]
        # softmax over two classes: the winner's probability is sigmoid(its margin)
        assert conf[0, 0].tolist() == pytest.approx([1 / (1 + math.exp(-m)) for m in top], rel=1e-5)
        assert teacher.model.bn.running_mean.tolist() == [0.0, 5.0] and teacher.model.bn.num_batches_tracked == 0
        assert not teacher.model.training and not teacher.model.bn.training and teacher.model.bn.track_running_stats
    with pytest.raises(ValueError, match="bn"):
        EMATeacher(0.999, "train")


def test_teacher_bn_config(tiny_overrides):
    assert load_config(None, ["train.schedule=teacher", "method=self_training"]).train.teacher_bn == "running"
    with pytest.raises(ConfigError, match="train.teacher_bn"):
        load_config(None, ["train.teacher_bn=batch"])
    with pytest.raises(ConfigError, match="train.teacher_bn"):
        load_config(None, ["train.schedule=teacher", "method=self_training", "train.teacher_bn=batch",
                           "model.freeze_bn=true"])
    with pytest.raises(ConfigError, match="train.teacher_bn"):
        load_config(None, ["train.schedule=teacher", "method=self_training", "train.teacher_bn=eval"])


def test_daformer_switches_train_and_resume_exactly_mid_phase(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["method=bida", *TEACHER, "train.iters=2", "train.teacher_bn=batch",
                                              "train.student_forwards=separate", "loss.pseudo_ce_mean=all",
                                              "pseudo.ignore_top=3", "pseudo.ignore_bottom=5",
                                              "train.mix_classes=batch", "loss.source_ce_mean=all"])
    train(cfg, tmp_path / "full")
    steps = [r for r in _records(tmp_path / "full") if r.get("phase") == "teacher"]
    assert len(steps) == 2 and all(math.isfinite(r["loss/total"]) for r in steps)
    assert "loss/contrast_t2s" in steps[-1]
    assert Trainer(cfg, tmp_path / "part").fit(stop_after=1) is None
    Trainer(cfg, tmp_path / "part", resume=True).fit()
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("full", "part"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ta, tb = a["mean_teacher"]["teacher"]["model"], b["mean_teacher"]["teacher"]["model"]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


# ------------------------------------------------ DAFormer's recipe: crop bands, ClassMix candidates


def test_banded_weight_zeroes_exactly_the_band_rows_also_under_padding():
    from bida.method.teacher import banded_weight

    q = torch.tensor(0.75)
    # no padding: rows 0-1 (top 2) and 7-9 (bottom 3) of 10 weigh 0, the others the quality
    w = banded_weight(q, (2, 10, 3), 2, 3)
    expect = torch.tensor([0, 0, 0.75, 0.75, 0.75, 0.75, 0.75, 0, 0, 0])
    assert w.shape == (2, 10, 3) and w.dtype == torch.float32
    assert torch.equal(w, expect.view(1, 10, 1).expand(2, 10, 3))
    # image 1 padded below row 5 (bida pads at the bottom): its band is rows 3-5, the last three
    # unpadded rows; image 2 is all padding: weight 0 everywhere
    valid = torch.ones(3, 10, 3, dtype=torch.bool)
    valid[1, 6:] = False
    valid[1, 2, 1] = False  # a hole in a row does not end the image
    valid[2] = False
    w = banded_weight(q, (3, 10, 3), 2, 3, valid)
    assert torch.equal(w[0, :, 0], expect)
    assert w[1, :, 0].tolist() == [0, 0, 0.75] + [0] * 7
    assert torch.equal(w[2], torch.zeros(10, 3))
    assert torch.equal(banded_weight(q, (1, 4, 2), 0, 0), torch.full((1, 4, 2), 0.75))


def test_quality_weight_counts_the_band_rows_and_the_bands_only_zero_the_weight():
    """DAFormer: quality = confident pixels / all pixels of the batch, computed before the bands."""
    from bida.method.teacher import banded_weight

    conf = torch.tensor([[[0.99, 0.99], [0.5, 0.99], [0.5, 0.5], [0.99, 0.99]]])  # (1, 4, 2)
    valid = torch.ones(1, 4, 2, dtype=torch.bool)
    q = quality_weight(conf, valid, 0.968)
    assert q.item() == pytest.approx(5 / 8)  # rows 0 and 3 (the bands below) count: 5 of 8
    w = banded_weight(q, (1, 4, 2), 1, 1, valid)
    assert w[0, :, 0].tolist() == pytest.approx([0, 5 / 8, 5 / 8, 0])


@pytest.mark.parametrize("autocast", [False, True])
def test_banded_pseudo_ce_matches_a_hand_reference(autocast):
    """The weighted CE over banded weights: sum over unbanded rows of q * ce, over all pixels
    (loss.pseudo_ce_mean=all) or the labelled ones, in fp32 also under bf16 autocast; no
    gradient reaches a banded row."""
    from bida.method.teacher import banded_weight

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 6, 4, generator=g).requires_grad_()
    labels = torch.randint(0, 3, (2, 6, 4), generator=g)
    labels[0, 2, :2] = 255
    valid = torch.ones(2, 6, 4, dtype=torch.bool)
    valid[1, 5:] = False  # image 1's last row is padding (ignore)
    labels[1, 5:] = 255
    q = torch.tensor(0.6)
    w = banded_weight(q, (2, 6, 4), 1, 2, valid)
    # hand reference (float64): -log softmax at the label, rows kept: image 0 rows 1-3, image 1 rows 1-2
    logp = torch.log_softmax(logits.detach().double(), 1)
    total = 0.0
    for b, rows in ((0, range(1, 4)), (1, range(1, 3))):
        for r in rows:
            for c in range(4):
                if labels[b, r, c] != 255:
                    total += 0.6 * -logp[b, labels[b, r, c], r, c].item()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        all_ = weighted_cross_entropy(logits, labels, w, mean_over="all")
        labelled = weighted_cross_entropy(logits, labels, w)
    assert all_.dtype == torch.float32
    assert all_.item() == pytest.approx(total / 48, rel=1e-6)
    assert labelled.item() == pytest.approx(total / int((labels != 255).sum()), rel=1e-6)
    all_.backward()
    grad = logits.grad.abs().sum(1)  # (2, 6, 4)
    assert grad[0, [0, 4, 5]].eq(0).all() and grad[1, [0, 3, 4, 5]].eq(0).all()
    assert grad[0, 1:4].gt(0).sum() == 10 and grad[1, 1:3].gt(0).all()


def test_teacher_step_bands_weigh_the_target_pixels_of_the_mix_and_mic(tiny_overrides):
    """seg_mix and mic of a teacher step with bands equal the losses recomputed by hand: the
    mix weighs pasted source pixels 1 and target pixels the quality, 0 on the band rows; MIC
    weighs the teacher labels the same way; the quality is the unbanded one."""
    import copy

    from bida.method.teacher import teacher_step

    over = ["method=self_training", *TEACHER, "pseudo.teacher_threshold=0.1", "train.student_forwards=separate",
            "mic.weight=1", "mic.block_size=8", "pseudo.ignore_top=3", "pseudo.ignore_bottom=5",
            "loss.pseudo_ce_mean=all"]
    cfg = load_config(None, tiny_overrides + over)
    model, state, src, tgt = _step_inputs(cfg)
    ref_model = copy.deepcopy(model)
    logs = teacher_step(model, src, tgt, cfg, state, None, 19).logs
    _, state, src, tgt = _step_inputs(cfg)  # fresh generators of the same seeds
    y_t, _, q = state.teacher.pseudo_labels(tgt["image"], None, 0.1)
    assert 0 < q.item() < 1 and torch.equal(logs["pseudo/teacher_quality"], q)
    band = torch.zeros(32, dtype=torch.bool)
    band[:3] = band[-5:] = True
    img_mix, y_mix, _, mask = state.mixer(src["image"], src["label"], tgt["image"], y_t, q)
    w_ref = torch.where(mask, 1.0, torch.where(band[None, :, None], 0.0, q))
    ref_model(src["image"], "source")  # the same forwards in the same order (BN batch statistics)
    ce = torch.nn.functional.cross_entropy(
        torch.nn.functional.interpolate(ref_model(img_mix, "target").logits.float(), size=(32, 64), mode="bilinear",
                                        align_corners=False), y_mix, ignore_index=255, reduction="none")
    assert logs["loss/seg_mix"].item() == pytest.approx((w_ref * ce).sum().item() / y_mix.numel(), rel=1e-5)
    img_masked, _ = state.masking(tgt["image"])
    ce = torch.nn.functional.cross_entropy(
        torch.nn.functional.interpolate(ref_model(img_masked, "target").logits.float(), size=(32, 64), mode="bilinear",
                                        align_corners=False), y_t, ignore_index=255, reduction="none")
    w_mic = torch.where(band[None, :, None], 0.0, q).expand(2, 32, 64)
    assert logs["loss/mic"].item() == pytest.approx((w_mic * ce).sum().item() / y_t.numel(), rel=1e-5)


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


def test_daformer_keys_are_checked(tiny_overrides):
    base = ["train.schedule=teacher", "method=self_training", "data.crop=[32,64]"]
    assert load_config(None, base + ["pseudo.ignore_top=15", "pseudo.ignore_bottom=16"]).pseudo.ignore_bottom == 16
    for over, needle in [(["pseudo.ignore_top=16", "pseudo.ignore_bottom=16"], "pseudo.ignore_top + pseudo.ignore_bottom"),
                         (["pseudo.ignore_top=-1"], "pseudo.ignore_top"),
                         (["pseudo.ignore_bottom=-2"], "pseudo.ignore_bottom"),
                         (["train.mix_classes=daformer"], "train.mix_classes"),
                         (["loss.source_ce_mean=mean"], "loss.source_ce_mean")]:
        with pytest.raises(ConfigError, match=needle.replace("+", r"\+")):
            load_config(None, base + over)
    for key in ("pseudo.ignore_top=1", "pseudo.ignore_bottom=1", "train.mix_classes=batch"):
        with pytest.raises(ConfigError, match=key.split("=")[0]):
            load_config(None, [key])  # the rounds schedule reads none of them
    assert load_config(None, ["loss.source_ce_mean=all"]).loss.source_ce_mean == "all"  # every schedule


# --------------------------------------------------------------------------- VFM-UDA's switches

class _PixelNet(torch.nn.Module):
    """Logits from a fixed 1x1 conv of the image plus a learnt per-column bias: not symmetric
    under a horizontal flip (the column bias), at half the image's resolution (so that the
    teacher upsamples), optionally followed by a BatchNorm."""

    def __init__(self, k: int = 3, width: int = 8, bn: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, k, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(k, 3, 1, 1, generator=g))
            self.conv.bias.copy_(torch.randn(k, generator=g))
        self.column = torch.nn.Parameter(torch.randn(1, k, 1, width // 2, generator=g))
        self.bn = torch.nn.BatchNorm2d(k) if bn else torch.nn.Identity()

    def forward(self, x, domain):
        logits = self.bn(F.avg_pool2d(self.conv(x), 2) + self.column)
        return SegOutput(logits, logits)


def _flip_reference(net, x):
    """By hand: the mean of softmax(up(net(x))) and flip(softmax(up(net(flip x)))), each of the
    two forwards on its own (batch statistics of its own batch)."""
    up = lambda z: F.interpolate(z, size=x.shape[-2:], mode="bilinear", align_corners=False)  # noqa: E731
    p1 = up(net(x, "target").logits).softmax(1)
    p2 = torch.flip(up(net(torch.flip(x, dims=[3]), "target").logits).softmax(1), dims=[3])
    return (p1 + p2) / 2


@pytest.mark.parametrize("bn", ["running", "batch"])
def test_teacher_flip_averages_the_softmax_of_the_image_and_its_mirror(bn):
    net = _PixelNet(bn=True)
    with torch.no_grad():
        net.bn.running_mean.copy_(torch.tensor([0.5, -1.0, 0.2]))
        net.bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.0]))
    x = torch.randn(2, 3, 6, 8, generator=torch.Generator().manual_seed(1))
    teacher = EMATeacher(0.999, bn)
    teacher.reset(net)
    y, conf, quality = teacher.pseudo_labels(x, None, 0.6, flip=True)
    ref_net = _PixelNet(bn=True)
    ref_net.load_state_dict(net.state_dict())
    ref_net.train(bn == "batch")  # batch statistics: each of the two forwards normalises its own batch
    with torch.no_grad():
        prob = _flip_reference(ref_net, x)
    assert torch.allclose(conf, prob.max(1).values, rtol=0, atol=1e-6)
    assert torch.equal(y, prob.argmax(1))
    assert quality == pytest.approx((prob.max(1).values >= 0.6).float().mean().item())
    y0, conf0, _ = teacher.pseudo_labels(x, None, 0.6)
    assert not torch.equal(conf0, conf)  # the mirror's half changes the confidences of this net
    assert teacher.model.bn.running_mean.tolist() == pytest.approx([0.5, -1.0, 0.2])  # untouched


def test_teacher_flip_is_a_no_op_for_a_mirror_symmetric_teacher():
    """A 1x1 conv (no column bias) commutes with the mirror: flip-averaged labels equal the plain ones."""
    net = _PixelNet()
    with torch.no_grad():
        net.column.zero_()
    x = torch.randn(2, 3, 6, 8, generator=torch.Generator().manual_seed(2))
    teacher = EMATeacher(0.999)
    teacher.reset(net)
    y0, conf0, q0 = teacher.pseudo_labels(x, None, 0.6)
    y1, conf1, q1 = teacher.pseudo_labels(x, None, 0.6, flip=True)
    assert torch.equal(y0, y1) and torch.allclose(conf0, conf1, rtol=0, atol=1e-6) and q0 == q1


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


def test_teacher_flip_and_weak_jitter_config(tiny_overrides):
    base = ["train.schedule=teacher", "method=self_training"]
    cfg = load_config(None, base)
    assert cfg.pseudo.teacher_flip is False and cfg.data.weak_jitter is False
    assert load_config(None, base + ["pseudo.teacher_flip=true", "data.weak_jitter=true"]).pseudo.teacher_flip
    for key in ("pseudo.teacher_flip", "data.weak_jitter"):
        for other in (["method=self_training"], ["train.schedule=teacher", "method=source_only"]):
            with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
                load_config(None, other + [f"{key}=true"])
            assert "\n" not in str(err.value)


def test_teacher_flip_and_weak_jitter_change_the_step_and_resume_exactly(tmp_path, tiny_overrides):
    base = tiny_overrides + ["method=self_training", *TEACHER, "train.iters=2"]
    on = base + ["pseudo.teacher_flip=true", "data.weak_jitter=true"]
    train(load_config(None, base), tmp_path / "off")
    train(load_config(None, on), tmp_path / "on")
    off_steps, on_steps = ([r for r in _records(tmp_path / run) if r.get("phase") == "teacher"] for run in ("off", "on"))
    assert off_steps[0]["loss/seg_src"] != on_steps[0]["loss/seg_src"]  # the source loss saw a jittered image
    cfg = load_config(None, on)
    assert Trainer(cfg, tmp_path / "part").fit(stop_after=1) is None
    Trainer(cfg, tmp_path / "part", resume=True).fit()
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("on", "part"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
