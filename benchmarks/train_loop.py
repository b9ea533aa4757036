"""The trainer against its benchmark: ``bida train`` steps/s, data wait, pseudo labels, evaluation.

Runs the real trainer (``bida.engine.train.Trainer``, the code ``bida train`` runs) on generated
synthetic data at the paper's shapes: DeepLab-V2 ResNet-101 (frozen BN), 2 + 2 crops of
730x730, bf16 autocast, BiDA. A short source phase, then one BiDA round of ``--iters``
iterations; its log records give the trainer's step time and the share spent waiting for
batches; its round record gives the pseudo-label pass in images/s. In the same process,
after training, the same model is timed on ``gpu_step.py``'s step (fixed batches already on
the device, no loader, no logging) and evaluated on the target validation images in
``whole`` and ``slide`` mode (images/s).

    python benchmarks/train_loop.py [--iters 300] [--workers 8]          # on a GPU
    python benchmarks/train_loop.py --smoke                                # CPU, tiny shapes, seconds

The generated images are cached under ``--cache`` (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as ts  # noqa: E402 - the benchmark next to this one

from bida.config import load_config  # noqa: E402
from bida.data.datasets import build_eval_dataset  # noqa: E402
from bida.engine.inference import evaluate  # noqa: E402
from bida.engine.train import Trainer  # noqa: E402


def overrides(args: argparse.Namespace, cache: Path) -> list[str]:
    """The run's config: the paper's network and crops on synthetic data, one BiDA round."""
    h, w = args.image
    return [
        "method=bida", f"model.backbone={args.backbone}", f"model.width={args.width}", "model.freeze_bn=true",
        f"data.synthetic.height={h}", f"data.synthetic.width={w}", f"data.synthetic.num_train={args.images}",
        f"data.synthetic.num_val={args.val_images}", f"data.synthetic.cache_dir={cache}",
        f"data.crop=[{args.crop},{args.crop}]", f"data.num_workers={args.workers}",
        f"train.batch_size={ts.BATCH}", f"train.iters={args.source_iters}", f"train.iters_per_round={args.iters}",
        "train.rounds=1", f"train.amp={args.amp}", f"train.log_every={args.log_every}",
        "train.eval_every=1000000", "train.checkpoint_every=1000000", "train.quiet=true",
        f"train.compile={str(args.compile).lower()}", f"eval.crop=[{args.eval_crop},{args.eval_crop}]",
        f"eval.stride=[{args.eval_crop * 2 // 3},{args.eval_crop * 2 // 3}]",
    ]


def round_figures(run: Path) -> dict:
    """Median step and data-wait seconds of the round's log records (the first one left out:
    it holds the warm-up), and the pseudo-label pass in images/s."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("phase") == "round" and "time/step_s" in r]
    timed = steps[1:] or steps
    labels = [r["time/pseudo_label_images_per_s"] for r in records if "time/pseudo_label_images_per_s" in r]
    return {"step_s": statistics.median(r["time/step_s"] for r in timed),
            "data_s": statistics.median(r["time/data_s"] for r in timed),
            "pseudo_label_images_per_s": labels[-1] if labels else float("nan"), "records": len(timed)}


