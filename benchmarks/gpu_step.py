"""Train step time and peak memory on a GPU: self_training vs bida, fp32 vs bf16 autocast.

The paper's setting: DeepLab-V2 ResNet-101 (width 1.0, frozen BN), 2 source + 2 target
730x730 crops, K=19. For each precision (and, with ``--channels-last``, memory format) the
two methods alternate (A B B A ...) after warm-up steps; a step is timed between
``torch.cuda.synchronize`` calls and its peak is ``torch.cuda.max_memory_allocated``
(weights, gradients, SGD momentum and activations). The step is the one
benchmarks/train_step.py times (zero grad, ``adapt_step``, backward, SGD step).

    bash benchmarks/gpu.sh                 # runs this with --repeats 6 --channels-last --compile, then the rest
    .venv/bin/python benchmarks/gpu_step.py [--size 730] [--repeats 10] [--channels-last]
    .venv/bin/python benchmarks/gpu_step.py --smoke        # CPU, tiny network: checks the script runs

Peak memory is reset after the warm-up steps (cuDNN autotuning workspaces are not part of
training's steady state). Achieved TFLOP/s divides FlopCounterMode's count of one step
(convolutions and matmuls, forward and backward) by the median step time; "% peak" is
against the device's dense bf16 or TF32 peak (table below; "n/a" for other devices).
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


# Dense peak TFLOP/s (vendor data sheets, without sparsity) by a part of the device name,
# most specific first. "fp32" is the TF32 tensor-core peak: PyTorch runs fp32 convolutions
# (almost all of this network's FLOPs) in TF32 by default (torch.backends.cudnn.allow_tf32).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.4, "fp32": 494.7}),
    ("H100 NVL", {"bf16": 835.0, "fp32": 417.5}),
    ("H100 PCIe", {"bf16": 756.0, "fp32": 378.0}),
    ("H100", {"bf16": 989.4, "fp32": 494.7}),  # SXM
    ("A100", {"bf16": 312.0, "fp32": 156.0}),
]


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The device's dense peak for ``precision``, or None for a device not in the table."""
    for part, peaks in PEAK_TFLOPS:
        if part.lower() in device_name.lower():
            return peaks[precision]
    return None


def count_flops(step) -> int:
    """FLOPs of one call of ``step`` (forward and backward), counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def run_config(args: argparse.Namespace, device: torch.device, amp_dtype, channels_last: bool,
               compile_model: bool = False) -> dict:
    """Median step seconds, peak GiB (timed steps only) and FLOPs of both methods for one setting."""
    cfgs = {m: ts.method_config(m, args) for m in ts.METHODS}
    torch.manual_seed(0)
    model = ts.build_model(cfgs["bida"].model, ts.NUM_CLASSES, cfgs["bida"].method.feature).to(device)
    batches = ts.make_batches(args.size, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        for batch in batches:
            batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    model.train()
    step_model = torch.compile(model, backend=args.compile_backend) if compile_model else model
    t = cfgs["bida"].train
    optimizer = torch.optim.SGD(model.param_groups(7.5e-5, t.head_lr_mult), lr=7.5e-5, momentum=t.momentum,
                                weight_decay=t.weight_decay)
    calibration = ts.new_calibration(cfgs["bida"], model, device)
    peaks = {m: 0.0 for m in ts.METHODS}
    calls = {m: 0 for m in ts.METHODS}

    def step(method: str) -> float:
        # The peak counts timed steps only: warm-up steps hold cuDNN autotuning workspaces
        # (and compilation) that a training run pays once.
        reset_peak(device)
        cal = calibration if method == "bida" else None
        seconds = ts.train_step(step_model, optimizer, batches, cfgs[method], cal, device, amp_dtype)
        calls[method] += 1
        if calls[method] > args.warmup:
            peaks[method] = max(peaks[method], peak_gib(device))
        return seconds

    times = ts.interleaved({m: (lambda m=m: step(m)) for m in ts.METHODS}, args.repeats, args.warmup)
    flops = {}
    if not compile_model:  # the FLOPs of a step do not depend on compilation
        for m in ts.METHODS:
            cal = calibration if m == "bida" else None
            flops[m] = count_flops(lambda m=m, cal=cal: ts.train_step(model, optimizer, batches, cfgs[m], cal,
                                                                       device, amp_dtype))
    result = {m: (statistics.median(times[m]), peaks[m], flops.get(m)) for m in ts.METHODS}
    del model, step_model, optimizer, batches
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=730, help="square crop (paper: 730)")
    parser.add_argument("--backbone", default="resnet101", choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (paper: 1.0)")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per method and configuration")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per method first (default: 3 on cuda, 1 on cpu)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--channels-last", action="store_true", help="also time channels_last memory format")
    parser.add_argument("--compile", action="store_true",
                        help="also time the step with the model under torch.compile (inductor, default mode), "
                             "in the last precision, contiguous")
    parser.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager"],
                        help="backend of --compile (aot_eager: eager kernels, quick to compile; for smoke tests)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU, ResNet-18 at 1/8 width, 64x64 crops, 1 repeat, aot_eager for --compile")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.size, args.backbone, args.width, args.repeats, args.warmup = "cpu", 64, "resnet18", 0.125, 1, 1
        args.compile_backend = "aot_eager"
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
    print(f"median of {args.repeats} steps per method (after {args.warmup} warm-up), the methods alternating; "
          f"peak memory over the timed steps; TFLOP/s from FlopCounterMode's count of one step")
    print()
    settings = [(p, False, False) for p in args.precisions]
    if args.channels_last:
        settings += [(p, True, False) for p in args.precisions]
    if args.compile:
        settings.append((args.precisions[-1], False, True))
    columns = ["precision", "format", "method", "step ms", "peak GiB", "TFLOP/s", "% peak", "bida/ST"]
    widths = [9, 22, 13, 9, 8, 8, 7, 7]
    print(" | ".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    rows: list[dict] = []
    flops_of: dict[tuple[str, str], int] = {}
    start = time.perf_counter()
    for precision, channels_last, compiled in settings:
        result = run_config(args, device, PRECISIONS[precision], channels_last, compiled)
        ratio = result["bida"][0] / result["self_training"][0]
        fmt = ("channels_last" if channels_last else "contiguous") + (" compiled" if compiled else "")
        for method in ts.METHODS:
            seconds, peak, flops = result[method]
            flops = flops if flops is not None else flops_of.get((precision, method))
            flops_of[(precision, method)] = flops
            tflops = flops / seconds / 1e12 if flops else None
            top = peak_tflops(name, precision) if device.type == "cuda" else None
            rows.append({"precision": precision, "format": fmt, "method": method, "step_ms": 1e3 * seconds,
                         "peak_gib": peak if device.type == "cuda" else None, "tflops": tflops,
                         "pct_peak": 100 * tflops / top if tflops and top else None, "bida_over_st": ratio})
            r = rows[-1]
            cells = [precision, fmt, method, f"{r['step_ms']:.1f}",
                     f"{peak:.2f}" if r["peak_gib"] is not None else "n/a",
                     f"{tflops:.3g}" if tflops else "n/a", f"{r['pct_peak']:.1f}" if r["pct_peak"] else "n/a",
                     f"{ratio:.3f}" if method == "bida" else ""]
            print(" | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)), flush=True)
        if args.json:  # after every setting: a run stopped by a time limit keeps what it measured
            import json

            with open(args.json, "w") as fh:
                json.dump({"device": name, "torch": torch.__version__, "rows": rows}, fh, indent=1)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
