"""bida.method.teacher: the EMA teacher, its pseudo labels and weights, the teacher step."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.engine.train import Trainer, train
from bida.errors import ConfigError
from bida.method.feature_distance import downscale_labels_by_ratio
from bida.method.pseudo_labels import Calibration
from bida.method.teacher import (EMATeacher, MeanTeacher, ema_alpha, mixed_target_batch, quality_weight,
    teacher_step, weighted_cross_entropy)
from bida.models import build_model
from bida.models.deeplabv2 import SegOutput
from helpers import IGNORE, MIT, MIXED, TEACHER


K = 19


THRESHOLD = 0.01  # tiny models are unsure: most teacher labels pass, some may not


class _MixRecorder:
    """Stands in for a MeanTeacher's ClassMix: records the mask; ``all_source`` pastes source everywhere."""

    def __init__(self, mixer, record: dict, all_source: bool = False):
        self.mixer, self.record, self.all_source = mixer, record, all_source

    def __call__(self, *args, **kwargs):
        img, labels, weight, mask = self.mixer(*args, **kwargs)
        if self.all_source:
            mask = torch.ones_like(mask)
        self.record["mask"] = mask
        return img, labels, weight, mask

    def __getattr__(self, name):
        return getattr(self.mixer, name)


def _setup(cfg, padded: bool = False, all_source: bool = False, seed: int = 0):
    """A student, its mean teacher and one 2 + 2 batch of 32x64 crops; records the student's
    forwards (inputs and outputs), the ClassMix mask and the teacher's labels."""
    torch.manual_seed(seed)
    model = build_model(cfg.model, K, cfg.method.feature).train()
    state = MeanTeacher(cfg, K, "cpu")
    state.start(model)
    g = torch.Generator().manual_seed(seed)
    src = {"image": torch.randn(2, 3, 32, 64, generator=g), "label": torch.randint(0, K, (2, 32, 64), generator=g)}
    tgt = {"image": torch.randn(2, 3, 32, 64, generator=g), "label": torch.randint(0, 4, (2, 32, 64), generator=g)}
    if padded:  # bottom 8 rows of the first crop and 16 of the second are padding
        valid = torch.ones(2, 32, 64, dtype=torch.bool)
        valid[0, 24:], valid[1, 16:] = False, False
        tgt["valid"] = valid
        tgt["label"] = torch.where(valid, tgt["label"], torch.full_like(tgt["label"], IGNORE))
    rec = {"forwards": []}
    model.register_forward_hook(lambda module, args, out: rec["forwards"].append((args, out)))
    state.mixer = _MixRecorder(state.mixer, rec, all_source)
    labels_of = state.teacher.pseudo_labels

    def teacher_labels(*args, **kwargs):
        rec["teacher"] = labels_of(*args, **kwargs)
        return rec["teacher"]

    state.teacher.pseudo_labels = teacher_labels
    return model, state, src, tgt, rec


