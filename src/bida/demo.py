"""``bida demo`` and ``bida ablate``: several runs compared in one Markdown table.

The demo trains a source-only model on the embedded synthetic pair, then adapts it with
``self_training`` and ``bida`` (both starting from the same source-only checkpoint, same
seed, same data), and prints the target mIoU of each. The ablation grid switches the BiDA
components on one by one from the same starting point.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import Config, load_config
from .errors import ConfigError
from .features import run_alignment
from .presets import preset_overrides
from .train import train

# Demo settings: a narrow ResNet-18 DeepLab-V2 on 64x128 images trains in minutes on a CPU.
DEMO_OVERRIDES: tuple[str, ...] = ()

ABLATION_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("self-training (no contrast)", ("method=self_training",)),
    ("+ t2s only", ("method=bida", "method.t2s=true", "method.s2t=false", "method.dynamic_labels=false", "method.calibration=false")),
    ("+ s2t only", ("method=bida", "method.t2s=false", "method.s2t=true", "method.dynamic_labels=false", "method.calibration=false")),
    ("+ t2s + s2t", ("method=bida", "method.dynamic_labels=false", "method.calibration=false")),
    ("+ dynamic labels", ("method=bida", "method.calibration=false")),
    ("+ calibration (full BiDA)", ("method=bida",)),
)

# Candidates for making the contrast count (README "Does the contrast count?"); each row
# is full BiDA with one change, so each is compared with full BiDA and with self-training.
CANDIDATE_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cand: y_D separate mean in L_t2s", ("method=bida", "method.t2s_dynamic=separate", "method.dynamic_t2s_weight=0.5")),
    ("cand: y_D only in target prototypes", ("method=bida", "method.t2s_dynamic=prototypes_only")),
    ("cand: centred features", ("method=bida", "method.center_features=batch")),
    ("cand: memory prototypes as partners", ("method=bida", "method.memory_partners=true")),
    ("cand: projection-head feature", ("method=bida", "method.feature=backbone")),
    ("cand: y_T for target segmentation", ("method=bida", "pseudo.dynamic_for_segmentation=true")),
    ("cand: contrast weights 0.5", ("method=bida", "loss.contrast_t2s_weight=0.5", "loss.contrast_s2t_weight=0.5")),
    ("cand: contrast weights 1.0", ("method=bida", "loss.contrast_t2s_weight=1.0", "loss.contrast_s2t_weight=1.0")),
    ("cand: memory partners + weights 0.5", ("method=bida", "method.memory_partners=true",
                                              "loss.contrast_t2s_weight=0.5", "loss.contrast_s2t_weight=0.5")),
)


def fresh_dir(path: Path) -> Path:
    """``path`` if it does not exist yet, else ``path-2``, ``path-3``, ... (never overwrite)."""
    if not path.exists():
        return path
    i = 2
    while Path(f"{path}-{i}").exists():
        i += 1
    return Path(f"{path}-{i}")


def results_table(rows: Sequence[tuple[str, dict]], title: str = "method") -> str:
    """Markdown table of target-val mIoU (last and best checkpoints) per run."""
    lines = [f"| {title} | target mIoU (last) | target mIoU (best on val) | pixel acc |", "|---|---:|---:|---:|"]
    for name, m in rows:
        best = m.get("best", {}).get("mIoU")
        best_s = f"{100 * best:.1f}" if isinstance(best, float) and best >= 0 else "-"
        lines.append(f"| {name} | {100 * m['mIoU']:.1f} | {best_s} | {100 * m['pixel_acc']:.1f} |")
    return "\n".join(lines)


def _train(cfg_path: str | None, overrides: Sequence[str], out: Path, quiet: bool) -> dict:
    cfg: Config = load_config(cfg_path, list(overrides) + (["train.quiet=true"] if quiet else []))
    t0 = time.time()
    metrics = train(cfg, out)
    metrics["wall_s"] = time.time() - t0
    # Prototype alignment of the final model (source train vs target val ground truth).
    metrics["alignment"] = run_alignment(out)
    return metrics


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def seed_list(cfg_path: str | None, overrides: Sequence[str], num_seeds: int) -> list[int]:
    """``num_seeds`` consecutive training seeds from the config's ``seed`` (data stay fixed)."""
    if num_seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {num_seeds}")
    first = load_config(cfg_path, list(overrides)).seed
    return [first + i for i in range(num_seeds)]


