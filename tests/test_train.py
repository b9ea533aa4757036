import json

import pytest
import torch

from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.errors import RunDirError
from bida.engine.schedules import plan_phases, poly_lr
from bida.engine.guard import TrainingDiverged
from bida.engine.train import Trainer, train
import bida.method.train_step

EXPECTED_TERMS = {
    "source_only": {"loss/seg_src"},
    "minent": {"loss/seg_src", "loss/ent_tgt"},
    "self_training": {"loss/seg_src", "loss/seg_tgt", "loss/ent_src", "loss/ent_tgt"},
    "bida": {"loss/seg_src", "loss/seg_tgt", "loss/ent_src", "loss/ent_tgt", "loss/contrast_t2s",
             "loss/contrast_s2t", "calibration/weight", "calibration/mean_shift", "pseudo/dynamic_coverage"},
}


def _records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_poly_lr_and_phases():
    assert poly_lr(1.0, 0, 10, 0.9) == 1.0 and poly_lr(1.0, 10, 10, 0.9) == 0.0
    cfg = load_config(None, ["method=bida", "train.rounds=3"])
    kinds = [(p.kind, p.round) for p in plan_phases(cfg)]
    assert kinds == [("source", -1), ("round", 0), ("round", 1), ("round", 2)]
    cfg = load_config(None, ["method=bida", "model.init_checkpoint=x.pt", "train.rounds=2"])
    assert [p.kind for p in plan_phases(cfg)] == ["round", "round"]


@pytest.mark.parametrize("method", ["source_only", "minent", "self_training", "bida"])
def test_each_method_runs_logs_and_writes_the_run_dir(tmp_path, tiny_overrides, method):
    cfg = load_config(None, tiny_overrides + [f"method={method}"])
    run = tmp_path / method
    metrics = train(cfg, run)
    assert 0.0 <= metrics["mIoU"] <= 1.0
    for f in ["config.yaml", "log.jsonl", "metrics.json", "checkpoints/last.pt", "checkpoints/best.pt"]:
        assert (run / f).is_file(), f
    assert list((run / "tensorboard").iterdir())
    saved = json.loads((run / "metrics.json").read_text())
    assert set(saved) >= {"mIoU", "per_class_iou", "pixel_acc"} and saved["checkpoint"] == "last"
    records = _records(run)
    adapt = [r for r in records if r.get("phase") == ("source" if method == "source_only" else "round")]
    assert adapt and EXPECTED_TERMS[method] <= set(adapt[-1])
    for r in adapt:
        assert all(v == v for k, v in r.items() if k.startswith("loss/"))  # no NaN
    if method in ("self_training", "bida"):
        rounds = [r for r in records if "pseudo/static_accuracy" in r]
        assert [r["round"] for r in rounds] == [0, 1]
        assert (run / "pseudo_labels" / "round_1" / "stats.json").is_file()
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["phase"] == len(plan_phases(cfg)) and state["step"] == sum(p.iters for p in plan_phases(cfg))
    if method == "bida":
        assert state["calibration"]["step"] > 0


def _weights(run):
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


@pytest.mark.parametrize("stop_at", [3, 7, 9])  # mid source stage, phase boundary area, mid round
def test_resume_is_exact(tmp_path, tiny_overrides, stop_at):
    cfg = load_config(None, tiny_overrides + ["method=bida"])
    full = tmp_path / "full"
    ref_metrics = train(cfg, full)
    part = tmp_path / "part"
    assert Trainer(cfg, part).fit(stop_after=stop_at) is None
    assert load_checkpoint(part / "checkpoints" / "last.pt")["step"] == stop_at
    resumed_metrics = Trainer(cfg, part, resume=True).fit()
    a, b = _weights(full), _weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed_metrics["mIoU"] == ref_metrics["mIoU"]
    ca = load_checkpoint(full / "checkpoints" / "last.pt")["calibration"]
    cb = load_checkpoint(part / "checkpoints" / "last.pt")["calibration"]
    assert ca["step"] == cb["step"] and torch.equal(ca["source"]["value"], cb["source"]["value"])
    losses_full = [r["loss/total"] for r in _records(full) if "loss/total" in r]
    losses_part = [r["loss/total"] for r in _records(part) if "loss/total" in r and r["step"] > stop_at]
    assert losses_part == losses_full[-len(losses_part):]


def test_existing_run_dir_is_refused_without_overwrite(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides)
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep")
    with pytest.raises(RunDirError, match="already exists"):
        train(cfg, run)
    assert (run / "precious.txt").read_text() == "keep"
    with pytest.raises(RunDirError, match="cannot resume"):
        Trainer(cfg, run, resume=True)


def test_non_finite_steps_are_skipped_then_stop(tmp_path, tiny_overrides, monkeypatch):
    import bida.engine.train as tr
    from bida.method.train_step import StepResult

    real = bida.method.train_step.source_step
    calls = {"n": 0}

    def flaky(model, batch, cfg, **kwargs):
        calls["n"] += 1
        result = real(model, batch, cfg, **kwargs)
        if calls["n"] == 2 or calls["n"] >= 5:  # one isolated NaN, later NaN forever
            return StepResult(result.loss * float("nan"), result.logs)
        return result

    monkeypatch.setattr(bida.method.train_step, "source_step", flaky)
    cfg = load_config(None, tiny_overrides + ["train.max_bad_steps=3", "train.iters=20", "train.checkpoint_every=1"])
    run = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match="3 non-finite steps"):
        train(cfg, run)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 3  # steps 1, 3, 4 succeeded (call 2 skipped); then 3 bad in a row
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    skipped = [r for r in _records(run) if "numerics/skipped_step" in r]
    assert len(skipped) == 4
