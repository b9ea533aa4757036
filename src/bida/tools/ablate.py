"""``bida ablate``: the BiDA components switched on one by one from the same starting point.

:data:`ABLATION_ROWS` go from self-training to full BiDA; ``--candidates`` adds
:data:`CANDIDATE_ROWS`, full BiDA (or the preset ``plus``) with one change each. Every row
runs over paired seeds as a grid (:mod:`bida.tools.grid`) and the table is written to
``ablation.{md,json}``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

from ..checkpoint import atomic_write_text
from ..config import load_config
from ..errors import ConfigError
from ..method.presets import preset_overrides
from ..engine.setup import environment
from .grid import _complete, _dir_name, _open_grid, run_grid, seed_list
from .grid_tables import _results_text, reported_split, summarise

ABLATION_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("self-training (no contrast)", ("method=self_training",)),
    ("+ t2s only", ("method=bida", "method.t2s=true", "method.s2t=false", "method.dynamic_labels=false", "method.calibration=false")),
    ("+ s2t only", ("method=bida", "method.t2s=false", "method.s2t=true", "method.dynamic_labels=false", "method.calibration=false")),
    ("+ t2s + s2t", ("method=bida", "method.dynamic_labels=false", "method.calibration=false")),
    ("+ dynamic labels", ("method=bida", "method.calibration=false")),
    ("+ calibration (full BiDA)", ("method=bida",)),
)

# Candidates for making the contrast count (docs/results.md); each row
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
    # The trained head with the paper's weights and partners (on the teacher path the preset's
    # memory partners and weights 0.5 gained less than the paper's settings).
    ("cand: paper + trained head", ("method=bida", "method.pretrain_head=true")),
)


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


def run_ablation(cfg_path: str | None, out: Path, overrides: Sequence[str] = (), init_checkpoint: str | None = None,
                 quiet: bool = False, seeds: int = 1, candidates: bool = False, resume: bool = False,
                 reevaluate: bool = False) -> str:
    """Every row of :data:`ABLATION_ROWS` (and the candidates) over seeds; writes ``ablation.{md,json}``.

    ``resume`` continues the ablation in ``out`` with its recorded settings (see :func:`bida.tools.demo.run_demo`).
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
