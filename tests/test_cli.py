"""Command-line smoke tests: a few iterations, then evaluate and predict; errors exit 2."""

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from bida.cli import main


def test_train_evaluate_predict(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--quiet", *tiny_overrides]) == 0
    ckpt = run / "checkpoints" / "last.pt"
    assert ckpt.is_file()
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert 0 <= m["mIoU"] <= 1 and "per_class_iou" in m
    assert "mIoU" in capsys.readouterr().out
    # predict on a folder and a single file
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(imgs / f"x{i}.png")
    pred = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(ckpt), str(imgs), "--out", str(pred), "--quiet"]) == 0
    label = np.asarray(Image.open(pred / "x0.png"))
    assert label.shape == (30, 50) and label.max() < 19
    assert np.asarray(Image.open(pred / "x1_overlay.png")).shape == (30, 50, 3)
    assert (pred / "x1_color.png").is_file()
    # predicting again without --overwrite is refused and leaves files alone
    before = (pred / "x0.png").read_bytes()
    assert main(["predict", "--checkpoint", str(ckpt), str(imgs / "x0.png"), "--out", str(pred), "--quiet"]) == 2
    assert (pred / "x0.png").read_bytes() == before
    assert "already exists" in capsys.readouterr().err


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "train.itres=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.itres" in err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "bida", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout


def test_ablate_writes_one_table(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "abl"
    assert main(["ablate", "--out", str(out), "--quiet", *tiny_overrides]) == 0
    table = (out / "ablation.md").read_text()
    for row in ("self-training", "t2s only", "s2t only", "t2s + s2t", "dynamic labels", "calibration"):
        assert row in table
    assert table.count("\n| ") == 7  # header + 6 rows
    cfg = (out / "row1" / "config.yaml").read_text()
    assert "s2t: false" in cfg and "dynamic_labels: false" in cfg
