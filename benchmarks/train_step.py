"""Time one training step of self_training against bida: what BiDA's extras cost.

Both methods train the same model on the same source and target batches (random images,
blocky labels with ~10% ignore, static pseudo labels on ~30% of the target pixels): zero
grad, ``adapt_step`` (forward of both domains, every loss), backward, SGD step. The two
methods alternate (A B B A ...) so that both see the same machine load; medians are
reported. The extras are also timed on their own, without the network's noise:
``adapt_step`` plus backward with the network replaced by its recorded outputs, bida
minus self_training.

The paper's setting is the default model (DeepLab-V2 ResNet-101, width 1.0, frozen BN,
2 source + 2 target images) at ``--size 730``; the default size is 321 so that a run
finishes in about 10 minutes on a 2-core CPU (a 730x730 step takes minutes there).

    .venv/bin/python benchmarks/train_step.py [--size 321] [--backbone resnet101] [--width 1.0]
        [--repeats 3] [--warmup 1] [--device cpu] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from bida.config import Config, load_config
from bida.models import DeepLabV2, SegOutput, build_model
from bida.pseudo_labels import Calibration
from bida.method.train_step import adapt_step

IGNORE = 255
NUM_CLASSES = 19  # Cityscapes train ids
BATCH = 2  # per domain: 2 source + 2 target images
METHODS = ("self_training", "bida")
SOURCE_IGNORE = 0.10  # share of unlabelled source pixels (GTA5: void, ego vehicle, ...)
STATIC_LABELLED = 0.30  # share of target pixels with a static pseudo label y_F
BLOCK = 32  # label blocks of 32x32 pixels: regions, not salt-and-pepper noise


def method_config(method: str, args: argparse.Namespace) -> Config:
    """The paper's settings (frozen BN, default losses and pseudo labels) for ``method``."""
    return load_config(None, [
        f"method={method}", f"model.backbone={args.backbone}", f"model.width={args.width}",
        "model.freeze_bn=true", f"data.crop=[{args.size},{args.size}]", f"train.batch_size={BATCH}",
    ])


