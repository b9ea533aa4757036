"""The HTML run report (bida.tools.report) and the feature sampler behind its feature view."""

from __future__ import annotations

import base64
import builtins
import errno
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bida.config import load_config
from bida.data.datasets import build_eval_dataset, resolve_domain
from bida.engine.train import train
from bida.errors import RunDirError
from bida.prototypes import downsample_labels
from bida.tools.cli import main
from bida.tools.features import SOURCE, TARGET, prototype_distances, sample_features
from bida.tools.predict import model_from_checkpoint
from bida.tools.report import write_report
from helpers import TINY_RUN, _one_line_trust, _tree, fill_disk, stopped_run  # noqa: F401 (fixtures)

TINY = [
    "data.synthetic.num_train=8", "data.synthetic.num_val=4", "data.synthetic.num_test=2", "data.synthetic.height=32",
    "data.synthetic.width=64", "data.crop=[32,64]", "model.width=0.125", "train.iters=6",
    "train.log_every=1", "train.quiet=true", "train.checkpoint_every=100",
]
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On small shared CPUs, torch's second intra-op thread made these tiny forward passes
    # 5-100x slower (spinning workers); one thread keeps the module within seconds.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_cache) -> list[Path]:
    """A source-only run and a two-round BiDA run started from it."""
    root = tmp_path_factory.mktemp("report-runs")
    base = TINY + [f"data.synthetic.cache_dir={synthetic_cache}"]
    train(load_config(None, base + ["method=source_only"]), root / "source_only")
    init = root / "source_only" / "checkpoints" / "last.pt"
    train(load_config(None, base + ["method=bida", f"model.init_checkpoint={init}", "train.iters_per_round=3",
                                    "train.rounds=2"]), root / "bida")
    return [root / "source_only", root / "bida"]


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report"
    return write_report(runs, out, max_images=4, feature_points=200, feature_images=4)


def _img_sources(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]+)"', page)


@pytest.mark.slow
def test_page_and_every_figure_exist(report):
    page = report.read_text()
    assert report.name == "index.html" and len(page) > 1000
    figures = sorted((report.parent / "figures").glob("*.png"))
    names = {f.stem for f in figures}
    assert {"curves_source_only", "curves_bida", "iou_bars", "confusion_source_only", "confusion_bida",
            "predictions", "pseudo_bida", "tsne", "prototype_distance"} <= names
    assert "pseudo_source_only" not in names  # no rounds: a note instead
    for f in figures:
        assert f.stat().st_size > 1000
        with Image.open(f) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    # every figure is on the page, embedded: the bytes of its PNG file, no relative path to follow
    sources = _img_sources(page)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    embedded = sorted(base64.b64decode(s.split(",", 1)[1]) for s in sources)
    assert embedded == sorted(f.read_bytes() for f in figures)


def test_index_html_alone_is_the_report_and_its_tables_scroll_in_their_box(report):
    page = report.read_text()
    assert _img_sources(page) and not [s for s in _img_sources(page) if not s.startswith("data:")]
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", page)  # nothing relative to the folder
    css = page[page.index("<style>"):page.index("</style>")]
    rule = re.search(r"(?:^|[}\n])table\{([^}]*)\}", css)
    assert rule and {"display:block", "max-width:100%", "overflow-x:auto"} <= set(rule[1].split(";"))
    assert "max-width:1280px" in css  # the page itself fits a 1280-pixel window


@pytest.mark.slow
def test_page_compares_runs_per_class(report, runs):
    import json

    page = report.read_text()
    classes = json.loads((runs[0] / "run.json").read_text())["classes"]
    start = page.index('<h2 id="iou"')
    table = page[start:page.index("<h2", start + 1)]
    for name in classes:
        assert f"<td>{name}</td>" in table
    for run in ("source_only", "bida"):
        assert f"<td>{run}</td>" in page  # header table
    assert "source_only (baseline)" in table and "Δ bida" in table
    assert 'class="up"' in table or 'class="down"' in table or "+0.0" in table
    assert "source_only: no self-training rounds" in page
    git = json.loads((runs[1] / "run.json").read_text())["git_revision"]
    assert (git or "unknown")[:12] in page


