"""Peak memory of a training step with and without ``model.grad_checkpoint``.

The transformer path at DAFormer's shapes, as ``teacher_step.py``: MiT-B5 with the DAFormer
head (decoder 256), 2 source + 2 target 512x512 crops, K=19, bf16 autocast, AdamW, the
teacher schedule (EMA teacher, ClassMix). One step is zero grad, ``teacher_step`` (forward
and every loss), backward, AdamW step and the EMA update. Each method runs once with the
plain model and once with activation checkpointing, one after the other in this process,
each with a freshly built model: a warm-up step (the optimizer's state, cuDNN), then the
peak (``torch.cuda.max_memory_allocated``, weights, optimizer state and teacher included)
of the next steps, and their median time. The variants are teacher_step.py's: self-training
and BiDA, each alone and with MIC.

    bash benchmarks/gpu.sh                         # runs this as one of its parts
    .venv/bin/python benchmarks/memory.py [--size 512] [--backbone mit_b5] [--methods self_training bida]
    .venv/bin/python benchmarks/memory.py --smoke  # CPU, MiT-B0 at width 0.25, 64x64, self_training: runs?
    .venv/bin/python benchmarks/memory.py --hrda --methods self_training+mic bida+mic  # MIC(HRDA) [+ BiDA], 1024 + 512

On a CPU there is no allocator peak to read: the figure is the growth of the process's
resident memory (its high-water mark, reset before the step where Linux allows) over the
step, marked ``~``: approximate, since memory that the C allocator keeps from earlier steps
is reused without showing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import teacher_step  # noqa: E402 - the benchmark next to this one
import train_step as ts  # noqa: E402
from evaluation import _reset_peak_rss  # noqa: E402 - resets VmHWM

from bida.config import replace_path  # noqa: E402
from bida.models import build_model  # noqa: E402
from bida.engine.optim import build_optimizer  # noqa: E402
from bida.method.teacher import MeanTeacher  # noqa: E402

PRECISIONS = teacher_step.PRECISIONS
BACKBONES = teacher_step.BACKBONES


def _rss_kib(field: str) -> int | None:
    """``VmRSS`` or ``VmHWM`` of this process in KiB (Linux), else None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMeter:
    """Peak memory of the code between :meth:`start` and :meth:`stop`, in GiB."""

    def __init__(self, device: torch.device):
        self.device = device
        self.approximate = device.type != "cuda"

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._hwm = _reset_peak_rss() and _rss_kib("VmHWM") is not None
        self._base = _rss_kib("VmRSS") if self._hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        # without a resettable high-water mark: growth of the lifetime maximum (0 if an earlier step was higher)
        peak = _rss_kib("VmHWM") if self._hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, peak - self._base) / 2**20


