"""Train step time and peak memory on a GPU: self_training vs bida, fp32 vs bf16 autocast.

The paper's setting: DeepLab-V2 ResNet-101 (width 1.0, frozen BN), 2 source + 2 target
730x730 crops, K=19. For each precision (and, with ``--channels-last``, memory format) the
two methods alternate (A B B A ...) after warm-up steps; a step is timed between
``torch.cuda.synchronize`` calls and its peak is ``torch.cuda.max_memory_allocated``
(weights, gradients, SGD momentum and activations). The step is the one
benchmarks/train_step.py times (zero grad, ``adapt_step``, backward, SGD step).

    benchmarks/gpu.sh                      # creates .venv if missing, then runs this
    .venv/bin/python benchmarks/gpu_step.py [--size 730] [--repeats 10] [--channels-last]
    .venv/bin/python benchmarks/gpu_step.py --device cpu --size 128 --repeats 1   # smoke test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as ts  # noqa: E402 - the benchmark next to this one

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def run_config(args: argparse.Namespace, device: torch.device, amp_dtype, channels_last: bool) -> dict:
    """Median step seconds and peak GiB of both methods for one precision / memory format."""
    cfgs = {m: ts.method_config(m, args) for m in ts.METHODS}
    torch.manual_seed(0)
    model = ts.build_model(cfgs["bida"].model, ts.NUM_CLASSES, cfgs["bida"].method.feature).to(device)
    batches = ts.make_batches(args.size, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        for batch in batches:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    model.train()
    t = cfgs["bida"].train
    optimizer = torch.optim.SGD(model.param_groups(7.5e-5, t.head_lr_mult), lr=7.5e-5, momentum=t.momentum,
                                weight_decay=t.weight_decay)
    calibration = ts.new_calibration(cfgs["bida"], model, device)
    peaks = {m: 0.0 for m in ts.METHODS}

    def step(method: str) -> float:
        reset_peak(device)
        cal = calibration if method == "bida" else None
        seconds = ts.train_step(model, optimizer, batches, cfgs[method], cal, device, amp_dtype)
        peaks[method] = max(peaks[method], peak_gib(device))
        return seconds

    times = ts.interleaved({m: (lambda m=m: step(m)) for m in ts.METHODS}, args.repeats, args.warmup)
    result = {m: (statistics.median(times[m]), peaks[m]) for m in ts.METHODS}
    del model, optimizer, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=730, help="square crop (paper: 730)")
    parser.add_argument("--backbone", default="resnet101", choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (paper: 1.0)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per method and configuration")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per method first (default: 3 on cuda, 1 on cpu)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--channels-last", action="store_true", help="also time channels_last memory format")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                 "use --device cpu for a smoke test")
    if args.warmup is None:
        args.warmup = 3 if device.type == "cuda" else 1
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"GPU train step: DeepLab-V2 {args.backbone} (width {args.width}, frozen BN), {ts.BATCH} source + "
          f"{ts.BATCH} target {args.size}x{args.size} crops, K={ts.NUM_CLASSES}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), device {device}: {name}")
    print(f"median of {args.repeats} steps per method (after {args.warmup} warm-up), the methods alternating")
    print()
    formats = [False, True] if args.channels_last else [False]
    columns, widths = ["precision", "format", "method", "step ms", "peak GiB", "bida/ST"], [9, 13, 13, 9, 8, 7]
    print(" | ".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    baseline = None
    start = time.perf_counter()
    for precision in args.precisions:
        for channels_last in formats:
            result = run_config(args, device, PRECISIONS[precision], channels_last)
            ratio = result["bida"][0] / result["self_training"][0]
            for method in ts.METHODS:
                seconds, peak = result[method]
                cells = [precision, "channels_last" if channels_last else "contiguous", method, f"{1e3 * seconds:.1f}",
                         f"{peak:.2f}" if device.type == "cuda" else "n/a", f"{ratio:.3f}" if method == "bida" else ""]
                print(" | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)), flush=True)
            if baseline is None:
                baseline = result["bida"][0]
            else:
                print(f"{'':>9}   bida step {baseline / result['bida'][0]:.2f}x as fast as fp32 contiguous", flush=True)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
