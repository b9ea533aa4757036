"""What a run report reads from a run directory: config, run record, log and metrics.

:func:`load_runs` gives one :class:`Run` per directory; a file a run does not have (an
unfinished run has no ``metrics.json``) is None, never an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..config import Config, load_config
from ..errors import BidaError, RunDirError


@dataclass
class Run:
    """What a run directory holds, read once."""

    name: str
    slug: str  # unique, file-name safe: figures/curves_<slug>.png
    path: Path
    cfg: Config
    meta: dict  # run.json
    records: list[dict]  # log.jsonl
    metrics: dict | None  # metrics.json (None while the run is unfinished)

    @property
    def checkpoint(self) -> Path | None:
        path = self.path / "checkpoints" / "last.pt"
        return path if path.is_file() else None

    def final(self) -> dict | None:
        """Final target metrics: ``metrics.json``, else the last evaluation in the log."""
        if self.metrics is not None and _finite(self.metrics.get("mIoU")):
            return self.metrics
        evals = [r for r in self.records if "eval/mIoU" in r]
        if not evals:
            return None
        last = evals[-1]
        return {"mIoU": last["eval/mIoU"], "pixel_acc": last.get("eval/pixel_acc", float("nan")),
                "per_class_iou": {k[len("eval/iou/"):]: v for k, v in last.items() if k.startswith("eval/iou/")},
                "from_log": True}

    def test(self) -> dict | None:
        """Target-test metrics of the last checkpoint (``metrics.json["test"]``), None without a test split."""
        test = (self.metrics or {}).get("test")
        return test if isinstance(test, dict) and _finite(test.get("mIoU")) else None

    def best(self) -> tuple[float, int] | None:
        """(best target mIoU, its step) over the run's evaluations."""
        best = (self.metrics or {}).get("best") or {}
        if isinstance(best.get("mIoU"), (int, float)) and best["mIoU"] >= 0:
            return float(best["mIoU"]), int(best.get("step", -1))
        evals = [(r["eval/mIoU"], r["step"]) for r in self.records if _finite(r.get("eval/mIoU"))]
        return max(evals) if evals else None

    def rounds(self) -> list[dict]:
        """Per-round static pseudo-label statistics (log records, else stats.json files)."""
        found = {r["round"]: r for r in self.records if "pseudo/per_class" in r}
        for stats_path in sorted((self.path / "pseudo_labels").glob("round_*/stats.json")):
            r = int(stats_path.parent.name.split("_")[-1])
            stats = _read_json(stats_path)
            if r not in found and stats and "per_class" in stats:
                found[r] = {"round": r, "pseudo/static_accuracy": stats.get("accuracy"),
                            "pseudo/static_coverage": stats.get("coverage"), "pseudo/per_class": stats["per_class"]}
        return [found[r] for r in sorted(found)]

    def method_label(self) -> str:
        m = self.cfg.method
        mic = " + MIC" if self.cfg.mic.weight > 0 else ""
        if m.name != "bida":
            return m.name + mic
        off = [part for part in ("t2s", "s2t", "dynamic_labels", "calibration") if not getattr(m, part)]
        return "bida" + (f" (without {', '.join(off)})" if off else "") + mic


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_log(path: Path) -> list[dict]:
    """The records of ``log.jsonl``; a half-written last line (a killed run) is skipped."""
    records = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            records.append(rec)
    return records


def load_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    """Read every run directory; display names are the directory names (made unique)."""
    if not run_dirs:
        raise BidaError("no run directories given")
    paths = [Path(p) for p in run_dirs]
    for p in paths:
        if not (p / "config.yaml").is_file():
            raise RunDirError(f"{p} is not a bida run directory (no config.yaml)")
    names = [p.resolve().name for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in paths]
    names = [n if names.count(n) == 1 else f"{n} #{i + 1}" for i, n in enumerate(names)]
    classes = {tuple(meta["classes"]) for p in paths if (meta := _read_json(p / "run.json")) and meta.get("classes")}
    if len(classes) > 1:
        raise BidaError("the runs were trained on different class sets; a report compares runs of one domain pair")
    slugs = [_slug(n) for n in names]
    slugs = [s if slugs.count(s) == 1 else f"{s}_{i + 1}" for i, s in enumerate(slugs)]
    return [Run(name, slug, p, load_config(p / "config.yaml"), _read_json(p / "run.json") or {},
                read_log(p / "log.jsonl"), _read_json(p / "metrics.json")) for name, slug, p in zip(names, slugs, paths)]


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "run"
