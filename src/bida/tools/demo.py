"""``bida demo`` and ``bida ablate``: several runs compared in one Markdown table.

The demo trains a source-only model on the embedded synthetic pair, then adapts it with
``self_training`` and ``bida`` (both starting from the same source-only checkpoint, same
seed, same data), and prints the target mIoU of each; the transformer demo adds both again
with MIC's masked image consistency. The ablation grid switches the BiDA components on one
by one from the same starting point.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from ..checkpoint import atomic_write_text
from ..config import Config, load_config, target_test_split
from ..errors import ConfigError, RunDirError
from .features import run_alignment
from ..method.presets import preset_overrides, preset_path
from ..engine.train import environment, train

# Demo settings: a narrow ResNet-18 DeepLab-V2 on 64x128 images trains in minutes on a CPU.
DEMO_OVERRIDES: tuple[str, ...] = ()
# The demo's config per architecture (None: the packaged defaults.yaml, DeepLab-V2 with
# offline rounds). ``transformer``: a CPU-sized MiT-B0 with the mean-teacher schedule,
# packaged as transformer_demo.yaml (also configs/demo_transformer.yaml).
TRANSFORMER_DEMO_FILE = Path(__file__).resolve().parent.parent / "transformer_demo.yaml"
DEMO_ARCHS: dict[str, str | None] = {"deeplab": None, "transformer": str(TRANSFORMER_DEMO_FILE)}
# The transformer demo's extra rows: its two teacher rows again with MIC (mic.weight 1, MIC's
# mask_lambda; block size and mask ratio from transformer_demo.yaml), each named after the row
# it extends. Their paired differences: against self_training (as every row) and against the
# row without MIC (BiDA's contribution on top of MIC: bida_mic against self_training_mic).
MIC_WEIGHT = "mic.weight=1.0"
MIC_ROWS: dict[str, str] = {"self_training_mic": "self_training", "bida_mic": "bida"}
MIC_PAIRS: dict[str, str] = {"bida_mic": "self_training_mic"}

ABLATION_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("self-training (no contrast)", ("method=self_training",)),
    ("+ t2s only", ("method=bida", "method.t2s=true", "method.s2t=false", "method.dynamic_labels=false", "method.calibration=false")),
    ("+ s2t only", ("method=bida", "method.t2s=false", "method.s2t=true", "method.dynamic_labels=false", "method.calibration=false")),
    ("+ t2s + s2t", ("method=bida", "method.dynamic_labels=false", "method.calibration=false")),
    ("+ dynamic labels", ("method=bida", "method.calibration=false")),
    ("+ calibration (full BiDA)", ("method=bida",)),
)

# Run directory of each ablation row: the components it switches on.
ROW_DIRS: dict[str, str] = {
    "self-training (no contrast)": "self_training",
    "+ t2s only": "t2s_only",
    "+ s2t only": "s2t_only",
    "+ t2s + s2t": "t2s_s2t",
    "+ dynamic labels": "t2s_s2t_dynamic",
    "+ calibration (full BiDA)": "t2s_s2t_dynamic_calibration",
}

# Candidates for making the contrast count (README "Does the contrast count?"); each row
# is full BiDA with one change (the last three: the preset ``plus`` with one change), so
# each is compared with full BiDA and with self-training.
CANDIDATE_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cand: memory prototypes as partners", ("method=bida", "method.memory_partners=true")),
    ("cand: y_T for target segmentation", ("method=bida", "pseudo.dynamic_for_segmentation=true")),
    ("cand: contrast weights 0.5", ("method=bida", "loss.contrast_t2s_weight=0.5", "loss.contrast_s2t_weight=0.5")),
    ("cand: contrast weights 1.0", ("method=bida", "loss.contrast_t2s_weight=1.0", "loss.contrast_s2t_weight=1.0")),
    ("cand: memory partners + weights 0.5", ("method=bida", *preset_overrides("plus"))),
    ("cand: memory partners + weights 1.0", ("method=bida", "method.memory_partners=true",
                                              "loss.contrast_t2s_weight=1.0", "loss.contrast_s2t_weight=1.0")),
    ("cand: preset plus + projection-head feature", ("method=bida", *preset_overrides("plus"), "method.feature=backbone")),
    ("cand: preset plus + temperature 0.05", ("method=bida", *preset_overrides("plus"), "loss.temperature=0.05")),
    ("cand: preset plus + temperature 0.2", ("method=bida", *preset_overrides("plus"), "loss.temperature=0.2")),
    # Contrast designs from the field (issue 20), each on top of the preset plus. A row that does
    # not apply to the config (see candidate_rows) is left out of its grid.
    ("cand: preset plus + trained head", ("method=bida", *preset_overrides("plus"), "method.pretrain_head=true")),
    ("cand: preset plus + trained backbone head", ("method=bida", *preset_overrides("plus"), "method.feature=backbone",
                                                   "method.pretrain_head=true")),
    ("cand: preset plus + contrast warm-up 100", ("method=bida", *preset_overrides("plus"),
                                                  "loss.contrast_warmup_iters=100")),
)
HEAD_ON = "method.pretrain_head=true"  # a row that adapts from a source-only model with a trained head

# results.json / ablation.json keys that are not rows: the wall times, which split the
# tables report ("test" when every run has a test split; each row's "val" block and its
# top-level figures stay target val, as before test splits), and where the figures were
# measured (bida.train.environment: git commit, CPU model, torch version).
SUMMARY_KEYS = ("timing", "split", "environment")
GRID_FILE = "grid.json"  # what a demo or ablation directory was asked to run (read by --resume)
RESULT_FILE = "demo_result.json"  # a finished run of a grid: its metrics, wall time and alignment
LABEL_CACHE = "shared_labels"  # round-0 static pseudo labels shared by the rows of a seed


def candidate_rows(cfg_path: str | None, overrides: Sequence[str] = ()) -> list[tuple[str, tuple[str, ...]]]:
    """The :data:`CANDIDATE_ROWS` that apply to a config: those whose overrides it accepts
    (a backbone head needs a DeepLab-V2, the trained head a head); the others are named on
    stdout and left out."""
    rows = []
    for name, row in CANDIDATE_ROWS:
        try:
            load_config(cfg_path, [*overrides, *row])
        except ConfigError as err:
            print(f"left out '{name}': {err}", flush=True)
            continue
        rows.append((name, row))
    return rows


def head_overrides(rows: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    """Overrides for a grid's source-only runs when a row adapts with a trained head
    (``method.pretrain_head``): the head, the feature it reads and its size. The head trains on detached
    features, so the segmentation weights are those of the source-only run without it.

    Raises:
        ConfigError: rows that need a trained head name different ``method.feature`` values.
    """
    head_rows = [row for _, row in rows if HEAD_ON in row]
    if not head_rows:
        return []
    shape = []  # the head's input and size
    for key in ("method.feature=", "model.proj_dim="):
        values = sorted({o for row in head_rows for o in row if o.startswith(key)})
        if len(values) > 1 or (values and any(values[0] not in row for row in head_rows)):
            raise ConfigError(f"method.pretrain_head: the rows that need a trained head differ in {key[:-1]} "
                              f"({', '.join(values)}); one source-only model per seed trains one head")
        shape += values
    return [HEAD_ON, *shape]


def fresh_dir(path: Path) -> Path:
    """``path`` if it does not exist yet, else ``path-2``, ``path-3``, ... (never overwrite)."""
    if not path.exists():
        return path
    i = 2
    while Path(f"{path}-{i}").exists():
        i += 1
    return Path(f"{path}-{i}")


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


def reported_split(summary: dict[str, dict]) -> str:
    """``"test"`` when every row of a summary has test figures, else ``"val"``."""
    rows = [e for k, e in summary.items() if k not in SUMMARY_KEYS]
    return "test" if rows and all("test" in e for e in rows) else "val"


def _reported(entry: dict, split: str) -> dict:
    """The figures of ``split`` in a summary row: its test block, or the row itself (val)."""
    return entry["test"] if split == "test" else entry


def _train(cfg_path: str | None, overrides: Sequence[str], out: Path, quiet: bool, resume: bool = False,
           label_cache: Path | None = None) -> dict:
    cfg: Config = load_config(cfg_path, list(overrides) + (["train.quiet=true"] if quiet else []))
    t0 = time.time()
    if resume and (out / "metrics.json").is_file():  # trained; stopped before its alignment was measured
        metrics = json.loads((out / "metrics.json").read_text())
    elif resume and (out / "config.yaml").is_file():
        metrics = train(None, out, resume=True, quiet=quiet, label_cache=label_cache)  # type: ignore[arg-type]
    else:
        metrics = train(cfg, out, label_cache=label_cache)
    metrics["wall_s"] = time.time() - t0
    # Prototype alignment of the final model (source train vs target val ground truth).
    metrics["alignment"] = run_alignment(out)
    atomic_write_text(out / RESULT_FILE, json.dumps(metrics, default=float))
    return metrics


def _finished(out: Path, reevaluate: bool) -> dict | None:
    """The recorded result of a finished run (evaluated again with ``reevaluate``), else None."""
    if not (out / RESULT_FILE).is_file():
        return None
    metrics = json.loads((out / RESULT_FILE).read_text())
    if reevaluate:
        metrics = reevaluate_run(out) | {"wall_s": metrics.get("wall_s", 0.0)}
        metrics["alignment"] = run_alignment(out)
        atomic_write_text(out / RESULT_FILE, json.dumps(metrics, default=float))
    return metrics


def reevaluate_run(run_dir: Path) -> dict:
    """Evaluate a run's last checkpoint on target val (and test) again; updates and returns its ``metrics.json``."""
    import torch

    from ..data.datasets import build_eval_dataset, resolve_domain
    from ..engine.evaluate import evaluate, write_metrics
    from .predict import model_from_checkpoint

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, cfg, names, _ = model_from_checkpoint(run_dir / "checkpoints" / "last.pt", None, device)
    tgt = resolve_domain(cfg, "target")
    fresh = evaluate(model, build_eval_dataset(cfg, tgt, cfg.data.target.val_split), cfg.eval, names,
                     cfg.data.eval_classes, quiet=True, ignore_index=tgt.classes.ignore_index, device=device)
    old = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    metrics = old | fresh
    split = target_test_split(cfg)
    if split:
        test = evaluate(model, build_eval_dataset(cfg, tgt, split), cfg.eval, names,
                        cfg.data.eval_classes, quiet=True, ignore_index=tgt.classes.ignore_index, device=device)
        metrics["test"] = test | {"split": split, "checkpoint": "last"}
    write_metrics(metrics, run_dir / "metrics.json")
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
             flat: bool = False, resume: bool = False, reevaluate: bool = False,
             timing: dict[str, float] | None = None, source_overrides: Sequence[str] = ()) -> dict[str, list[dict]]:
    """Train every row for every seed; returns ``{row name: [metrics per seed]}``.

    Each seed first trains its own source-only model (unless ``init_checkpoint`` is given),
    and every row of that seed starts from it: rows are paired on seeds. A row named
    ``source_only`` is that source-only run itself. Runs go to ``out/seed_S/<row dir>``
    (``out/<row dir>`` when ``flat``); the round-0 pseudo labels, the same for every row
    of a seed, are generated once (``<seed dir>/shared_labels``). With ``resume``, finished
    runs are read back, stopped ones continued and missing ones trained. ``timing`` gets
    each run's wall time in seconds, keyed by its directory relative to ``out``.
    ``source_overrides`` apply to the source-only runs only.
    """
    results: dict[str, list[dict]] = {name: [] for name, _ in rows}
    if init_checkpoint is None:  # the source-only models train the head a row adapts with
        source_overrides = [*source_overrides, *head_overrides(rows)]
    total = len(seeds) * (len(rows) + (init_checkpoint is None and not any(n == "source_only" for n, _ in rows)))
    done = 0

    def one(run_dir: Path, args: list[str], label: str, cache: Path | None) -> dict:
        nonlocal done
        done += 1
        metrics = _finished(run_dir, reevaluate) if resume else None
        if metrics is not None:
            print(f"[{done}/{total}] {label}: finished earlier -> {run_dir}", flush=True)
        else:
            print(f"[{done}/{total}] {label} -> {run_dir}", flush=True)
            metrics = _train(cfg_path, args, run_dir, quiet, resume=resume, label_cache=cache)
        if timing is not None:
            timing[run_dir.relative_to(out).as_posix()] = float(metrics.get("wall_s", 0.0))
        return metrics

    for seed in seeds:
        seed_dir = out if flat else out / f"seed_{seed}"
        base = list(overrides) + [f"seed={seed}"]
        init = init_checkpoint
        if init is None:
            so = one(seed_dir / "source_only", base + ["method=source_only", *source_overrides], f"seed {seed}: source-only", None)
            if "source_only" in results:
                results["source_only"].append(so | {"seed": seed})
            init = str(seed_dir / "source_only" / "checkpoints" / "last.pt")
        for name, row in rows:
            if name == "source_only":
                continue
            m = one(seed_dir / _dir_name(name), base + list(row) + [f"model.init_checkpoint={init}"],
                    f"seed {seed}: {name}", seed_dir / LABEL_CACHE)
            results[name].append(m | {"seed": seed})
    return results


