"""The run report's tables: HTML cells and the sections that are mostly numbers.

The runs table, the per-class IoU comparison, the pseudo-label rounds and the confusion
matrices (:mod:`bida.tools.report` assembles the page).
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from .report_runs import Run, _finite

if TYPE_CHECKING:
    from .report import _Page


NEUTRAL_POINTS = 0.05  # IoU differences below 0.05 points are not coloured


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _pct(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None or not _finite(value) else f"{100 * value:.{digits}f}"


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


def _num(value) -> str:
    return f"{value:.3f}" if _finite(value) else "n/a"


def _compare_row(label: str, ref: float, others: Sequence[float], lower_is_better: bool) -> list:
    """A table row: the baseline's value, then each other run's value and its delta."""
    row = [(label, ""), (_num(ref), "")]
    for value in others:
        row += [(_num(value), ""), _delta_cell(value - ref if _finite(value) and _finite(ref) else None,
                                               lower_is_better=lower_is_better, scale=1.0, digits=3)]
    return row


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


