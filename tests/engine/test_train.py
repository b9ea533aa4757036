"""bida.engine.train: the training loop, its runs, logs and run directory."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bida.method.train_step
from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.engine.guard import TrainingDiverged
from bida.engine.schedules import plan_phases
from bida.engine.train import Trainer, train
from bida.method.losses import seg_cross_entropy

from fixtures import make_folder_tree
from helpers import _assert_same, _stems


def test_trainer_keeps_moving_averages_for_memory_partners_alone(tmp_path, tiny_overrides):
    from bida.engine.train import Trainer

    for partners, built in (("false", False), ("true", True)):
        cfg = load_config(None, tiny_overrides + ["method=bida", "method.calibration=false",
                                                  f"method.memory_partners={partners}"])
        trainer = Trainer(cfg, tmp_path / partners)
        trainer.close()
        assert (trainer.calibration is not None) == built


def _parts(tmp_path: Path, overrides: list[str]) -> dict:
    from bida.config import load_config
    from bida.data.datasets import resolve_domain

    cfg = load_config(None, overrides)
    src = resolve_domain(cfg, "source")
    stop = SimpleNamespace(on_rank0=lambda work: work(lambda: None), check=lambda *_: None)
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    return dict(cfg=cfg, src=src, num_classes=src.classes.num_classes, run_dir=run_dir, stop=stop,
                device=torch.device("cpu"))


def test_class_weights_come_from_the_source_train_labels_counted_once_per_run(tmp_path, monkeypatch):
    import bida.data.rare_class as rc
    from bida.engine.class_weights import source_class_weights

    tree = make_folder_tree(tmp_path / "A", classes=("sky", "tree", "house"), n_train=3, size=(16, 32))
    make_folder_tree(tmp_path / "B", classes=("sky", "tree", "house"), size=(16, 32), target_without_train_labels=True)
    over = ["data.source.kind=folder", f"data.source.root={tmp_path / 'A'}", "data.target.kind=folder",
            f"data.target.root={tmp_path / 'B'}"]
    assert source_class_weights(**_parts(tmp_path, over)) is None  # none: nothing counted, nothing written
    assert not list((tmp_path / "run").iterdir())
    scans = []
    real = rc.class_pixel_counts
    monkeypatch.setattr(rc, "class_pixel_counts", lambda *a, **k: (scans.append(1), real(*a, **k))[1])
    parts = _parts(tmp_path, over + ["loss.class_weights=inverse_sqrt_freq"])
    weights = source_class_weights(**parts)
    # my own count of the train labels the fixture wrote (255 = ignore)
    ids = np.concatenate([v.ravel() for k, v in tree.ids.items() if k.startswith("train/")])
    hist = np.bincount(ids[ids != 255], minlength=3)[:3].astype(np.float64)
    f = hist / hist.sum()
    expected = (1 / np.sqrt(f)) / np.sqrt(f).sum()
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-6)
    assert source_class_weights(**parts) is not None and scans == [1]  # a resume reads the run directory's counts
    assert (parts["run_dir"] / rc.STATS_FILE).is_file()


def test_a_run_trains_its_source_ce_with_the_class_weights(tmp_path, monkeypatch):
    """Every step's source CE gets the weights: the source stage's, checked against the loss
    computed by hand from the same logits."""
    import bida.method.train_step as ts
    from bida.tools.cli import main

    make_folder_tree(tmp_path / "A", classes=("sky", "tree", "house"), n_train=3, size=(16, 32))
    make_folder_tree(tmp_path / "B", classes=("sky", "tree", "house"), size=(16, 32), target_without_train_labels=True)
    seen = []
    real = ts.seg_cross_entropy

    def recording(logits, labels, ignore_index=255, mean_over="labelled", class_weights=None):
        loss = real(logits, labels, ignore_index, mean_over, class_weights)
        seen.append((logits.detach(), labels.clone(), class_weights, loss.detach()))
        return loss

    monkeypatch.setattr(ts, "seg_cross_entropy", recording)
    assert main(["train", "--out", str(tmp_path / "run"), "data.source.kind=folder", f"data.source.root={tmp_path / 'A'}",
                 "data.target.kind=folder", f"data.target.root={tmp_path / 'B'}", "model.width=0.125",
                 "data.crop=[16,32]", "train.iters=2", "train.eval_every=100", "train.quiet=true",
                 "data.num_workers=0", "method=source_only", "loss.class_weights=inverse_sqrt_freq"]) == 0
    assert len(seen) == 2
    for logits, labels, w, loss in seen:
        assert w is not None and w.shape == (3,) and (w > 0).all()
        up = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        valid = labels != 255
        y = labels.clamp(max=2).long()
        nll = -F.log_softmax(up, 1).gather(1, y[:, None])[:, 0]
        torch.testing.assert_close(loss, (w[y] * nll)[valid].sum() / valid.sum())


def _small_objects(root: Path, n: int, seed: int) -> None:
    """64x64 grey images with two 8x8 squares, each red or blue: 97 % background."""
    import json

    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = np.asarray(((90, 90, 90), (140, 80, 80), (80, 80, 140)), np.float32)
    root.mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps({"classes": ["background", "red", "blue"]}))
    for split, count in (("train", n), ("val", n // 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(count):
            label = np.zeros((64, 64), np.uint8)
            for _ in range(2):
                c, (y, x) = int(rng.integers(1, 3)), rng.integers(0, 64 - 8, 2)
                label[y:y + 8, x:x + 8] = c
            image = colours[label] + rng.normal(0, 20, (64, 64, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / split / f"{i}.png")
            Image.fromarray(label).save(root / "labels" / split / f"{i}.png")


@pytest.mark.slow
def test_class_weights_make_small_objects_learnable_where_plain_ce_learns_background(tmp_path, capsys):
    """A folder pair of small squares on 97 % background, from random weights: plain CE predicts
    background on nearly every pixel (and says so), the class-balanced CE finds the squares."""
    import json

    from bida.tools.cli import main

    _small_objects(tmp_path / "A", 16, 0)
    _small_objects(tmp_path / "B", 16, 1)
    results = {}
    for weighting in ("none", "inverse_sqrt_freq"):
        out = tmp_path / weighting
        assert main(["train", "--out", str(out), "data.source.kind=folder", f"data.source.root={tmp_path / 'A'}",
                     "data.target.kind=folder", f"data.target.root={tmp_path / 'B'}", "model.width=0.125",
                     "data.crop=[64,64]", "data.scale_range=[1.0,1.0]", "train.iters=250", "train.lr=0.03",
                     "train.eval_every=1000", "train.quiet=true", "data.num_workers=0", "method=source_only",
                     f"loss.class_weights={weighting}"]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        conf = torch.tensor(metrics["confusion"])
        iou = metrics["per_class_iou"]
        results[weighting] = (conf.sum(0) / conf.sum(), (iou["red"] + iou["blue"]) / 2, capsys.readouterr().out)
    share, small_iou, printed = results["none"]
    assert share[0] >= 0.99 and small_iou < 0.1
    assert "warning: the model predicts background on" in printed and "loss.class_weights=inverse_sqrt_freq" in printed
    share, small_iou, printed = results["inverse_sqrt_freq"]
    labelled = 0.0312  # the squares' share of the val labels (2 x 64 of 4096 pixels, less overlaps)
    assert share[1:].sum() >= labelled / 2 and small_iou > 0.2
    assert "warning: the model predicts" not in printed


def test_source_phase_keeps_the_target_stem_in_sync(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["method=bida", "model.separate_target_stem=true"])
    run = tmp_path / "run"
    trainer = Trainer(cfg, run)
    initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.fit(stop_after=cfg.train.iters) is None  # stops at the start of round 0
    state = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    source, target = _stems(state)
    assert not torch.equal(source["conv1.weight"], initial["conv1.weight"])  # the source stem was trained
    _assert_same(target, source)


@pytest.mark.parametrize("source_stem", ["shared", "separate"])
def test_adaptation_starts_from_the_trained_source_stem(tmp_path, tiny_overrides, source_stem):
    separate = str(source_stem == "separate").lower()
    src_cfg = load_config(None, tiny_overrides + ["method=source_only", f"model.separate_target_stem={separate}"])
    src_run = tmp_path / "source_only"
    src_metrics = train(src_cfg, src_run)
    ckpt = src_run / "checkpoints" / "last.pt"
    src_state = load_checkpoint(ckpt)["model"]
    trained_source, trained_target = _stems(src_state)
    if source_stem == "separate":  # the source-only model evaluates target images with its trained stem
        _assert_same(trained_target, trained_source)

    cfg = load_config(None, tiny_overrides + ["method=bida", "train.rounds=1", "model.separate_target_stem=true",
                                              f"model.init_checkpoint={ckpt}"])
    trainer = Trainer(cfg, tmp_path / "bida")
    source, target = _stems(trainer.model.state_dict())
    _assert_same(source, trained_source)
    _assert_same(target, trained_source)
    assert trainer.evaluator.target()["mIoU"] == src_metrics["mIoU"]  # round 0 starts from the source-only model
    assert 0.0 <= trainer.fit()["mIoU"] <= 1.0


EXPECTED_TERMS = {
    "source_only": {"loss/seg_src"},
    "minent": {"loss/seg_src", "loss/ent_tgt"},
    "self_training": {"loss/seg_src", "loss/seg_tgt", "loss/ent_src", "loss/ent_tgt"},
    "bida": {"loss/seg_src", "loss/seg_tgt", "loss/ent_src", "loss/ent_tgt", "loss/contrast_t2s",
             "loss/contrast_s2t", "calibration/weight", "calibration/mean_shift", "pseudo/dynamic_coverage"},
}


def _records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


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
