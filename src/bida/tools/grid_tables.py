"""A grid's results summarised over seeds, and the Markdown tables of ``results.md`` and ``ablation.md``.

:func:`summarise` turns ``{row: [metrics per seed]}`` (:func:`bida.tools.grid.run_grid`) into
the rows of ``results.json`` / ``ablation.json``: mean ± std and paired differences against a
baseline, on target val and, when every run has one, on target test. The tables read those rows.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# results.json / ablation.json keys that are not rows: the wall times, which split the
# tables report ("test" when every run has a test split; each row's "val" block and its
# top-level figures stay target val, as before test splits), and where the figures were
# measured (bida.train.environment: git commit, CPU model, torch version).
SUMMARY_KEYS = ("timing", "split", "environment")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def summarise(results: dict[str, list[dict]], baseline: str) -> dict[str, dict]:
    """``results.json`` content: per row ``{"per_seed", "mean", "std", ...}``, mIoU in [0, 1].

    Every row other than ``baseline`` also gets ``vs_<baseline>``: the per-seed paired
    differences, their mean and std, the number of seeds it wins, and the mean per-class
    IoU difference. These top-level figures are target val (the split that chose best.pt),
    repeated in a ``val`` block; when every run of a row has a test split, a ``test`` block
    holds the same figures on it (``split`` names the split in each block).
    """
    summary: dict[str, dict] = {}
    base_runs = results.get(baseline, [])
    for name, runs in results.items():
        mious = [r["mIoU"] for r in runs]
        mean, std = mean_std(mious)
        best = [r.get("best", {}).get("mIoU") for r in runs]
        entry = {
            "per_seed": mious, "mean": mean, "std": std, "seeds": [r["seed"] for r in runs],
            # the keys a one-seed results.json has always held (means over seeds here)
            "mIoU": mean, "pixel_acc": mean_std([r["pixel_acc"] for r in runs])[0],
            "best": runs[0].get("best", {}) if len(runs) == 1 else {"per_seed": best, "mean": mean_std(best)[0]},
            "wall_s": float(sum(r.get("wall_s", 0.0) for r in runs)),
            "per_class_iou": _mean_per_class([r.get("per_class_iou", {}) for r in runs]),
        }
        aligned = [r["alignment"] for r in runs if r.get("alignment")]
        if aligned:
            entry["alignment"] = {key: {"per_seed": [a[key] for a in aligned], "mean": mean_std([a[key] for a in aligned])[0]}
                                  for key in ("mean_margin", "nearest_own_share")}
        if name != baseline and base_runs and len(base_runs) == len(runs):
            entry[f"vs_{baseline}"] = paired_difference(runs, base_runs)
        entry["val"] = {"split": runs[0].get("split", "val") if runs else "val",
                        **{k: entry[k] for k in ("per_seed", "mean", "std", "mIoU", "pixel_acc", "best", "per_class_iou")},
                        **{k: v for k, v in entry.items() if k.startswith("vs_")}}
        if runs and all("test" in r for r in runs):
            tests = [r["test"] for r in runs]
            t_mean, t_std = mean_std([t["mIoU"] for t in tests])
            entry["test"] = {"split": tests[0].get("split", "test"), "checkpoint": "last",
                             "per_seed": [t["mIoU"] for t in tests], "mean": t_mean, "std": t_std, "mIoU": t_mean,
                             "pixel_acc": mean_std([t["pixel_acc"] for t in tests])[0],
                             "per_class_iou": _mean_per_class([t.get("per_class_iou", {}) for t in tests])}
            if name != baseline and base_runs and len(base_runs) == len(runs) and all("test" in r for r in base_runs):
                entry["test"][f"vs_{baseline}"] = paired_difference(tests, [r["test"] for r in base_runs])
        summary[name] = entry
    return summary


def add_pair(summary: dict[str, dict], results: dict[str, list[dict]], name: str, other: str) -> None:
    """``vs_<other>`` for row ``name`` (top level and val block; and its test block when both have one)."""
    vs = paired_difference(results[name], results[other])
    summary[name][f"vs_{other}"] = vs
    summary[name]["val"][f"vs_{other}"] = vs
    if "test" in summary[name] and "test" in summary[other]:
        summary[name]["test"][f"vs_{other}"] = paired_difference([r["test"] for r in results[name]],
                                                                 [r["test"] for r in results[other]])


def paired_difference(runs: Sequence[dict], base_runs: Sequence[dict]) -> dict:
    """Seed by seed ``runs`` minus ``base_runs`` (same seeds, same order): the mIoU differences,
    their mean and std, the number of seeds won, and the mean per-class IoU difference."""
    diffs = [a["mIoU"] - b["mIoU"] for a, b in zip(runs, base_runs)]
    d_mean, d_std = mean_std(diffs)
    pc = _mean_per_class([r.get("per_class_iou", {}) for r in runs])
    base_pc = _mean_per_class([r.get("per_class_iou", {}) for r in base_runs])
    return {"per_seed": diffs, "mean": d_mean, "std": d_std, "wins": int(sum(d > 0 for d in diffs)),
            "per_class_iou": {k: (v - base_pc[k]) if v is not None and base_pc.get(k) is not None else None
                              for k, v in pc.items()}}


def _mean_per_class(per_run: Sequence[dict]) -> dict[str, float | None]:
    names = list(per_run[0]) if per_run else []
    out: dict[str, float | None] = {}
    for k in names:
        vals = [r.get(k) for r in per_run]
        out[k] = None if any(v is None for v in vals) else float(np.mean(vals))
    return out


def reported_split(summary: dict[str, dict]) -> str:
    """``"test"`` when every row of a summary has test figures, else ``"val"``."""
    rows = [e for k, e in summary.items() if k not in SUMMARY_KEYS]
    return "test" if rows and all("test" in e for e in rows) else "val"


def _reported(entry: dict, split: str) -> dict:
    """The figures of ``split`` in a summary row: its test block, or the row itself (val)."""
    return entry["test"] if split == "test" else entry


def results_table(rows: Sequence[tuple[str, dict]], title: str = "method") -> str:
    """Markdown table per run: target-test mIoU of the last checkpoint when the runs have a
    test split (then also target val, which chose best.pt), else target-val mIoU (last and best)."""
    with_test = bool(rows) and all("test" in m for _, m in rows)
    if with_test:
        lines = [f"| {title} | target test mIoU (last) | test pixel acc | target val mIoU (last) "
                 "| target val mIoU (best on val) |", "|---|---:|---:|---:|---:|"]
    else:
        lines = [f"| {title} | target mIoU (last) | target mIoU (best on val) | pixel acc |", "|---|---:|---:|---:|"]
    for name, m in rows:
        best = m.get("best", {}).get("mIoU")
        best_s = f"{100 * best:.1f}" if isinstance(best, float) and best >= 0 else "-"
        if with_test:
            t = m["test"]
            lines.append(f"| {name} | {100 * t['mIoU']:.1f} | {100 * t['pixel_acc']:.1f} | {100 * m['mIoU']:.1f} | {best_s} |")
        else:
            lines.append(f"| {name} | {100 * m['mIoU']:.1f} | {best_s} | {100 * m['pixel_acc']:.1f} |")
    return "\n".join(lines)


def seeds_table(summary: dict[str, dict], baseline: str, title: str = "method") -> str:
    """Markdown: mean ± std, per-seed values and the paired difference against ``baseline``,
    on the test split when every row has one (then with the val mean beside them)."""
    split = reported_split(summary)
    val_col = split == "test"
    lines = [f"| {title} | target {split} mIoU mean ± std | per seed | − {baseline} (paired, mean ± std) | wins "
             + ("| target val mean " if val_col else "") + "| prototype margin | nearest-own |",
             "|---|---:|---|---:|---:|" + ("---:|" if val_col else "") + "---:|---:|"]
    for name, row in summary.items():
        if name in SUMMARY_KEYS:
            continue
        e = _reported(row, split)
        per_seed = ", ".join(f"{100 * v:.1f}" for v in e["per_seed"])
        vs = e.get(f"vs_{baseline}")
        vs_s = f"{100 * vs['mean']:+.1f} ± {100 * vs['std']:.1f} ({', '.join(f'{100 * d:+.1f}' for d in vs['per_seed'])})" if vs else "—"
        wins = f"{vs['wins']}/{len(vs['per_seed'])}" if vs else "—"
        al = row.get("alignment", {})
        margin = f"{al['mean_margin']['mean']:+.3f}" if al else "—"
        own = f"{100 * al['nearest_own_share']['mean']:.0f}%" if al else "—"
        val = f" {100 * row['mean']:.1f} |" if val_col else ""
        lines.append(f"| {name} | {100 * e['mean']:.1f} ± {100 * e['std']:.1f} | {per_seed} | {vs_s} | {wins} |{val} "
                     f"{margin} | {own} |")
    return "\n".join(lines)


def pairs_table(summary: dict[str, dict], baseline: str) -> str:
    """Markdown: each paired difference against a row other than ``baseline`` ("" when none)."""
    lines = []
    split = reported_split(summary)
    for name, row in summary.items():
        if name in SUMMARY_KEYS:
            continue
        for key, vs in _reported(row, split).items():
            if key.startswith("vs_") and key != f"vs_{baseline}":
                per_seed = ", ".join(f"{100 * d:+.1f}" for d in vs["per_seed"])
                lines.append(f"| {name} − {key[len('vs_'):]} | {100 * vs['mean']:+.1f} ± {100 * vs['std']:.1f} "
                             f"| {per_seed} | {vs['wins']}/{len(vs['per_seed'])} |")
    if not lines:
        return ""
    return "\n".join(["| paired difference | mean ± std | per seed | wins |", "|---|---:|---|---:|", *lines])


def per_class_table(summary: dict[str, dict], baseline: str, rows: Sequence[str]) -> str:
    """Markdown: mean per-class IoU of ``baseline`` and each row's mean per-class difference
    (on the test split when every row has one)."""
    split = reported_split(summary)
    base = _reported(summary[baseline], split)["per_class_iou"]
    lines = [f"| class | {baseline} | " + " | ".join(f"{r} − {baseline}" for r in rows) + " |",
             "|---|---:|" + "---:|" * len(rows)]
    for k, v in base.items():
        cells = []
        for r in rows:
            d = _reported(summary[r], split).get(f"vs_{baseline}", {}).get("per_class_iou", {}).get(k)
            cells.append("—" if d is None else f"{100 * d:+.1f}")
        lines.append(f"| {k} | {'—' if v is None else f'{100 * v:.1f}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing_table(timing: dict) -> str:
    """Markdown: wall time of the set-up, each run and the report, and their total."""
    lines = ["| part | wall time |", "|---|---:|"]

    def fmt(seconds: float) -> str:
        return f"{int(seconds // 60)}m{seconds % 60:04.1f}s" if seconds >= 60 else f"{seconds:.1f}s"

    if "setup_s" in timing:
        lines.append(f"| set-up (data generation or cache, configs) | {fmt(timing['setup_s'])} |")
    for name, secs in timing.get("runs_s", {}).items():
        lines.append(f"| run `{name}` (training, evaluation, alignment) | {fmt(secs)} |")
    if "report_s" in timing:
        lines.append(f"| report | {fmt(timing['report_s'])} |")
    if "total_s" in timing:
        lines.append(f"| **total** | **{fmt(timing['total_s'])}** |")
    return "\n".join(lines)


def _results_text(title: str, results: dict[str, list[dict]], summary: dict[str, dict], baseline: str,
                  wall: float | dict, what: str, env: dict | None = None) -> str:
    n = len(next(iter(results.values())))
    split = reported_split(summary)
    parts = [f"# {title}", ""]
    if split == "test":
        parts += ["Figures on the target test split: images that no training step, pseudo label, best.pt or "
                  "choice ever saw. Target val chose best.pt (and the presets); its figures are apart.", ""]
    if n == 1:
        parts += [results_table([(k, v[0]) for k, v in results.items()], what), ""]
    else:
        parts += [f"{n} seeds ({', '.join(str(r['seed']) for r in next(iter(results.values())))}); each seed trains its own "
                  f"source-only model and every other row starts from it (paired on seeds). Target-{split} mIoU of the last "
                  f"checkpoint, in percent.", "", seeds_table(summary, baseline, what), ""]
        pairs = pairs_table(summary, baseline)
        if pairs:
            parts += ["Paired differences between other rows (percentage points):", "", pairs, ""]
        parts += ["Mean per-class IoU (percent) and paired differences:", "",
                  per_class_table(summary, baseline, [k for k in summary if f"vs_{baseline}" in summary[k]]), "",
                  "Prototype margin: per class, cos(target prototype, own source prototype) minus the best "
                  "cos with another class's source prototype (ground truth, source train vs target val, "
                  "mean over classes and seeds); nearest-own: share of target prototypes whose nearest "
                  "source prototype is their own class.", ""]
    if isinstance(wall, dict):
        parts += ["Wall time (this process; runs finished before a --resume keep their own time):", "",
                  timing_table(wall)]
    else:
        parts.append(f"Wall time: {wall / 60:.1f} min.")
    if env is not None:
        parts += ["", f"Measured at commit {env.get('git_commit') or 'unknown (not a git checkout)'} on "
                      f"{env.get('cpu') or 'an unknown CPU'} ({env.get('cpu_count')} cores), torch {env.get('torch')}."]
    return "\n".join(parts) + "\n"
