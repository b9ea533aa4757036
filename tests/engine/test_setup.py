"""train.deterministic: the process-wide switches it sets, that a run restores them, and that on
CPU it changes no result (the kernels bida uses there are deterministic already)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bida.config import load_config
from bida.engine.setup import determinism_settings, deterministic_algorithms, restore_determinism
from bida.engine.train import train
from bida.errors import ConfigError
from bida.tools.cli import main

from fixtures import make_folder_tree
from helpers import folder_run  # noqa: F401 (fixtures)


@pytest.fixture
def clean_switches(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = determinism_settings()
    yield
    restore_determinism(before)


def test_switch_sets_cuda_determinism_and_restores(clean_switches):
    before = determinism_settings()
    deterministic_algorithms(False)  # off: nothing is touched
    assert determinism_settings() == before and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    deterministic_algorithms(True)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    restore_determinism(before)
    assert determinism_settings() == before


def test_a_user_workspace_setting_is_kept(clean_switches, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    deterministic_algorithms(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_deterministic_run_on_cpu_equals_default_and_restores(tmp_path, tiny_overrides, clean_switches):
    before = determinism_settings()
    base = tiny_overrides + ["method=bida", "train.iters=3", "train.rounds=1", "train.iters_per_round=2"]
    a = train(load_config(None, base), tmp_path / "a")
    assert determinism_settings() == before  # the next run in this process starts clean
    b = train(load_config(None, base + ["train.deterministic=true"]), tmp_path / "b")
    assert determinism_settings() == before
    def logged(run):  # every logged value except the wall times
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
                for line in (run / "log.jsonl").read_text().splitlines()]

    assert logged(tmp_path / "a") == logged(tmp_path / "b") and a["mIoU"] == b["mIoU"]


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.deterministic"):
        load_config(None, ["train.deterministic=maybe"])


def test_random_init_is_warned_and_source_val_is_reported(folder_run):
    run, _, stderr = folder_run
    assert "warning: training resnet18 from random weights" in stderr and "DeepLab_init.pth" in stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["source_val"]["mIoU"] <= 1.0 and set(metrics["source_val"]["per_class_iou"]) == {
        "sky", "tree", "house"}
    assert 0.0 <= metrics["mIoU"] <= 1.0  # the target keys stay
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert any("eval/source_mIoU" in rec for rec in log)


def test_no_random_init_warning_for_the_embedded_pair(tmp_path, tiny_overrides, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), *tiny_overrides, "train.iters=1", "method=source_only"]) == 0
    captured = capsys.readouterr()
    assert "random weights" not in captured.out + captured.err


def _shapes(root: Path, n: int, size: int, seed: int, colours) -> None:
    """Squares and discs on a plain background, with noise: a 3-class folder domain."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps({"classes": ["background", "square", "disc"]}))
    yy, xx = np.mgrid[:size, :size]
    for split, count in (("train", n), ("val", n // 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(count):
            label = np.zeros((size, size), np.uint8)
            for _ in range(2):
                c, r = int(rng.integers(1, 3)), int(rng.integers(size // 8, size // 4))
                cy, cx = rng.integers(r, size - r, 2)
                inside = ((np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)) if c == 1 else (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                label[inside] = c
            image = np.asarray(colours, np.float32)[label] + rng.normal(0, 15, (size, size, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / split / f"{i}.png")
            Image.fromarray(label).save(root / "labels" / split / f"{i}.png")


def test_custom_folder_config_trains_from_random_init(tmp_path):
    """configs/custom_folders.yaml as shipped (backbone, width, LR, BN, schedule), with a
    smaller crop and fewer iterations: the source loss falls well below its start and
    source-val mIoU beats predicting the background everywhere."""
    _shapes(tmp_path / "A", 24, 48, 0, [(90, 140, 90), (200, 60, 60), (60, 60, 200)])
    _shapes(tmp_path / "B", 24, 48, 1, [(120, 120, 150), (220, 120, 80), (80, 120, 220)])
    run = tmp_path / "run"
    assert main(["train", "-c", str(Path(__file__).parents[2] / "configs" / "custom_folders.yaml"),
                 f"data.source.root={tmp_path / 'A'}", f"data.target.root={tmp_path / 'B'}", "data.crop=[48,48]",
                 "train.iters=40", "train.log_every=1", "train.eval_every=1000", "train.checkpoint_every=1000",
                 "train.quiet=true", "data.num_workers=0", "--out", str(run)]) == 0
    losses = [r["loss/seg_src"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
              if "loss/seg_src" in r]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:3])
    metrics = json.loads((run / "metrics.json").read_text())
    labels = np.concatenate([np.asarray(Image.open(p)).ravel() for p in sorted((tmp_path / "A" / "labels" / "val").glob("*.png"))])
    all_background_miou = float(np.mean(labels == 0)) / 3  # background IoU = its share; the other two 0
    assert metrics["source_val"]["mIoU"] > all_background_miou + 0.1


def test_random_init_warning_gives_each_family_its_weights_recipe():
    from bida.models.weights import random_init_warning

    dino = random_init_warning("dinov2_vitl14")
    assert dino.startswith("bida: warning: training dinov2_vitl14 from random weights")
    assert "model.pretrained=pretrained/dinov2_vitl14_pretrain.pth" in dino
    assert "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth" in dino
    assert "facebook/dinov2-large" in dino and "'DINOv2 weights'" in dino
    reg = random_init_warning("dinov2_vits14_reg")
    assert "dinov2_vits14_reg4_pretrain.pth" in reg and "facebook/dinov2-with-registers-small" in reg
    mit = random_init_warning("mit_b5")
    assert "model.pretrained=pretrained/mit_b5.pth" in mit and "nvidia/mit-b5" in mit and "'MiT weights'" in mit
    assert "DeepLab_init.pth data.normalize=caffe" in random_init_warning("resnet101")
    assert all("\n" not in w for w in (dino, reg, mit))