def run_grid(cfg_path: str | None, out: Path, rows: Sequence[tuple[str, Sequence[str]]], seeds: Sequence[int],
             overrides: Sequence[str] = (), init_checkpoint: str | None = None, quiet: bool = False,
             flat: bool = False) -> dict[str, list[dict]]:
    """Train every row for every seed; returns ``{row name: [metrics per seed]}``.

    Each seed first trains its own source-only model (unless ``init_checkpoint`` is given),
    and every row of that seed starts from it: rows are paired on seeds. A row named
    ``source_only`` is that source-only run itself. Runs go to ``out/seed_S/<row>``
    (``out/<row>`` when ``flat``).
    """
    results: dict[str, list[dict]] = {name: [] for name, _ in rows}
    total = len(seeds) * (len(rows) + (init_checkpoint is None and not any(n == "source_only" for n, _ in rows)))
    done = 0
    for seed in seeds:
        seed_dir = out if flat else out / f"seed_{seed}"
        base = list(overrides) + [f"seed={seed}"]
        init = init_checkpoint
        if init is None:
            done += 1
            print(f"[{done}/{total}] seed {seed}: source-only -> {seed_dir / 'source_only'}", flush=True)
            so = _train(cfg_path, base + ["method=source_only"], seed_dir / "source_only", quiet)
            if "source_only" in results:
                results["source_only"].append(so | {"seed": seed})
            init = str(seed_dir / "source_only" / "checkpoints" / "last.pt")
        for name, row in rows:
            if name == "source_only":
                continue
            done += 1
            run_dir = seed_dir / _dir_name(name)
            print(f"[{done}/{total}] seed {seed}: {name} -> {run_dir}", flush=True)
            m = _train(cfg_path, base + list(row) + [f"model.init_checkpoint={init}"], run_dir, quiet)
            results[name].append(m | {"seed": seed})
    return results


def _dir_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name).strip("_") or "row"


def summarise(results: dict[str, list[dict]], baseline: str) -> dict[str, dict]:
    """``results.json`` content: per row ``{"per_seed", "mean", "std", ...}``, mIoU in [0, 1].

    Every row other than ``baseline`` also gets ``vs_<baseline>``: the per-seed paired
    differences, their mean and std, the number of seeds it wins, and the mean per-class
    IoU difference.
    """
    summary: dict[str, dict] = {}
    base_runs = results.get(baseline, [])
    base_pc = _mean_per_class([r.get("per_class_iou", {}) for r in base_runs])
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
            diffs = [a["mIoU"] - b["mIoU"] for a, b in zip(runs, base_runs)]
            d_mean, d_std = mean_std(diffs)
            entry[f"vs_{baseline}"] = {
                "per_seed": diffs, "mean": d_mean, "std": d_std, "wins": int(sum(d > 0 for d in diffs)),
                "per_class_iou": {k: (v - base_pc[k]) if v is not None and base_pc.get(k) is not None else None
                                  for k, v in entry["per_class_iou"].items()},
            }
        summary[name] = entry
    return summary


def _mean_per_class(per_run: Sequence[dict]) -> dict[str, float | None]:
    names = list(per_run[0]) if per_run else []
    out: dict[str, float | None] = {}
    for k in names:
        vals = [r.get(k) for r in per_run]
        out[k] = None if any(v is None for v in vals) else float(np.mean(vals))
    return out


def seeds_table(summary: dict[str, dict], baseline: str, title: str = "method") -> str:
    """Markdown: mean ± std, per-seed values and the paired difference against ``baseline``."""
    lines = [f"| {title} | target mIoU mean ± std | per seed | − {baseline} (paired, mean ± std) | wins "
             "| prototype margin | nearest-own |", "|---|---:|---|---:|---:|---:|---:|"]
    for name, e in summary.items():
        per_seed = ", ".join(f"{100 * v:.1f}" for v in e["per_seed"])
        vs = e.get(f"vs_{baseline}")
        vs_s = f"{100 * vs['mean']:+.1f} ± {100 * vs['std']:.1f} ({', '.join(f'{100 * d:+.1f}' for d in vs['per_seed'])})" if vs else "—"
        wins = f"{vs['wins']}/{len(vs['per_seed'])}" if vs else "—"
        al = e.get("alignment", {})
        margin = f"{al['mean_margin']['mean']:+.3f}" if al else "—"
        own = f"{100 * al['nearest_own_share']['mean']:.0f}%" if al else "—"
        lines.append(f"| {name} | {100 * e['mean']:.1f} ± {100 * e['std']:.1f} | {per_seed} | {vs_s} | {wins} | {margin} | {own} |")
    return "\n".join(lines)


