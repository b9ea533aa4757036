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

from .config import Config, load_config
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
    return metrics


def run_demo(out: Path, overrides: Sequence[str] = (), quiet: bool = False, report: bool = True) -> dict[str, dict]:
    """Source-only, then self-training and BiDA from it; prints and writes ``results.md``."""
    out = fresh_dir(Path(out))
    out.mkdir(parents=True)
    base = list(DEMO_OVERRIDES) + list(overrides)
    results: dict[str, dict] = {}
    print(f"[1/3] source-only training -> {out / 'source_only'}", flush=True)
    results["source_only"] = _train(None, base + ["method=source_only"], out / "source_only", quiet)
    init = out / "source_only" / "checkpoints" / "last.pt"
    for i, method in enumerate(("self_training", "bida"), start=2):
        print(f"[{i}/3] {method} from the source-only model -> {out / method}", flush=True)
        results[method] = _train(None, base + [f"method={method}", f"model.init_checkpoint={init}"], out / method, quiet)
    table = results_table([(k, v) for k, v in results.items()])
    text = f"# bida demo (embedded synthetic pair)\n\n{table}\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({k: {kk: v[kk] for kk in ("mIoU", "pixel_acc", "best", "wall_s")}
                                                  for k, v in results.items()}, indent=2))
    print("\n" + table + "\n")
    if report:
        try:
            from .report import write_report
        except ImportError:
            write_report = None
        if write_report is not None:
            page = write_report([out / k for k in results], out / "report")
            print(f"report: {page}")
    print(f"demo directory: {out}")
    return results


def run_ablation(cfg_path: str | None, out: Path, overrides: Sequence[str] = (), init_checkpoint: str | None = None,
                 quiet: bool = False) -> str:
    """Every row of :data:`ABLATION_ROWS` from one source-only checkpoint; writes ``ablation.md``."""
    out = fresh_dir(Path(out))
    out.mkdir(parents=True)
    base = list(overrides)
    if init_checkpoint is None:
        print(f"source-only stage -> {out / 'source_only'}", flush=True)
        _train(cfg_path, base + ["method=source_only"], out / "source_only", quiet)
        init_checkpoint = str(out / "source_only" / "checkpoints" / "last.pt")
    rows = []
    for i, (name, row) in enumerate(ABLATION_ROWS):
        print(f"[{i + 1}/{len(ABLATION_ROWS)}] {name}", flush=True)
        m = _train(cfg_path, base + list(row) + [f"model.init_checkpoint={init_checkpoint}"], out / f"row{i}", quiet)
        rows.append((name, m))
    table = results_table(rows, "ablation")
    (out / "ablation.md").write_text(f"# BiDA ablation\n\n{table}\n")
    print("\n" + table + f"\n\nwritten to {out / 'ablation.md'}")
    return table