@pytest.mark.slow
def test_page_reports_the_test_split_with_val_apart(report, runs):
    import json

    page = report.read_text()
    assert "Per-class IoU on the target test set" in page and "Confusion matrices (target test)" in page
    header = page[page.index('<h2 id="runs"'):page.index('<h2 id="iou"')]
    assert "target test mIoU (last)" in header and "target val mIoU (last)" in header
    start = page.index('<h2 id="iou"')
    table = page[start:page.index("<h2", start + 1)]
    for run in runs:
        m = json.loads((run / "metrics.json").read_text())
        assert f"<td>{100 * m['test']['mIoU']:.1f}</td>" in header and f"<td>{100 * m['mIoU']:.1f}</td>" in header
    base = json.loads((runs[0] / "metrics.json").read_text())["test"]["mIoU"]
    assert f"<td>{100 * base:.1f}</td>" in table.split("mIoU</td>")[-1]  # the table's mIoU row: test


@pytest.mark.slow
def test_page_has_no_external_resources(report):
    page = report.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()


@pytest.mark.slow
def test_section_without_target_labels_is_left_out_with_a_note(runs, tmp_path):
    run = tmp_path / "no_val"
    shutil.copytree(runs[0], run, ignore=shutil.ignore_patterns("best.pt", "tensorboard"))
    cfg = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(cfg.replace("val_split: val", "val_split: null"))
    page = write_report([run], tmp_path / "out", feature_points=50, feature_images=2).read_text()
    assert page.count("No labelled target validation images") == 2  # predictions and features
    assert not (tmp_path / "out" / "figures" / "predictions.png").exists()
    assert not (tmp_path / "out" / "figures" / "tsne.png").exists()
    files = re.findall(r'<img[^>]*\sdata-file="([^"]+)"', page)  # each embedded figure's PNG beside the page
    assert files and all((tmp_path / "out" / f).is_file() for f in files)


