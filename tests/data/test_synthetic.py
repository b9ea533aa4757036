"""The embedded synthetic domain pair: layout on disk, determinism, cache, domain gap."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bida.data import synthetic
from bida.data.synthetic import (CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, SyntheticSpec, default_cache_dir,
    ensure_synthetic, render_scene)
from bida.errors import ConfigError
from helpers import _bida, _env, _wait_for

SMALL = SyntheticSpec(num_train=8, num_val=4, height=32, width=64, seed=0)
VALID_IDS = set(range(19)) | {255}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return ensure_synthetic(SMALL, tmp_path_factory.mktemp("cache"))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, domain: str, kind: str, split: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted((root / domain / kind / split).glob("*.png"))]


def test_layout_is_the_folder_domain_layout(root):
    expected = {"manifest.json"}
    for domain in ("source", "target"):
        expected.add(f"{domain}/classes.json")
        for split, n in (("train", SMALL.num_train), ("val", SMALL.num_val)):
            for kind in ("images", "labels"):
                expected |= {f"{domain}/{kind}/{split}/{i:05d}.png" for i in range(n)}
    assert set(_files(root)) == expected
    assert root.parent.name.startswith("cache")  # directly under the cache dir
    assert "32x64" in root.name
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["spec"] == {"num_train": 8, "num_val": 4, "height": 32, "width": 64, "seed": 0}
    assert manifest["version"] == synthetic.GENERATOR_VERSION


def test_images_and_labels_are_valid(root):
    seen: set[int] = set()
    for domain in ("source", "target"):
        for split in ("train", "val"):
            img_paths = sorted((root / domain / "images" / split).glob("*.png"))
            lab_paths = sorted((root / domain / "labels" / split).glob("*.png"))
            assert [p.name for p in img_paths] == [p.name for p in lab_paths]
            for ip, lp in zip(img_paths, lab_paths):
                with Image.open(ip) as im, Image.open(lp) as lb:
                    assert im.mode == "RGB" and lb.mode == "L"
                    assert im.size == lb.size == (SMALL.width, SMALL.height)
                    values = set(np.unique(np.asarray(lb)).tolist())
                assert values <= VALID_IDS
                seen |= values
    assert len(seen - {255}) >= 8


def test_classes_json(root):
    for domain in ("source", "target"):
        meta = json.loads((root / domain / "classes.json").read_text())
        assert meta["classes"][:3] == ["road", "sidewalk", "building"]
        assert meta["classes"] == list(CITYSCAPES_CLASSES) and len(meta["classes"]) == 19
        assert meta["classes"][18] == "bicycle"
        assert meta["ignore_index"] == 255
        assert meta["palette"] == [list(c) for c in CITYSCAPES_PALETTE]
        assert meta["palette"][0] == [128, 64, 128] and meta["palette"][10] == [70, 130, 180]


def test_deterministic_and_seed_dependent(root, tmp_path):
    again = ensure_synthetic(SMALL, tmp_path / "a")
    assert again.name == root.name
    assert _files(again) == _files(root)
    other = ensure_synthetic(SyntheticSpec(num_train=2, num_val=1, height=32, width=64, seed=1), tmp_path / "b")
    for domain in ("source", "target"):
        a = (root / domain / "images" / "train" / "00000.png").read_bytes()
        b = (other / domain / "images" / "train" / "00000.png").read_bytes()
        assert a != b


def test_image_seeding_is_order_independent(root):
    # image i of split s of domain d comes from default_rng([seed, d, s, i])
    image, label = render_scene(np.random.default_rng([SMALL.seed, 1, 1, 3]), SMALL, "target")
    assert np.array_equal(np.asarray(Image.open(root / "target/images/val/00003.png")), image)
    assert np.array_equal(np.asarray(Image.open(root / "target/labels/val/00003.png")), label)
    image, label = render_scene(np.random.default_rng([SMALL.seed, 0, 0, 5]), SMALL, "source")
    assert np.array_equal(np.asarray(Image.open(root / "source/images/train/00005.png")), image)


def test_cache_is_reused(tmp_path):
    spec = SyntheticSpec(num_train=2, num_val=1, height=32, width=64)
    first = ensure_synthetic(spec, tmp_path)
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    second = ensure_synthetic(spec, tmp_path)
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in second.rglob("*")} == stamps
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary directories left


def test_other_parameters_get_their_own_directory(tmp_path):
    a = ensure_synthetic(SyntheticSpec(num_train=2, num_val=1, height=32, width=64), tmp_path)
    b = ensure_synthetic(SyntheticSpec(num_train=2, num_val=1, height=48, width=64), tmp_path)
    c = ensure_synthetic(SyntheticSpec(num_train=3, num_val=1, height=32, width=64), tmp_path)
    assert len({a, b, c}) == 3
    assert all(p.parent == tmp_path and (p / "manifest.json").is_file() for p in (a, b, c))
    assert Image.open(b / "source/images/train/00000.png").size == (64, 48)
    assert len(list((c / "target/images/train").glob("*.png"))) == 3


def test_mismatched_manifest_is_regenerated(tmp_path):
    spec = SyntheticSpec(num_train=2, num_val=1, height=32, width=64)
    root = ensure_synthetic(spec, tmp_path)
    good = (root / "manifest.json").read_text()
    bad = json.loads(good)
    bad["spec"]["num_train"] = 99
    (root / "manifest.json").write_text(json.dumps(bad))
    assert ensure_synthetic(spec, tmp_path) == root
    assert (root / "manifest.json").read_text() == good
    assert len(list((root / "source/images/train").glob("*.png"))) == 2


def test_lost_race_uses_the_winners_copy(tmp_path, monkeypatch):
    spec = SyntheticSpec(num_train=2, num_val=1, height=32, width=64)
    winner = ensure_synthetic(spec, tmp_path / "elsewhere")
    cache = tmp_path / "cache"
    real_rename = os.rename

    def rename(src, dst):  # another process finishes just before our rename
        shutil.copytree(winner, dst)
        real_rename(src, dst)

    monkeypatch.setattr(synthetic.os, "rename", rename)
    root = ensure_synthetic(spec, cache)
    assert root == cache / winner.name
    assert _files(root) == _files(winner)
    assert [p.name for p in cache.iterdir()] == [winner.name]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BIDA_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("BIDA_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "bida"


def test_render_scene_contract():
    spec = SyntheticSpec(height=40, width=72)
    for style in ("source", "target"):
        image, label = render_scene(np.random.default_rng(3), spec, style)
        assert image.shape == (40, 72, 3) and image.dtype == np.uint8
        assert label.shape == (40, 72) and label.dtype == np.uint8
        assert set(np.unique(label).tolist()) <= VALID_IDS
        assert label[0].tolist().count(10) > 0  # sky at the top
        assert np.mean(label[-1] == 0) > 0.2  # road at the bottom
    with pytest.raises(ValueError):
        render_scene(np.random.default_rng(0), spec, "cartoon")


@pytest.mark.parametrize("kwargs", [dict(num_train=0), dict(num_val=-1), dict(height=8), dict(seed=-1),
                                    dict(width=64.0), dict(num_train=True)])
def test_bad_spec(kwargs):
    with pytest.raises(ConfigError):
        SyntheticSpec(**kwargs)


def test_domain_gap_is_in_colour_not_layout():
    spec = SyntheticSpec(height=32, width=64)
    stats = {}
    for d, style in enumerate(("source", "target")):
        pairs = [render_scene(np.random.default_rng([7, d, 0, i]), spec, style) for i in range(40)]
        images = np.stack([p[0] for p in pairs]).astype(np.float64)
        labels = np.stack([p[1] for p in pairs])
        stats[style] = {
            c: (images[labels == c].mean(0), np.mean(labels == c)) for c in range(19) if np.any(labels == c)
        }
    common = set(stats["source"]) & set(stats["target"])
    assert len(common) >= 10
    moved = [c for c in common if np.linalg.norm(stats["source"][c][0] - stats["target"][c][0]) > 25]
    assert len(moved) >= 6, moved
    road, sky = 0, 10
    for c in (road, sky):
        assert abs(stats["source"][c][1] - stats["target"][c][1]) < 0.05
        assert stats["target"][c][1] > 0.08
    # colour is still informative in the target: road is darker than sky and sidewalk
    assert stats["target"][road][0].mean() < stats["target"][sky][0].mean()
    assert stats["target"][road][0].mean() < stats["target"][1][0].mean()


@pytest.mark.slow
def test_sigterm_while_the_synthetic_data_is_generated_leaves_nothing(tmp_path, tiny_overrides):
    # before: the process died by SIGTERM and left cache/synthetic-....tmp-<pid>/ for good
    cache = tmp_path / "cache"
    overrides = [o for o in tiny_overrides if not o.startswith("data.synthetic.cache_dir")]
    run = tmp_path / "run"
    proc = _bida(["train", *overrides, f"data.synthetic.cache_dir={cache}", "--out", str(run)],
                 _env(tmp_path, "data.synthetic:render_scene:slow"))
    _wait_for(lambda: (tmp_path / "started-rank0").exists(), [proc], what="generation")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == f"bida: stopped by SIGTERM before the run started; nothing was written to {run}"
    assert "Traceback" not in err and not run.exists()
    assert list(cache.iterdir()) == []


def test_a_generation_killed_outright_is_cleaned_up_by_the_next_one(tmp_path):
    # before: a SIGKILLed generation's .tmp-<pid> directory stayed in the cache for ever
    from bida.data.synthetic import SyntheticSpec, _root_name, ensure_synthetic

    spec = SyntheticSpec(num_train=2, num_val=1, height=32, width=64)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f"{_root_name(spec)}.tmp-{int(dead.stdout)}"
    (leftover / "source").mkdir(parents=True)
    live = tmp_path / f"{_root_name(spec)}.tmp-{os.getppid()}"  # a live process's generation is left alone
    live.mkdir()
    root = ensure_synthetic(spec, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([root.name, live.name])
