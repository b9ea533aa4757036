"""Exact resume: a run stopped anywhere and resumed ends bit-identical to the uninterrupted run.

One matrix over schedule (source stage + rounds, mean teacher) x backbone (DeepLab-V2 ResNet,
MiT, DINOv2) x stop point (mid-phase, at a phase boundary, inside the round-label pass, inside
an evaluation) x how the run stops (SIGINT, SIGTERM, an exception that kills the process's run,
``Trainer.fit(stop_after=...)`` as a pre-empted job). Every case compares every tensor and value
of ``checkpoints/last.pt``, the log records (less their wall-clock ``time/*`` fields) and
``metrics.json`` with the uninterrupted run of the same configuration, which is trained once
per configuration and shared by its cases.

A configuration carries the switches whose state must survive a resume (stochastic depth,
rare-class sampling, ClassMix, MIC, layer decay, the VFM-UDA recipe, DAFormer's switches...)
and, where its run shows what the switch does, a check of the uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.errors import Interrupted
from helpers import MIT, TEACHER

DINO = ["model.backbone=dinov2_vits14", "model.width=0.125", "model.decoder=daformer", "model.decoder_dim=16",
        "model.proj_dim=8", "eval.max_images=1"]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]


def _steps(run: Path, phase: str) -> list[dict]:
    return [r for r in _records(run) if r.get("phase") == phase and "loss/total" in r]


def _last(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")


# ------------------------------------------------ what the uninterrupted runs show


def _feature_distance_run(run: Path) -> None:
    steps = _steps(run, "teacher")
    assert len(steps) == 3
    assert {"loss/seg_src", "loss/seg_mix", "loss/contrast_t2s", "loss/contrast_s2t", "loss/feature_distance",
            "pseudo/dynamic_coverage", "calibration/weight", "pseudo/teacher_quality"} <= set(steps[-1])
    assert not any(k.startswith("loss/ent") or k == "loss/seg_tgt" for k in steps[-1])
    assert steps[-1]["loss/feature_distance"] > 0
    assert _last(run)["mean_teacher"]["teacher"]["updates"] == 3


def _contrast_logged(phase: str) -> Callable[[Path], None]:
    def check(run: Path) -> None:
        steps = _steps(run, phase)
        assert steps and all(math.isfinite(r["loss/contrast_t2s"]) for r in steps)
    return check


def _mic_run(run: Path) -> None:
    steps = _steps(run, "teacher")
    assert len(steps) == 3 and all(r["loss/mic"] > 0 for r in steps)  # threshold 0: MIC has a weight
    assert "masking" in _last(run)["mean_teacher"]


def _layer_decay_run(run: Path) -> None:
    state = _last(run)
    key = "backbone.blocks.0.attn.qkv.weight"  # the teacher is an average, not a copy of the student
    assert not torch.equal(state["model"][key], state["mean_teacher"]["teacher"]["model"][key])


def _vfm_uda_run(run: Path) -> None:
    state = _last(run)
    assert state["model"]["backbone.mask_token"].abs().max() > 0  # trained away from its zero start
    assert all("weight_decay" not in g or g["weight_decay"] == 0.01 for g in state["optimizer"]["param_groups"])


def _log_points(run: Path) -> None:
    assert [r["step"] for r in _records(run) if "loss/seg_src" in r] == [3, 4]


def _evaluations(run: Path) -> None:
    assert [r["step"] for r in _records(run) if "eval/mIoU" in r] == [2, 4]


def _imagenet_weights(tmp: Path, tiny: list[str]) -> list[str]:
    """A weight file of the architecture, as model.pretrained (the feature distance needs one)."""
    from bida.models import build_model

    weights = tmp / "init.pth"
    if not weights.is_file():
        torch.manual_seed(0)
        torch.save(build_model(load_config(None, tiny).model, 19).state_dict(), weights)
    return [f"model.pretrained={weights}"]


@dataclass(frozen=True)
class Setting:
    """One configuration: its overrides (after the tiny ones), extra ones computed from a
    scratch directory and the tiny overrides, and a check of its uninterrupted run."""

    overrides: tuple[str, ...]
    extra: Callable[[Path, list[str]], list[str]] | None = None
    check: Callable[[Path], None] | None = None


SETTINGS = {
    # source stage (6 steps) + 2 rounds of 4: TINY's lengths
    "resnet_rounds_bida": Setting(("method=bida",)),
    "resnet_rounds_warmup": Setting(("method=bida", "train.iters=2", "train.rounds=1",
                                     "loss.contrast_warmup_iters=3"), check=_contrast_logged("round")),
    "resnet_rounds_self_training": Setting(("method=self_training", "train.iters=2", "train.iters_per_round=2",
                                            "train.rounds=1")),
    "resnet_source_log_points": Setting(("train.iters=4", "train.log_every=3", "train.checkpoint_every=100"),
                                        check=_log_points),
    "resnet_source_evaluations": Setting(("train.iters=4", "train.eval_every=2", "train.checkpoint_every=100"),
                                         check=_evaluations),
    "mit_rounds_drop_path": Setting((*MIT, "method=bida", "model.drop_path=0.3", "train.iters=2",
                                     "train.iters_per_round=2", "train.rounds=1")),
    "resnet_teacher_feature_distance": Setting(("method=bida", *TEACHER, "loss.feature_distance_weight=0.005",
                                                "train.iters=3"),
                                               extra=_imagenet_weights, check=_feature_distance_run),
    "resnet_teacher_daformer_switches": Setting((
        "method=bida", *TEACHER, "train.iters=2", "train.teacher_bn=batch", "train.student_forwards=separate",
        "loss.pseudo_ce_mean=all", "pseudo.ignore_top=3", "pseudo.ignore_bottom=5", "train.mix_classes=batch",
        "loss.source_ce_mean=all"), check=_contrast_logged("teacher")),
    # a source stage of 2 steps, then 4 teacher steps
    "mit_teacher_rare_classes_drop_path": Setting((*MIT, "model.drop_path=0.3", "data.normalize=imagenet",
                                                   "method=bida", *TEACHER, "train.iters=4",
                                                   "train.source_iters=2")),
    "mit_teacher_mic": Setting((*MIT, "model.drop_path=0.3", "data.normalize=imagenet", "mic.weight=1",
                                "mic.block_size=8", "pseudo.teacher_threshold=0.0", "method=bida", *TEACHER,
                                "train.iters=3"), check=_mic_run),
    "dinov2_teacher_layer_decay_mic": Setting((
        *DINO, "model.drop_path=0.3", "method=bida", "train.schedule=teacher", "train.iters=3",
        "train.optimizer=adamw", "train.lr=1e-4", "train.weight_decay=0.01", "train.layer_decay=0.8",
        "mic.weight=1", "mic.block_size=14"), check=_layer_decay_run),
    "dinov2_teacher_vfm_uda": Setting((
        *DINO, "model.decoder=light", "model.input_scale=1.1", "model.mask_token=true", "model.drop_path=0.0",
        "method=self_training", "train.schedule=teacher", "train.iters=3", "train.optimizer=adamw", "train.lr=1e-4",
        "train.weight_decay=0.01", "train.decay_norms_biases=true", "train.warmup_iters=2",
        "train.warmup_ratio=1e-3", "train.teacher_bn=batch", "train.student_forwards=separate",
        "pseudo.teacher_flip=true", "data.weak_jitter=true", "mic.weight=1", "pseudo.teacher_threshold=0"),
        check=_vfm_uda_run),
}


@dataclass(frozen=True)
class Stop:
    """Where and how the interrupted run stops.

    ``where``: ``step`` (during global step ``at``), ``labels`` (at the ``at``-th image of the
    round-label pass), ``eval`` (at the ``at``-th image an evaluation predicts) or ``api``
    (``Trainer.fit(stop_after=at)``). ``how``: ``SIGINT``, ``SIGTERM``, ``crash`` (an
    exception ends the run; it resumes from its last periodic checkpoint) or ``stop_after``.
    ``saved``: the step the stopped run's ``last.pt`` must hold (None: not checked).
    """

    where: str
    at: int
    how: str
    saved: int | None = None


# Every (setting, stop) pair; the ids read "setting-where@at-how".
CASES: list[tuple[str, Stop]] = [
    # source stage + rounds, ResNet: mid source stage, right after the boundary, mid round 0,
    # at the boundary, in the round-0 label pass, by every kind of stop
    ("resnet_rounds_bida", Stop("api", 3, "stop_after", 3)),
    ("resnet_rounds_bida", Stop("api", 7, "stop_after", 7)),
    ("resnet_rounds_bida", Stop("api", 9, "stop_after", 9)),
    ("resnet_rounds_bida", Stop("step", 3, "SIGINT", 3)),
    ("resnet_rounds_bida", Stop("step", 6, "SIGTERM", 6)),  # the last source step: the phase boundary
    ("resnet_rounds_bida", Stop("step", 9, "crash", 8)),  # checkpoints every 2 steps
    ("resnet_rounds_bida", Stop("labels", 3, "SIGTERM", 6)),
    ("resnet_rounds_bida", Stop("labels", 5, "crash", 6)),
    ("resnet_rounds_self_training", Stop("labels", 3, "SIGINT", 2)),
    ("resnet_rounds_warmup", Stop("api", 4, "stop_after", 4)),  # mid round, inside the contrast warm-up
    ("resnet_source_log_points", Stop("api", 2, "stop_after", 2)),  # between two log records
    ("resnet_source_log_points", Stop("step", 2, "SIGTERM", 2)),
    ("resnet_source_evaluations", Stop("eval", 1, "SIGTERM", 2)),  # inside the evaluation of step 2
    ("resnet_source_evaluations", Stop("eval", 1, "SIGINT", 2)),
    ("resnet_source_evaluations", Stop("eval", 2, "crash", 0)),
    # MiT, rounds
    ("mit_rounds_drop_path", Stop("api", 3, "stop_after", 3)),  # mid round
    ("mit_rounds_drop_path", Stop("step", 2, "SIGINT", 2)),  # the boundary
    # mean teacher
    ("resnet_teacher_feature_distance", Stop("api", 1, "stop_after", 1)),
    ("resnet_teacher_feature_distance", Stop("step", 2, "crash", 0)),
    ("resnet_teacher_daformer_switches", Stop("api", 1, "stop_after", 1)),
    ("mit_teacher_rare_classes_drop_path", Stop("api", 4, "stop_after", 4)),  # step 2 of the teacher phase
    ("mit_teacher_rare_classes_drop_path", Stop("step", 2, "SIGTERM", 2)),  # the source -> teacher boundary
    ("mit_teacher_mic", Stop("api", 1, "stop_after", 1)),
    ("mit_teacher_mic", Stop("step", 2, "SIGINT", 2)),
    ("dinov2_teacher_layer_decay_mic", Stop("api", 2, "stop_after", 2)),
    ("dinov2_teacher_layer_decay_mic", Stop("step", 1, "SIGTERM", 1)),
    ("dinov2_teacher_vfm_uda", Stop("api", 2, "stop_after", 2)),
]


class Crash(RuntimeError):
    """What the ``crash`` stop raises."""


def _stop_hook(monkeypatch, stop: Stop) -> None:
    """Stop the run as ``stop`` says, from inside the step, the label pass or the evaluation."""
    import bida.engine.inference as inference
    import bida.engine.round_labels as round_labels

    calls = {"n": 0}

    def fire() -> None:
        calls["n"] += 1
        if calls["n"] != stop.at:
            return
        if stop.how == "crash":
            raise Crash(f"{stop.where} {stop.at}")
        os.kill(os.getpid(), getattr(signal, stop.how))

    def wrap(real):
        def hooked(*args, **kwargs):
            fire()
            return real(*args, **kwargs)
        return hooked

    if stop.where == "step":  # every step clears the gradients once, before its forward
        monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", wrap(torch.optim.Optimizer.zero_grad))
    elif stop.where == "labels":
        monkeypatch.setattr(round_labels, "predict_probs", wrap(round_labels.predict_probs))
    elif stop.where == "eval":
        monkeypatch.setattr(inference, "predict_probs", wrap(inference.predict_probs))
    else:
        raise ValueError(stop.where)


def _comparable(value):
    """A checkpoint value with its tensors as (dtype, shape, bytes): equality is bit-identity."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        return ("tensor", str(t.dtype), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    return value