def measure(cfg, args: argparse.Namespace, device: torch.device, amp_dtype) -> tuple[float, float]:
    """(peak GiB over the timed steps, median step seconds) of ``cfg`` on a freshly built model."""
    torch.manual_seed(0)
    model = build_model(cfg.model, ts.NUM_CLASSES, cfg.method.feature).to(device).train()
    batches = ts.make_batches(args.size, device)
    batches[1]["label"] = torch.full_like(batches[1]["label"], ts.IGNORE)  # target truth: unknown
    state = MeanTeacher(cfg, ts.NUM_CLASSES, device)
    state.start(model)
    calibration = ts.new_calibration(cfg, model, device) if cfg.method.name == "bida" else None
    optimizer = build_optimizer(model.param_groups(cfg.train.lr, cfg.train.head_lr_mult), cfg.train.lr, cfg.train)
    step = teacher_step.step_fn(model, optimizer, state, batches, cfg, calibration, device, amp_dtype)
    for _ in range(args.warmup):
        step()
    meter = PeakMeter(device)
    meter.start()
    times = [step() for _ in range(args.repeats)]
    peak = meter.stop()
    del model, optimizer, state, step, calibration, batches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return peak, statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=None, help="square crop (DAFormer: 512; with --hrda 1024)")
    parser.add_argument("--backbone", default=None, choices=BACKBONES,
                        help="MiT (DAFormer's mit_b5) or a DINOv2 ViT (dinov2_vitl14: VFM-UDA's), no weights loaded")
    parser.add_argument("--width", type=float, default=None, help="encoder width multiplier (MiT stages, ViT embedding)")
    parser.add_argument("--decoder-dim", type=int, default=256, help="DAFormer head channels (DAFormer: 256)")
    parser.add_argument("--methods", nargs="+", default=["self_training", "bida", "self_training+mic", "bida+mic"],
                        choices=teacher_step.METHODS)
    parser.add_argument("--precision", default="bf16", choices=list(PRECISIONS))
    parser.add_argument("--repeats", type=int, default=2, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="steps per variant before measuring")
    parser.add_argument("--hrda", action="store_true",
                        help="HRDA: --size is the context crop (HRDA: 1024, the default then), a detail crop of half its side")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, MiT-B0 (or --backbone) at width 0.25 (or --width), 64x64, self_training: checks the script runs")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.size, args.decoder_dim = "cpu", 64, 32
        args.backbone, args.width = args.backbone or "mit_b0", args.width or 0.25
        args.precision, args.repeats, args.warmup = "fp32", 1, 1
        if args.methods == parser.get_default("methods"):  # unless named: the cheapest variant
            args.methods = ["self_training"]
    args.backbone, args.width = args.backbone or "mit_b5", args.width or 1.0
    args.size = args.size or (1024 if args.hrda else 512)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"no CUDA device (torch {torch.__version__}); use --smoke for a CPU check")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    hrda = f" in HRDA (detail crops {args.size // 2}x{args.size // 2})" if args.hrda else ""
    print(f"peak memory of a teacher train step: {args.backbone} (width {args.width}) + DAFormer head "
          f"({args.decoder_dim}){hrda}, {ts.BATCH} source + {ts.BATCH} target {args.size}x{args.size} crops, "
          f"K={ts.NUM_CLASSES}, {args.precision}, AdamW, EMA teacher")
    print(f"torch {torch.__version__}, device {device}: {name}")
    print(f"each variant: a fresh model, {args.warmup} warm-up step(s), then the peak and median time of "
          f"{args.repeats} step(s)" + ("; ~ = resident-memory growth, approximate" if device.type != "cuda" else ""))
    print()
    columns, widths = ["method", "grad_checkpoint", "peak GiB", "step ms", "ckpt/plain"], [17, 15, 9, 9, 10]
    print(" | ".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    rows: list[dict] = []
    start = time.perf_counter()
    approximate = device.type != "cuda"
    for method in args.methods:
        base = teacher_step.method_config(method, args)
        plain = None
        for on in (False, True):
            peak, seconds = measure(replace_path(base, model__grad_checkpoint=on), args, device, PRECISIONS[args.precision])
            ratio = peak / plain if on and plain else None
            plain = peak if not on else plain
            rows.append({"method": method, "grad_checkpoint": on, "peak_gib": peak, "step_ms": 1e3 * seconds,
                         "peak_ratio": ratio, "approximate": approximate})
            cells = [method, str(on).lower(), ("~" if approximate else "") + f"{peak:.3f}", f"{1e3 * seconds:.1f}",
                     f"{ratio:.3f}" if ratio is not None else ""]
            print(" | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)), flush=True)
            if args.json:  # after every row: a run stopped by its time limit keeps what it measured
                with open(args.json, "w") as fh:
                    json.dump({"device": name, "torch": torch.__version__, "backbone": args.backbone,
                               "size": args.size, "precision": args.precision, "hrda": args.hrda, "rows": rows},
                              fh, indent=1)
    print(f"\nckpt/plain: peak with grad_checkpoint over peak without; total {time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
