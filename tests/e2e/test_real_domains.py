"""Real layouts end to end: the paper configs on fixture trees, `bida data check`, custom folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from bida.tools.cli import main
from bida.config import load_config
from bida.data.datasets import build_eval_dataset, build_train_dataset, resolve_domain
from fixtures import make_cityscapes_tree, make_folder_tree, make_gta5_tree, make_synthia_tree
from helpers import CONFIGS

SMALL = ["model.backbone=resnet18", "model.width=0.125", "model.pretrained=null", "model.init_checkpoint=null",
         "data.crop=[8,16]", "data.resize=null", "data.num_workers=0", "train.iters=2", "train.rounds=1",
         "train.iters_per_round=2", "train.quiet=true", "eval.size=null", "train.eval_every=100"]


def test_gta5_to_cityscapes_config_reads_fixture_trees(tmp_path):
    gta = make_gta5_tree(tmp_path / "GTA5", n=3, mismatched=1)
    city = make_cityscapes_tree(tmp_path / "Cityscapes", unlabelled_splits=("train",))
    cfg = load_config(CONFIGS / "gta5_to_cityscapes.yaml",
                      [f"data.source.root={gta.root}", f"data.target.root={city.root}", *SMALL])
    assert cfg.method.name == "bida" and cfg.train.rounds == 1
    src, tgt = resolve_domain(cfg, "source"), resolve_domain(cfg, "target")
    ds = build_train_dataset(cfg, src, "train", require_labels=True)
    assert len(ds) == 3
    val = build_eval_dataset(cfg, tgt, "val")
    item = val[0]
    assert item["label"].shape == item["image"].shape[-2:]
    assert set(np.unique(item["label"].numpy())) <= set(range(19)) | {255}


def test_paper_runs_train_on_fixtures_and_report_protocols(tmp_path):
    gta = make_gta5_tree(tmp_path / "GTA5", n=2, mismatched=0)
    syn = make_synthia_tree(tmp_path / "SYNTHIA", n=2)
    city = make_cityscapes_tree(tmp_path / "Cityscapes", n_per_city=1)
    for name, root in (("gta5", gta.root), ("synthia", syn.root)):
        run = tmp_path / f"run_{name}"
        args = ["train", "-c", str(CONFIGS / f"{name}_to_cityscapes.yaml"), "--out", str(run),
                f"data.source.root={root}", f"data.target.root={city.root}", "data.normalize=imagenet", *SMALL]
        assert main(args) == 0
        m = json.loads((run / "metrics.json").read_text())
        assert {"mIoU_19", "mIoU_16", "mIoU_13"} <= set(m)
        if name == "synthia":  # the config scores 16 classes
            assert len(m["per_class_iou"]) == 16 and m["mIoU"] == m["mIoU_16"]


def test_data_check_command(tmp_path, capsys):
    gta = make_gta5_tree(tmp_path / "GTA5", n=2, mismatched=1)
    city = make_cityscapes_tree(tmp_path / "Cityscapes")
    args = ["data", "check", "-c", str(CONFIGS / "gta5_to_cityscapes.yaml"),
            f"data.source.root={gta.root}", f"data.target.root={city.root}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "road" in out and "00002" in out  # histogram and the resized GTA5 label warning
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(city.root / "gtFine" / "val" / "aachen" /
                                                      "aachen_000000_000019_gtFine_labelIds.png")
    assert main(args) == 1
    assert "aachen_000000_000019" in capsys.readouterr().out


def test_custom_folders_source_only_and_bida_with_only_roots(tmp_path):
    classes = ("ground", "wall", "sky", "object")
    src = make_folder_tree(tmp_path / "A", classes=classes, n_train=3, n_val=2, size=(16, 24))
    tgt = make_folder_tree(tmp_path / "B", classes=classes, n_train=3, n_val=2, size=(16, 24),
                           target_without_train_labels=True)
    # only the roots (plus sizes that make the test take seconds) are overridden
    fast = ["model.backbone=resnet18", "model.width=0.125", "data.crop=[16,24]", "train.iters=2",
            "train.iters_per_round=2", "train.rounds=1", "train.quiet=true", "data.num_workers=0"]
    for method in ("source_only", "bida"):
        run = tmp_path / method
        args = ["train", "-c", str(CONFIGS / "custom_folders.yaml"), "--out", str(run),
                f"data.source.root={src.root}", f"data.target.root={tgt.root}", f"method={method}", *fast]
        assert main(args) == 0
        m = json.loads((run / "metrics.json").read_text())
        assert list(m["per_class_iou"]) == list(classes)
        assert main(["evaluate", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--quiet"]) == 0