def _dir_name(name: str) -> str:
    """A row's run directory: its components (``t2s_s2t_dynamic``), else its name made safe."""
    if name in ROW_DIRS:
        return ROW_DIRS[name]
    if name.startswith("cand: "):
        name = "cand_" + name[len("cand: "):]
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name).strip("_") or "row"


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


def _open_grid(out: Path, spec: dict, resume: bool) -> tuple[Path, dict]:
    """A fresh grid directory with its ``grid.json``, or (``resume``) the spec of an existing one."""
    if resume:
        path = Path(out) / GRID_FILE
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            raise RunDirError(f"{out} is not a bida {spec['command']} directory that can be resumed "
                              f"(no readable {GRID_FILE})") from None
        if saved.get("command") != spec["command"]:
            raise RunDirError(f"{out} holds a bida {saved.get('command')}, not a {spec['command']}: "
                              f"resume it with bida {saved.get('command')} --resume {out}")
        return Path(out), saved
    out = fresh_dir(Path(out))
    out.mkdir(parents=True)
    atomic_write_text(out / GRID_FILE, json.dumps(spec, indent=2))
    return out, spec


def _complete(out: Path, results_file: str, run_dirs: Sequence[Path]) -> bool:
    return (out / results_file).is_file() and all((d / RESULT_FILE).is_file() for d in run_dirs)