def _differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}/{k}: only in one" for k in sorted(set(a) ^ set(b), key=str)]
        for k in a.keys() & b.keys():
            out += _differences(a[k], b[k], f"{where}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where or "/"]


def _without_times(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def _assert_same_run(full: Path, part: Path) -> None:
    diff = _differences(_comparable(_last(full)), _comparable(_last(part)))
    assert not diff, f"last.pt differs at {diff[:10]}"
    assert _without_times(_records(part)) == _without_times(_records(full))
    metrics = [json.loads((r / "metrics.json").read_text()) for r in (full, part)]
    assert metrics[0] == metrics[1]
    for pass_dir in sorted((full / "pseudo_labels").glob("round_*")):  # the static labels, byte for byte
        for f in sorted(p for p in pass_dir.rglob("*.png")):
            assert f.read_bytes() == (part / f.relative_to(full)).read_bytes(), f


_REFERENCES: dict[str, Path] = {}  # setting -> its uninterrupted run, trained once per worker


def _overrides(name: str, tiny_overrides: list[str], scratch: Path) -> list[str]:
    setting = SETTINGS[name]
    overrides = tiny_overrides + list(setting.overrides)
    if setting.extra is not None:
        overrides += setting.extra(scratch, tiny_overrides)
    return overrides


@pytest.fixture
def reference(tmp_path_factory, tiny_overrides):
    def get(name: str) -> tuple[list[str], Path]:
        root = tmp_path_factory.getbasetemp() / "exact-resume" / name
        root.mkdir(parents=True, exist_ok=True)
        overrides = _overrides(name, tiny_overrides, root)
        if name not in _REFERENCES:
            from bida.engine.train import train

            train(load_config(None, overrides), root / "full")
            if SETTINGS[name].check is not None:
                SETTINGS[name].check(root / "full")
            _REFERENCES[name] = root / "full"
        return overrides, _REFERENCES[name]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("name, stop", CASES, ids=[f"{n}-{s.where}@{s.at}-{s.how}" for n, s in CASES])
def test_a_stopped_run_resumes_bit_identically(tmp_path, monkeypatch, reference, name, stop):
    from bida.engine.train import Trainer

    overrides, full = reference(name)
    cfg = load_config(None, overrides)
    part = tmp_path / "part"
    if stop.how == "stop_after":
        assert Trainer(cfg, part).fit(stop_after=stop.at) is None
    else:
        _stop_hook(monkeypatch, stop)
        expected = Crash if stop.how == "crash" else Interrupted
        with pytest.raises(expected) as info:
            Trainer(cfg, part).fit()
        if expected is Interrupted:
            assert info.value.signum == getattr(signal, stop.how)
        monkeypatch.undo()
    if stop.saved is not None:
        assert _last(part)["step"] == stop.saved
    assert Trainer(cfg, part, resume=True).fit() is not None
    _assert_same_run(full, part)


def test_the_matrix_covers_every_schedule_backbone_stop_point_and_stop():
    """What the matrix must keep covering when cases are added or dropped."""
    def backbone(n):
        return n.split("_")[0]

    def schedule(n):
        return n.split("_")[1]

    covered = {(backbone(n), schedule(n)) for n, _ in CASES}
    assert covered >= {("resnet", "rounds"), ("resnet", "source"), ("resnet", "teacher"), ("mit", "rounds"),
                       ("mit", "teacher"), ("dinov2", "teacher")}
    assert {s.where for _, s in CASES} == {"api", "step", "labels", "eval"}
    assert {s.how for _, s in CASES} == {"stop_after", "SIGINT", "SIGTERM", "crash"}
    for where in ("step", "labels", "eval"):
        assert {s.how for _, s in CASES if s.where == where} == {"SIGINT", "SIGTERM", "crash"}, where
    assert set(SETTINGS) == {n for n, _ in CASES}
