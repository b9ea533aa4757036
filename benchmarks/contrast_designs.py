"""Measure the contrast designs of issue 20 over paired seeds, on one path.

Rows: self-training, BiDA with the paper's settings, the preset ``plus``, and each design
candidate of ``bida.tools.ablate.CANDIDATE_ROWS`` that applies to the path (trained head, contrast
warm-up; each on top of ``plus``). The distribution-aware contrast and teacher prototypes
were measured with this script too (README, "Contrast designs from the field"); they lost
and their switches were removed.
Every seed trains its own source-only model (with the head a row needs: the segmentation
weights are the same with it) and every row of the seed adapts from it.

    PYTHONPATH=src python benchmarks/contrast_designs.py --arch deeplab --seeds 5 --out runs/designs_deeplab
    PYTHONPATH=src python benchmarks/contrast_designs.py --resume runs/designs_deeplab
    ... --design "trained head" --design "contrast warm-up 100"   # a subset of the designs

Writes ``designs.md`` (tables on target test and on target val, the split choices are made
on) and ``designs.json`` (``bida.tools.grid_tables.summarise`` rows, each with a ``val`` and a ``test`` block).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bida.checkpoint import atomic_write_text
from bida.engine.setup import environment
from bida.tools.ablate import candidate_rows
from bida.tools.demo import DEMO_ARCHS
from bida.tools.grid import _open_grid, run_grid, seed_list
from bida.tools.grid_tables import SUMMARY_KEYS, seeds_table, summarise, timing_table
from bida.method.presets import preset_overrides

DESIGNS = ("cand: preset plus + trained head", "cand: preset plus + trained backbone head",
           "cand: preset plus + contrast warm-up 100", "cand: paper + trained head")
BASELINE = "self_training"
PREFIX = "cand: preset plus + "


def _short(name: str) -> str:
    """A design's name as ``--design`` takes it."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else name[len("cand: "):]


def design_rows(cfg_path: str | None, overrides: list[str], designs: list[str] | None = None,
                bida_baselines: bool = True) -> list[tuple[str, tuple[str, ...]]]:
    """The rows measured on a path: source-only, the baselines and the designs that apply
    (``designs``: only those, by name without ``cand: preset plus + `` or ``cand: ``; None: all).
    ``bida_baselines=False`` leaves out BiDA paper and ``plus`` (a grid that adds designs
    to another's seeds: self-training, kept, shows that both adapt from the same weights).

    Raises:
        ValueError: a name in ``designs`` that is no design.
    """
    base = [("source_only", ()), (BASELINE, ("method=self_training",)), ("bida_paper", ("method=bida",)),
            ("bida_plus", ("method=bida", *preset_overrides("plus")))]
    wanted = DESIGNS if designs is None else [PREFIX + d if PREFIX + d in DESIGNS else "cand: " + d for d in designs]
    unknown = [w for w in wanted if w not in DESIGNS]
    if unknown:
        raise ValueError(f"--design: unknown {', '.join(unknown)} (known: "
                         f"{', '.join(_short(d) for d in DESIGNS)})")
    base = base if bida_baselines else base[:2]
    return base + [(n, r) for n, r in candidate_rows(cfg_path, overrides) if n in wanted]


def _val_only(summary: dict) -> dict:
    return {k: ({kk: vv for kk, vv in v.items() if kk != "test"} if k not in SUMMARY_KEYS else v)
            for k, v in summary.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(DEMO_ARCHS), default="deeplab")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/designs"))
    parser.add_argument("--resume", type=Path, default=None, help="continue the grid in this directory")
    parser.add_argument("--design", action="append", default=None, metavar="NAME", dest="designs",
                        help="measure this design (repeatable, e.g. 'contrast warm-up 100'; default: every one that applies)")
    parser.add_argument("--without-bida-baselines", action="store_true",
                        help="leave out the BiDA paper and plus rows (another grid of the same seeds has them)")
    parser.add_argument("overrides", nargs="*", help="key=value for every run (tests shrink the runs)")
    args = parser.parse_args(argv)
    t0 = time.time()
    spec = {"command": "contrast-designs", "arch": args.arch, "seeds": args.seeds, "overrides": args.overrides,
            "designs": args.designs, "bida_baselines": not args.without_bida_baselines}
    if args.resume is None:
        seed_list(DEMO_ARCHS[args.arch], args.overrides, args.seeds)
        design_rows(DEMO_ARCHS[args.arch], args.overrides, args.designs)  # names checked before the directory exists
    out, spec = _open_grid(args.resume or args.out, spec, args.resume is not None)
    cfg_path, overrides = DEMO_ARCHS[spec["arch"]], list(spec["overrides"])
    seeds = seed_list(cfg_path, overrides, int(spec["seeds"]))
    rows = design_rows(cfg_path, overrides, spec.get("designs"), spec.get("bida_baselines", True))
    timing: dict = {"setup_s": time.time() - t0, "runs_s": {}}
    results = run_grid(cfg_path, out, rows, seeds, overrides, quiet=True, flat=False, resume=args.resume is not None,
                       timing=timing["runs_s"])
    summary = summarise(results, BASELINE)
    timing["total_s"] = time.time() - t0
    env = environment()
    text = "\n".join([
        f"# Contrast designs, {spec['arch']} ({len(seeds)} paired seeds: {', '.join(map(str, seeds))})", "",
        "## Target test (300 images no choice saw; last checkpoint)", "", seeds_table(summary, BASELINE, "row"), "",
        "## Target val (the split the winner is chosen on)", "", seeds_table(_val_only(summary), BASELINE, "row"), "",
        "## Wall time", "", timing_table(timing), "",
        f"Measured at commit {env.get('git_commit')} on {env.get('cpu')} ({env.get('cpu_count')} cores), "
        f"torch {env.get('torch')}.", ""])
    atomic_write_text(out / "designs.md", text)
    atomic_write_text(out / "designs.json", json.dumps(summary | {"environment": env, "timing": timing}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