def run_demo(out: Path, overrides: Sequence[str] = (), quiet: bool = False, report: bool = True,
             seeds: int = 1, preset: str = "paper", resume: bool = False, reevaluate: bool = False,
             arch: str = "deeplab") -> dict[str, dict]:
    """Source-only, then self-training and BiDA from it, for each seed; writes ``results.{md,json}``.

    ``preset`` (:mod:`bida.presets`) applies to the BiDA row only; ``results.json`` records it,
    and its ``timing`` field the wall-time breakdown (set-up, each run, report). ``resume``
    continues the demo in ``out`` with its recorded settings: missing runs are trained,
    stopped ones continued, then the table and report are rebuilt; a finished demo is left
    as it is unless ``reevaluate`` asks for every run to be evaluated again. ``arch``
    (:data:`DEMO_ARCHS`) picks the demo's config: ``deeplab`` (DeepLab-V2, offline rounds) or
    ``transformer`` (MiT-B0, mean teacher: the rows are source-only, teacher self-training
    and BiDA + teacher, and both again with MIC, :data:`MIC_ROWS`).
    """
    t0 = time.time()
    if arch not in DEMO_ARCHS:
        raise ConfigError(f"--arch: unknown architecture '{arch}' (known: {', '.join(DEMO_ARCHS)})")
    spec = {"command": "demo", "overrides": list(DEMO_OVERRIDES) + list(overrides), "seeds": seeds, "preset": preset,
            "arch": arch}
    if not resume:
        seed_list(DEMO_ARCHS[arch], spec["overrides"], seeds)  # validated before the directory is created
    out, spec = _open_grid(Path(out), spec, resume)
    base, seeds, preset = spec["overrides"], int(spec["seeds"]), spec["preset"]
    arch = spec.get("arch", "deeplab")
    cfg_path = DEMO_ARCHS[arch]
    seed_values = seed_list(cfg_path, base, seeds)
    rows = [("source_only", ()), ("self_training", ("method=self_training",)),
            ("bida", ("method=bida", *preset_overrides(preset, preset_path(load_config(cfg_path, list(base))))))]
    if preset != "paper":  # the paper's settings are always reported beside a preset
        rows.append(("bida_paper", ("method=bida",)))
    if arch == "transformer":
        rows += [(name, (*dict(rows)[plain], MIC_WEIGHT)) for name, plain in MIC_ROWS.items()]
    seed_dirs = [out] if seeds == 1 else [out / f"seed_{s}" for s in seed_values]
    if resume and not reevaluate and _complete(out, "results.json", [d / k for d in seed_dirs for k, _ in rows]):
        print(f"demo {out} is complete ({out / 'results.md'}); nothing to do "
              "(--reevaluate evaluates every run again and rebuilds the table and report)")
        saved = json.loads((out / "results.json").read_text())
        return {k: v for k, v in saved.items() if k not in SUMMARY_KEYS}
    # Set-up: the embedded data are generated on first use (then read from the cache).
    from ..data.datasets import resolve_domain

    setup_cfg = load_config(cfg_path, list(base))
    resolve_domain(setup_cfg, "source"), resolve_domain(setup_cfg, "target")
    timing: dict = {"setup_s": time.time() - t0, "runs_s": {}}
    # Mean teacher: a source-only run trains train.iters on source; the demo's source-only
    # models train the config's source stage (train.source_iters) instead.
    t = setup_cfg.train
    so_over = [f"train.iters={t.source_iters}"] if t.schedule == "teacher" and t.source_iters else []
    results = run_grid(cfg_path, out, rows, seed_values, base, quiet=quiet, flat=seeds == 1, resume=resume,
                       reevaluate=reevaluate, timing=timing["runs_s"], source_overrides=so_over)
    summary = summarise(results, "self_training")
    for name, other in (*MIC_PAIRS.items(), ("bida", "bida_paper")):
        if name in results and other in results:
            add_pair(summary, results, name, other)
    for name in ("bida", "bida_mic"):
        if name in summary:
            summary[name]["preset"] = preset
    if "bida_paper" in summary:
        summary["bida_paper"]["preset"] = "paper"
    title = "bida demo (embedded synthetic pair" + (", MiT-B0, mean teacher)" if arch == "transformer" else ")")
    title += "" if preset == "paper" else f", BiDA with preset '{preset}'"

    env = environment()

    def write(timing: dict) -> str:
        timing["total_s"] = time.time() - t0
        text = _results_text(title, results, summary, "self_training", timing, "method", env)
        atomic_write_text(out / "results.md", text)
        atomic_write_text(out / "results.json", json.dumps(
            summary | {"split": reported_split(summary), "environment": env, "timing": timing}, indent=2))
        return text

    text = write(timing)  # before the report: the table survives a failing report
    if report:
        try:
            from .report import write_report
        except ImportError:
            write_report = None
        if write_report is not None:
            t_report = time.time()
            first = seed_dirs[0]
            page = write_report([first / k for k, _ in rows], out / "report", overwrite=resume)
            timing["report_s"] = time.time() - t_report
            text = write(timing)
            print(f"report ({'seed ' + str(seed_values[0]) if seeds > 1 else 'this run'}): {page}")
    print("\n" + text)
    print(f"demo directory: {out}")
    return summary


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


