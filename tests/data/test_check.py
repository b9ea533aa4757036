
from pathlib import Path

import numpy as np
from PIL import Image

from bida.data.check import IGNORE_NAME, QUICK_CHECK_FILES, CheckReport, check_domain
from bida.labels import CITYSCAPES_CLASSES
from bida.tools.cli import main

from fixtures import (EXPECTED_CITYSCAPES_TRAIN_IDS, EXPECTED_SYNTHIA_TRAIN_IDS, expected_train_ids,
    make_cityscapes_tree, make_folder_tree, make_gta5_tree, make_synthia_tree)
from helpers import _folder_pair


def _histogram(labels: list[np.ndarray], names: tuple[str, ...]) -> dict[str, int]:
    """Reference histogram, counted class by class."""
    out: dict[str, int] = {}
    for label in labels:
        for value in np.unique(label).tolist():
            key = IGNORE_NAME if value == 255 else names[value]
            out[key] = out.get(key, 0) + int((label == value).sum())
    return out


def _has(items: list[str], *parts: str) -> bool:
    return any(all(p in item for p in parts) for item in items)


def test_clean_gta5_domain(tmp_path):
    tree = make_gta5_tree(tmp_path, n=3, mismatched=0)
    report = check_domain("gta5", tmp_path, {"train": True})
    assert report.ok() and report.errors == [] and report.warnings == []
    assert report.counts == {"train": 3} and report.checked == {"train": 3}
    labels = [expected_train_ids(ids, EXPECTED_CITYSCAPES_TRAIN_IDS) for ids in tree.ids.values()]
    assert report.histogram == {"train": _histogram(labels, CITYSCAPES_CLASSES)}
    assert sum(report.histogram["train"].values()) == 3 * 8 * 16


def test_synthia_histogram_from_16_bit_labels(tmp_path):
    tree = make_synthia_tree(tmp_path, n=2)
    report = check_domain("synthia", tmp_path, {"train": True})
    assert report.ok()
    labels = [expected_train_ids(ids, EXPECTED_SYNTHIA_TRAIN_IDS) for ids in tree.ids.values()]
    assert report.histogram["train"] == _histogram(labels, CITYSCAPES_CLASSES)
    assert "terrain" not in report.histogram["train"]


def test_gta5_size_mismatch_is_a_warning(tmp_path):
    make_gta5_tree(tmp_path, n=2, mismatched=1)
    report = check_domain("gta5", tmp_path, {"train": True})
    assert report.ok()
    assert _has(report.warnings, "labels/00002.png is 32x16 but image", "resizes it with nearest")


def test_every_problem_is_collected(tmp_path):
    make_cityscapes_tree(tmp_path, cities=("aachen", "bochum"), n_per_city=2)
    labels = tmp_path / "gtFine/train"
    images = tmp_path / "leftImg8bit/train"
    (labels / "aachen/aachen_000000_000019_gtFine_labelIds.png").unlink()  # missing label
    (images / "aachen/aachen_000001_000019_leftImg8bit.png").write_bytes(b"broken")  # unreadable image
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(labels / "bochum/bochum_000000_000019_gtFine_labelIds.png")
    (images / "bochum/bochum_000001_000019_leftImg8bit.png").unlink()  # orphan label
    (tmp_path / "leftImg8bit/val/aachen").rename(tmp_path / "aachen_moved")
    (tmp_path / "leftImg8bit/val/bochum").rename(tmp_path / "bochum_moved")  # empty split

    report = check_domain("cityscapes", tmp_path, {"train": True, "val": True, "test": False})
    assert not report.ok()
    assert _has(report.errors, "aachen_000000_000019_leftImg8bit.png has no label")
    assert _has(report.errors, "cannot read image", "aachen_000001_000019_leftImg8bit.png")
    assert _has(report.errors, "bochum_000000_000019_gtFine_labelIds.png is 4x4 but image")
    assert _has(report.errors, "no images in", "leftImg8bit/val")
    assert _has(report.errors, "missing image directory", "leftImg8bit/test")
    assert _has(report.warnings, "bochum_000001_000019_gtFine_labelIds.png has no image")
    assert len(report.errors) == 5
    assert report.counts == {"train": 3, "val": 0, "test": 0}


