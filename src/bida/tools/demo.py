"""``bida demo``: several runs compared in one Markdown table.

The demo trains a source-only model on the embedded synthetic pair, then adapts it with
``self_training`` and ``bida`` (both starting from the same source-only checkpoint, same
seed, same data), and prints the target mIoU of each; the transformer demo adds both again
with MIC's masked image consistency.

``bida ablate`` (the BiDA components switched on one by one from the same starting point) is
:mod:`bida.tools.ablate`; what a grid of runs over paired seeds is, :mod:`bida.tools.grid`;
its summaries and tables, :mod:`bida.tools.grid_tables`. Their names stay importable from
here, as they were before they moved.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from ..checkpoint import atomic_write_text
from ..config import load_config
from ..errors import ConfigError
from ..method.presets import preset_overrides, preset_path
from ..engine.setup import environment
from .grid import _complete, _open_grid, run_grid, seed_list
from .grid_tables import SUMMARY_KEYS, _results_text, add_pair, reported_split, summarise

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
    results = run_grid(cfg_path, out, rows, seed_values, base, quiet=quiet, flat=seeds == 1, resume=resume,
                       reevaluate=reevaluate, timing=timing["runs_s"])
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