def per_class_table(summary: dict[str, dict], baseline: str, rows: Sequence[str]) -> str:
    """Markdown: mean per-class IoU of ``baseline`` and each row's mean per-class difference."""
    base = summary[baseline]["per_class_iou"]
    lines = [f"| class | {baseline} | " + " | ".join(f"{r} − {baseline}" for r in rows) + " |",
             "|---|---:|" + "---:|" * len(rows)]
    for k, v in base.items():
        cells = []
        for r in rows:
            d = summary[r].get(f"vs_{baseline}", {}).get("per_class_iou", {}).get(k)
            cells.append("—" if d is None else f"{100 * d:+.1f}")
        lines.append(f"| {k} | {'—' if v is None else f'{100 * v:.1f}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(out: Path, overrides: Sequence[str] = (), quiet: bool = False, report: bool = True,
             seeds: int = 1, preset: str = "paper") -> dict[str, dict]:
    """Source-only, then self-training and BiDA from it, for each seed; writes ``results.{md,json}``.

    ``preset`` (:mod:`bida.presets`) applies to the BiDA row only; ``results.json`` records it.
    """
    base = list(DEMO_OVERRIDES) + list(overrides)
    seed_values = seed_list(None, base, seeds)
    out = fresh_dir(Path(out))
    out.mkdir(parents=True)
    t0 = time.time()
    rows = [("source_only", ()), ("self_training", ("method=self_training",)),
            ("bida", ("method=bida", *preset_overrides(preset)))]
    results = run_grid(None, out, rows, seed_values, base, quiet=quiet, flat=seeds == 1)
    summary = summarise(results, "self_training")
    summary["bida"]["preset"] = preset
    wall = time.time() - t0
    title = "bida demo (embedded synthetic pair)" + ("" if preset == "paper" else f", BiDA with preset '{preset}'")
    text = _results_text(title, results, summary, "self_training", wall, "method")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print("\n" + text)
    if report:
        try:
            from .report import write_report
        except ImportError:
            write_report = None
        if write_report is not None:
            first = out if seeds == 1 else out / f"seed_{seed_values[0]}"
            page = write_report([first / k for k, _ in rows], out / "report")
            print(f"report ({'seed ' + str(seed_values[0]) if seeds > 1 else 'this run'}): {page}")
    print(f"demo directory: {out}")
    return summary


def _results_text(title: str, results: dict[str, list[dict]], summary: dict[str, dict], baseline: str,
                  wall: float, what: str) -> str:
    n = len(next(iter(results.values())))
    parts = [f"# {title}", ""]
    if n == 1:
        parts += [results_table([(k, v[0]) for k, v in results.items()], what), ""]
    else:
        parts += [f"{n} seeds ({', '.join(str(r['seed']) for r in next(iter(results.values())))}); each seed trains its own "
                  f"source-only model and every other row starts from it (paired on seeds). Target-val mIoU of the last "
                  f"checkpoint, in percent.", "", seeds_table(summary, baseline, what), "",
                  "Mean per-class IoU (percent) and paired differences:", "",
                  per_class_table(summary, baseline, [k for k in summary if f"vs_{baseline}" in summary[k]]), "",
                  "Prototype margin: per class, cos(target prototype, own source prototype) minus the best "
                  "cos with another class's source prototype (ground truth, source train vs target val, "
                  "mean over classes and seeds); nearest-own: share of target prototypes whose nearest "
                  "source prototype is their own class.", ""]
    parts.append(f"Wall time: {wall / 60:.1f} min.")
    return "\n".join(parts) + "\n"


def run_ablation(cfg_path: str | None, out: Path, overrides: Sequence[str] = (), init_checkpoint: str | None = None,
                 quiet: bool = False, seeds: int = 1, candidates: bool = False) -> str:
    """Every row of :data:`ABLATION_ROWS` (and the candidates) over seeds; writes ``ablation.{md,json}``."""
    seed_values = seed_list(cfg_path, overrides, seeds)
    if init_checkpoint is not None and seeds > 1:
        raise ConfigError("--init-checkpoint fixes one source-only model: it cannot be combined with --seeds > 1")
    out = fresh_dir(Path(out))
    out.mkdir(parents=True)
    t0 = time.time()
    rows = ([("source_only", ())] if init_checkpoint is None else []) + list(ABLATION_ROWS)
    rows += list(CANDIDATE_ROWS) if candidates else []
    results = run_grid(cfg_path, out, rows, seed_values, overrides, init_checkpoint, quiet, flat=seeds == 1)
    baseline = ABLATION_ROWS[0][0]
    summary = summarise(results, baseline)
    text = _results_text("BiDA ablation", results, summary, baseline, time.time() - t0, "ablation")
    (out / "ablation.md").write_text(text)
    (out / "ablation.json").write_text(json.dumps(summary, indent=2))
    print("\n" + text + f"\nwritten to {out / 'ablation.md'}")
    return text