@pytest.mark.slow
def test_cli_refuses_to_overwrite(runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["report", str(runs[0]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) == 2
    assert "not a bida run directory" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_cli_writes_the_report(runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", str(runs[0]), "--out", str(out), "--max-images", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    assert (out / "index.html").is_file() and (out / "figures" / "predictions.png").is_file()
    assert main(["report", str(runs[0]), "--out", str(out), "--max-images", "2", "--overwrite"]) == 0


@pytest.fixture(scope="module")
def model_and_data(runs):
    model, cfg, names, _ = model_from_checkpoint(runs[1] / "checkpoints" / "last.pt")
    src = build_eval_dataset(cfg, resolve_domain(cfg, "source"), "train")
    tgt = build_eval_dataset(cfg, resolve_domain(cfg, "target"), "val")
    return model, src, tgt, len(names)


def _pixel_counts(model, ds, k: int, max_images: int) -> np.ndarray:
    """Labelled pixels per class at the feature size, counted independently of the sampler."""
    counts = np.zeros(k, np.int64)
    for i in range(min(len(ds), max_images)):
        item = ds[i]
        with torch.no_grad():
            size = model(item["image"][None]).features.shape[-2:]
        y = downsample_labels(item["label"][None], tuple(size)).numpy()
        counts += np.bincount(y[y < k], minlength=k)
    return counts


def test_sample_features_are_balanced_and_bounded(model_and_data):
    model, src, tgt, k = model_and_data
    s = sample_features(model, src, tgt, k, max_points=120, max_images=3)
    n = len(s["features"])
    assert 0 < n <= 120
    assert s["features"].shape == (n, model.feature_dim) and s["features"].dtype == np.float32
    assert s["labels"].shape == s["domain"].shape == (n,)
    assert set(np.unique(s["domain"])) == {SOURCE, TARGET}
    for code, ds, suffix in ((SOURCE, src, "src"), (TARGET, tgt, "tgt")):
        available = _pixel_counts(model, ds, k, 3)
        np.testing.assert_array_equal(s[f"present_{suffix}"], available > 0)
        got = np.bincount(s["labels"][s["domain"] == code], minlength=k)
        quota = 60 // int((available > 0).sum())
        # every present class gets its equal share, or all its pixels when it has fewer
        np.testing.assert_array_equal(got, np.minimum(available, quota))
        assert got.sum() <= 60
    again = sample_features(model, src, tgt, k, max_points=120, max_images=3)
    np.testing.assert_array_equal(again["features"], s["features"])


def test_prototype_distances_in_range(model_and_data):
    model, src, tgt, k = model_and_data
    s = sample_features(model, src, tgt, k, max_points=20, max_images=2)
    d = prototype_distances(s["prototypes_src"], s["present_src"], s["prototypes_tgt"], s["present_tgt"])
    both = s["present_src"] & s["present_tgt"]
    assert d.shape == (k,) and both.any()
    assert np.all((d[both] >= 0) & (d[both] <= 2)) and np.isnan(d[~both]).all()
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    q = torch.tensor([[2.0, 0.0], [0.0, -1.0], [-1.0, 1.0]])
    np.testing.assert_allclose(prototype_distances(p, [True] * 3, q, [True] * 3), [0.0, 2.0, 1.0], atol=1e-7)


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs headless Chromium at /usr/bin/chromium")
def test_page_renders_in_headless_chromium(report, tmp_path):
    """index.html copied alone (its figures embedded) renders in a 1280-pixel window."""
    alone = tmp_path / "alone" / "index.html"
    alone.parent.mkdir()
    alone.write_bytes(report.read_bytes())
    report = alone
    shot = tmp_path / "shot.png"
    subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
                    report.resolve().as_uri()], capture_output=True, timeout=60, check=False)
    assert shot.is_file() and shot.stat().st_size > 0
    with Image.open(shot) as im:
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is None or len(colors) > 50  # None: more colours than maxcolors


def test_prototype_alignment_hand_example():
    from bida.tools.features import prototype_alignment

    src = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    tgt = np.array([[1.0, 0.1], [1.0, 0.0], [0.0, 0.0]])  # class 1's target sits on class 0's source
    a = prototype_alignment(src, np.array([True, True, False]), tgt, np.array([True, True, True]))
    cos01 = 0.1 / np.hypot(1.0, 0.1)
    assert np.isclose(a["margin"][0], 1 / np.hypot(1.0, 0.1) - cos01)  # own minus class 1 (class 2 absent in source)
    assert np.isclose(a["margin"][1], 0.0 - 1.0) and np.isnan(a["margin"][2])
    assert a["nearest_own"][:2].tolist() == [1.0, 0.0] and a["num_classes"] == 2
    assert np.isclose(a["nearest_own_share"], 0.5)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("bida: error:") and "\n" not in err, err
    return err


def test_full_disk_in_the_report_names_the_figure_and_leaves_no_empty_png(tmp_path, capsys, synthetic_cache,
                                                                          monkeypatch):
    # before: one line without a file name, and a 0-byte figures/iou_bars.png
    from bida.config import load_config
    from bida.engine.train import train

    run, out = tmp_path / "run", tmp_path / "report"
    train(load_config(None, [*TINY_RUN, "train.iters=2", f"data.synthetic.cache_dir={synthetic_cache}"]), run)
    with monkeypatch.context() as m:
        fill_disk(m, lambda p: out in p.parents, budget=0)
        assert main(["report", str(run), "--out", str(out), "--max-images", "1"]) == 2
    err = _one_line(capsys)
    assert "No space left on device" in err and str(out / "figures") in err and ".png" in err, err
    assert list((out / "figures").iterdir()) == []  # no empty, partial or temporary file
    assert not (out / "index.html").exists()


def test_report_overwrite_replaces_only_a_bida_report(stopped_run, tmp_path, capsys):
    # before: --overwrite replaced any index.html and deleted any figures/*.png
    from bida.tools.report import prepare_out_dir

    site = tmp_path / "site"
    (site / "figures").mkdir(parents=True)
    (site / "index.html").write_text("<html>my page</html>")
    (site / "figures" / "plot.png").write_bytes(b"png")
    before = _tree(site)
    assert main(["report", str(stopped_run), "--out", str(site), "--overwrite"]) == 2
    err = _one_line_trust(capsys)
    assert str(site / "index.html") in err and "not written by bida report" in err, err
    assert _tree(site) == before
    (site / "index.html").write_text("<p>Written by <code>bida report</code> on today</p>")
    (site / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="notes.txt is not part of a bida report"):
        prepare_out_dir(site, overwrite=True)
    (site / "notes.txt").unlink()
    prepare_out_dir(site, overwrite=True)  # a report of bida: its old figures go
    assert not (site / "figures" / "plot.png").exists()
