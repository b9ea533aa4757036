"""loss.class_weights (class-balanced source CE) and the warning for a model that learnt only
the majority class: formulas against hand-computed cases, the run path against own counts."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bida.engine.inference import majority_collapse
from bida.method.losses import inverse_sqrt_frequency_weights, seg_cross_entropy
from fixtures import make_folder_tree


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
    torch.testing.assert_close(seg_cross_entropy(logits, y, class_weights=w), expected)
    expected_all = (w[y.clamp(max=2)] * nll)[valid].sum() / y.numel()
    torch.testing.assert_close(seg_cross_entropy(logits, y, mean_over="all", class_weights=w), expected_all)
    # weights of 1 are the unweighted loss; nothing labelled gives an exact 0
    assert torch.equal(seg_cross_entropy(logits, y, class_weights=torch.ones(3)), seg_cross_entropy(logits, y))
    assert seg_cross_entropy(logits, torch.full_like(y, 255), class_weights=w) == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(seg_cross_entropy(logits, y, class_weights=w), expected)


def _confusion(labelled: list[int], predicted_top: float, k: int = 4) -> torch.Tensor:
    """Rows = truth: class 0 covers ``labelled[0]`` pixels...; every pixel of class c > 0 is
    predicted as c with probability 1 - predicted_top, else as class 0; class 0 is always right."""
    conf = torch.zeros(k, k, dtype=torch.int64)
    conf[0, 0] = labelled[0]
    for c in range(1, k):
        to_top = round(labelled[c] * predicted_top)
        conf[c, 0], conf[c, c] = to_top, labelled[c] - to_top
    return conf


def test_majority_collapse_warning_on_hand_made_confusion_matrices():
    names = ["background", "one", "two", "three"]
    # 92 % background, the digits all predicted background: warned, with what to try
    warn = majority_collapse(_confusion([920, 30, 30, 20], 1.0), names, "target val")
    assert warn is not None and "\n" not in warn
    assert warn.startswith("bida: warning: the model predicts background on 100.0 % of the target val pixels, "
                           "where it covers 92.0 %")
    assert "loss.class_weights=inverse_sqrt_freq" in warn and "model.pretrained" in warn and "iterations" in warn
    # background on 99.5 %: the digits get 0.5 % of their 8 % (< a quarter): warned
    assert majority_collapse(_confusion([920, 30, 30, 20], 0.94), names, "val") is not None
    # the digits get half their pixels (96 % predicted background): a weak model, not a collapsed one
    assert majority_collapse(_confusion([920, 30, 30, 20], 0.5), names, "val") is None
    # a class that truly covers 97 %, predicted as such, is no collapse
    assert majority_collapse(_confusion([970, 10, 10, 10], 0.0), names, "val") is None
    # balanced labels, 95 % predicted as one class: warned; 90 %: below "nearly every pixel"
    assert majority_collapse(_confusion([250, 250, 250, 250], 0.94), names, "val") is not None
    assert majority_collapse(_confusion([250, 250, 250, 250], 0.86), names, "val") is None
    # empty matrix, or labels of one class only: nothing to say
    assert majority_collapse(torch.zeros(4, 4, dtype=torch.int64), names, "val") is None
    assert majority_collapse(_confusion([100, 0, 0, 0], 1.0), names, "val") is None


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


def test_an_unknown_class_weighting_is_one_line_naming_the_key(tmp_path, capsys):
    from bida.tools.cli import main

    assert main(["train", "--out", str(tmp_path / "run"), "loss.class_weights=inverse_freq"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "loss.class_weights" in err and "inverse_sqrt_freq" in err
    assert not (tmp_path / "run").exists()


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
