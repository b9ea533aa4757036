"""What a grid of runs is: rows (named override lists) times training seeds, paired on seeds.

Each seed trains its own source-only model and every row of the seed adapts from it. A grid
directory records what it was asked to run (``grid.json``) so that ``--resume`` continues it:
finished runs (``demo_result.json``) are read back, stopped ones continued and missing ones
trained. Used by ``bida demo`` (:mod:`bida.tools.demo`), ``bida ablate``
(:mod:`bida.tools.ablate`) and ``benchmarks/contrast_designs.py``; the summaries and tables
of a grid's results are in :mod:`bida.tools.grid_tables`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from ..checkpoint import atomic_write_text
from ..config import Config, load_config, target_test_split
from ..errors import ConfigError, RunDirError
from .features import run_alignment
from ..engine.train import train

# Run directory of each ablation row (:data:`bida.tools.ablate.ABLATION_ROWS`): the components it switches on.
ROW_DIRS: dict[str, str] = {
    "self-training (no contrast)": "self_training",
    "+ t2s only": "t2s_only",
    "+ s2t only": "s2t_only",
    "+ t2s + s2t": "t2s_s2t",
    "+ dynamic labels": "t2s_s2t_dynamic",
    "+ calibration (full BiDA)": "t2s_s2t_dynamic_calibration",
}
HEAD_ON = "method.pretrain_head=true"  # a row that adapts from a source-only model with a trained head
GRID_FILE = "grid.json"  # what a demo or ablation directory was asked to run (read by --resume)
RESULT_FILE = "demo_result.json"  # a finished run of a grid: its metrics, wall time and alignment
LABEL_CACHE = "shared_labels"  # round-0 static pseudo labels shared by the rows of a seed


def fresh_dir(path: Path) -> Path:
    """``path`` if it does not exist yet, else ``path-2``, ``path-3``, ... (never overwrite)."""
    if not path.exists():
        return path
    i = 2
    while Path(f"{path}-{i}").exists():
        i += 1
    return Path(f"{path}-{i}")


def source_stage_overrides(cfg: Config) -> list[str]:
    """What a grid's source-only runs add to train the config's source stage: on the teacher
    schedule a source_only run trains ``train.iters`` on source, so it is given
    ``train.source_iters`` instead; other schedules need nothing."""
    t = cfg.train
    return [f"train.iters={t.source_iters}"] if t.schedule == "teacher" and t.source_iters else []


def seed_list(cfg_path: str | None, overrides: Sequence[str], num_seeds: int) -> list[int]:
    """``num_seeds`` consecutive training seeds from the config's ``seed`` (data stay fixed)."""
    if num_seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {num_seeds}")
    first = load_config(cfg_path, list(overrides)).seed
    return [first + i for i in range(num_seeds)]


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
    from ..engine.inference import evaluate, write_metrics
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


def run_grid(cfg_path: str | None, out: Path, rows: Sequence[tuple[str, Sequence[str]]], seeds: Sequence[int],
             overrides: Sequence[str] = (), init_checkpoint: str | None = None, quiet: bool = False,
             flat: bool = False, resume: bool = False, reevaluate: bool = False,
             timing: dict[str, float] | None = None) -> dict[str, list[dict]]:
    """Train every row for every seed; returns ``{row name: [metrics per seed]}``.

    Each seed first trains its own source-only model (unless ``init_checkpoint`` is given),
    and every row of that seed starts from it: rows are paired on seeds. A row named
    ``source_only`` is that source-only run itself. Runs go to ``out/seed_S/<row dir>``
    (``out/<row dir>`` when ``flat``); the round-0 pseudo labels, the same for every row
    of a seed, are generated once (``<seed dir>/shared_labels``). With ``resume``, finished
    runs are read back, stopped ones continued and missing ones trained. ``timing`` gets
    each run's wall time in seconds, keyed by its directory relative to ``out``.
    The source-only runs train the config's source stage (:func:`source_stage_overrides`), for
    every caller alike (demo, ablate, the benchmarks).
    """
    results: dict[str, list[dict]] = {name: [] for name, _ in rows}
    source_overrides = source_stage_overrides(load_config(cfg_path, list(overrides)))
    if init_checkpoint is None:  # the source-only models train the head a row adapts with
        source_overrides += head_overrides(rows)
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
