"""What a new user meets: own folders, predictions, messages and the command line."""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bida.engine.train as tr
from bida.checkpoint import load_checkpoint
from bida.tools.cli import main, parse_args
from bida.data.readers import read_image
from bida.errors import CheckpointError, DataError
from fixtures import make_folder_tree
import bida.method.train_step
import bida.checkpoint

PALETTE = ((250, 0, 0), (0, 250, 0), (0, 0, 250))
FOLDER_TINY = ["model.width=0.125", "data.crop=[16,32]", "train.iters=2", "train.checkpoint_every=1",
               "train.eval_every=100", "train.log_every=1", "train.quiet=true", "data.num_workers=0"]


def _folder_pair(root: Path, palette=PALETTE, target_classes=("sky", "tree", "house")) -> list[str]:
    make_folder_tree(root / "A", classes=("sky", "tree", "house"), size=(16, 32), palette=palette)
    make_folder_tree(root / "B", classes=target_classes, size=(16, 32), palette=palette,
                     target_without_train_labels=True)
    return ["data.source.kind=folder", f"data.source.root={root / 'A'}",
            "data.target.kind=folder", f"data.target.root={root / 'B'}"]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> tuple[Path, list[str], str]:
    """A tiny source-only run on a folder pair with its own palette (trained once)."""
    root = tmp_path_factory.mktemp("folders")
    data = _folder_pair(root)
    run = root / "run"
    import io
    from contextlib import redirect_stdout

    err = io.StringIO()
    with redirect_stdout(err):
        assert main(["train", *data, *FOLDER_TINY, "--out", str(run)]) == 0
    return run, data, err.getvalue()