def _prototypes(f: torch.Tensor, y: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per-class mean feature over the pixels labelled with the class, pixel by pixel (float64)."""
    sums, counts = {}, {}
    b, d, h, w = f.shape
    for i in range(b):
        for r in range(h):
            for c in range(w):
                k = int(y[i, r, c])
                if k == IGNORE:
                    continue
                sums[k] = sums.get(k, torch.zeros(d, dtype=torch.float64)) + f[i, :, r, c].double()
                counts[k] = counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


def _contrast(f: torch.Tensor, y: torch.Tensor, protos: dict[int, torch.Tensor], tau: float) -> float:
    """-log softmax over the present classes' cosine / tau at the pixel's class, mean over the
    pixels whose class has a prototype (0 when none has), pixel by pixel (float64)."""
    classes = sorted(protos)
    losses = []
    b, _, h, w = f.shape
    for i in range(b):
        for r in range(h):
            for c in range(w):
                k = int(y[i, r, c])
                if k not in protos:
                    continue
                v = f[i, :, r, c].double()
                sims = torch.stack([torch.dot(v, protos[j]) / (v.norm() * protos[j].norm()) / tau for j in classes])
                losses.append(-(sims[classes.index(k)] - torch.logsumexp(sims, 0)))
    return float(torch.stack(losses).mean()) if losses else 0.0


def _label_transfer(f: torch.Tensor, protos: dict[int, torch.Tensor], tau: float, threshold: float,
                    where: torch.Tensor) -> torch.Tensor:
    """Dynamic labels: the class of the most similar prototype where its softmax probability
    reaches ``threshold``, at the pixels ``where`` alone (ignore elsewhere), pixel by pixel."""
    classes = sorted(protos)
    b, _, h, w = f.shape
    out = torch.full((b, h, w), IGNORE, dtype=torch.long)
    for i in range(b):
        for r in range(h):
            for c in range(w):
                if not where[i, r, c]:
                    continue
                v = f[i, :, r, c].double()
                sims = torch.stack([torch.dot(v, protos[j]) / (v.norm() * protos[j].norm()) / tau for j in classes])
                q = sims.softmax(0)
                if q.max() >= threshold:
                    out[i, r, c] = classes[int(q.argmax())]
    return out


def _at_features(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A (B, H, W) map at the feature size by nearest neighbour: output row i reads input row
    floor(i * H / h), and likewise for columns."""
    rows = [min(math.floor(i * x.shape[-2] / size[0]), x.shape[-2] - 1) for i in range(size[0])]
    cols = [min(math.floor(j * x.shape[-1] / size[1]), x.shape[-1] - 1) for j in range(size[1])]
    return x[:, rows][:, :, cols]


def test_mixed_target_batch_keeps_target_origin_valid_pixels_only():
    mask = torch.tensor([[[True, False, False], [False, True, False]]])  # True: pasted source
    valid = torch.tensor([[[True, True, True], [False, False, True]]])
    label = torch.tensor([[[1, 2, 3], [4, 5, IGNORE]]])
    gt = torch.tensor([[[7, 8, 9], [10, 11, 12]]])
    img = torch.randn(1, 3, 2, 3)
    out = mixed_target_batch({"label": label, "gt": gt, "valid": valid, "image": torch.zeros(1, 3, 2, 3)}, img, mask)
    assert out["image"] is img
    assert out["valid"].tolist() == [[[False, True, True], [False, False, True]]]
    assert out["label"].tolist() == [[[IGNORE, 2, 3], [IGNORE, IGNORE, IGNORE]]]
    assert out["gt"].tolist() == [[[IGNORE, 8, 9], [IGNORE, IGNORE, 12]]]
    no_padding = mixed_target_batch({"label": label, "gt": gt}, img, mask)
    assert torch.equal(no_padding["valid"], ~mask)
    assert no_padding["label"].tolist() == [[[IGNORE, 2, 3], [4, IGNORE, IGNORE]]]


@pytest.mark.parametrize("case", ["plain", "padded", "bands", "bf16"])
def test_mixed_contrast_reads_the_mixed_forward_at_target_origin_pixels(tiny_overrides, case):
    """Both contrasts and the label transfer of a ``mixed`` step equal a pixel-by-pixel
    reference built from the mixed forward's features at the target-origin pixels (labels: the
    teacher's confident ones, completed by label transfer), source prototypes from the source
    forward. Crop padding counts as no pixel; the crop bands weigh the mix's CE only, as on
    the unmixed path; under bf16 autocast the losses are those of the features the forward
    returned, in full precision."""
    extra = ["pseudo.ignore_top=3", "pseudo.ignore_bottom=5"] if case == "bands" else []
    teacher_threshold, transfer_threshold = 0.12, 0.1
    cfg = load_config(None, tiny_overrides + TEACHER + MIXED + extra + [
        "method.calibration=false", "train.student_forwards=separate",
        f"pseudo.teacher_threshold={teacher_threshold}", f"pseudo.transfer_threshold={transfer_threshold}"])
    model, state, src, tgt, rec = _setup(cfg, padded=case == "padded")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16"):
        result = teacher_step(model, src, tgt, cfg, state, None, K)
    assert len(rec["forwards"]) == 2  # source, mixed: no forward of the unmixed target crop
    (_, out_src), (args_mix, out_mix) = rec["forwards"]
    assert args_mix[1] == "target"
    f_src, f_mix = out_src.features.detach(), out_mix.features.detach()
    size = tuple(f_mix.shape[-2:])
    labels, conf, _ = rec["teacher"]
    y_static = torch.where(conf >= teacher_threshold, labels, torch.full_like(labels, IGNORE))  # padding: ignore
    keep = ~rec["mask"] & tgt.get("valid", torch.ones_like(rec["mask"]))  # target-origin, not padding
    y_f = _at_features(torch.where(keep, y_static, torch.full_like(y_static, IGNORE)), size)
    cells = _at_features(keep, size)
    assert cells.any() and not cells.all()  # both origins at the feature size: the test can tell them apart
    tau = cfg.loss.temperature
    y_src = _at_features(src["label"], size)
    protos_src = _prototypes(f_src, y_src)
    y_d = _label_transfer(f_mix, protos_src, tau, transfer_threshold, cells)
    y_t = torch.where(y_f != IGNORE, y_f, y_d)
    assert ((y_f == IGNORE) & (y_d != IGNORE)).any()  # label transfer completes some target pixels
    assert float(result.logs["pseudo/dynamic_coverage"]) == pytest.approx(float((y_d != IGNORE).double().mean()))
    protos_tgt = _prototypes(f_mix, y_t)
    t2s, s2t = _contrast(f_mix, y_t, protos_src, tau), _contrast(f_src, y_src, protos_tgt, tau)
    assert t2s > 0 and s2t > 0
    assert float(result.logs["loss/contrast_t2s"]) == pytest.approx(t2s, rel=1e-5, abs=1e-6)
    assert float(result.logs["loss/contrast_s2t"]) == pytest.approx(s2t, rel=1e-5, abs=1e-6)
    # Counting the pasted source pixels (or the padding) as target pixels would give other values.
    y_all = torch.where(_at_features(y_static, size) != IGNORE, _at_features(y_static, size),
                        _label_transfer(f_mix, protos_src, tau, transfer_threshold, torch.ones_like(cells)))
    assert float(result.logs["loss/contrast_t2s"]) != pytest.approx(_contrast(f_mix, y_all, protos_src, tau), rel=1e-3)
    assert result.loss.dtype == torch.float32 and math.isfinite(float(result.loss.detach()))
    result.loss.backward()


@pytest.mark.parametrize("designs", [[], ["loss.contrast_resolution=label", "method.prototype_scope=pair"]],
                         ids=["defaults", "label_resolution_pair_scope"])
def test_no_target_pixel_in_the_mix_leaves_the_contrast_at_zero_and_the_step_finite(tiny_overrides, designs):
    """A mix that pasted source everywhere: no target pixel, so no target prototype, label
    transfer or t2s pixel; both contrasts are 0, the calibration's target average stays
    unset, and the loss and gradients are finite."""
    cfg = load_config(None, tiny_overrides + TEACHER + MIXED + designs + [f"pseudo.teacher_threshold={THRESHOLD}"])
    model, state, src, tgt, rec = _setup(cfg, all_source=True)
    c = cfg.calibration
    calibration = Calibration(K, model.feature_dim, momentum=c.momentum, max_weight=c.max_weight,
                              ramp_iters=c.ramp_iters)
    result = teacher_step(model, src, tgt, cfg, state, calibration, K)
    assert rec["mask"].all()
    assert float(result.logs["loss/contrast_t2s"]) == 0.0 and float(result.logs["loss/contrast_s2t"]) == 0.0
    assert float(result.logs["pseudo/dynamic_coverage"]) == 0.0
    assert not calibration.target.initialized.any() and calibration.source.initialized.any()
    result.loss.backward()
    assert math.isfinite(float(result.loss.detach()))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("mic", [False, True], ids=["plain", "mic"])
def test_mixed_runs_as_many_student_forwards_as_self_training(tiny_overrides, mic):
    extra = ["mic.weight=1.0", "mic.block_size=8"] if mic else []
    counts = {}
    for name, method in (("self_training", ["method=self_training"]), ("unmixed", ["method=bida"]), ("mixed", MIXED)):
        cfg = load_config(None, tiny_overrides + TEACHER + method + extra + [f"pseudo.teacher_threshold={THRESHOLD}"])
        model, state, src, tgt, rec = _setup(cfg)
        teacher_step(model, src, tgt, cfg, state, None, K).loss.backward()
        counts[name] = len(rec["forwards"])
    assert counts["self_training"] == (2 if mic else 1)  # joint source + mix (+ MIC's masked target)
    assert counts["unmixed"] == counts["self_training"] + 1
    assert counts["mixed"] == counts["self_training"]


@pytest.mark.slow
def test_mixed_teacher_run_stopped_mid_way_resumes_exactly(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + TEACHER + MIXED + ["train.iters=3", "pseudo.teacher_threshold=0.07",
                                                                 "mic.weight=1.0", "mic.block_size=8"])
    train(cfg, tmp_path / "full")
    steps = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()
             if '"phase": "teacher"' in line]
    assert len(steps) == 3 and all(math.isfinite(r["loss/total"]) for r in steps)
    assert {"loss/contrast_t2s", "loss/contrast_s2t", "loss/mic", "pseudo/dynamic_coverage"} <= set(steps[-1])
    assert Trainer(cfg, tmp_path / "part").fit(stop_after=1) is None
    Trainer(cfg, tmp_path / "part", resume=True).fit()
    a, b = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("full", "part"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    ta, tb = a["mean_teacher"]["teacher"]["model"], b["mean_teacher"]["teacher"]["model"]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    ca, cb = a["calibration"], b["calibration"]
    assert ca.keys() == cb.keys()


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


def test_quality_weight_over_ranks_counts_the_global_batch():
    conf = torch.tensor([[[0.9, 0.1], [0.95, 0.2]]])
    valid = torch.tensor([[[True, True], [True, False]]])
    other = torch.tensor([5.0, 6.0])  # another rank's (confident, valid) counts
    assert quality_weight(conf, valid, 0.5).item() == pytest.approx(2 / 3)
    assert quality_weight(conf, valid, 0.5, reduce=lambda c: c + other).item() == pytest.approx(7 / 9)


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


BIDA_OFF = ["method=bida", "method.t2s=false", "method.s2t=false", "method.dynamic_labels=false",
            "method.calibration=false"]


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