def run_ablation(cfg_path: str | None, out: Path, overrides: Sequence[str] = (), init_checkpoint: str | None = None,
                 quiet: bool = False, seeds: int = 1, candidates: bool = False, resume: bool = False,
                 reevaluate: bool = False) -> str:
    """Every row of :data:`ABLATION_ROWS` (and the candidates) over seeds; writes ``ablation.{md,json}``.

    ``resume`` continues the ablation in ``out`` with its recorded settings (see :func:`run_demo`).
    """
    t0 = time.time()
    spec = {"command": "ablate", "config": cfg_path, "overrides": list(overrides), "seeds": seeds,
            "init_checkpoint": init_checkpoint, "candidates": candidates}
    if not resume:
        seed_list(cfg_path, overrides, seeds)
        if init_checkpoint is not None and seeds > 1:
            raise ConfigError("--init-checkpoint fixes one source-only model: it cannot be combined with --seeds > 1")
    out, spec = _open_grid(Path(out), spec, resume)
    cfg_path, overrides, seeds = spec["config"], spec["overrides"], int(spec["seeds"])
    init_checkpoint, candidates = spec["init_checkpoint"], bool(spec["candidates"])
    seed_values = seed_list(cfg_path, overrides, seeds)
    rows = ([("source_only", ())] if init_checkpoint is None else []) + list(ABLATION_ROWS)
    rows += candidate_rows(cfg_path, overrides) if candidates else []
    seed_dirs = [out] if seeds == 1 else [out / f"seed_{s}" for s in seed_values]
    if resume and not reevaluate and _complete(out, "ablation.md", [d / _dir_name(k) for d in seed_dirs for k, _ in rows]):
        print(f"ablation {out} is complete ({out / 'ablation.md'}); nothing to do "
              "(--reevaluate evaluates every run again and rebuilds the table)")
        return (out / "ablation.md").read_text()
    timing: dict = {"setup_s": time.time() - t0, "runs_s": {}}
    results = run_grid(cfg_path, out, rows, seed_values, overrides, init_checkpoint, quiet, flat=seeds == 1,
                       resume=resume, reevaluate=reevaluate, timing=timing["runs_s"])
    baseline = ABLATION_ROWS[0][0]
    summary = summarise(results, baseline)
    timing["total_s"] = time.time() - t0
    env = environment()
    text = _results_text("BiDA ablation", results, summary, baseline, timing, "ablation", env)
    atomic_write_text(out / "ablation.md", text)
    atomic_write_text(out / "ablation.json", json.dumps(
        summary | {"split": reported_split(summary), "environment": env, "timing": timing}, indent=2))
    print("\n" + text + f"\nwritten to {out / 'ablation.md'}")
    return text
