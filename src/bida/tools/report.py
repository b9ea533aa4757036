"""Run reports: one self-contained HTML page comparing training runs.

:func:`write_report` reads run directories (``config.yaml``, ``run.json``, ``log.jsonl``,
``metrics.json``, ``checkpoints/last.pt``, ``pseudo_labels/round_R/stats.json``) and
writes ``OUT/index.html`` with its figures embedded (PNG data URIs; the same PNG files are
also written to ``OUT/figures/``). The page alone is the report: no other file, no scripts,
no external style sheets, no network; a table wider than the window (many runs or classes)
scrolls inside its own box. The first run is the
baseline that the others are compared with (as ``bida demo`` orders them: source-only
first). A section that a run cannot fill (no rounds, no target labels, no checkpoint) is
left out for that run with a note saying why.

The page is assembled here (:class:`_Page`, :func:`write_report`); what it reads from a run
is :mod:`bida.tools.report_runs`, its tables :mod:`bida.tools.report_tables` and its figures
:mod:`bida.tools.report_figures`.
"""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path
from typing import Sequence

import torch
from matplotlib.figure import Figure

from ..checkpoint import atomic_write_bytes, atomic_write_text
from ..errors import RunDirError
from .report_figures import _curves, _features, _load_models, _predictions, _pseudo
from .report_runs import load_runs
from .report_tables import _confusion, _e, _header, _iou


# --------------------------------------------------------------------------- page


class _Page:
    """HTML sections and the figures they reference."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.fig_dir = out_dir / "figures"
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        self.parts: list[str] = []
        self.toc: list[tuple[str, str]] = []

    def section(self, anchor: str, title: str) -> None:
        self.toc.append((anchor, title))
        self.parts.append(f'<h2 id="{anchor}">{_e(title)}</h2>')

    def add(self, text: str) -> None:
        self.parts.append(text)

    def note(self, text: str) -> None:
        self.parts.append(f'<p class="note">{_e(text)}</p>')

    def figure(self, fig: Figure, name: str, caption: str) -> None:
        path = self.fig_dir / f"{name}.png"
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100, bbox_inches="tight", facecolor="white")
        atomic_write_bytes(path, png.getvalue())  # a full disk leaves no empty or partial PNG
        # Embedded, so that index.html alone is the report (mailed, uploaded, opened from anywhere);
        # the PNG file stays beside it for slides and papers.
        uri = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode("ascii")
        self.parts.append(f'<figure><img src="{uri}" alt="{_e(caption)}" data-file="figures/{_e(path.name)}">'
                          f"<figcaption>{_e(caption)}</figcaption></figure>")

    def html(self, title: str) -> str:
        toc = " &middot; ".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in self.toc)
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
                f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1><nav>{toc}</nav>\n"
                + "\n".join(self.parts) + "\n</body></html>\n")


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1280px;padding:0 16px;color:#222}
h1{font-size:26px;margin-bottom:4px}h2{border-bottom:2px solid #ccc;padding-bottom:4px;margin-top:36px}
nav{color:#666;margin-bottom:16px}a{color:#1a5fb4}
table{border-collapse:collapse;margin:8px 0 16px;font-size:14px;display:block;max-width:100%;overflow-x:auto}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}td.path{white-space:normal;word-break:break-all;text-align:left}
td.up{background:#d8f0d2}td.down{background:#f6d3d0}tr.total td{font-weight:bold;border-top:2px solid #888}
figure{margin:8px 0 20px}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:13px}
.note{color:#8a5a00;background:#fff6e0;border-left:4px solid #e0a000;padding:4px 10px}
code{background:#f4f4f4;padding:0 3px}.row{display:flex;flex-wrap:wrap;gap:20px;align-items:flex-start}
.row figure{flex:1 1 360px;margin-top:8px}.grid{display:flex;flex-wrap:wrap;gap:12px}.grid figure{flex:1 1 560px}
"""


# --------------------------------------------------------------------------- entry point


REPORT_MARK = "Written by <code>bida report</code>"  # in the footer of every index.html it writes


def _not_report_file(out_dir: Path) -> str | None:
    """Why ``out_dir`` is not a bida report (naming a file --overwrite would clobber), or None."""
    index = out_dir / "index.html"
    if index.is_file():
        try:
            if REPORT_MARK not in index.read_text(errors="replace"):
                return f"{index} was not written by bida report"
        except OSError as err:
            return f"{index} cannot be read ({err.strerror or err})"
    for p in sorted(out_dir.iterdir()):
        if p.name == "figures" and p.is_dir():
            other = sorted(f for f in p.iterdir() if f.suffix != ".png" or not f.is_file())
            if other:
                return f"{other[0]} is not a report figure"
        elif p.name != "index.html":
            return f"{p} is not part of a bida report"
    return None


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out_dir`` without ``overwrite``; with it, drop the old figures only."""
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"report directory {out_dir} is a file")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise RunDirError(f"report directory {out_dir} already exists and is not empty; "
                              "use --overwrite to replace the report")
        foreign = _not_report_file(out_dir)
        if foreign is not None:  # checked before anything is removed
            raise RunDirError(f"refusing to --overwrite {out_dir}: {foreign}; remove it yourself or choose another --out")
        for old in (out_dir / "figures").glob("*.png"):
            old.unlink()
    try:
        (out_dir / "figures").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(f"report directory {out_dir} is not writable: {err.strerror or err}") from None


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, max_images: int = 6,
                 device: torch.device | str = "cpu", *, overwrite: bool = False, scan_images: int = 100,
                 feature_points: int = 1500, feature_images: int = 16) -> Path:
    """Write ``out_dir/index.html`` comparing ``run_dirs`` (the first is the baseline).

    Args:
        run_dirs: bida run directories, baseline first.
        out_dir: Report directory (created; must be empty unless ``overwrite``).
        max_images: Target validation images shown (half best, half worst of the last run).
        device: Where the checkpoints run for predictions and features.
        overwrite: Replace the report in a non-empty ``out_dir``.
        scan_images: How many validation images are ranked by the last run's per-image mIoU.
        feature_points: Pixel features in the t-SNE view (both domains together).
        feature_images: Images read per domain for features and prototypes.

    Returns:
        The path of ``index.html``.
    """
    runs = load_runs(run_dirs)
    out = Path(out_dir)
    prepare_out_dir(out, overwrite)
    page = _Page(out)
    class_names = list(runs[-1].meta.get("classes") or (runs[-1].final() or {}).get("per_class_iou", {}).keys())
    models = _load_models(runs, device)
    _header(page, runs)
    _iou(page, runs)
    _predictions(page, runs, models, max_images, scan_images, device)
    _curves(page, runs)
    _pseudo(page, runs)
    _features(page, runs, models, feature_points, feature_images, device)
    _confusion(page, runs, class_names)
    page.add(f'<p class="footer">{REPORT_MARK} on {_e(time.strftime("%Y-%m-%d %H:%M:%S"))}.</p>')
    index = out / "index.html"
    atomic_write_text(index, page.html("bida run report: " + ", ".join(run.name for run in runs)))
    return index
