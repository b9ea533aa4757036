"""Time BiDA's per-iteration extras, vectorised (bida) against a naive per-class loop.

The extras are everything BiDA adds to a plain segmentation step (docs/method.md sections
1 to 4): source prototypes, label transfer to calibrated source prototypes and fusion
with the static labels, target prototypes, both contrast losses (forward + backward),
and the calibration update. The naive version does the same computation at the same
resolution, looping over classes and images (not pixels) the way a first implementation
would. Both start from the same state; their losses, labels and gradients are checked
to agree before anything is timed.

    .venv/bin/python benchmarks/method_extras.py [--repeats 5] [--dim 76 256] [--device cuda]
    .venv/bin/python benchmarks/method_extras.py --smoke          # tiny shapes, seconds on a CPU

Three variants: eager (bida's functions as training runs them), compiled (the same
forward under torch.compile; backward and the EMA update stay eager) and the naive loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from bida.losses import pixel_prototype_contrast
from bida.prototypes import class_prototypes
from bida.pseudo_labels import Calibration, calibrated_prototypes, fuse_labels, label_transfer

IGNORE = 255
NUM_CLASSES = 19  # Cityscapes train ids
BATCH = 2  # per domain: 2 source + 2 target images
CROP = 730
FEATURE_SIZE = 92  # stride-8 map of a 730x730 crop (DeepLab-V2, ceil mode)
TEMPERATURE = 0.1  # loss.temperature
TRANSFER_THRESHOLD = 0.8  # pseudo.transfer_threshold
IGNORE_SHARE = 0.10


# --- the naive reference: same maths, Python loops over classes and images ---------------


def naive_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int):
    feats = features.float()
    rows, present = [], []
    for c in range(num_classes):
        mask = (labels == c).unsqueeze(1).float()  # (B, 1, h, w)
        count = mask.sum()
        present.append(bool(count > 0))
        rows.append((feats * mask).sum(dim=(0, 2, 3)) / count.clamp_min(1.0))
    return torch.stack(rows), torch.tensor(present, device=features.device)


def naive_calibrate(batch_protos, batch_present, calibration: Calibration):
    src, tgt, weight = calibration.source, calibration.target, calibration.weight()
    rows = []
    for c in range(batch_protos.shape[0]):
        row = batch_protos[c] if batch_present[c] else src.value[c]
        if src.initialized[c] and tgt.initialized[c]:
            row = row + weight * (tgt.value[c] - src.value[c])
        rows.append(row)
    return torch.stack(rows), batch_present | src.initialized


def naive_class_logits(feature_map, prototypes, classes):
    """(len(classes), h, w) cosine / tau of one image, one class at a time."""
    return torch.stack(
        [
            F.cosine_similarity(feature_map, prototypes[c].view(-1, 1, 1), dim=0) / TEMPERATURE
            for c in classes
        ]
    )


@torch.no_grad()
def naive_label_transfer(features, prototypes, present):
    classes = [c for c in range(prototypes.shape[0]) if present[c]]
    lookup = torch.tensor(classes, device=features.device)
    out = []
    for b in range(features.shape[0]):
        q = naive_class_logits(features[b].float(), prototypes, classes).softmax(0)
        conf, index = q.max(0)
        out.append(torch.where(conf >= TRANSFER_THRESHOLD, lookup[index], IGNORE))
    return torch.stack(out)


def naive_contrast(features, labels, prototypes, present):
    classes = [c for c in range(prototypes.shape[0]) if present[c]]
    total, count = features.sum() * 0.0, 0
    for b in range(features.shape[0]):
        log_q = naive_class_logits(features[b].float(), prototypes, classes).log_softmax(0)
        for row, c in enumerate(classes):
            mask = (labels[b] == c).float()
            total = total - (log_q[row] * mask).sum()
            count += int(mask.sum())
    return total / max(count, 1)


def naive_ema_update(memory, protos, present):
    m = memory.momentum
    for c in range(protos.shape[0]):
        if not present[c]:
            continue
        new = protos[c].detach().float()
        memory.value[c] = m * memory.value[c] + (1 - m) * new if memory.initialized[c] else new
        memory.initialized[c] = True
        memory.num_updates[c] += 1


def naive_step(f_src, y_src, f_tgt, y_static, calibration):
    protos_src, present_src = naive_prototypes(f_src, y_src, NUM_CLASSES)
    calibrated, cal_present = naive_calibrate(protos_src.detach(), present_src, calibration)
    y_tgt = fuse_labels(y_static, naive_label_transfer(f_tgt, calibrated, cal_present))
    protos_tgt, present_tgt = naive_prototypes(f_tgt, y_tgt, NUM_CLASSES)
    loss_t2s = naive_contrast(f_tgt, y_tgt, protos_src, present_src)
    loss_s2t = naive_contrast(f_src, y_src, protos_tgt, present_tgt)
    (loss_t2s + loss_s2t).backward()
    naive_ema_update(calibration.source, protos_src, present_src)
    naive_ema_update(calibration.target, protos_tgt, present_tgt)
    calibration.step += 1
    return loss_t2s.detach(), loss_s2t.detach(), y_tgt


# --- bida's vectorised functions --------------------------------------------------------


def extras_forward(f_src, y_src, f_tgt, y_static, mem_src, mem_tgt, weight):
    """Prototypes, calibrated label transfer, fusion and both contrasts: one pure function.

    ``weight`` (lambda_cal) is a 0-dim tensor so that a compiled version does not
    recompile as the ramp moves.
    """
    protos_src, present_src = class_prototypes(f_src, y_src, NUM_CLASSES)
    calibrated, cal_present = calibrated_prototypes(protos_src.detach(), present_src, mem_src, mem_tgt, weight)
    y_dynamic = label_transfer(f_tgt, calibrated, cal_present, TEMPERATURE, TRANSFER_THRESHOLD)
    y_tgt = fuse_labels(y_static, y_dynamic)
    protos_tgt, present_tgt = class_prototypes(f_tgt, y_tgt, NUM_CLASSES)
    loss_t2s = pixel_prototype_contrast(f_tgt, y_tgt, protos_src, present_src, TEMPERATURE)
    loss_s2t = pixel_prototype_contrast(f_src, y_src, protos_tgt, present_tgt, TEMPERATURE)
    return loss_t2s, loss_s2t, y_tgt, protos_src.detach(), present_src, protos_tgt.detach(), present_tgt


def make_step(forward):
    """An extras step (forward, backward, calibration update) around ``forward``."""
    def step(f_src, y_src, f_tgt, y_static, calibration):
        # torch.full: a fill kernel, not a blocking host-to-device copy of the Python float
        weight = torch.full((), calibration.weight(), device=f_src.device)
        loss_t2s, loss_s2t, y_tgt, p_src, in_src, p_tgt, in_tgt = forward(
            f_src, y_src, f_tgt, y_static, calibration.source, calibration.target, weight)
        (loss_t2s + loss_s2t).backward()
        calibration.update(p_src, in_src, p_tgt, in_tgt)
        return loss_t2s.detach(), loss_s2t.detach(), y_tgt
    return step


vectorised_step = make_step(extras_forward)


# --- harness ------------------------------------------------------------------------------


def make_inputs(dim: int, device: torch.device, seed: int = 0, size: int = FEATURE_SIZE):
    """Features clustered around class centres (target centres shifted: a domain bias)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH, size, size)
    centres = torch.randn(NUM_CLASSES, dim, generator=gen)
    centres_tgt = centres + 0.3 * torch.randn(NUM_CLASSES, dim, generator=gen)

    def domain(centre_table):
        labels = torch.randint(0, NUM_CLASSES, shape, generator=gen)
        noise = torch.randn(BATCH, dim, *shape[1:], generator=gen)
        feats = centre_table[labels].permute(0, 3, 1, 2) + noise
        ignored = torch.rand(shape, generator=gen) < IGNORE_SHARE
        return feats, labels.masked_fill(ignored, IGNORE)

    f_src, y_src = domain(centres)
    f_tgt, y_static = domain(centres_tgt)
    return [t.to(device) for t in (f_src, y_src, f_tgt, y_static)]