def benchmark_step(trainer: Trainer, args: argparse.Namespace, repeats: int) -> float:
    """Median seconds of gpu_step.py's step on the trained model (same precision, method, crops)."""
    device, cfg = trainer.device, trainer.cfg
    model = trainer.model
    model.train()
    batches = ts.make_batches(args.crop, device)
    optimizer = torch.optim.SGD(model.param_groups(7.5e-5, cfg.train.head_lr_mult), lr=7.5e-5,
                                momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
    times = [ts.train_step(model, optimizer, batches, cfg, trainer.calibration, device, dtype)
             for _ in range(args.warmup + repeats)]
    return statistics.median(times[args.warmup:])


def eval_images_per_s(trainer: Trainer, mode: str) -> float:
    cfg = trainer.cfg
    ds = build_eval_dataset(cfg, trainer.tgt, cfg.data.target.val_split)
    eval_cfg = dataclasses.replace(cfg.eval, mode=mode)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
    evaluate(trainer.model, ds, eval_cfg, trainer.classes.names, device=trainer.device, autocast_dtype=dtype)  # warm-up
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    start = time.perf_counter()
    evaluate(trainer.model, ds, eval_cfg, trainer.classes.names, device=trainer.device, autocast_dtype=dtype)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    return len(ds) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=300, help="BiDA iterations of the timed round")
    parser.add_argument("--source-iters", type=int, default=10, help="source-phase iterations before it")
    parser.add_argument("--workers", type=int, default=8, help="data.num_workers")
    parser.add_argument("--amp", default="bf16", choices=["none", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="train.compile=true (inductor)")
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--crop", type=int, default=730, help="square training crop (paper: 730)")
    parser.add_argument("--image", type=int, nargs=2, default=[736, 736], help="generated image size (h w)")
    parser.add_argument("--images", type=int, default=16, help="generated training images per domain")
    parser.add_argument("--val-images", type=int, default=8, help="generated target validation images")
    parser.add_argument("--eval-crop", type=int, default=512, help="sliding-window size (stride 2/3 of it)")
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=20, help="timed benchmark steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed benchmark steps first")
    parser.add_argument("--cache", default=None, help="directory for the generated images")
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.iters, args.source_iters, args.workers, args.amp, args.backbone, args.width = 4, 2, 0, "none", "resnet18", 0.125
        args.crop, args.image, args.images, args.val_images, args.eval_crop = 32, [32, 64], 4, 2, 32
        args.log_every, args.repeats, args.warmup = 2, 1, 1
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True

    with tempfile.TemporaryDirectory(prefix="bida-train-loop-") as tmp:
        cache = Path(args.cache or Path(tmp) / "cache")
        run = Path(args.out or Path(tmp) / "run")
        cfg = load_config(None, overrides(args, cache))
        start = time.perf_counter()
        trainer = Trainer(cfg, run, overwrite=True)
        setup_s = time.perf_counter() - start
        trainer.fit()
        figures = round_figures(run)
        figures["setup_s"] = setup_s
        figures["benchmark_step_s"] = benchmark_step(trainer, args, args.repeats)
        figures["eval_whole_images_per_s"] = eval_images_per_s(trainer, "whole")
        figures["eval_slide_images_per_s"] = eval_images_per_s(trainer, "slide")
    figures["trainer_over_benchmark"] = figures["step_s"] / figures["benchmark_step_s"]
    device = trainer.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"bida train: {args.backbone} (width {args.width}), {ts.BATCH}+{ts.BATCH} crops {args.crop}x{args.crop}, "
          f"amp {args.amp}, {args.workers} loader workers, {args.iters} BiDA iterations; torch {torch.__version__}, "
          f"{device}: {name}")
    print(f"  trainer step        {1e3 * figures['step_s']:8.1f} ms  ({1 / figures['step_s']:.2f} steps/s, "
          f"median of {figures['records']} log records)")
    print(f"  benchmark step      {1e3 * figures['benchmark_step_s']:8.1f} ms  (gpu_step.py's step, same model)")
    print(f"  trainer / benchmark {figures['trainer_over_benchmark']:8.3f}")
    print(f"  data wait           {1e3 * figures['data_s']:8.1f} ms a step")
    print(f"  pseudo labels       {figures['pseudo_label_images_per_s']:8.2f} images/s")
    print(f"  evaluation whole    {figures['eval_whole_images_per_s']:8.2f} images/s")
    print(f"  evaluation slide    {figures['eval_slide_images_per_s']:8.2f} images/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, **figures}, indent=1))
    return figures


if __name__ == "__main__":
    main()
