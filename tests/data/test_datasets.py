"""bida.data.datasets: training items and loaders, the target test split, bad files mid-run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bida.config import load_config
from bida.data.synthetic import SyntheticSpec, ensure_synthetic
from bida.tools.cli import main

from fixtures import make_folder_tree
from helpers import _one_line_error


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_file_met_mid_run_gives_one_line_and_the_run_resumes(tmp_path, capsys, workers):
    # before: with workers, a 23-line "Caught DataError in DataLoader worker process" message
    from fixtures import make_folder_tree

    src, tgt = tmp_path / "src", tmp_path / "tgt"
    make_folder_tree(src, n_train=4)
    make_folder_tree(tgt, target_without_train_labels=True)
    bad = src / "images" / "train" / "img_003.png"  # beyond the 2 files checked up front
    good = bad.read_bytes()
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    run = tmp_path / "run"
    args = ["data.source.kind=folder", f"data.source.root={src}", "data.source.val_split=null",
            "data.target.kind=folder", f"data.target.root={tgt}", "model.width=0.125", "train.iters=4",
            "train.quiet=true", "data.crop=[8,12]", "train.eval_every=100", f"data.num_workers={workers}"]
    assert main(["train", "--out", str(run), *args]) == 2
    err = _one_line_error(capsys)
    assert "img_003.png" in err and "--resume" in err and "Traceback" not in err
    bad.write_bytes(good)
    assert main(["train", "--resume", str(run)]) == 0


def test_loader_workers_are_shut_down_on_every_exit_path(tmp_path):
    """Workers ignore SIGTERM, so a worker left to multiprocessing's exit handler (which
    terminates by signal, then joins) would hang the interpreter forever: an error in a
    phase must still stop them, even while the error (and its traceback) is kept alive."""
    import multiprocessing

    from fixtures import make_folder_tree

    import bida.engine.train as tr

    src, tgt = tmp_path / "src", tmp_path / "tgt"
    make_folder_tree(src, n_train=4)
    make_folder_tree(tgt, target_without_train_labels=True)
    (src / "images" / "train" / "img_003.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cfg = load_config(None, ["data.source.kind=folder", f"data.source.root={src}", "data.source.val_split=null",
                             "data.target.kind=folder", f"data.target.root={tgt}", "model.width=0.125",
                             "train.iters=4", "train.quiet=true", "data.crop=[8,12]", "train.eval_every=100",
                             "data.num_workers=1"])
    with pytest.raises(Exception) as err:
        tr.Trainer(cfg, tmp_path / "run").fit()
    assert "img_003.png" in str(err.value)
    assert not multiprocessing.active_children()  # the traceback in ``err`` keeps the frames alive


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


def test_the_embedded_target_has_a_test_split_when_it_has_test_images():
    from bida.config import target_test_split

    cfg = load_config(None, [])
    assert cfg.data.synthetic.num_test == 300 and target_test_split(cfg) == "test" and cfg.data.target.val_split == "val"
    assert target_test_split(load_config(None, ["data.synthetic.num_test=0"])) is None
    # other kinds: only data.target.test_split names one (a folder without images/test is not asked for it)
    assert target_test_split(load_config(None, ["data.target.kind=folder", "data.target.root=x"])) is None
    assert target_test_split(load_config(None, ["data.target.kind=folder", "data.target.root=x",
                                                "data.target.test_split=held_out"])) == "held_out"


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
