"""The target test split (issue 20.1): generated on its own stream, read by nothing but the
final evaluation, reported by train, evaluate, demo and report with val kept apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import bida.data.datasets as datasets
from bida.engine.evaluator import Evaluator
from bida.tools.cli import main
from bida.config import load_config
from bida.data.synthetic import SyntheticSpec, ensure_synthetic
from bida.errors import ConfigError
from fixtures import make_folder_tree


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_test_images_have_their_own_stream_and_leave_train_and_val_unchanged(tmp_path):
    plain = ensure_synthetic(SyntheticSpec(num_train=3, num_val=2, height=32, width=64), tmp_path)
    with_test = ensure_synthetic(SyntheticSpec(num_train=3, num_val=2, height=32, width=64, num_test=2), tmp_path)
    assert plain != with_test
    a, b = _files(plain), _files(with_test)
    assert {k: v for k, v in b.items() if "/test/" not in k} == a  # every train and val file, byte for byte
    tests = {k: v for k, v in b.items() if "/test/" in k}
    assert sorted(tests) == [f"{d}/{kind}/test/{i:05d}.png" for d in ("source", "target")
                             for kind in ("images", "labels") for i in range(2)]
    # a stream of its own: test image i is neither train nor val image i
    for i in range(2):
        img = b[f"target/images/test/{i:05d}.png"]
        assert img != b[f"target/images/val/{i:05d}.png"] and img != b[f"target/images/train/{i:05d}.png"]
    manifest = json.loads((with_test / "manifest.json").read_text())
    assert manifest["splits"] == {"train": 3, "val": 2, "test": 2} and manifest["spec"]["num_test"] == 2
    assert "test" not in json.loads((plain / "manifest.json").read_text())["splits"]  # same cache name as before


@pytest.mark.parametrize("overrides, key", [
    (["data.synthetic.num_test=0", "data.target.test_split=test"], "data.target.test_split"),
    (["data.target.test_split=val"], "data.target.test_split"),
    (["data.source.test_split=test"], "data.source.test_split"),
    (["data.synthetic.num_test=-1"], "data.synthetic.num_test"),
])
def test_bad_test_split_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, overrides)


def test_the_embedded_target_has_a_test_split_when_it_has_test_images():
    from bida.config import target_test_split

    cfg = load_config(None, [])
    assert cfg.data.synthetic.num_test == 300 and target_test_split(cfg) == "test" and cfg.data.target.val_split == "val"
    assert target_test_split(load_config(None, ["data.synthetic.num_test=0"])) is None
    # other kinds: only data.target.test_split names one (a folder without images/test is not asked for it)
    assert target_test_split(load_config(None, ["data.target.kind=folder", "data.target.root=x"])) is None
    assert target_test_split(load_config(None, ["data.target.kind=folder", "data.target.root=x",
                                                "data.target.test_split=held_out"])) == "held_out"


def test_no_test_image_is_read_before_the_final_evaluation(tmp_path, tiny_overrides, monkeypatch):
    """Every image read is recorded: training, pseudo labels (two rounds) and the periodic
    evaluations that choose best.pt read no test image; only the final test evaluation does."""
    import bida.engine.train as tr

    reads: list[tuple[str, bool]] = []
    phase = {"final_test": False}
    real_load, real_test = datasets.SegmentationDataset.load, Evaluator.test

    def load(self, index):
        reads.append((str(self.samples[index].image), phase["final_test"]))
        return real_load(self, index)

    def evaluate_test(self, *a, **k):
        phase["final_test"] = True
        try:
            return real_test(self, *a, **k)
        finally:
            phase["final_test"] = False

    monkeypatch.setattr(datasets.SegmentationDataset, "load", load)
    monkeypatch.setattr(Evaluator, "test", evaluate_test)
    cfg = load_config(None, tiny_overrides + ["method=bida", "train.iters=2", "train.eval_every=2"])
    metrics = tr.train(cfg, tmp_path / "run")
    test_dir = f"{Path('images') / 'test'}"
    assert any(test_dir in path for path, _ in reads)  # the reads are seen at all
    assert all(final for path, final in reads if test_dir in path)  # test images only in the final evaluation
    assert all(test_dir not in path for path, final in reads if not final)
    assert len([p for p, final in reads if final]) == 2  # data.synthetic.num_test=2, read once each
    # metrics.json: val figures at the top level as always, the test split in its own block
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["split"] == "val" and saved["test"]["split"] == "test" and saved["test"]["checkpoint"] == "last"
    assert saved["best"]["step"] >= 0 and 0.0 <= saved["test"]["mIoU"] <= 1.0
    assert saved["test"]["mIoU"] == metrics["test"]["mIoU"] and len(saved["test"]["confusion"]) == 19
    # bida evaluate --split test gives the same figures from the same checkpoint; --split val the val ones
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.pt")
    for split, ref in (("test", saved["test"]), ("val", saved)):
        out = tmp_path / f"eval_{split}"
        assert main(["evaluate", "--checkpoint", ckpt, "--split", split, "--out", str(out), "--quiet"]) == 0
        again = json.loads((out / "metrics.json").read_text())
        assert again["split"] == split and again["confusion"] == ref["confusion"]


def test_folder_domains_read_images_test_and_evaluate_cli_needs_the_key(tmp_path, capsys):
    classes = ("ground", "wall", "sky")
    src = make_folder_tree(tmp_path / "src", classes=classes, n_train=3, n_val=1, size=(16, 32))
    tgt = make_folder_tree(tmp_path / "tgt", classes=classes, n_train=3, n_val=1, size=(16, 32), n_test=2)
    common = ["data.source.kind=folder", f"data.source.root={src.root}", "data.target.kind=folder",
              f"data.target.root={tgt.root}", "data.crop=[16,32]", "model.width=0.125", "train.iters=2",
              "train.eval_every=100", "train.quiet=true"]
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *common, "data.target.test_split=test"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["test"]["split"] == "test" and set(m["test"]["per_class_iou"]) == set(classes)
    # the test labels are tiled with a shift per image, as the fixture writes them: pixel counts match
    assert int(np.asarray(m["test"]["confusion"]).sum()) == 2 * 16 * 32 - 2 * int((tgt.ids["test/img_000"] == 255).sum())
    capsys.readouterr()
    assert main(["data", "check", *common, "data.target.test_split=test", "--quick"]) == 0
    assert "| test | 2 | 2 |" in capsys.readouterr().out.split("## target")[1]  # the check reads the test split
    # a run without the key: nothing to evaluate on test, said in one line naming the key
    plain = tmp_path / "plain"
    assert main(["train", "--out", str(plain), *common]) == 0
    assert "test" not in json.loads((plain / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(plain / "checkpoints" / "last.pt"), "--split", "test"]) == 2
    assert "data.target.test_split" in capsys.readouterr().err
