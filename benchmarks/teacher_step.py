"""Mean-teacher train step on a GPU: DAFormer-style self-training vs BiDA + teacher, each with and without MIC.

The transformer path at DAFormer's shapes: MiT-B5 with the DAFormer head (decoder 256),
2 source + 2 target 512x512 crops, K=19, bf16 autocast, AdamW. One step is what
``train.py`` runs in ``train.schedule=teacher``: zero grad, ``teacher_step`` (teacher
pseudo labels, ClassMix, the student's forward of source, target and mixed crops, every
loss, MIC's masked-target forward for the ``+mic`` variants), backward, AdamW step and
the EMA teacher update. The variants (self_training, bida, bida_mixed, self_training+mic,
bida+mic, bida_mixed+mic; ``bida`` reads BiDA's target pixels from a forward of the unmixed
target crop, ``bida_mixed`` from the ClassMix crop's forward, ``method.target_features``)
alternate (A B C D D C B A ...) after warm-up steps and are given as ratios to the first;
peak memory (``torch.cuda.max_memory_allocated``) is reset after the warm-up and covers
all variants together: ``memory.py`` measures each variant's own peak, with and without
``model.grad_checkpoint``. ``--grad-checkpoint`` times every variant with checkpointing.

    bash benchmarks/gpu.sh                              # runs this after the DeepLab-V2 parts
    .venv/bin/python benchmarks/teacher_step.py [--size 512] [--repeats 6] [--backbone mit_b5] [--grad-checkpoint]
    .venv/bin/python benchmarks/teacher_step.py --smoke  # CPU, MiT-B0 at width 0.25: checks the script runs
    .venv/bin/python benchmarks/teacher_step.py --hrda   # HRDA, MIC(HRDA), BiDA + MIC(HRDA): 1024 context + 512 detail
    OMP_NUM_THREADS=1 python benchmarks/teacher_step.py --device cpu --backbone mit_b0 --size 128 \
        --precisions fp32 --repeats 10  # the CPU figures of method.target_features (one thread)

The feature distance is off (it needs the ImageNet weights, which the benchmark does not
load); with it, each step adds one forward of a frozen copy of the network.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as ts  # noqa: E402 - the benchmark next to this one

from bida.config import Config, load_config  # noqa: E402
from bida.models import build_model  # noqa: E402
from bida.engine.optim import build_optimizer  # noqa: E402
from bida.method.teacher import MeanTeacher, teacher_step  # noqa: E402

METHODS = ("self_training", "bida", "bida_mixed", "self_training+mic", "bida+mic", "bida_mixed+mic")
TARGET_FEATURES = {"bida": "unmixed", "bida_mixed": "mixed"}  # method.target_features of each BiDA variant
BACKBONES = [f"mit_b{i}" for i in range(6)] + [f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg")]
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def mic_block(size: int, hrda: bool = False) -> int:
    """MIC's mask block at a ``size`` crop: 64 at 512 (DAFormer's half-resolution crops),
    scaled with the crop; under HRDA 64 at its full-resolution 1024 context crops."""
    return max(1, size // (16 if hrda else 8))


def method_config(method: str, args: argparse.Namespace) -> Config:
    """DAFormer's recipe (AdamW, EMA 0.999, ClassMix) at the given shapes, for ``method``.

    ``method`` is ``self_training``, ``bida`` or ``bida_mixed`` (BiDA with
    ``method.target_features=mixed``), with ``+mic`` for masked image consistency at MIC's
    settings (weight 1, mask ratio 0.7, block 64 at 512 crops). ``args.hrda``: the same on
    HRDA's network (HRDA, MIC(HRDA) and BiDA + MIC(HRDA)).
    """
    name, _, extra = method.partition("+")
    hrda = getattr(args, "hrda", False)
    mic = ["mic.weight=1.0", "mic.mask_ratio=0.7", f"mic.block_size={mic_block(args.size, hrda)}"] if extra == "mic" else []
    bida = [f"method.target_features={TARGET_FEATURES[name]}"] if name in TARGET_FEATURES else []
    # HRDA (--hrda): the crop is the context crop, with a detail crop of half its side inside
    # (HRDA's 1024 + 512); each student forward separate, as HRDA's.
    hrda_keys = ["model.hrda.enabled=true", f"model.hrda.detail_crop=[{args.size // 2},{args.size // 2}]",
                 "train.student_forwards=separate"] if hrda else []
    return load_config(None, mic + bida + hrda_keys + [
        f"method={name if name not in TARGET_FEATURES else 'bida'}", "train.schedule=teacher", "train.optimizer=adamw",
        "train.lr=6e-5",
        "train.weight_decay=0.01", f"model.backbone={args.backbone}", "model.decoder=daformer",
        f"model.decoder_dim={args.decoder_dim}", f"model.width={args.width}", "model.freeze_bn=false",
        "method.feature=decoder", "data.normalize=imagenet", f"data.crop=[{args.size},{args.size}]",
        f"train.batch_size={ts.BATCH}", f"model.grad_checkpoint={str(getattr(args, 'grad_checkpoint', False)).lower()}",
    ])


def step_fn(model, optimizer, state: MeanTeacher, batches, cfg: Config, calibration, device, amp_dtype):
    """A closure timing one teacher-schedule step of ``cfg.method``, as train.py runs it."""
    batch_src, batch_tgt = batches

    def run() -> float:
        ts.sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            result = teacher_step(model, batch_src, batch_tgt, cfg, state, calibration, ts.NUM_CLASSES)
        result.loss.backward()
        optimizer.step()
        state.after_step(model)
        ts.sync(device)
        return time.perf_counter() - start

    return run


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=None, help="square crop (DAFormer: 512; with --hrda 1024)")
    parser.add_argument("--backbone", default="mit_b5", choices=BACKBONES,
                        help="MiT (DAFormer's mit_b5) or a DINOv2 ViT (dinov2_vitl14: VFM-UDA's), no weights loaded")
    parser.add_argument("--width", type=float, default=1.0, help="encoder width multiplier (MiT stages, ViT embedding)")
    parser.add_argument("--decoder-dim", type=int, default=256, help="DAFormer head channels (DAFormer: 256)")
    parser.add_argument("--repeats", type=int, default=6, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per method first (default: 3 on cuda, 1 on cpu)")
    parser.add_argument("--precisions", nargs="+", default=["bf16"], choices=list(PRECISIONS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                        help="variants to time against each other (the first is the ratio's base)")
    parser.add_argument("--grad-checkpoint", action="store_true", help="model.grad_checkpoint=true for every variant")
    parser.add_argument("--hrda", action="store_true",
                        help="HRDA: --size is the context crop (HRDA: 1024, the default then), a detail crop of half its side")
    parser.add_argument("--smoke", action="store_true", help="CPU, MiT-B0 at width 0.25, 64x64: checks the script runs")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.size, args.backbone, args.width, args.decoder_dim = "cpu", 64, "mit_b0", 0.25, 32
        args.repeats, args.warmup = 1, 1
    args.size = args.size or (1024 if args.hrda else 512)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"no CUDA device (torch {torch.__version__}); use --smoke for a CPU check")
    if args.warmup is None:
        args.warmup = 3 if device.type == "cuda" else 1
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    hrda = f" in HRDA (detail crops {args.size // 2}x{args.size // 2})" if args.hrda else ""
    print(f"teacher train step: {args.backbone} (width {args.width}) + DAFormer head ({args.decoder_dim}){hrda}, "
          f"{ts.BATCH} source + {ts.BATCH} target {args.size}x{args.size} crops, K={ts.NUM_CLASSES}, AdamW, EMA teacher")
    print(f"torch {torch.__version__}, device {device}: {name}")
    print(f"median of {args.repeats} steps per method (after {args.warmup} warm-up), the methods alternating")
    print()
    base = args.methods[0]
    columns, widths = ["precision", "method", "step ms", "peak GiB", f"x/{base}"[:18]], [9, 17, 9, 8, 18]
    print(" | ".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    rows: list[dict] = []
    start = time.perf_counter()
    for precision in args.precisions:
        torch.manual_seed(0)
        cfgs = {m: method_config(m, args) for m in args.methods}
        model = build_model(cfgs[args.methods[0]].model, ts.NUM_CLASSES, "decoder").to(device).train()
        batches = ts.make_batches(args.size, device)
        batches[1]["label"] = torch.full_like(batches[1]["label"], ts.IGNORE)  # target truth: unknown
        run = {}
        for method, cfg in cfgs.items():
            state = MeanTeacher(cfg, ts.NUM_CLASSES, device)
            state.start(model)
            calibration = ts.new_calibration(cfg, model, device) if cfg.method.name == "bida" else None
            optimizer = build_optimizer(model.param_groups(cfg.train.lr, cfg.train.head_lr_mult), cfg.train.lr, cfg.train)
            run[method] = step_fn(model, optimizer, state, batches, cfg, calibration, device, PRECISIONS[precision])
        for fn in run.values():  # warm-up (cuDNN autotuning, allocator), not in the peak
            for _ in range(args.warmup):
                fn()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = ts.interleaved(run, args.repeats, 0)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        medians = {m: statistics.median(t) for m, t in times.items()}
        for method in args.methods:
            ratio = medians[method] / medians[base]
            rows.append({"precision": precision, "method": method, "step_ms": 1e3 * medians[method],
                         "peak_gib": peak, "over_base": ratio, "base": base,
                         "bida_over_st": medians["bida"] / medians["self_training"] if {"bida", "self_training"} <= set(medians) else None,
                         "bida_mixed_over_st": (medians["bida_mixed"] / medians["self_training"]
                                                if {"bida_mixed", "self_training"} <= set(medians) else None)})
            cells = [precision, method, f"{1e3 * medians[method]:.1f}", f"{peak:.2f}" if peak is not None else "n/a",
                     f"{ratio:.3f}" if method != base else ""]
            print(" | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)), flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"device": name, "torch": torch.__version__, "backbone": args.backbone, "size": args.size,
                           "grad_checkpoint": args.grad_checkpoint, "hrda": args.hrda, "rows": rows}, fh, indent=1)
    print(f"\npeak memory: every variant's steps together (one model; memory.py gives each its own); total {time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