def test_labels_not_required_for_target_split(tmp_path):
    make_cityscapes_tree(tmp_path, unlabelled_splits=("train",))
    report = check_domain("cityscapes", tmp_path, {"train": False, "val": True})
    assert report.ok()
    assert "train" not in report.histogram and "val" in report.histogram
    report = check_domain("cityscapes", tmp_path, {"train": True})
    assert len(report.errors) == 4 and _has(report.errors, "has no label (split 'train')")


def test_folder_values_outside_classes(tmp_path):
    make_folder_tree(tmp_path, classes=("a", "b", "c"))
    Image.fromarray(np.array([[0, 1, 5]], np.uint8)).save(tmp_path / "labels/val/img_001.png")
    report = check_domain("folder", tmp_path, {"train": True, "val": True})
    assert _has(report.errors, "labels/val/img_001.png has values 5 outside classes 0..2")
    assert _has(report.errors, "labels/val/img_001.png is 3x1 but image")  # both problems
    assert set(report.histogram["train"]) == {"a", "b", "c", IGNORE_NAME}
    assert report.histogram["val"]["5"] == 1  # out-of-class values show in the histogram


def test_folder_num_classes_override(tmp_path):
    make_folder_tree(tmp_path, classes=("a", "b", "c"))
    report = check_domain("folder", tmp_path, {"val": True}, num_classes=2)
    assert _has(report.errors, "has values 2 outside classes 0..1")


def test_malformed_classes_json_still_lists(tmp_path):
    make_folder_tree(tmp_path)
    (tmp_path / "classes.json").write_text("{broken")
    report = check_domain("folder", tmp_path, {"train": True})
    assert _has(report.errors, "classes.json", "invalid JSON")
    assert report.counts == {"train": 3}
    assert set(report.histogram["train"]) == {"0", "1", "2", IGNORE_NAME}


def test_missing_root(tmp_path):
    report = check_domain("gta5", tmp_path / "nope", {"train": True})
    assert report.errors == [f"dataset root {tmp_path / 'nope'} does not exist or is not a directory"]


def test_quick_check_reads_only_the_first_files(tmp_path):
    make_gta5_tree(tmp_path, n=5, mismatched=0)
    (tmp_path / "images/00005.png").write_bytes(b"broken")
    quick = check_domain("gta5", tmp_path, {"train": True}, full=False)
    assert quick.ok() and quick.checked == {"train": QUICK_CHECK_FILES}
    assert sum(quick.histogram["train"].values()) == QUICK_CHECK_FILES * 8 * 16
    assert check_domain("gta5", tmp_path, {"train": True}, max_files=4).ok()
    full = check_domain("gta5", tmp_path, {"train": True})
    assert not full.ok() and _has(full.errors, "cannot read image", "00005.png")
    (tmp_path / "labels/00005.png").unlink()  # listing problems are found even by the quick check
    assert _has(check_domain("gta5", tmp_path, {"train": True}, full=False).errors, "00005.png has no label")


def test_to_markdown(tmp_path):
    make_folder_tree(tmp_path, classes=("sky", "tree"))
    (tmp_path / "labels/val/img_000.png").unlink()
    markdown = check_domain("folder", tmp_path, {"train": True, "val": True}).to_markdown()
    assert markdown.startswith(f"# Data check: folder {tmp_path}\n")
    assert "**Status:** 1 error(s)" in markdown
    assert "| train | 3 | 3 |" in markdown and "| val | 2 | 2 |" in markdown
    assert "## Errors" in markdown and "img_000.png has no label" in markdown
    assert "| sky | " in markdown and f"| {IGNORE_NAME} | " in markdown
    ok = CheckReport(domain="x", counts={"train": 1}).to_markdown()
    assert "**Status:** OK" in ok and "## Errors" not in ok


def test_markdown_truncates_long_lists():
    report = CheckReport(domain="x", errors=[f"error {i}" for i in range(60)])
    markdown = report.to_markdown()
    assert "- error 49" in markdown and "- error 50" not in markdown and "... and 10 more" in markdown


def test_data_check_refuses_different_class_lists(tmp_path, capsys):
    data = _folder_pair(tmp_path, target_classes=("sky", "tree", "car"))
    assert main(["data", "check", *data]) == 1
    out = capsys.readouterr()
    assert "list different classes" in out.out and "data check found errors" in out.err
