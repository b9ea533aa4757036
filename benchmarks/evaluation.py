"""Evaluation throughput and peak memory: whole-image prediction vs sliding windows.

Both modes call :func:`bida.engine.inference.predict_probs` (softmax probabilities at input size)
with ``EvalConfig(mode=...)`` on the same random images. Images/s: the two modes
alternate in one process, medians reported. Peak memory: each mode runs again in a
fresh subprocess, and the growth of its peak resident set size over the process after
the model and the image were built is reported (Linux: VmHWM reset through
/proc/self/clear_refs; elsewhere the ``ru_maxrss`` delta); allocators keep freed memory,
so only a fresh process per mode gives that mode's own peak. On CUDA the peak is
``torch.cuda.max_memory_allocated`` above the memory in use before the call.

The default (ResNet-101 at width 0.5, one 512x1024 image) takes a couple of minutes on a
2-core CPU; Cityscapes evaluation in the paper predicts 1460x730 at width 1.0.

    .venv/bin/python benchmarks/evaluation.py [--height 512] [--width-px 1024] [--backbone resnet101]
        [--width 0.5] [--crop 512 512] [--stride 341 341] [--repeats 3] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from bida.config import EvalConfig, ModelConfig
from bida.models import build_model
from bida.engine.inference import predict_probs

NUM_CLASSES = 19  # Cityscapes train ids
MODES = ("whole", "slide")


def build(args: argparse.Namespace, device: torch.device):
    torch.manual_seed(0)
    model_cfg = ModelConfig(backbone=args.backbone, width=args.width, freeze_bn=True)
    model = build_model(model_cfg, NUM_CLASSES).to(device).eval()
    image = torch.randn(1, 3, args.height, args.width_px, generator=torch.Generator().manual_seed(0)).to(device)
    return model, image


def eval_config(mode: str, args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(mode=mode, crop=tuple(args.crop), stride=tuple(args.stride))


def windows(args: argparse.Namespace) -> int:
    """Number of windows ``slide`` runs per image (as bida.engine.inference.slide_logits counts them)."""
    ch, cw = min(args.crop[0], args.height), min(args.crop[1], args.width_px)
    rows = max(1, math.ceil((args.height - ch) / args.stride[0]) + 1)
    cols = max(1, math.ceil((args.width_px - cw) / args.stride[1]) + 1)
    return rows * cols


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predict_seconds(model, image, cfg: EvalConfig, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    predict_probs(model, image, cfg, NUM_CLASSES)
    sync(device)
    return time.perf_counter() - start


def peak_mib(mode: str, args: argparse.Namespace, device: torch.device) -> float:
    """Peak memory (MiB) one prediction adds over the built model and image."""
    model, image = build(args, device)
    cfg = eval_config(mode, args)
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        predict_probs(model, image, cfg, NUM_CLASSES)
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if _reset_peak_rss():  # Linux: the peak restarts from the current resident set
        before = _status_kib("VmRSS")
        predict_probs(model, image, cfg, NUM_CLASSES)
        return (_status_kib("VmHWM") - before) / 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    predict_probs(model, image, cfg, NUM_CLASSES)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def _reset_peak_rss() -> bool:
    """Reset the peak RSS (VmHWM), so that earlier transients (imports, init) do not hide this one."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_in_subprocess(mode: str, argv: list[str]) -> float:
    out = subprocess.run([sys.executable, __file__, *argv, "--child-peak", mode], capture_output=True, text=True,
                         check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=512, help="image height")
    parser.add_argument("--width-px", type=int, default=1024, help="image width")
    parser.add_argument("--backbone", default="resnet101", choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    parser.add_argument("--width", type=float, default=0.5, help="channel multiplier (paper: 1.0)")
    parser.add_argument("--crop", type=int, nargs=2, default=[512, 512], help="sliding window (h w)")
    parser.add_argument("--stride", type=int, nargs=2, default=[341, 341], help="window stride (h w)")
    parser.add_argument("--repeats", type=int, default=3, help="timed images per mode")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument("--child-peak", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child_peak:
        print(json.dumps({"peak_mib": peak_mib(args.child_peak, args, device)}))
        return

    model, image = build(args, device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Evaluation, whole image vs sliding window: DeepLab-V2 {args.backbone} (width {args.width}, frozen BN), "
          f"one {args.height}x{args.width_px} image, K={NUM_CLASSES}")
    print(f"slide: {args.crop[0]}x{args.crop[1]} windows, stride {args.stride[0]}x{args.stride[1]}: "
          f"{windows(args)} windows per image")
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"median of {args.repeats} images per mode (after 1 warm-up), the modes alternating; "
          f"peak memory of one prediction in a fresh process per mode")
    print()

    times: dict[str, list[float]] = {m: [] for m in MODES}
    for i in range(1 + args.repeats):
        for mode in MODES if i % 2 == 0 else reversed(MODES):
            elapsed = predict_seconds(model, image, eval_config(mode, args), device)
            if i > 0:
                times[mode].append(elapsed)
    del model, image
    peaks = {m: peak_in_subprocess(m, sys.argv[1:]) for m in MODES}

    median = {m: statistics.median(t) for m, t in times.items()}
    columns, widths = ["mode", "windows", "s/image", "images/s", "peak MiB"], [6, 7, 8, 8, 9]
    print(" | ".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    for m in MODES:
        cells = [m, str(windows(args) if m == "slide" else 1), f"{median[m]:.2f}", f"{1 / median[m]:.3f}",
                 f"{peaks[m]:.0f}"]
        print(" | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    print(f"\nslide / whole: {median['slide'] / median['whole']:.2f}x the time, "
          f"{peaks['slide'] / max(peaks['whole'], 1e-9):.2f}x the peak memory")


if __name__ == "__main__":
    main()
