"""Every row of the bad-input table: one line naming the culprit, exit code 2, disk untouched."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bida.checkpoint import save_checkpoint
from bida.tools.cli import main
from bida.models import DeepLabV2
from fixtures import make_folder_tree

TINY = ["model.width=0.125", "train.iters=2", "train.quiet=true", "data.crop=[8,12]", "train.eval_every=100"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its bytes (dirs as markers)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def folder_pair(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "data" / "src"
    tgt = tmp_path / "data" / "tgt"
    make_folder_tree(src)
    make_folder_tree(tgt, target_without_train_labels=True)
    return src, tgt


def folder_args(src: Path, tgt: Path) -> list[str]:
    return ["data.source.kind=folder", f"data.source.root={src}", "data.source.val_split=null",
            "data.target.kind=folder", f"data.target.root={tgt}", *TINY]


def run_cli(tmp_path: Path, args: list[str], capsys, needle: str) -> None:
    """Run ``bida ...``; expect exit 2, one stderr line containing ``needle``, nothing changed."""
    before = snapshot(tmp_path)
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("bida: error:") and "\n" not in err, err
    assert needle in err, err
    assert snapshot(tmp_path) == before


def train_args(tmp_path: Path, extra: list[str]) -> list[str]:
    return ["train", "--out", str(tmp_path / "run"), *extra]


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


@pytest.mark.parametrize("override, needle", [
    ("train.colour=3", "train.colour"),          # unknown key
    ("train.iters=many", "train.iters"),         # wrong type
    ("train.iters", "malformed override"),       # malformed override
])
def test_config_errors(tmp_path, capsys, override, needle):
    run_cli(tmp_path, train_args(tmp_path, [override]), capsys, needle)


def test_unknown_key_in_config_file(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("model:\n  depth: 50\n")
    run_cli(tmp_path, ["train", "-c", str(cfg), "--out", str(tmp_path / "run")], capsys, "model.depth")


def test_checkpoint_of_other_class_count_or_architecture(tmp_path, capsys):
    src, tgt = folder_pair(tmp_path)  # 3 classes
    ckpt = tmp_path / "k19.pt"
    save_checkpoint({"model": DeepLabV2(19, "resnet18", width=0.125).state_dict()}, ckpt)
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt) + [f"model.init_checkpoint={ckpt}"]), capsys,
            "19 classes, the config has 3")
    ckpt50 = tmp_path / "r50.pt"
    save_checkpoint({"model": DeepLabV2(3, "resnet50", width=0.125).state_dict()}, ckpt50)
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt) + [f"model.init_checkpoint={ckpt50}"]), capsys,
            "architecture")


def test_truncated_checkpoint(tmp_path, capsys):
    src, tgt = folder_pair(tmp_path)
    ckpt = tmp_path / "cut.pt"
    save_checkpoint({"model": DeepLabV2(3, "resnet18", width=0.125).state_dict()}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt) + [f"model.init_checkpoint={ckpt}"]), capsys, "cut.pt")


def test_pretrained_with_unexpected_keys(tmp_path, capsys):
    src, tgt = folder_pair(tmp_path)
    import torch

    state = DeepLabV2(3, "resnet18", width=0.125).state_dict()
    state["transformer.blocks.0.attn.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "odd.pth")
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt) + [f"model.pretrained={tmp_path / 'odd.pth'}"]),
            capsys, "unexpected keys")


def test_output_directory_not_writable(tmp_path, capsys):
    src, tgt = folder_pair(tmp_path)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    run_cli(tmp_path, ["train", "--out", str(blocker / "run"), *folder_args(src, tgt)], capsys, "not writable")


def test_existing_run_dir_needs_resume_or_overwrite(tmp_path, capsys):
    src, tgt = folder_pair(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt)), capsys, "--overwrite")


def test_disk_full_while_writing_checkpoint(tmp_path, capsys, monkeypatch):
    from bida.config import load_config
    from bida.engine.train import Trainer

    src, tgt = folder_pair(tmp_path)
    run = tmp_path / "run"
    cfg = load_config(None, folder_args(src, tgt) + ["train.iters=4", "train.checkpoint_every=1"])
    Trainer(cfg, run).fit(stop_after=1)  # a pre-empted run with a good checkpoint at step 1
    before = snapshot(tmp_path)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    import bida.checkpoint

    monkeypatch.setattr(bida.checkpoint.os, "fsync", full_disk)
    code = main(["train", "--resume", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "No space left on device" in err and "last.pt" in err and "\n" not in err
    after = snapshot(tmp_path)
    # the checkpoint and config are untouched; no temporary file is left behind
    for key in ("run/checkpoints/last.pt", "run/config.yaml"):
        assert after[key] == before[key]
    assert not [k for k in after if ".tmp-" in k]


@pytest.mark.parametrize("override", [
    "train.checkpoint_every=0", "train.eval_every=0", "train.log_every=0",  # were ZeroDivisionError
    "train.batch_size=0", "data.num_workers=-1", "train.lr=-1", "pseudo.class_fraction=2",
    "data.crop=[0,0]", "train.rounds=-1", "eval.max_images=0", "train.lr=.nan", "data.scale_range=[1.5,0.5]",
    "mic.mask_ratio=1",  # masks every block
])
def test_numeric_config_values_are_range_checked(tmp_path, capsys, override):
    # before: a traceback with a half-made run directory, or exit 0 with meaningless metrics
    run_cli(tmp_path, train_args(tmp_path, [override]), capsys, override.split("=")[0])


def test_every_numeric_config_key_has_a_range():
    import dataclasses
    import typing

    from bida.config import RANGES, Config

    def numeric_keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(tp):
                yield from numeric_keys(tp, key + ".")
            elif {int, float} & set(typing.get_args(tp) or (tp,)) or \
                    any({int, float} & set(typing.get_args(a)) for a in typing.get_args(tp)):
                yield key

    assert sorted(set(numeric_keys(Config)) - set(RANGES)) == []


# ------------------------------------------------- values that passed validation (issue 18.10)


@pytest.mark.parametrize("override, needle", [
    ("data.eval_classes=[99]", "data.eval_classes"),  # was an IndexError at the first evaluation
    ("data.eval_classes=[]", "data.eval_classes"),  # was mIoU 0.0
    ("data.eval_classes=[1,1]", "lists a class twice"),  # was a mean that counted class 1 twice
    ("model.width=.inf", "model.width"),  # was OverflowError
    ("train.lr=.inf", "train.lr"),  # was accepted
    ("loss.contrast_t2s_weight=-.inf", "loss.contrast_t2s_weight"),
    ("data.crop=[100000,100000]", "data.crop"),  # was a 27.9 GiB allocation in a worker
    ("data.resize=100000", "data.resize"),
    ("train.iters=1:30", "train.iters"),  # was 90 (YAML 1.1 sexagesimal)
    ("loss.temperature=1e-9", "swamps every other term"),  # was a total loss of 3e8
    ("data.num_workers=100000", "a process of its own"),  # forked hundreds of workers
])
def test_values_that_crashed_or_misled_later_are_refused_up_front(tmp_path, capsys, override, needle):
    src, tgt = folder_pair(tmp_path)
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt) + [override]), capsys, needle)
    assert not (tmp_path / "run").exists()


def test_numbers_are_read_as_yaml_1_2(tmp_path):
    from bida.config import load_config
    from bida.errors import ConfigError

    assert load_config(None, ["train.iters=010"]).train.iters == 10  # was 8 (YAML 1.1 octal)
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 1e-3
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  iters: 010\n  log_every: 0o10\n  lr: 2.5e-4\n")
    cfg = load_config(path)
    assert (cfg.train.iters, cfg.train.log_every, cfg.train.lr) == (10, 8, 2.5e-4)
    path.write_text("train:\n  iters: 1:30\n")
    with pytest.raises(ConfigError, match="train.iters: expected an integer, got '1:30'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"seed: -1 is out of range \(must be in \[0, 4294967295\]\)"):
        load_config(None, ["seed=-1"])  # was printed as 4.29497e+09


def test_a_bad_saved_config_is_one_line_on_resume_and_evaluate(tmp_path, capsys):
    from bida.config import load_config
    from bida.engine.train import Trainer

    src, tgt = folder_pair(tmp_path)
    run = tmp_path / "run"
    Trainer(load_config(None, folder_args(src, tgt) + ["train.iters=4"]), run).fit(stop_after=1)
    saved = (run / "config.yaml").read_text()
    ckpt = str(run / "checkpoints" / "last.pt")
    for edit in ("eval_classes: null", "crop:\n  - 8\n  - 12"):
        assert edit in saved
    for bad, needle in (("eval_classes: [99]", "data.eval_classes"), ("crop: [.inf, 12]", "data.crop")):
        edited = saved.replace("eval_classes: null" if "eval" in bad else "crop:\n  - 8\n  - 12", bad)
        (run / "config.yaml").write_text(edited)
        before = {k: v for k, v in snapshot(run).items() if k != ".lock"}
        assert main(["train", "--resume", str(run)]) == 2  # was an IndexError traceback at the evaluation
        err = capsys.readouterr().err.strip()
        assert err.startswith("bida: error:") and "\n" not in err and needle in err, err
        assert {k: v for k, v in snapshot(run).items() if k != ".lock"} == before
    (run / "config.yaml").write_text(saved)
    assert main(["evaluate", "--checkpoint", ckpt, "data.eval_classes=[99]", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "data.eval_classes" in err and ">= 3" in err, err


# ------------------------------------------------- files that cannot be listed or followed (issue 18.11)


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


@pytest.mark.parametrize("overrides, needle", [
    (["pseudo.ignore_top=-1"], "pseudo.ignore_top"),
    (["pseudo.ignore_bottom=-3"], "pseudo.ignore_bottom"),
    (["pseudo.ignore_top=4", "pseudo.ignore_bottom=4"], "pseudo.ignore_top + pseudo.ignore_bottom"),  # crop height 8
    (["pseudo.ignore_top=8"], "pseudo.ignore_top + pseudo.ignore_bottom"),
    (["train.mix_classes=daformer"], "train.mix_classes"),
    (["loss.source_ce_mean=pixels"], "loss.source_ce_mean"),
    (["method.target_features=mixed"], "method.target_features"),  # self_training has no BiDA target pixels
    (["method.target_features=both"], "method.target_features"),
])
def test_daformer_recipe_keys_are_refused_up_front(tmp_path, capsys, overrides, needle):
    src, tgt = folder_pair(tmp_path)
    teacher = ["train.schedule=teacher", "method=self_training"]
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt) + teacher + overrides), capsys, needle)


@pytest.mark.parametrize("override, needle", [
    ("train.warmup_ratio=0", "train.warmup_ratio"),  # the warm-up would start at LR 0
    ("train.warmup_ratio=1.5", "train.warmup_ratio"),
    ("model.input_scale=0", "model.input_scale"),
    ("model.input_scale=1.1", "model.input_scale"),  # a DeepLab-V2 backbone has no ViT input
    ("model.decoder=light", "model.decoder"),
    ("train.decay_norms_biases=true", "train.decay_norms_biases"),
    ("pseudo.teacher_flip=true", "pseudo.teacher_flip"),  # the rounds schedule has no teacher
    ("data.weak_jitter=true", "data.weak_jitter"),
])
def test_vfm_uda_switches_are_refused_where_nothing_reads_them(tmp_path, capsys, override, needle):
    src, tgt = folder_pair(tmp_path)
    run_cli(tmp_path, train_args(tmp_path, folder_args(src, tgt) + [override]), capsys, needle)
    assert not (tmp_path / "run").exists()