def warm_calibration(dim: int, device: torch.device) -> Calibration:
    """A calibration a few steps into its ramp, so that the shift is really applied."""
    calibration = Calibration(NUM_CLASSES, dim, ramp_iters=10, max_weight=1.0, momentum=0.99)
    calibration.to(device)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        src, tgt = torch.randn(2, NUM_CLASSES, dim, generator=gen).to(device)
        keep_src, keep_tgt = (torch.rand(2, NUM_CLASSES, generator=gen) < 0.9).to(device)
        calibration.update(src, keep_src, tgt, keep_tgt)
    return calibration


def copy_calibration(calibration: Calibration, device: torch.device) -> Calibration:
    clone = Calibration(
        NUM_CLASSES,
        calibration.source.dim,
        ramp_iters=calibration.ramp_iters,
        max_weight=calibration.max_weight,
        momentum=calibration.source.momentum,
    ).to(device)
    clone.load_state_dict(calibration.state_dict())
    return clone


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def check_agreement(inputs, calibration, device, steps) -> tuple[float, float]:
    """Run every variant of ``steps`` once from the same state; all must agree with the first."""
    f_src, y_src, f_tgt, y_static = inputs
    runs = []
    for step in steps.values():
        cal = copy_calibration(calibration, device)
        src, tgt = leaf(f_src), leaf(f_tgt)
        t2s, s2t, y_tgt = step(src, y_src, tgt, y_static, cal)
        runs.append((t2s, s2t, y_tgt, src.grad, tgt.grad, cal))
    fast = runs[0]
    for slow in runs[1:]:
        torch.testing.assert_close(fast[0], slow[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast[1], slow[1], rtol=1e-4, atol=1e-5)
        # Label transfer may flip on exact probability ties only; allow a handful of pixels.
        assert (fast[2] != slow[2]).float().mean() < 1e-3, "fused target labels differ"
        torch.testing.assert_close(fast[3], slow[3], rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(fast[4], slow[4], rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(fast[5].source.value, slow[5].source.value)
        torch.testing.assert_close(fast[5].target.value, slow[5].target.value)
    return float(fast[0]), float(fast[1])


def time_once(step, inputs, calibration, device) -> float:
    """Milliseconds of one call of ``step`` on fresh leaf features."""
    f_src, y_src, f_tgt, y_static = inputs
    src, tgt = leaf(f_src), leaf(f_tgt)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step(src, y_src, tgt, y_static, calibration)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def time_all(steps: dict, inputs, calibration, device, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median ms of each variant, alternating them so that all see the same machine load."""
    cals = {name: copy_calibration(calibration, device) for name in steps}
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i in range(warmup + repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            elapsed = time_once(steps[name], inputs, cals[name], device)
            if i >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(t) for name, t in times.items()}


def compiled_step(backend: str, mode: str | None):
    """The vectorised step with its forward under ``torch.compile`` (backward and EMA update eager)."""
    kwargs = {"backend": backend} | ({"mode": mode} if mode and backend == "inductor" else {})
    return make_step(torch.compile(extras_forward, dynamic=False, **kwargs))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed iterations per variant")
    parser.add_argument(
        "--dim", type=int, nargs="+", default=[76, 256],
        help="feature dims (76 = 4 ASPP branches x 19 classes; 256 = projection head)",
    )
    parser.add_argument("--device", default="cpu", help="torch device to run on")
    parser.add_argument("--size", type=int, default=FEATURE_SIZE, help="feature map side (92: a 730x730 crop)")
    parser.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "none"],
                        help="backend of the compiled variant (aot_eager: quick to compile, eager kernels; "
                             "none: leave the compiled variant out)")
    parser.add_argument("--compile-mode", default=None, choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile mode of the compiled variant (inductor only)")
    parser.add_argument("--no-naive", action="store_true", help="leave the per-class loop out (it is slow)")
    parser.add_argument("--json", default=None, help="also write the medians (ms per dim and variant) to this file")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes (16x16 features, D=8), 1 repeat, aot_eager: checks the script runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.dim, args.repeats = 16, [8], 1
        if args.compile_backend == "inductor":
            args.compile_backend = "aot_eager"
    device = torch.device(args.device)

    print(f"BiDA method extras: {BATCH} source + {BATCH} target images, "
          f"features {args.size}x{args.size}{' (a 730x730 crop)' if args.size == FEATURE_SIZE else ''}, "
          f"K={NUM_CLASSES}, ~{IGNORE_SHARE:.0%} ignore")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, device {device} ({name}), load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"median of {args.repeats} repeats (after 2 warm-up), the variants alternating; compiled: "
          f"{args.compile_backend}{f' mode {args.compile_mode}' if args.compile_mode else ''}")
    print()
    columns = ["D", "L_t2s", "L_s2t", "eager ms", "compiled ms", "eager/compiled", "naive loop ms", "naive/eager"]
    widths = [5, 8, 8, 9, 11, 14, 13, 11]
    print(" | ".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    results = {}
    for dim in args.dim:
        inputs = make_inputs(dim, device, size=args.size)
        calibration = warm_calibration(dim, device)
        steps = {"eager": vectorised_step}
        if args.compile_backend != "none":
            torch._dynamo.reset()
            steps["compiled"] = compiled_step(args.compile_backend, args.compile_mode)
        if not args.no_naive:
            steps["naive"] = naive_step
        loss_t2s, loss_s2t = check_agreement(inputs, calibration, device, steps)
        ms = time_all(steps, inputs, calibration, device, args.repeats)
        results[dim] = ms

        def cell(key, fmt="{:.2f}"):
            return fmt.format(ms[key]) if key in ms else "n/a"
        ratio_c = f"{ms['eager'] / ms['compiled']:.2f}x" if "compiled" in ms else "n/a"
        ratio_n = f"{ms['naive'] / ms['eager']:.1f}x" if "naive" in ms else "n/a"
        cells = [f"{dim}", f"{loss_t2s:.4f}", f"{loss_s2t:.4f}", cell("eager"), cell("compiled"), ratio_c,
                 cell("naive"), ratio_n]
        print(" | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)), flush=True)
    print()
    print("Losses, fused labels, feature gradients and EMA updates of all variants agree "
          "(checked before timing).")
    if args.json:
        import json

        with open(args.json, "w") as fh:
            json.dump({"device": name, "torch": torch.__version__, "ms": {str(d): r for d, r in results.items()}}, fh)
    return results


if __name__ == "__main__":
    main()
