"""Run reports: one self-contained HTML page comparing training runs.

:func:`write_report` reads run directories (``config.yaml``, ``run.json``, ``log.jsonl``,
``metrics.json``, ``checkpoints/last.pt``, ``pseudo_labels/round_R/stats.json``) and
writes ``OUT/index.html`` with its figures as PNG files in ``OUT/figures/``. The page
needs nothing else: no scripts, no external style sheets, no network. The first run is the
baseline that the others are compared with (as ``bida demo`` orders them: source-only
first). A section that a run cannot fill (no rounds, no target labels, no checkpoint) is
left out for that run with a note saying why.

Figures are drawn on :class:`matplotlib.figure.Figure` objects, which render with the Agg
backend without touching pyplot's global state.
"""

from __future__ import annotations

import html
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..checkpoint import atomic_write_bytes, atomic_write_text
from ..config import Config, load_config
from ..errors import BidaError, RunDirError

NEUTRAL_POINTS = 0.05  # IoU differences below 0.05 points are not coloured
SOURCE_MARKER, TARGET_MARKER = "o", "^"


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    """What a run directory holds, read once."""

    name: str
    slug: str  # unique, file-name safe: figures/curves_<slug>.png
    path: Path
    cfg: Config
    meta: dict  # run.json
    records: list[dict]  # log.jsonl
    metrics: dict | None  # metrics.json (None while the run is unfinished)

    @property
    def checkpoint(self) -> Path | None:
        path = self.path / "checkpoints" / "last.pt"
        return path if path.is_file() else None

    def final(self) -> dict | None:
        """Final target metrics: ``metrics.json``, else the last evaluation in the log."""
        if self.metrics is not None and _finite(self.metrics.get("mIoU")):
            return self.metrics
        evals = [r for r in self.records if "eval/mIoU" in r]
        if not evals:
            return None
        last = evals[-1]
        return {"mIoU": last["eval/mIoU"], "pixel_acc": last.get("eval/pixel_acc", float("nan")),
                "per_class_iou": {k[len("eval/iou/"):]: v for k, v in last.items() if k.startswith("eval/iou/")},
                "from_log": True}

    def test(self) -> dict | None:
        """Target-test metrics of the last checkpoint (``metrics.json["test"]``), None without a test split."""
        test = (self.metrics or {}).get("test")
        return test if isinstance(test, dict) and _finite(test.get("mIoU")) else None

    def best(self) -> tuple[float, int] | None:
        """(best target mIoU, its step) over the run's evaluations."""
        best = (self.metrics or {}).get("best") or {}
        if isinstance(best.get("mIoU"), (int, float)) and best["mIoU"] >= 0:
            return float(best["mIoU"]), int(best.get("step", -1))
        evals = [(r["eval/mIoU"], r["step"]) for r in self.records if _finite(r.get("eval/mIoU"))]
        return max(evals) if evals else None

    def rounds(self) -> list[dict]:
        """Per-round static pseudo-label statistics (log records, else stats.json files)."""
        found = {r["round"]: r for r in self.records if "pseudo/per_class" in r}
        for stats_path in sorted((self.path / "pseudo_labels").glob("round_*/stats.json")):
            r = int(stats_path.parent.name.split("_")[-1])
            stats = _read_json(stats_path)
            if r not in found and stats and "per_class" in stats:
                found[r] = {"round": r, "pseudo/static_accuracy": stats.get("accuracy"),
                            "pseudo/static_coverage": stats.get("coverage"), "pseudo/per_class": stats["per_class"]}
        return [found[r] for r in sorted(found)]

    def method_label(self) -> str:
        m = self.cfg.method
        mic = " + MIC" if self.cfg.mic.weight > 0 else ""
        if m.name != "bida":
            return m.name + mic
        off = [part for part in ("t2s", "s2t", "dynamic_labels", "calibration") if not getattr(m, part)]
        return "bida" + (f" (without {', '.join(off)})" if off else "") + mic


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_log(path: Path) -> list[dict]:
    """The records of ``log.jsonl``; a half-written last line (a killed run) is skipped."""
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def load_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    """Read every run directory; display names are the directory names (made unique)."""
    if not run_dirs:
        raise BidaError("no run directories given")
    paths = [Path(p) for p in run_dirs]
    for p in paths:
        if not (p / "config.yaml").is_file():
            raise RunDirError(f"{p} is not a bida run directory (no config.yaml)")
    names = [p.resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]
    names = [n if names.count(n) == 1 else f"{n} #{i + 1}" for i, n in enumerate(names)]
    classes = {tuple(meta["classes"]) for p in paths if (meta := _read_json(p / "run.json")) and meta.get("classes")}
    if len(classes) > 1:
        raise BidaError("the runs were trained on different class sets; a report compares runs of one domain pair")
    slugs = [_slug(n) for n in names]
    slugs = [s if slugs.count(s) == 1 else f"{s}_{i + 1}" for i, s in enumerate(slugs)]
    return [Run(name, slug, p, load_config(p / "config.yaml"), _read_json(p / "run.json") or {},
                read_log(p / "log.jsonl"), _read_json(p / "metrics.json")) for name, slug, p in zip(names, slugs, paths)]


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
        rel = f"figures/{path.name}"
        self.parts.append(f'<figure><img src="{_e(rel)}" alt="{_e(caption)}"><figcaption>{_e(caption)}</figcaption></figure>')

    def html(self, title: str) -> str:
        toc = " &middot; ".join(f'<a href="#{a}">{_e(t)}</a>' for a, t in self.toc)
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
                f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1><nav>{toc}</nav>\n"
                + "\n".join(self.parts) + "\n</body></html>\n")


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1280px;padding:0 16px;color:#222}
h1{font-size:26px;margin-bottom:4px}h2{border-bottom:2px solid #ccc;padding-bottom:4px;margin-top:36px}
nav{color:#666;margin-bottom:16px}a{color:#1a5fb4}
table{border-collapse:collapse;margin:8px 0 16px;font-size:14px}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}th{background:#f0f0f0}
td:first-child,th:first-child{text-align:left}td.path{white-space:normal;word-break:break-all;text-align:left}
td.up{background:#d8f0d2}td.down{background:#f6d3d0}tr.total td{font-weight:bold;border-top:2px solid #888}
figure{margin:8px 0 20px}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:13px}
.note{color:#8a5a00;background:#fff6e0;border-left:4px solid #e0a000;padding:4px 10px}
code{background:#f4f4f4;padding:0 3px}.row{display:flex;flex-wrap:wrap;gap:20px;align-items:flex-start}
.row figure{flex:1 1 360px;margin-top:8px}.grid{display:flex;flex-wrap:wrap;gap:12px}.grid figure{flex:1 1 560px}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or not _finite(value) else f"{100 * value:.{digits}f}"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "run"


def _table(header: Sequence[str], rows: Iterable[Sequence[tuple[str, str]]], total_last: bool = False) -> str:
    """HTML table; each cell is (text, css class)."""
    rows = list(rows)
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for i, row in enumerate(rows):
        cls = ' class="total"' if total_last and i == len(rows) - 1 else ""
        out.append(f"<tr{cls}>" + "".join(f'<td class="{c}">{_e(t)}</td>' if c else f"<td>{_e(t)}</td>" for t, c in row) + "</tr>")
    return "\n".join(out) + "</table>"


def _delta_cell(delta: float | None, lower_is_better: bool = False, scale: float = 100.0, digits: int = 1) -> tuple[str, str]:
    if delta is None or not _finite(delta):
        return "", ""
    points = scale * delta
    good = points < 0 if lower_is_better else points > 0
    cls = "" if abs(points) < NEUTRAL_POINTS * (scale / 100.0) else ("up" if good else "down")
    return f"{points:+.{digits}f}", cls


def _colors(palette: Sequence[Sequence[int]], k: int) -> list[tuple[float, float, float]]:
    return [tuple(c / 255.0 for c in palette[i]) for i in range(k)]


# --------------------------------------------------------------------------- sections


def _on_test(runs: list[Run]) -> bool:
    """Whether every run has target-test figures: then the report compares runs on them."""
    return bool(runs) and all(run.test() is not None for run in runs)


def _reported(run: Run, on_test: bool) -> dict | None:
    """The figures the report compares: target test (``on_test``), else target val."""
    return run.test() if on_test else run.final()


def _header(page: _Page, runs: list[Run]) -> None:
    page.section("runs", "Runs")
    rows = []
    for run in runs:
        final, best, test = run.final(), run.best(), run.test()
        rev = run.meta.get("git_revision") or "unknown"
        steps = max((r["step"] for r in run.records), default=0)
        rows.append([(run.name, ""), (run.method_label(), ""),
                     (_pct(test["mIoU"]) if test else "n/a", ""),
                     (_pct(final["mIoU"]) if final else "n/a", ""),
                     (f"{_pct(best[0])} (step {best[1]})" if best else "n/a", ""),
                     (_pct(final.get("pixel_acc")) if final else "n/a", ""), (str(steps), ""),
                     (rev[:12], ""), (str(run.meta.get("started", "")).replace("T", " "), ""), (str(run.path), "path")])
    page.add(_table(["run", "method", "target test mIoU (last)", "target val mIoU (last)", "best on val",
                     "val pixel acc", "steps", "git revision", "started", "directory"], rows))
    page.add('<p>Numbers in percent. "test" is the target test split (data.target.test_split): images that no '
             'training step, pseudo label, best.pt or choice ever saw, evaluated once on the last checkpoint; '
             'it is the number to report. "last" is the final checkpoint; "best" is selected on the target '
             'validation set itself, as the official code does.'
             + (" The per-class IoU and the confusion matrices below are on the test split." if _on_test(runs) else
                " Not every run has a test split: the sections below use target val.") + '</p>')
    for run in runs:
        final = run.final()
        if final is None:
            page.note(f"{run.name}: no target evaluation in metrics.json or log.jsonl.")
        elif final.get("from_log"):
            page.note(f"{run.name}: no metrics.json (unfinished run?); its numbers come from the last evaluation in log.jsonl.")


def _curves(page: _Page, runs: list[Run]) -> None:
    page.section("curves", "Training curves")
    for run in runs:
        train = [r for r in run.records if "lr" in r]
        if not train:
            page.note(f"{run.name}: log.jsonl has no training records.")
            continue
        fig = Figure(figsize=(15, 3.6), layout="constrained")
        ax_loss, ax_lr, ax_miou = fig.subplots(1, 3)
        keys = sorted({k for r in train for k in r if k.startswith("loss/")})
        positive = True
        for key in keys:
            pts = [(r["step"], r[key]) for r in train if _finite(r.get(key))]
            if pts:
                ax_loss.plot(*zip(*pts), label=key[len("loss/"):], lw=1.2)
                positive = positive and min(v for _, v in pts) > 0
        if positive and keys:
            ax_loss.set_yscale("log")
        ax_loss.set_title("losses")
        ax_loss.legend(fontsize=8, ncol=2)
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:gray")
        ax_lr.set_title(f"learning rate (backbone; head ×{run.cfg.train.head_lr_mult:g})")
        evals = [(r["step"], 100 * r["eval/mIoU"]) for r in run.records if _finite(r.get("eval/mIoU"))]
        if evals:
            ax_miou.plot(*zip(*evals), marker="o", color="tab:green")
        else:
            ax_miou.text(0.5, 0.5, "no target evaluation logged", ha="center", va="center", transform=ax_miou.transAxes)
        ax_miou.set_title("target val mIoU (%)")
        round_starts = sorted({r["step"] for r in run.records if "pseudo/per_class" in r})
        for ax in (ax_loss, ax_lr, ax_miou):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            for s in round_starts:
                ax.axvline(s, color="k", ls=":", lw=0.8)
        fig.suptitle(f"{run.name} ({run.method_label()})", fontsize=12)
        caption = f"{run.name}: losses, learning rate and target mIoU" + (
            "; dotted lines mark the start of each self-training round" if round_starts else "")
        page.figure(fig, f"curves_{run.slug}", caption)


def _iou(page: _Page, runs: list[Run]) -> None:
    on_test = _on_test(runs)
    page.section("iou", f"Per-class IoU on the target {'test' if on_test else 'validation'} set")
    finals = [(run, _reported(run, on_test)) for run in runs]
    have = [(run, f) for run, f in finals if f is not None]
    for run, f in finals:
        if f is None:
            page.note(f"{run.name}: no target evaluation (no metrics.json and no eval records); left out of the comparison.")
    if not have:
        return
    classes: list[str] = []
    for _, f in have:
        classes += [c for c in f["per_class_iou"] if c not in classes]
    base = have[0][1]
    header = ["class", f"{have[0][0].name} (baseline)"]
    for run, _ in have[1:]:
        header += [run.name, f"Δ {run.name}"]
    rows = []
    for c in classes + ["mIoU"]:
        get = (lambda f: f.get("mIoU")) if c == "mIoU" else (lambda f, c=c: f["per_class_iou"].get(c))
        row = [(c, ""), (_pct(get(base)), "")]
        for _, f in have[1:]:
            value, ref = get(f), get(base)
            row += [(_pct(value), ""), _delta_cell(value - ref if _finite(value) and _finite(ref) else None)]
        rows.append(row)
    page.add("<p>IoU in percent; Δ in points against the first run (green: better, red: worse). "
             "n/a: the class is in neither the ground truth nor the prediction.</p>")
    page.add('<div class="row">' + _table(header, rows, total_last=True))
    # Horizontal bars, classes top to bottom like the table beside it.
    # Horizontal bars, classes top to bottom like the table beside it; classes without an
    # IoU in any run (absent from the validation set) are left out of the chart only.
    shown = [c for c in classes if any(_finite(f["per_class_iou"].get(c)) for _, f in have)] or classes
    fig = Figure(figsize=(6.5, max(3.5, 0.08 * len(shown) * len(have) + 1.5)), layout="constrained")
    ax = fig.subplots()
    height = 0.8 / len(have)
    y = np.arange(len(shown))
    for i, (run, f) in enumerate(have):
        vals = [100 * v if _finite(v := f["per_class_iou"].get(c)) else 0.0 for c in shown]
        ax.barh(y + (i - (len(have) - 1) / 2) * height, vals, height, label=f"{run.name} (mIoU {_pct(f['mIoU'])})")
    ax.set_yticks(y, shown)
    ax.invert_yaxis()
    ax.set_xlabel("IoU (%)")
    ax.set_xlim(0, 100)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside upper center", ncol=min(3, len(have)), fontsize=9)
    page.figure(fig, "iou_bars", "Per-class target IoU of every run (classes with no IoU in any run left out)")
    page.add("</div>")


def _confusion(page: _Page, runs: list[Run], class_names: Sequence[str]) -> None:
    on_test = _on_test(runs)
    page.section("confusion", f"Confusion matrices (target {'test' if on_test else 'val'})")
    figs = []
    for run in runs:
        conf = ((run.test() if on_test else run.metrics) or {}).get("confusion")
        if not conf:
            page.note(f"{run.name}: metrics.json holds no confusion matrix.")
            continue
        conf = np.asarray(conf, dtype=np.float64)
        k = conf.shape[0]
        names = list(class_names) if len(class_names) == k else [str(i) for i in range(k)]
        rows = conf.sum(1, keepdims=True)
        norm = np.divide(conf, rows, out=np.full_like(conf, np.nan), where=rows > 0)
        fig = Figure(figsize=(0.38 * k + 2.5, 0.38 * k + 2), layout="constrained")
        ax = fig.subplots()
        im = ax.imshow(norm, cmap=colormaps["Blues"].with_extremes(bad="#e8e8e8"), vmin=0, vmax=1)
        ax.set_xticks(range(k), names, rotation=90, fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        ax.set_xlabel("prediction")
        ax.set_ylabel("ground truth")
        if k <= 25:
            for i in range(k):
                for j in range(k):
                    if _finite(norm[i, j]) and norm[i, j] >= 0.01:
                        ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=6,
                                color="white" if norm[i, j] > 0.5 else "black")
        fig.colorbar(im, ax=ax, shrink=0.7, label="fraction of the ground-truth row")
        ax.set_title(run.name)
        figs.append((fig, run))
    if figs:
        page.add('<div class="grid">')
        for fig, run in figs:
            page.figure(fig, f"confusion_{run.slug}",
                        f"{run.name}: row-normalised confusion (percent of each ground-truth class; grey rows: class absent)")
        page.add("</div>")


def _load_models(runs: list[Run], device) -> dict[str, tuple]:
    from .predict import model_from_checkpoint

    return {run.name: model_from_checkpoint(run.checkpoint, device=device) for run in runs if run.checkpoint}


def _target_val(cfg: Config):
    """(domain, labelled target-val dataset) or a reason why there is none."""
    from ..data.datasets import build_eval_dataset, resolve_domain

    if not cfg.data.target.val_split:
        return None, "data.target.val_split is not set"
    try:
        dom = resolve_domain(cfg, "target")
        return (dom, build_eval_dataset(cfg, dom, cfg.data.target.val_split)), ""
    except BidaError as err:
        return None, str(err)


@torch.no_grad()
def _predict(model, cfg: Config, item: dict, k: int, device) -> np.ndarray:
    from ..engine.evaluate import predict_probs

    x = item["image"].unsqueeze(0).to(device)
    return predict_probs(model, x, cfg.eval, k, tuple(item["label"].shape[-2:])).argmax(1)[0].cpu().numpy().astype(np.uint8)


def _image_miou(pred: np.ndarray, label: torch.Tensor, names: Sequence[str], cfg: Config, ignore: int) -> float:
    from ..engine.evaluate import confusion_matrix, metrics_from_confusion

    conf = confusion_matrix(torch.from_numpy(pred.astype(np.int64)), label, len(names), ignore)
    return metrics_from_confusion(conf, names, cfg.data.eval_classes)["mIoU"]


def _predictions(page: _Page, runs: list[Run], models: dict, max_images: int, scan_images: int, device) -> None:
    from ..data.labels import colorize

    page.section("predictions", "Target validation predictions")
    for run in runs:
        if run.name not in models:
            page.note(f"{run.name}: no checkpoints/last.pt; left out of the predictions and the feature view.")
    last = runs[-1]
    if last.name not in models:
        page.note(f"{last.name} has no checkpoints/last.pt: cannot rank the validation images.")
        return
    found, why = _target_val(last.cfg)
    if found is None:
        page.note(f"No labelled target validation images ({why}).")
        return
    dom, ds = found
    names, ignore = list(dom.classes.names), dom.classes.ignore_index
    k = len(names)
    model_last, cfg_last = models[last.name][0], models[last.name][1]
    n_scan = min(len(ds), scan_images)
    n_show = min(max_images, n_scan)
    if n_show <= 0:
        page.note("max_images is 0: no images shown.")
        return
    scores = np.array([_image_miou(_predict(model_last, cfg_last, item, k, device), item["label"], names, cfg_last, ignore)
                       for item in (ds[i] for i in range(n_scan))])
    order = [int(i) for i in np.argsort(-scores, kind="stable")]
    n_best = math.ceil(n_show / 2)
    best = order[:n_best]
    worst = [i for i in reversed(order) if i not in best][: n_show - n_best]  # the very worst first
    chosen = best + worst
    shown = [run for run in runs if run.name in models]
    cols = 2 + len(shown)
    image0, _ = ds.load(chosen[0])
    h, w = image0.shape[:2]
    cell_w = 2.6
    fig = Figure(figsize=(cell_w * cols, len(chosen) * cell_w * h / w + 1.4), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(chosen), cols))
    palette = dom.classes.palette
    seen: set[int] = set()
    for r, idx in enumerate(chosen):
        item = ds[idx]
        image, _ = ds.load(idx)
        label = item["label"].numpy()
        seen |= set(np.unique(label[label != ignore]).tolist())
        tag = f"best #{r + 1}" if r < n_best else f"worst #{r - n_best + 1}"
        panels = [(image, f"{tag}: {ds.samples[idx].name}"),
                  (colorize(np.where(label == ignore, 255, label).astype(np.uint8), palette), "ground truth")]
        for run in shown:
            model, cfg = models[run.name][0], models[run.name][1]
            pred = _predict(model, cfg, item, k, device)
            seen |= set(np.unique(pred).tolist())
            miou = _image_miou(pred, item["label"], names, cfg, ignore)
            panels.append((colorize(pred, palette), f"{run.name}: {100 * miou:.1f}"))
        for c, (img, title) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
    colors = _colors(palette, k)
    fig.legend(handles=[Patch(color=colors[c], label=names[c]) for c in sorted(seen) if c < k],
               loc="outside lower center", ncol=min(10, max(1, len(seen))), fontsize=8)
    page.figure(fig, "predictions",
                f"Best and worst target validation images by the per-image mIoU of {last.name} "
                f"(ranked over the first {n_scan} images); titles give each run's per-image mIoU (%); black: ignore")


def _pseudo(page: _Page, runs: list[Run]) -> None:
    page.section("pseudo", "Pseudo-label quality over rounds")
    for run in runs:
        rounds = run.rounds()
        if not rounds:
            page.note(f"{run.name}: no self-training rounds ({run.method_label()}).")
            continue
        classes = list(dict.fromkeys(c for r in rounds for c in r["pseudo/per_class"]))
        acc = np.array([[_nan(r["pseudo/per_class"].get(c, {}).get("accuracy")) for r in rounds] for c in classes])
        cov = np.array([[_nan(r["pseudo/per_class"].get(c, {}).get("coverage")) for r in rounds] for c in classes])
        if np.isnan(acc).all() and np.isnan(cov).all():
            page.note(f"{run.name}: the target training images have no labels, so pseudo-label quality is unknown.")
            continue
        dynamic = [r for r in run.records if "pseudo/dynamic_coverage" in r or "calibration/weight" in r]
        ncols = 4 if dynamic else 3
        fig = Figure(figsize=(4.2 * ncols, max(4.0, 0.28 * len(classes) + 1.5)), layout="constrained")
        axes = fig.subplots(1, ncols)
        labels = [str(r["round"]) for r in rounds]
        axes[0].plot(labels, [100 * _nan(r.get("pseudo/static_accuracy")) for r in rounds], marker="o", label="accuracy")
        axes[0].plot(labels, [100 * _nan(r.get("pseudo/static_coverage")) for r in rounds], marker="s", label="coverage")
        axes[0].set_xlabel("round")
        axes[0].set_ylabel("%")
        axes[0].set_ylim(0, 100)
        axes[0].grid(alpha=0.3)
        axes[0].legend()
        axes[0].set_title("static pseudo labels (all classes)")
        for ax, values, title in ((axes[1], acc, "accuracy per class (%)"), (axes[2], cov, "coverage per class (%)")):
            im = ax.imshow(100 * values, cmap=colormaps["viridis"].with_extremes(bad="#e8e8e8"), vmin=0, vmax=100,
                           aspect="auto")
            ax.set_xticks(range(len(rounds)), labels)
            ax.set_yticks(range(len(classes)), classes, fontsize=8)
            ax.set_xlabel("round")
            ax.set_title(title)
            for i in range(len(classes)):
                for j in range(len(rounds)):
                    if _finite(values[i, j]):
                        ax.text(j, i, f"{100 * values[i, j]:.0f}", ha="center", va="center", fontsize=7,
                                color="white" if values[i, j] < 0.5 else "black")
            fig.colorbar(im, ax=ax, shrink=0.8)
        if dynamic:
            ax = axes[3]
            for key in ("pseudo/dynamic_coverage", "pseudo/dynamic_acc", "pseudo/fused_coverage", "calibration/weight"):
                pts = [(r["step"], r[key]) for r in dynamic if _finite(r.get(key))]
                if pts:
                    ax.plot(*zip(*pts), label=key, lw=1.2)
            ax.set_xlabel("step")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            ax.set_title("per iteration")
        fig.suptitle(run.name)
        caption = (f"{run.name}: accuracy (share of the pixels pseudo-labelled as a class that truly belong to it) "
                   "and coverage (share of a class's true pixels that received a pseudo label) of the static labels "
                   "of each round; grey: undefined (no such pixels)")
        if dynamic:
            caption += "; right: dynamic labels and calibration during training"
        page.figure(fig, f"pseudo_{run.slug}", caption)
        header = ["class"] + [f"acc r{l}" for l in labels] + [f"cov r{l}" for l in labels]
        rows = [[(c, "")] + [(_pct(v), "") for v in acc[i]] + [(_pct(v), "") for v in cov[i]] for i, c in enumerate(classes)]
        page.add(f"<details><summary>{_e(run.name)}: per-class table</summary>{_table(header, rows)}</details>")


def _nan(value) -> float:
    return float(value) if _finite(value) else float("nan")


def _tsne(features: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(features)
    # perplexity must stay below the number of points; ~n/3 keeps small samples meaningful.
    perplexity = float(max(2, min(30, (n - 1) // 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    # One OpenMP thread: on shared or busy CPUs the spinning worker threads of the
    # Barnes-Hut gradient made it 5-25x slower (measured), and 1500 points need no more.
    with threadpool_limits(limits=1):
        return tsne.fit_transform(features)


def _features(page: _Page, runs: list[Run], models: dict, feature_points: int, feature_images: int, device) -> None:
    from ..data.datasets import build_eval_dataset, resolve_domain
    from .features import prototype_alignment, prototype_distances, sample_features

    page.section("features", "Feature space")
    shown = [run for run in runs if run.name in models]
    if not shown:
        page.note("No run has checkpoints/last.pt: no features to show.")
        return
    last = shown[-1]
    found, why = _target_val(last.cfg)
    if found is None:
        page.note(f"No labelled target validation images ({why}): target features cannot be labelled.")
        return
    dom_tgt, tgt_ds = found
    try:
        dom_src = resolve_domain(last.cfg, "source")
        src_ds = build_eval_dataset(last.cfg, dom_src, last.cfg.data.source.train_split)
    except BidaError as err:
        page.note(f"No labelled source images ({err}).")
        return
    names, palette = list(dom_tgt.classes.names), dom_tgt.classes.palette
    k = len(names)
    samples = {run.name: sample_features(models[run.name][0], src_ds, tgt_ds, k,
                                         feature_points if run is last else 0, device, max_images=feature_images,
                                         ignore_index=dom_tgt.classes.ignore_index)
               for run in shown}
    s = samples[last.name]
    n = len(s["features"])
    if n < 10:
        page.note(f"{last.name}: only {n} labelled feature pixels sampled; no t-SNE view.")
    else:
        fig = _tsne_figure(s, names, palette, last.name)
        page.figure(fig, "tsne",
                    f"{last.name}: t-SNE of {n} pixel features (class-balanced sample of source train "
                    f"and target val pixels, ground-truth colours, first {feature_images} images of each), with the "
                    "class prototypes of each domain as large outlined markers joined by a grey line")
    dists = {name: prototype_distances(v["prototypes_src"], v["present_src"], v["prototypes_tgt"], v["present_tgt"])
             for name, v in samples.items()}
    _distance_section(page, shown, dists, names)
    aligned = {name: prototype_alignment(v["prototypes_src"], v["present_src"], v["prototypes_tgt"], v["present_tgt"])
               for name, v in samples.items()}
    _alignment_section(page, shown, aligned, names)


def _alignment_section(page: _Page, runs: list[Run], aligned: dict[str, dict], names: Sequence[str]) -> None:
    page.add("<h3>Source-target alignment per class (margin)</h3>")
    keep = [c for c in range(len(names)) if any(_finite(a["margin"][c]) for a in aligned.values())]
    if not keep:
        page.note("No class is present in both domains' labelled images.")
        return
    base = runs[0].name
    header = ["class", base] + [h for run in runs[1:] for h in (run.name, f"Δ {run.name}")]
    rows = []
    for label, get in [(names[c], lambda a, c=c: float(a["margin"][c])) for c in keep] + [
            ("mean margin", lambda a: a["mean_margin"]), ("nearest-own share", lambda a: a["nearest_own_share"])]:
        rows.append(_compare_row(label, get(aligned[base]), [get(aligned[run.name]) for run in runs[1:]],
                                 lower_is_better=False))
    page.add(_table(header, rows, total_last=True))
    page.add("<p>A measure that is fair across runs: for each class, cos(target prototype, its own source "
             "prototype) minus the highest cos with another class's source prototype. Positive: the target "
             "prototype is nearer its own source class than any other; raw distances above are dominated by a "
             "component every class-score feature shares, and grow when a method makes classes more distinct. "
             "Nearest-own share: the fraction of classes whose target prototype has its own source prototype "
             "as nearest. Δ against the first run (green: better aligned).</p>")


def _tsne_figure(s: dict, names: Sequence[str], palette, title: str) -> Figure:
    from .features import SOURCE, TARGET

    k = len(names)
    feats = s["features"]
    protos = [(code, c, s[f"prototypes_{suf}"][c]) for code, suf in ((SOURCE, "src"), (TARGET, "tgt"))
              for c in range(k) if s[f"present_{suf}"][c]]
    stacked = np.concatenate([feats, np.stack([p for _, _, p in protos])]) if protos else feats
    # Cosine geometry (what the contrastive losses use): unit-normalise before t-SNE.
    stacked = stacked / np.linalg.norm(stacked, axis=1, keepdims=True).clip(min=1e-12)
    emb = _tsne(stacked.astype(np.float32))
    pts, proto_pts = emb[: len(feats)], emb[len(feats):]
    colors = np.array(_colors(palette, k))
    fig = Figure(figsize=(11, 8), layout="constrained")
    ax = fig.subplots()
    for code, marker in ((SOURCE, SOURCE_MARKER), (TARGET, TARGET_MARKER)):
        m = s["domain"] == code
        ax.scatter(pts[m, 0], pts[m, 1], c=colors[s["labels"][m]], marker=marker, s=18, alpha=0.6, linewidths=0)
    by_class: dict[int, dict[int, np.ndarray]] = {}
    for (code, c, _), xy in zip(protos, proto_pts):
        by_class.setdefault(c, {})[code] = xy
        ax.scatter(*xy, color=colors[c], marker=SOURCE_MARKER if code == SOURCE else TARGET_MARKER, s=260,
                   edgecolors="black", linewidths=1.6, zorder=3)
    for ends in by_class.values():
        if len(ends) == 2:
            (x0, y0), (x1, y1) = ends[SOURCE], ends[TARGET]
            ax.plot([x0, x1], [y0, y1], color="0.4", lw=1, zorder=2)
    present = sorted(set(s["labels"].tolist()) | set(by_class))
    handles = [Patch(color=colors[c], label=names[c]) for c in present]
    handles += [ax.scatter([], [], marker=SOURCE_MARKER, color="0.5", label="source"),
                ax.scatter([], [], marker=TARGET_MARKER, color="0.5", label="target"),
                ax.scatter([], [], marker="o", s=200, facecolor="white", edgecolors="black", linewidths=1.6,
                           label="prototype (large)")]
    fig.legend(handles=handles, loc="outside right upper", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title}: pixel features of both domains (t-SNE)")
    return fig


def _distance_section(page: _Page, runs: list[Run], dists: dict[str, np.ndarray], names: Sequence[str]) -> None:
    page.add("<h3>Source-target prototype distance per class</h3>")
    base = runs[0].name
    keep = [c for c in range(len(names)) if any(_finite(d[c]) for d in dists.values())]
    if not keep:
        page.note("No class is present in both domains' labelled images.")
        return
    before = " (before)" if len(runs) > 1 else ""
    header = ["class", base + before]
    for run in runs[1:]:
        header += [run.name, f"Δ {run.name}"]
    # One row per class, then the mean over the classes present in both domains.
    values = {name: [float(d[c]) for c in keep] + [float(np.nanmean(d[keep])) if np.isfinite(d[keep]).any() else math.nan]
              for name, d in dists.items()}
    rows = []
    for i, label in enumerate([names[c] for c in keep] + ["mean"]):
        rows.append(_compare_row(label, values[base][i], [values[run.name][i] for run in runs[1:]],
                                 lower_is_better=True))
    page.add(_table(header, rows, total_last=True))
    page.add("<p>Cosine distance 1 − cos between the source prototype (source train, ground truth) and the target "
             "prototype (target val, ground truth) of each class, from each run's last checkpoint; 0 is perfectly "
             "aligned, 2 opposite. Δ against the first run (green: closer).</p>")
    fig = Figure(figsize=(max(9, 0.55 * len(keep) + 3), 3.8), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(runs)
    x = np.arange(len(keep))
    for i, run in enumerate(runs):
        vals = [v if _finite(v := float(dists[run.name][c])) else 0.0 for c in keep]
        ax.bar(x + (i - (len(runs) - 1) / 2) * width, vals, width, label=run.name + (before if i == 0 else ""))
    ax.set_xticks(x, [names[c] for c in keep], rotation=45, ha="right")
    ax.set_ylabel("1 − cos(source, target)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9)
    page.figure(fig, "prototype_distance", "Per-class cosine distance between source and target prototypes")


def _compare_row(label: str, ref: float, others: Sequence[float], lower_is_better: bool) -> list:
    """A table row: the baseline's value, then each other run's value and its delta."""
    row = [(label, ""), (_num(ref), "")]
    for value in others:
        row += [(_num(value), ""), _delta_cell(value - ref if _finite(value) and _finite(ref) else None,
                                               lower_is_better=lower_is_better, scale=1.0, digits=3)]
    return row


def _num(value) -> str:
    return f"{value:.3f}" if _finite(value) else "n/a"


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
