"""``method.target_features``: BiDA on the mean-teacher schedule reading its target pixels from
the unmixed crop's own forward (``unmixed``) or from the ClassMix crop's forward at its
target-origin pixels (``mixed``)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.engine.train import Trainer, train
from bida.errors import ConfigError
from bida.method.pseudo_labels import Calibration
from bida.method.teacher import MeanTeacher, mixed_target_batch, teacher_step
from bida.models import build_model

IGNORE = 255
K = 19
TEACHER = ["train.schedule=teacher", "train.iters=4", "train.optimizer=adamw", "train.weight_decay=0.01",
           "train.lr=6e-4", "train.warmup_iters=2", "train.poly_power=1.0", "data.rare_class_sampling=true",
           "data.rcs_min_pixels=2"]
MIXED = ["method=bida", "method.target_features=mixed"]
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


# ------------------------------------------------------------------ independent references


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


# ------------------------------------------------------------------ the pure function


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


# ------------------------------------------------------------------ the step against the references


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


# ------------------------------------------------------------------ cost: student forwards per step


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


# ------------------------------------------------------------------ config and runs


def test_target_features_is_checked(tiny_overrides):
    assert load_config(None, tiny_overrides + TEACHER + ["method=bida"]).method.target_features == "unmixed"
    assert load_config(None, tiny_overrides + TEACHER + MIXED).method.target_features == "mixed"
    with pytest.raises(ConfigError, match="method.target_features"):
        load_config(None, tiny_overrides + MIXED)  # the rounds schedule has no ClassMix crop
    for method in ("self_training", "source_only"):
        with pytest.raises(ConfigError, match="method.target_features"):
            load_config(None, tiny_overrides + TEACHER + [f"method={method}", "method.target_features=mixed"])
    with pytest.raises(ConfigError, match="target_features"):
        load_config(None, tiny_overrides + TEACHER + ["method=bida", "method.target_features=both"])


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
