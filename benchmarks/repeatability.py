"""Does one config repeat bit for bit across fresh processes, and under which conditions?

Runs ``bida demo`` (source-only, then self-training and BiDA from it) in several fresh
processes, each under one named condition, and compares every logged value (wall times
left out) and the final metrics of each run with those of the first process. The
conditions are the suspects of a non-repeat: embedded data generated in the process or
read from the cache, Python's hash seed, MKL's conditional numerical reproducibility and
dynamic thread choice, and the thread count.

    python benchmarks/repeatability.py                         # the shrunk demo, every condition
    python benchmarks/repeatability.py --full                  # the demo as `make demo` runs it (minutes each)
    python benchmarks/repeatability.py --conditions warm hash mkl_cbwr

Prints one row per process: the condition, whether each run equals the first process's,
and each run's test mIoU. Exit status 0 either way: a difference is a finding, not an error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("source_only", "self_training", "bida")
# The demo shrunk in lengths and image counts only (the DeepLab-V2 rounds path, as shipped).
SHRUNK = ["train.iters=300", "train.iters_per_round=100", "train.rounds=2", "train.eval_every=100",
          "data.synthetic.num_val=60", "data.synthetic.num_test=60"]
SMOKE = ["data.synthetic.num_train=8", "data.synthetic.num_val=4", "data.synthetic.num_test=2",
         "data.synthetic.height=32", "data.synthetic.width=64", "data.crop=[32,64]", "model.width=0.125",
         "train.iters=4", "train.iters_per_round=2", "train.rounds=1", "train.eval_every=100"]
# name -> (environment changes, whether the data cache starts empty)
CONDITIONS: dict[str, tuple[dict[str, str], bool]] = {
    "fresh": ({}, True),                                     # data generated in this process
    "warm": ({}, False),                                     # data read from the cache
    "hash": ({"PYTHONHASHSEED": "123"}, False),              # another hash seed (set and dict order)
    "mkl_cbwr": ({"MKL_CBWR": "COMPATIBLE"}, False),         # MKL's reproducible code paths
    "mkl_static": ({"MKL_DYNAMIC": "FALSE"}, False),         # MKL keeps the thread count it is given
    "one_thread": ({"OMP_NUM_THREADS": "1"}, False),         # expected to differ: another summation order
}


def logged(run: Path) -> list[dict]:
    """Every logged record of a run, wall times left out."""
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
            for line in (run / "log.jsonl").read_text().splitlines()]


def run_demo(out: Path, cache: Path, env: dict[str, str], overrides: list[str]) -> float:
    """One ``bida demo`` in a fresh process; returns its wall time in seconds."""
    full_env = {**os.environ, "BIDA_CACHE": str(cache), **env}
    full_env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + full_env.get("PYTHONPATH", "")
    start = time.time()
    subprocess.run([sys.executable, "-m", "bida", "demo", "--quiet", "--out", str(out), *overrides],
                   env=full_env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return time.time() - start


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    p.add_argument("--full", action="store_true", help="the demo at its own lengths (as `make demo`)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs")
    p.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    overrides = SMOKE if args.smoke else [] if args.full else SHRUNK
    out = args.out or Path(tempfile.mkdtemp(prefix="bida-repeat-"))
    warm_cache = out / "cache"
    rows, first = [], None
    for i, name in enumerate(args.conditions):
        env, fresh = CONDITIONS[name]
        cache = out / f"cache_{i}" if fresh else warm_cache
        wall = run_demo(out / f"{i}_{name}", cache, env, overrides)
        runs = {r: logged(out / f"{i}_{name}" / r) for r in RUNS}
        metrics = {r: json.loads((out / f"{i}_{name}" / r / "metrics.json").read_text()) for r in RUNS}
        test = {r: metrics[r].get("test", {}).get("mIoU", metrics[r]["mIoU"]) for r in RUNS}
        if first is None:
            first = (runs, test)
        # compared as JSON text: a NaN (an undefined accuracy) then equals itself
        same = {r: json.dumps(runs[r], sort_keys=True) == json.dumps(first[0][r], sort_keys=True)
                and test[r] == first[1][r] for r in RUNS}
        rows.append({"condition": name, "env": env, "fresh_cache": fresh, "wall_s": wall,
                     "same_as_first": same, "test_mIoU": test})
        print(f"{name:>11} | " + " | ".join(f"{r} {'same' if same[r] else 'DIFFERS'} {100 * test[r]:.4f}"
                                           for r in RUNS) + f" | {wall:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"overrides": overrides, "rows": rows}, indent=2))
    print(f"runs in {out}")
    return rows


if __name__ == "__main__":
    main()
