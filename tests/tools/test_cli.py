"""Command-line smoke tests: a few iterations, then evaluate and predict; errors exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bida.checkpoint
import bida.method.train_step
from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.engine.setup import git_revision
from bida.errors import CheckpointError
from bida.tools.cli import main, parse_args

from fixtures import make_folder_tree
from helpers import FOLDER_TINY, _folder_pair, _one_line_error


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
    # predicting again with the same checkpoint keeps the finished files (a resumed pass)
    before = (pred / "x0.png").read_bytes()
    assert main(["predict", "--checkpoint", str(ckpt), str(imgs / "x0.png"), "--out", str(pred), "--quiet"]) == 0
    assert (pred / "x0.png").read_bytes() == before


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "train.itres=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train.itres" in err
    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "bida", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "train" in out.stdout


@pytest.mark.slow
def test_ablate_writes_one_table(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "abl"
    assert main(["ablate", "--out", str(out), "--quiet", *tiny_overrides]) == 0
    table = (out / "ablation.md").read_text()
    for row in ("source_only", "self-training", "t2s only", "s2t only", "t2s + s2t", "dynamic labels", "calibration"):
        assert row in table
    assert table.split("Wall time")[0].count("\n| ") == 8  # header + source-only + 6 rows
    cfg = (out / "t2s_only" / "config.yaml").read_text()
    assert "s2t: false" in cfg and "dynamic_labels: false" in cfg
    summary = json.loads((out / "ablation.json").read_text())
    assert summary["+ t2s only"]["vs_self-training (no contrast)"]["per_seed"]


@pytest.mark.slow
def test_demo_over_seeds_pairs_every_method_on_its_own_source_model(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seeds", "2", "--quiet", *tiny_overrides]) == 0
    summary = json.loads((out / "results.json").read_text())
    assert set(summary) == {"source_only", "self_training", "bida", "timing", "split", "environment"}
    summary.pop("timing")
    assert summary.pop("split") == "test"  # what the tables report; the val figures stay apart
    env = summary.pop("environment")  # where the figures were measured
    assert env["torch"] == torch.__version__ and env["cpu"] and env["git_commit"] == git_revision()
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
    for method, entry in summary.items():
        metrics = [json.loads((out / f"seed_{s}" / method / "metrics.json").read_text()) for s in (0, 1)]
        assert entry["per_seed"] == [m["mIoU"] for m in metrics] and entry["seeds"] == [0, 1]  # val, as always
        assert entry["val"]["per_seed"] == entry["per_seed"] and entry["val"]["split"] == "val"
        assert entry["test"]["per_seed"] == [m["test"]["mIoU"] for m in metrics] and entry["test"]["split"] == "test"
        assert entry["test"]["mean"] == np.mean(entry["test"]["per_seed"])
        assert entry["mean"] == np.mean(entry["per_seed"])
        assert np.isclose(entry["std"], np.std(entry["per_seed"], ddof=1))
        assert 0.0 <= entry["mean"] <= 1.0
        assert {"mean_margin", "nearest_own_share"} <= set(entry["alignment"])
    for s in (0, 1):  # each seed adapts from its own source-only model
        cfg = (out / f"seed_{s}" / "bida" / "config.yaml").read_text()
        assert f"seed_{s}/source_only/checkpoints/last.pt" in cfg and f"seed: {s}" in cfg
    vs = summary["bida"]["vs_self_training"]
    assert np.allclose(vs["per_seed"], np.subtract(summary["bida"]["per_seed"], summary["self_training"]["per_seed"]))
    assert vs["wins"] == sum(d > 0 for d in vs["per_seed"])
    vs_test = summary["bida"]["test"]["vs_self_training"]
    assert np.allclose(vs_test["per_seed"], np.subtract(summary["bida"]["test"]["per_seed"],
                                                        summary["self_training"]["test"]["per_seed"]))
    text = (out / "results.md").read_text()
    assert "±" in text and "bida" in text and "Mean per-class IoU" in text
    assert "target test mIoU mean ± std" in text and "| target val mean |" in text
    assert f"Measured at commit {env['git_commit'] or 'unknown'}" in text
    bida_row = next(line for line in text.splitlines() if line.startswith("| bida |"))
    assert bida_row.startswith(f"| bida | {100 * summary['bida']['test']['mean']:.1f} ± ")
    assert text in capsys.readouterr().out
    # the transformer demo's MIC rows stay out of the DeepLab-V2 demo
    assert {p.name for p in (out / "seed_0").iterdir()} == {"source_only", "self_training", "bida", "shared_labels"}
    assert all("mic" not in k for k in json.loads((out / "results.json").read_text())["timing"]["runs_s"])
    assert "Paired differences between other rows" not in text
    for method in summary:
        assert load_config(out / "seed_0" / method / "config.yaml").mic.weight == 0.0
        assert [k for k in summary[method] if k.startswith("vs_")] == ([] if method == "self_training" else
                                                                     ["vs_self_training"])


def test_seeds_must_be_positive(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--seeds", "0"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_presets_are_overrides_that_user_overrides_beat(tmp_path, tiny_overrides):
    from bida.config import load_config
    from bida.method.presets import PRESETS, preset_overrides

    assert preset_overrides("paper") == [] and preset_overrides(None) == []
    plus = load_config(None, preset_overrides("plus"))
    assert plus.method.memory_partners and plus.loss.contrast_t2s_weight > load_config(None).loss.contrast_t2s_weight
    mine = load_config(None, preset_overrides("plus") + ["loss.contrast_t2s_weight=0.3"])
    assert mine.loss.contrast_t2s_weight == 0.3
    for name in PRESETS:  # every preset names real keys
        load_config(None, preset_overrides(name))
    run = tmp_path / "plus"
    assert main(["train", "--out", str(run), "--preset", "plus", "method=bida", *tiny_overrides]) == 0
    assert "memory_partners: true" in (run / "config.yaml").read_text()


@pytest.mark.slow
def test_transformer_demo_runs_source_only_teacher_self_training_bida_and_both_with_mic(tmp_path, tiny_overrides):
    """``bida demo --arch transformer``: its packaged config as shipped, lengths shrunk."""
    from bida.tools.demo import TRANSFORMER_DEMO_FILE

    assert (Path(__file__).parents[2] / "configs" / "demo_transformer.yaml").read_text() == \
        TRANSFORMER_DEMO_FILE.read_text()
    out = tmp_path / "demo"
    shrink = [o for o in tiny_overrides if not o.startswith(("model.width", "train.iters"))]
    assert main(["demo", "--arch", "transformer", "--out", str(out), "--seeds", "2", "--quiet", *shrink,
                 "train.source_iters=3", "train.iters=2", "data.rcs_min_pixels=3"]) == 0  # 12 at 4x the area
    summary = json.loads((out / "results.json").read_text())
    rows = {"source_only": "source_only", "self_training": "self_training", "bida": "bida",
            "self_training_mic": "self_training", "bida_mic": "bida"}  # row: method
    assert set(summary) == {*rows, "timing", "split", "environment"} and summary["split"] == "test"
    assert set(summary["timing"]["runs_s"]) == {f"seed_{s}/{r}" for s in (0, 1) for r in rows}
    for row, method in rows.items():
        metrics = [json.loads((out / f"seed_{s}" / row / "metrics.json").read_text()) for s in (0, 1)]
        assert summary[row]["per_seed"] == [m["mIoU"] for m in metrics] and summary[row]["seeds"] == [0, 1]
        for s in (0, 1):
            cfg = load_config(out / f"seed_{s}" / row / "config.yaml")
            assert cfg.model.backbone == "mit_b0" and cfg.train.schedule == "teacher" and cfg.seed == s
            assert cfg.method.name == method
            # MIC on in the MIC rows only, with the demo's block (MIC's 32 at 512 crops, scaled to 64)
            assert cfg.mic.weight == (1.0 if row.endswith("_mic") else 0.0)
            assert (cfg.mic.block_size, cfg.mic.mask_ratio) == (4, 0.7)
            if row != "source_only":  # every row of a seed adapts that seed's source-only model
                assert cfg.model.init_checkpoint.endswith(f"seed_{s}/source_only/checkpoints/last.pt")
    steps = [json.loads(line) for line in (out / "seed_1" / "source_only" / "log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in steps if r.get("phase") == "source") == 3  # the source stage's length
    bida_log = (out / "seed_0" / "bida" / "log.jsonl").read_text()
    assert '"phase": "teacher"' in bida_log and "loss/contrast_t2s" in bida_log and "loss/mic" not in bida_log
    mic_log = (out / "seed_0" / "bida_mic" / "log.jsonl").read_text()
    assert "loss/mic" in mic_log and "loss/contrast_t2s" in mic_log
    assert "loss/mic" in (out / "seed_1" / "self_training_mic" / "log.jsonl").read_text()
    # paired differences: every row against self_training, bida_mic also against self_training_mic
    pairs = {"source_only": ["self_training"], "bida": ["self_training"], "self_training_mic": ["self_training"],
             "bida_mic": ["self_training", "self_training_mic"]}
    for row, bases in pairs.items():
        assert sorted(k for k in summary[row] if k.startswith("vs_")) == sorted(f"vs_{b}" for b in bases)
        for base in bases:
            vs = summary[row][f"vs_{base}"]
            diffs = np.subtract(summary[row]["per_seed"], summary[base]["per_seed"])
            assert np.allclose(vs["per_seed"], diffs) and np.isclose(vs["mean"], diffs.mean())
            assert np.isclose(vs["std"], np.std(diffs, ddof=1)) and vs["wins"] == int((diffs > 0).sum())
            for k, d in vs["per_class_iou"].items():
                a, b = summary[row]["per_class_iou"][k], summary[base]["per_class_iou"][k]
                assert d is None if a is None or b is None else np.isclose(d, a - b)
    assert "vs_self_training" not in summary["self_training"]
    assert summary["bida"]["preset"] == summary["bida_mic"]["preset"] == "paper"
    text = (out / "results.md").read_text()
    for row in rows:
        assert f"\n| {row} | " in text
    vs = summary["bida_mic"]["test"]["vs_self_training_mic"]  # the tables report the test split
    diffs = np.subtract(summary["bida_mic"]["test"]["per_seed"], summary["self_training_mic"]["test"]["per_seed"])
    assert np.allclose(vs["per_seed"], diffs) and summary["bida_mic"]["val"]["vs_self_training_mic"]["per_seed"] == \
        summary["bida_mic"]["vs_self_training_mic"]["per_seed"]
    assert f"| bida_mic − self_training_mic | {100 * vs['mean']:+.1f} ± {100 * vs['std']:.1f} |" in text
    page = (out / "report" / "index.html").read_text()  # the report of the first seed shows every row
    assert "self_training + MIC" in page and "bida + MIC" in page and "bida_mic" in page


def test_evaluate_refuses_a_checkpoint_of_another_class_count(tmp_path, capsys, tiny_overrides):
    # before: exit 0 and metrics computed with 7 output channels against the dataset's classes
    from bida.checkpoint import save_checkpoint
    from bida.config import to_dict
    from bida.models import build_model

    cfg = load_config(None, tiny_overrides)
    ckpt = tmp_path / "k7.pt"
    save_checkpoint({"model": build_model(cfg.model, 7, cfg.method.feature).state_dict(), "config": to_dict(cfg),
                     "num_classes": 7, "class_names": [f"c{i}" for i in range(7)]}, ckpt)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--out", str(tmp_path / "eval"), *tiny_overrides]) == 2
    err = _one_line_error(capsys)
    assert "7 classes, the config has" in err and "k7.pt" in err
    assert not (tmp_path / "eval").exists()


def test_the_embedded_pair_is_reported_as_synthetic(tiny_overrides, capsys):
    assert main(["data", "check", "--quick", *tiny_overrides]) == 0
    out = capsys.readouterr().out
    assert "## source: synthetic at" in out and "# Data check: synthetic " in out and ": folder" not in out


def test_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "photo.jpg")
    with pytest.raises(CheckpointError, match=r"photo\.jpg is not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "photo.jpg")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "photo.jpg")]) == 2
    err = capsys.readouterr().err
    assert "not a PyTorch checkpoint" in err and "could run code" not in err


def test_overrides_are_accepted_anywhere_after_the_command():
    args = parse_args(["train", "--out", "r", "a.b=1", "--quiet", "train.iters=30", "--preset", "plus", "c=2"])
    assert args.overrides == ["a.b=1", "train.iters=30", "c=2"] and args.quiet and args.preset == "plus"
    assert parse_args(["evaluate", "--checkpoint", "x.pt", "--out", "d", "eval.flip=true"]).overrides == ["eval.flip=true"]
    assert parse_args(["demo", "--seeds", "2", "seed=3", "--quiet"]).overrides == ["seed=3"]
    with pytest.raises(SystemExit):  # not an override: still an error
        parse_args(["predict", "--checkpoint", "c", "a.png", "--out", "d", "b.png"])
    with pytest.raises(SystemExit):
        parse_args(["train", "--out", "r", "--bogus"])


def test_version(capsys):
    import bida

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"bida {bida.__version__}"


def test_a_width_left_from_a_demo_config_is_named_before_the_run_directory(tmp_path, capsys):
    """model.width below 1 with a full-width weight file: one line naming model.width, no run directory."""
    from bida.models import DeepLabV2
    from bida.models.dinov2 import DINOv2Segmentor
    from bida.models.weights import load_pretrained

    wide = DeepLabV2(3, "resnet18", width=0.25)
    torch.save({k: v for k, v in wide.state_dict().items() if not k.startswith("layer5.")}, tmp_path / "r18.pth")
    data = _folder_pair(tmp_path)
    assert main(["train", *data, *FOLDER_TINY, f"model.pretrained={tmp_path / 'r18.pth'}",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("bida: error: model.width=0.125: ")
    assert "model.width=0.25; set model.width=0.25" in err
    assert not (tmp_path / "run").exists()
    # DINOv2: a full-width release file into a ViT scaled to a quarter (6 heads: 96 of 384 channels)
    full = DINOv2Segmentor(3, "dinov2_vits14", width=1.0)
    torch.save({k[len("backbone."):]: v for k, v in full.state_dict().items() if k.startswith("backbone.")},
               tmp_path / "dinov2_vits14_pretrain.pth")
    with pytest.raises(CheckpointError, match=r"^model\.width=0\.25: .*model\.width=1; set model\.width=1 "):
        load_pretrained(DINOv2Segmentor(3, "dinov2_vits14", width=0.25), tmp_path / "dinov2_vits14_pretrain.pth")
    # at full width, another size of the family names model.backbone
    with pytest.raises(CheckpointError, match=r"^model\.backbone=dinov2_vitb14: .*has shape \(1, 1, 384\), model "
                                              r"expects \(1, 1, 768\)"):
        load_pretrained(DINOv2Segmentor(3, "dinov2_vitb14", width=1.0), tmp_path / "dinov2_vits14_pretrain.pth")


def test_a_config_error_found_in_the_data_leaves_no_run_directory(tmp_path, tiny_overrides, capsys):
    # before: data.rcs_min_pixels too high failed at the first phase, after config.yaml, run.json
    # and checkpoints/last.pt were written; the same command was then refused (only --overwrite helped)
    run = tmp_path / "run"
    rcs = [*tiny_overrides, "data.rare_class_sampling=true", "train.iters=1"]
    assert main(["train", "--out", str(run), *rcs, "data.rcs_min_pixels=100000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.rcs_min_pixels" in err[0], err
    assert not run.exists()
    assert main(["train", "--out", str(run), *rcs, "data.rcs_min_pixels=2"]) == 0  # the same --out, fixed
    # the counts made before the directory existed are kept for the loaders (not counted again)
    stats = json.loads((run / "rare_class_stats.json").read_text())
    assert len(stats["samples"]) == 8 and stats["num_classes"] == 19
