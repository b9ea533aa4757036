"""Bad data on disk met through the command line: one line naming the culprit, exit code 2."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bida.tools.cli import main

from fixtures import make_folder_tree
from helpers import folder_args, folder_pair, run_cli, train_args


def test_valid_folder_pair_trains(tmp_path, capsys):
    src, tgt = folder_pair(tmp_path)
    assert main(train_args(tmp_path, folder_args(src, tgt))) == 0
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_missing_dataset_root(tmp_path, capsys):
    src, tgt = folder_pair(tmp_path)
    args = folder_args(src, tgt) + [f"data.source.root={tmp_path / 'nowhere'}"]
    run_cli(tmp_path, train_args(tmp_path, args), capsys, "nowhere")


def test_empty_split(tmp_path, capsys):
    src, tgt = folder_pair(tmp_path)
    for f in (src / "images" / "train").iterdir():
        f.unlink()
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt)), capsys, str(src / "images" / "train"))


def test_image_without_label(tmp_path, capsys):
    src, tgt = folder_pair(tmp_path)
    (src / "labels" / "train" / "img_000.png").unlink()
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt)), capsys, "img_000")


def test_image_label_size_mismatch(tmp_path, capsys):
    src, tgt = folder_pair(tmp_path)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(src / "labels" / "train" / "img_000.png")
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt)), capsys, "img_000")


def test_corrupt_image(tmp_path, capsys):
    src, tgt = folder_pair(tmp_path)
    (src / "images" / "train" / "img_000.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt)), capsys, "img_000.png")


def test_label_values_outside_class_set(tmp_path, capsys):
    src, tgt = folder_pair(tmp_path)
    Image.fromarray(np.full((8, 12), 7, np.uint8)).save(src / "labels" / "train" / "img_000.png")
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt)), capsys, "img_000.png")


@pytest.mark.parametrize("content", [None, "{not json", '{"classes": "sky"}', '{"classes": ["a"], "palette": [[1, 2]]}'])
def test_classes_json_missing_or_malformed(tmp_path, capsys, content):
    src, tgt = folder_pair(tmp_path)
    if content is None:
        (src / "classes.json").unlink()
    else:
        (src / "classes.json").write_text(content)
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt)), capsys, "classes.json")


def test_source_and_target_classes_differ(tmp_path, capsys):
    src, tgt = folder_pair(tmp_path)
    spec = json.loads((tgt / "classes.json").read_text())
    spec["classes"] = ["sky", "tree", "car"]
    (tgt / "classes.json").write_text(json.dumps(spec))
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt)), capsys, "different classes")


def _train_and_check(tmp_path, capsys, src, tgt) -> tuple[str, str]:
    """``bida train`` (must exit 2 with one line, creating nothing) and ``bida data check``
    (must exit 1): the train error line and the check's report."""
    run = tmp_path / "run"
    assert main(train_args(tmp_path, folder_args(src, tgt))) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bida: error:") and "\n" not in err, err
    assert not run.exists()
    assert main(["data", "check", *folder_args(src, tgt)]) == 1
    return err, capsys.readouterr().out


def test_a_symlink_loop_image_is_refused_not_dropped(tmp_path, capsys):
    # before: the image was left out of training silently; data check did not name the loop
    src, tgt = folder_pair(tmp_path)
    loop = src / "images" / "train" / "img_009.png"
    os.symlink(loop.name, loop)
    (src / "labels" / "train" / "img_000.png").rename(src / "labels" / "train" / "img_009.png")
    os.symlink("img_009.png", src / "labels" / "train" / "img_000.png")  # a label that resolves
    err, report = _train_and_check(tmp_path, capsys, src, tgt)
    assert str(loop) in err and "symlink loop" in err, err
    assert f"cannot read image {loop}: symlink loop" in report
    assert "has no image" not in report and "no label" not in report


def test_an_unreadable_directory_is_permission_denied_not_empty(tmp_path, capsys, monkeypatch):
    # before: "no images in DIR" for a directory that holds images it may not list
    src, tgt = folder_pair(tmp_path)
    locked = src / "images" / "train"
    locked.chmod(0)
    if os.geteuid() == 0:  # root lists a chmod-000 directory: refuse it as the kernel would for a user
        real_scandir = os.scandir

        def scandir(path="."):
            if Path(path) == locked:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", scandir)
    try:
        err, report = _train_and_check(tmp_path, capsys, src, tgt)
    finally:
        locked.chmod(0o755)
    assert f"permission denied: {locked}" in err, err
    assert f"permission denied: {locked}" in report and "no images" not in report


@pytest.mark.parametrize("where", ["pseudo-label pass", "evaluation"])
def test_a_bad_target_file_met_mid_run_says_how_to_resume(tmp_path, capsys, where):
    # before: the source side's "checkpoint saved at step N; ... --resume" hint was missing
    src, tgt = tmp_path / "src", tmp_path / "tgt"
    make_folder_tree(src)
    make_folder_tree(tgt, n_val=3, target_without_train_labels=True)
    split = "train" if where == "pseudo-label pass" else "val"
    bad = tgt / "images" / split / "img_002.png"  # beyond the 2 files checked up front
    good = bad.read_bytes()
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    run = tmp_path / "run"
    extra = (["method=self_training", "train.rounds=1", "train.iters_per_round=2"] if split == "train"
             else ["train.iters=4", "train.eval_every=2"])
    assert main(train_args(tmp_path, folder_args(src, tgt) + extra)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(bad) in err, err
    assert f"checkpoint saved at step 2; fix or remove the file, then continue with: bida train --resume {run}" in err
    bad.write_bytes(good)
    assert main(["train", "--resume", str(run)]) == 0
    assert (run / "metrics.json").is_file()


def test_an_unreadable_pseudo_label_is_a_data_error_naming_it(tmp_path):
    # before: a raw FileNotFoundError / PIL error from the target loader (a traceback)
    from bida.data.datasets import SegmentationDataset, pseudo_label_name
    from bida.data.listing import list_samples
    from bida.errors import DataError

    make_folder_tree(tmp_path / "tgt", target_without_train_labels=True)
    samples = list_samples("folder", tmp_path / "tgt", "train", require_labels=False)
    labels = tmp_path / "round_0"
    labels.mkdir()
    (labels / pseudo_label_name(samples[0].name)).write_bytes(b"not a png")
    ds = SegmentationDataset(samples, "folder", 3, train=True, crop=(8, 12), label_dir=labels)
    for i, name in ((0, pseudo_label_name(samples[0].name)), (1, pseudo_label_name(samples[1].name))):
        with pytest.raises(DataError, match=f"cannot read pseudo label {labels / name}.*remove {labels}"):
            ds[(i, 0)]
