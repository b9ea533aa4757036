"""``method.target_features`` over paired seeds on the transformer demo (MiT-B0, mean teacher).

Rows: self-training, BiDA with the paper's settings reading its target pixels from the
unmixed crop's own forward (``bida``, the default) and from the ClassMix crop's forward
(``bida_mixed``), and both again with the transformer path's ``plus`` preset
(``bida_plus``, ``bida_plus_mixed``; the preset as ``bida demo --arch transformer --preset
plus`` applies it). Every seed trains one source-only model and every row of the seed
adapts from it; the seeds are the demo's (0, 1, ...). Choices are read on target val, the
figures reported on target test.

    PYTHONPATH=src python benchmarks/target_features.py --seeds 5 --out runs/target_features
    PYTHONPATH=src python benchmarks/target_features.py --resume runs/target_features
    ... --rows bida bida_mixed --init-checkpoint SOURCE.pt   # a quicker, weaker pairing: see --init-checkpoint

Writes ``target_features.md`` (test and val tables, the paired differences mixed - unmixed)
and ``target_features.json`` (``bida.tools.grid_tables.summarise`` rows with ``vs_bida`` /
``vs_bida_plus`` pairs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bida.checkpoint import atomic_write_text
from bida.config import load_config
from bida.engine.setup import environment
from bida.method.presets import preset_overrides, preset_path
from bida.tools.demo import DEMO_ARCHS
from bida.tools.grid import _open_grid, run_grid, seed_list
from bida.tools.grid_tables import SUMMARY_KEYS, add_pair, seeds_table, summarise, timing_table

BASELINE = "self_training"
MIXED = "method.target_features=mixed"
PAIRS = {"bida_mixed": "bida", "bida_plus_mixed": "bida_plus", "bida_plus": "bida"}


def rows(cfg_path: str, overrides: list[str], names: list[str] | None = None) -> list[tuple[str, tuple[str, ...]]]:
    """Source-only, BiDA (paper, plus) with each target-feature source, and self-training;
    ``names``: only those rows (source-only is always trained unless an init checkpoint is given)."""
    plus = tuple(preset_overrides("plus", preset_path(load_config(cfg_path, overrides))))
    # In the order that matters when a seed must stop early: the pair first, self-training last.
    every = [("source_only", ()), ("bida", ("method=bida",)), ("bida_mixed", ("method=bida", MIXED)),
             ("bida_plus", ("method=bida", *plus)), ("bida_plus_mixed", ("method=bida", *plus, MIXED)),
             (BASELINE, ("method=self_training",))]
    return every if names is None else [r for r in every if r[0] in names]


def pairs_text(summary: dict, split: str) -> str:
    """Per-seed paired differences (points of mIoU) of each pair on ``split``."""
    lines = ["| pair | per seed | mean ± std | wins |", "|---|---|---|---|"]
    for name, other in PAIRS.items():
        block = summary.get(name, {}).get(split, {}).get(f"vs_{other}")
        if block:
            seeds = ", ".join(f"{100 * d:+.2f}" for d in block["per_seed"])
            lines.append(f"| {name} - {other} | {seeds} | {100 * block['mean']:+.2f} ± {100 * block['std']:.2f} | "
                         f"{block['wins']}/{len(block['per_seed'])} |")
    return "\n".join(lines)


def _val_only(summary: dict) -> dict:
    return {k: ({kk: vv for kk, vv in v.items() if kk != "test"} if k not in SUMMARY_KEYS else v)
            for k, v in summary.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/target_features"))
    parser.add_argument("--resume", type=Path, default=None, help="continue the grid in this directory")
    parser.add_argument("--rows", nargs="+", default=None, choices=[n for n, _ in rows(DEMO_ARCHS["transformer"], [])],
                        help="only these rows (default: all)")
    parser.add_argument("--init-checkpoint", default=None,
                        help="every seed adapts from this source-only checkpoint instead of training its own "
                             "(the seeds then vary the adaptation alone: a quicker, weaker pairing)")
    parser.add_argument("overrides", nargs="*", help="key=value for every run (tests shrink the runs)")
    args = parser.parse_args(argv)
    t0 = time.time()
    cfg_path = DEMO_ARCHS["transformer"]
    spec = {"command": "target-features", "seeds": args.seeds, "overrides": args.overrides, "rows": args.rows,
            "init_checkpoint": args.init_checkpoint}
    if args.resume is None:
        seed_list(cfg_path, args.overrides, args.seeds)
    out, spec = _open_grid(args.resume or args.out, spec, args.resume is not None)
    overrides = list(spec["overrides"])
    seeds = seed_list(cfg_path, overrides, int(spec["seeds"]))
    timing: dict = {"setup_s": time.time() - t0, "runs_s": {}}
    init = spec.get("init_checkpoint")
    grid_rows = [r for r in rows(cfg_path, overrides, spec.get("rows")) if not (init and r[0] == "source_only")]
    results = run_grid(cfg_path, out, grid_rows, seeds, overrides, init_checkpoint=init, quiet=True,
                       resume=args.resume is not None, timing=timing["runs_s"])
    summary = summarise(results, BASELINE)
    for name, other in PAIRS.items():
        if name in results and other in results:
            add_pair(summary, results, name, other)
    timing["total_s"] = time.time() - t0
    env = environment()
    text = "\n".join([
        f"# method.target_features, transformer demo ({len(seeds)} paired seeds: {', '.join(map(str, seeds))})", "",
        *([f"Every seed adapts from one source-only model: {init}.", ""] if init else []),
        *([f"Overrides: {' '.join(overrides)}", ""] if overrides else []),
        "## Target val (the split choices are made on)", "", seeds_table(_val_only(summary), BASELINE, "row"), "",
        pairs_text(summary, "val"), "",
        "## Target test (300 images no choice saw; last checkpoint)", "", seeds_table(summary, BASELINE, "row"), "",
        pairs_text(summary, "test"), "",
        "## Wall time", "", timing_table(timing), "",
        f"Measured at commit {env.get('git_commit')} on {env.get('cpu')} ({env.get('cpu_count')} cores), "
        f"torch {env.get('torch')}.", ""])
    atomic_write_text(out / "target_features.md", text)
    atomic_write_text(out / "target_features.json", json.dumps(summary | {"environment": env, "timing": timing}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