def blocky_labels(gen: torch.Generator, size: int, labelled: float) -> torch.Tensor:
    """(BATCH, size, size) class ids in 32x32 blocks, ``1 - labelled`` of the blocks ignored."""
    cells = (BATCH, -(-size // BLOCK), -(-size // BLOCK))
    ids = torch.randint(0, NUM_CLASSES, cells, generator=gen)
    ids = ids.masked_fill(torch.rand(cells, generator=gen) >= labelled, IGNORE)
    big = F.interpolate(ids[:, None].float(), scale_factor=BLOCK, mode="nearest")[:, 0].long()
    return big[:, :size, :size]


def make_batches(size: int, device: torch.device, seed: int = 0) -> tuple[dict, dict]:
    """One source batch (image, label) and one target batch (image, static pseudo label)."""
    gen = torch.Generator().manual_seed(seed)
    batch_src = {"image": torch.randn(BATCH, 3, size, size, generator=gen),
                 "label": blocky_labels(gen, size, 1.0 - SOURCE_IGNORE)}
    batch_tgt = {"image": torch.randn(BATCH, 3, size, size, generator=gen),
                 "label": blocky_labels(gen, size, STATIC_LABELLED)}
    return ({k: v.to(device) for k, v in batch_src.items()}, {k: v.to(device) for k, v in batch_tgt.items()})


def new_calibration(cfg: Config, model: DeepLabV2, device: torch.device) -> Calibration:
    c = cfg.calibration
    return Calibration(NUM_CLASSES, model.feature_dim, momentum=c.momentum, max_weight=c.max_weight,
                       ramp_iters=c.ramp_iters).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, optimizer, batches, cfg: Config, calibration, device, amp_dtype: torch.dtype | None = None) -> float:
    """Seconds of one full training step (forward, losses, backward, SGD step), as train.py runs it."""
    batch_src, batch_tgt = batches
    sync(device)
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        result = adapt_step(model, batch_src, batch_tgt, cfg, calibration, NUM_CLASSES)
    result.loss.backward()
    optimizer.step()
    sync(device)
    return time.perf_counter() - start


def interleaved(run: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Time every callable of ``run`` ``warmup + repeats`` times, in A B B A order; drop warm-ups."""
    names = list(run)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeats):
        for name in names if i % 2 == 0 else reversed(names):
            elapsed = run[name]()
            if i >= warmup:
                times[name].append(elapsed)
    return times


class Replay(torch.nn.Module):
    """Stands in for the network: the recorded outputs of one forward, as trainable leaves.

    ``adapt_step`` on a Replay does all of a step's work except the network's, so the
    difference between the methods is the extras alone.
    """

    def __init__(self, out: SegOutput) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(out.logits.detach().clone())
        self.features = torch.nn.Parameter(out.features.detach().clone())

    def forward(self, x: torch.Tensor, domain: str = "source") -> SegOutput:  # noqa: ARG002 - model API
        return SegOutput(logits=self.logits * 1.0, features=self.features * 1.0)


def time_extras(model, batches, cfgs: dict[str, Config], device, repeats: int) -> dict[str, float]:
    """Median ms of adapt_step + backward on replayed network outputs, per method."""
    batch_src, batch_tgt = batches
    with torch.no_grad():
        out = model(torch.cat([batch_src["image"], batch_tgt["image"]]), "source")
    replay = Replay(out)
    calibration = new_calibration(cfgs["bida"], model, device)

    def once(method: str) -> float:
        sync(device)
        start = time.perf_counter()
        replay.zero_grad(set_to_none=True)
        cal = calibration if method == "bida" else None
        adapt_step(replay, batch_src, batch_tgt, cfgs[method], cal, NUM_CLASSES).loss.backward()
        sync(device)
        return (time.perf_counter() - start) * 1e3

    times = interleaved({m: (lambda m=m: once(m)) for m in METHODS}, repeats, warmup=2)
    return {m: statistics.median(t) for m, t in times.items()}


def header(args: argparse.Namespace, model: DeepLabV2, device: torch.device, feature_size: tuple[int, int]) -> None:
    print(f"Train step, self_training vs bida: DeepLab-V2 {args.backbone} (width {args.width}, frozen BN), "
          f"{BATCH} source + {BATCH} target {args.size}x{args.size} crops, K={NUM_CLASSES}, "
          f"features {model.feature_dim} x {feature_size[0]}x{feature_size[1]}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"load average {load:.1f} on {os.cpu_count()} CPUs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=321, help="square crop (paper: 730)")
    parser.add_argument("--backbone", default="resnet101", choices=["resnet18", "resnet34", "resnet50", "resnet101"])
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier (paper: 1.0)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method first")
    parser.add_argument("--extras-repeats", type=int, default=20, help="timed adapt_step calls on replayed outputs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfgs = {m: method_config(m, args) for m in METHODS}
    torch.manual_seed(0)
    model = build_model(cfgs["bida"].model, NUM_CLASSES, cfgs["bida"].method.feature).to(device)
    model.train()
    t = cfgs["bida"].train
    optimizer = torch.optim.SGD(model.param_groups(7.5e-5, t.head_lr_mult), lr=7.5e-5, momentum=t.momentum,
                                weight_decay=t.weight_decay)
    batches = make_batches(args.size, device)
    calibration = new_calibration(cfgs["bida"], model, device)
    with torch.no_grad():
        feature_size = tuple(model(batches[0]["image"][:1]).features.shape[-2:])
    header(args, model, device, feature_size)
    print(f"median of {args.repeats} steps per method (after {args.warmup} warm-up), the methods alternating")
    print()

    steps = interleaved({
        "self_training": lambda: train_step(model, optimizer, batches, cfgs["self_training"], None, device),
        "bida": lambda: train_step(model, optimizer, batches, cfgs["bida"], calibration, device),
    }, args.repeats, args.warmup)
    median = {m: statistics.median(v) for m, v in steps.items()}
    columns, widths = ["method", "step s (median)", "min s", "max s"], [14, 15, 8, 8]
    print(" | ".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    for m in METHODS:
        cells = [m, f"{median[m]:.3f}", f"{min(steps[m]):.3f}", f"{max(steps[m]):.3f}"]
        print(" | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)))
    ratio = median["bida"] / median["self_training"]
    fastest = min(steps["bida"]) / min(steps["self_training"])
    print(f"\nbida / self_training step time: {ratio:.3f} ({100 * (ratio - 1):+.1f}%) of the medians, "
          f"{fastest:.3f} ({100 * (fastest - 1):+.1f}%) of the fastest steps")
    order = [f"{m} {steps[m][i]:.2f}" for i in range(args.repeats)
             for m in (METHODS if (i + args.warmup) % 2 == 0 else METHODS[::-1])]
    print(f"timed steps in the order they ran (s): {', '.join(order)}")

    extras = time_extras(model, batches, cfgs, device, args.extras_repeats)
    added = extras["bida"] - extras["self_training"]
    print(f"\nadapt_step + backward on replayed network outputs (no network), median of {args.extras_repeats}:")
    print(f"  self_training {extras['self_training']:.1f} ms, bida {extras['bida']:.1f} ms")
    print(f"  BiDA extras: {added:.1f} ms = {100 * added / (1e3 * median['bida']):.2f}% of a bida step "
          f"(+{100 * added / (1e3 * median['self_training']):.2f}% on a self_training step)")


if __name__ == "__main__":
    main()