# -------------------------------------------------------------------- own data


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
    assert main(["train", "-c", str(Path(__file__).parents[1] / "configs" / "custom_folders.yaml"),
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


def test_predictions_use_the_palette_of_classes_json(folder_run, tmp_path):
    run, _, _ = folder_run
    ckpt = run / "checkpoints" / "last.pt"
    assert load_checkpoint(ckpt)["palette"] == [list(c) for c in PALETTE]
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 32, 3), dtype=np.uint8)).save(image)
    assert main(["predict", "--checkpoint", str(ckpt), str(image), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    pred = np.asarray(Image.open(tmp_path / "p" / "x.png"))
    color = np.asarray(Image.open(tmp_path / "p" / "x_color.png"))
    assert np.array_equal(color, np.asarray(PALETTE, np.uint8)[pred])


def test_palette_of_an_older_checkpoint_comes_from_its_config(folder_run, tmp_path):
    from bida.tools.predict import model_from_checkpoint

    run, _, _ = folder_run
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    del state["palette"]
    torch.save(state, tmp_path / "old.pt")
    assert model_from_checkpoint(tmp_path / "old.pt")[3] == list(PALETTE)


def test_data_check_refuses_different_class_lists(tmp_path, capsys):
    data = _folder_pair(tmp_path, target_classes=("sky", "tree", "car"))
    assert main(["data", "check", *data]) == 1
    out = capsys.readouterr()
    assert "list different classes" in out.out and "data check found errors" in out.err


def test_16_bit_grayscale_is_scaled_not_white(tmp_path):
    values = (np.arange(16 * 32).reshape(16, 32) * 128).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode.startswith("I")
    rgb = read_image(tmp_path / "g.png")
    expected = np.round(values / 257.0).astype(np.uint8)
    assert rgb.dtype == np.uint8 and np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(DataError, match=r"f\.tiff.*floating-point"):
        read_image(tmp_path / "f.tiff")


def test_jpg_label_is_named_and_histogram_is_in_class_order(tmp_path, capsys):
    data = _folder_pair(tmp_path)
    lab = tmp_path / "A" / "labels" / "train" / "img_000.png"
    Image.open(lab).convert("L").save(lab.with_suffix(".jpg"))
    lab.unlink()
    assert main(["data", "check", *data]) == 1
    out = capsys.readouterr().out
    assert "labels must be PNG" in out and "img_000.jpg" in out
    with pytest.raises(DataError, match="labels must be PNG"):
        from bida.data.listing import list_samples

        list_samples("folder", tmp_path / "A", "train")
    # class order in the histogram, whatever order the splits meet the classes in
    from bida.data.check import check_domain

    (tmp_path / "C" / "images" / "train").mkdir(parents=True)
    (tmp_path / "C" / "labels" / "train").mkdir(parents=True)
    (tmp_path / "C" / "classes.json").write_text(json.dumps({"classes": ["a", "b", "c"]}))
    for i, fill in enumerate((2, 0, 1)):
        Image.fromarray(np.full((4, 4), 255, np.uint8)).save(tmp_path / "C" / "images" / "train" / f"{i}.png")
        label = np.full((4, 4), fill, np.uint8)
        label[0, 0] = 255
        Image.fromarray(label).save(tmp_path / "C" / "labels" / "train" / f"{i}.png")
    md = check_domain("folder", tmp_path / "C", {"train": True}).to_markdown()
    rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "(" in line]
    assert rows == ["a", "b", "c", "(ignore)"]


def test_the_embedded_pair_is_reported_as_synthetic(tiny_overrides, capsys):
    assert main(["data", "check", "--quick", *tiny_overrides]) == 0
    out = capsys.readouterr().out
    assert "## source: synthetic at" in out and "# Data check: synthetic " in out and ": folder" not in out


# -------------------------------------------------------------------- predictions


def test_predict_keeps_every_output(folder_run, tmp_path, capsys):
    run, _, _ = folder_run
    ckpt = str(run / "checkpoints" / "last.pt")
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in ("a.png", "sub/a.png", "sub/b.jpg"):
        Image.fromarray(rng.integers(0, 255, (16, 32, 3), dtype=np.uint8)).save(imgs / name)
    out = tmp_path / "p"
    assert main(["predict", "--checkpoint", ckpt, str(imgs), "--out", str(out), "--quiet"]) == 0
    assert "wrote 3 predictions" in capsys.readouterr().out
    for name in ("a", "sub/a", "sub/b"):
        assert (out / f"{name}.png").is_file() and (out / f"{name}_overlay.png").is_file()
    # the same file twice is predicted once
    assert main(["predict", "--checkpoint", ckpt, str(imgs / "a.png"), str(imgs / "a.png"), "--out",
                 str(tmp_path / "q"), "--quiet"]) == 0
    assert "wrote 1 predictions" in capsys.readouterr().out
    # x.jpg and x.png would write the same files: refused, naming both, nothing written
    Image.fromarray(rng.integers(0, 255, (16, 32, 3), dtype=np.uint8)).save(imgs / "sub" / "a.jpg")
    assert main(["predict", "--checkpoint", ckpt, str(imgs), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "sub/a.jpg" in err and "sub/a.png" in err and not (tmp_path / "r").exists()


def test_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "photo.jpg")
    with pytest.raises(CheckpointError, match=r"photo\.jpg is not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "photo.jpg")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "photo.jpg")]) == 2
    err = capsys.readouterr().err
    assert "not a PyTorch checkpoint" in err and "could run code" not in err


# -------------------------------------------------------------------- command line


def test_public_modules_are_attributes_of_the_package():
    import bida

    assert callable(bida.losses.pixel_prototype_contrast) and bida.losses.__doc__
    # The public method modules expose the very functions of bida.method, and name each in __all__.
    for name in ("prototypes", "pseudo_labels", "losses"):
        public, home = importlib.import_module(f"bida.{name}"), importlib.import_module(f"bida.method.{name}")
        assert getattr(bida, name) is public and public.__all__ == home.__all__
        assert all(getattr(public, n) is getattr(home, n) for n in public.__all__)
    import bida.labels

    assert bida.labels.CITYSCAPES_CLASSES[0] == "road" and callable(bida.labels.colorize)
    # The list covers every public module and subpackage on disk, so it cannot go stale.
    package = Path(bida.__file__).parent
    modules = {p.stem for p in package.glob("*.py") if not p.stem.startswith("_")}
    modules |= {p.parent.name for p in package.glob("*/__init__.py")}
    assert modules == set(bida.PUBLIC_MODULES)
    for name in bida.PUBLIC_MODULES:
        assert getattr(bida, name).__name__ == f"bida.{name}"
    assert bida.Segmenter.__module__ == "bida.tools.segmenter"
    # Internal modules have one path: the old flat ones are gone.
    for old in ("train", "cli", "teacher", "weights", "deeplabv2"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"bida.{old}")
    with pytest.raises(AttributeError):
        bida.no_such_module  # noqa: B018


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


# -------------------------------------------------------------------- Ctrl-C


def _signal_at(monkeypatch, calls: dict[int, int]):
    """Send SIGINT from inside the source step on the given calls (call number -> count)."""
    real = bida.method.train_step.source_step
    seen = {"n": 0}

    def step(*a, **k):
        seen["n"] += 1
        for _ in range(calls.get(seen["n"], 0)):
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(bida.method.train_step, "source_step", step)


def test_ctrl_c_says_where_it_saves_and_saves_there(tmp_path, tiny_overrides, monkeypatch, capsys):
    _signal_at(monkeypatch, {3: 1})  # during step 3
    run = tmp_path / "r"
    assert main(["train", "--out", str(run), *tiny_overrides, "method=source_only", "train.checkpoint_every=100"]) == 130
    err = capsys.readouterr().err
    assert "stop requested (SIGINT): saving a checkpoint at step 3" in err and "again to stop at once" in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3


def test_second_ctrl_c_stops_at_once_keeping_the_last_checkpoint(tmp_path, tiny_overrides, monkeypatch, capsys):
    _signal_at(monkeypatch, {4: 2})  # twice during step 4; the last checkpoint is step 2
    run = tmp_path / "r"
    assert main(["train", "--out", str(run), *tiny_overrides, "method=source_only", "train.checkpoint_every=2"]) == 130
    err = capsys.readouterr().err
    assert "stopped at once by a second SIGINT during step 4" in err and "checkpoint of step 2 is kept" in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
    monkeypatch.undo()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0


def test_second_ctrl_c_during_a_save_waits_for_it(tmp_path, tiny_overrides, monkeypatch, capsys):
    real = bida.checkpoint.save_checkpoint
    sent = {"n": 0}

    def save(state, path):
        if state["step"] == 2 and not sent["n"]:
            sent["n"] = 1
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        real(state, path)

    monkeypatch.setattr(bida.checkpoint, "save_checkpoint", save)
    run = tmp_path / "r"
    assert main(["train", "--out", str(run), *tiny_overrides, "method=source_only", "train.checkpoint_every=2"]) == 130
    assert "after saving step 2" in capsys.readouterr().err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2


def test_resume_says_it_loads_the_static_labels(tmp_path, tiny_overrides, capsys):
    from bida.config import load_config
    from bida.engine.train import Trainer

    verbose = [o for o in tiny_overrides if o != "train.quiet=true"]
    run = tmp_path / "r"
    cfg = load_config(None, verbose + ["method=self_training", "train.iters=2", "train.rounds=1"])
    assert Trainer(cfg, run).fit(stop_after=3) is None  # stopped inside round 0, after its labels
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "loading static pseudo labels of round 0" in text and "generating static pseudo labels" not in text


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


# ---------------------------------------------------------------- a config error leaves nothing, resume says where

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


def test_resume_says_from_which_step_phase_and_iteration(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    from bida.config import load_config

    cfg = load_config(None, tiny_overrides + ["method=self_training", "train.iters=2", "train.rounds=1",
                                              "train.iters_per_round=4"])
    assert tr.Trainer(cfg, run).fit(stop_after=3) is None  # 2 source steps, then 1 of the round
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"bida: resuming from step 3 (phase 2 of 2: round, iteration 1 of 4) in {run}" in out, out
