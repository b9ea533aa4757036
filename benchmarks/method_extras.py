"""Time BiDA's per-iteration extras, vectorised (bida) against a naive per-class loop.

The extras are everything BiDA adds to a plain segmentation step (docs/method.md sections
1 to 4): source prototypes, label transfer to calibrated source prototypes and fusion
with the static labels, target prototypes, both contrast losses (forward + backward),
and the calibration update. The naive version does the same computation at the same
resolution, looping over classes and images (not pixels) the way a first implementation
would. Both start from the same state; their losses, labels and gradients are checked
to agree before anything is timed.

    .venv/bin/python benchmarks/method_extras.py [--repeats 5] [--dim 76 256]
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
from bida.pseudo_labels import Calibration, fuse_labels, label_transfer

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


def vectorised_step(f_src, y_src, f_tgt, y_static, calibration):
    protos_src, present_src = class_prototypes(f_src, y_src, NUM_CLASSES)
    calibrated, cal_present = calibration.calibrate(protos_src.detach(), present_src)
    y_dynamic = label_transfer(f_tgt, calibrated, cal_present, TEMPERATURE, TRANSFER_THRESHOLD)
    y_tgt = fuse_labels(y_static, y_dynamic)
    protos_tgt, present_tgt = class_prototypes(f_tgt, y_tgt, NUM_CLASSES)
    loss_t2s = pixel_prototype_contrast(f_tgt, y_tgt, protos_src, present_src, TEMPERATURE)
    loss_s2t = pixel_prototype_contrast(f_src, y_src, protos_tgt, present_tgt, TEMPERATURE)
    (loss_t2s + loss_s2t).backward()
    calibration.update(protos_src.detach(), present_src, protos_tgt.detach(), present_tgt)
    return loss_t2s.detach(), loss_s2t.detach(), y_tgt


# --- harness ------------------------------------------------------------------------------


def make_inputs(dim: int, device: torch.device, seed: int = 0):
    """Features clustered around class centres (target centres shifted: a domain bias)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (BATCH, FEATURE_SIZE, FEATURE_SIZE)
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


def check_agreement(inputs, calibration, device) -> tuple[float, float]:
    f_src, y_src, f_tgt, y_static = inputs
    runs = []
    for step in (vectorised_step, naive_step):
        cal = copy_calibration(calibration, device)
        src, tgt = leaf(f_src), leaf(f_tgt)
        t2s, s2t, y_tgt = step(src, y_src, tgt, y_static, cal)
        runs.append((t2s, s2t, y_tgt, src.grad, tgt.grad, cal))
    fast, slow = runs
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-4, atol=1e-5)
    # Label transfer may flip on exact probability ties only; allow a handful of pixels.
    assert (fast[2] != slow[2]).float().mean() < 1e-4, "fused target labels differ"
    torch.testing.assert_close(fast[3], slow[3], rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(fast[4], slow[4], rtol=1e-3, atol=1e-7)
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


def time_both(inputs, calibration, device, repeats: int, warmup: int = 2):
    """Median ms of each variant, alternating them so that both see the same machine load."""
    cal_fast = copy_calibration(calibration, device)
    cal_slow = copy_calibration(calibration, device)
    fast, slow = [], []
    for i in range(warmup + repeats):
        t_fast = time_once(vectorised_step, inputs, cal_fast, device)
        t_slow = time_once(naive_step, inputs, cal_slow, device)
        if i >= warmup:
            fast.append(t_fast)
            slow.append(t_slow)
    return statistics.median(fast), statistics.median(slow)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed iterations per variant")
    parser.add_argument(
        "--dim", type=int, nargs="+", default=[76, 256],
        help="feature dims (76 = 4 ASPP branches x 19 classes; 256 = projection head)",
    )
    parser.add_argument("--device", default="cpu", help="torch device to run on")
    args = parser.parse_args()
    device = torch.device(args.device)

    print(f"BiDA method extras: {BATCH} source + {BATCH} target images, {CROP}x{CROP} crop, "
          f"features {FEATURE_SIZE}x{FEATURE_SIZE}, K={NUM_CLASSES}, ~{IGNORE_SHARE:.0%} ignore")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"load average {load:.1f} on {os.cpu_count()} CPUs")
    print(f"median of {args.repeats} repeats (after 2 warm-up), the two variants alternating")
    print()
    columns = ["D", "L_t2s", "L_s2t", "vectorised ms", "naive loop ms", "speedup"]
    widths = [5, 8, 8, 13, 13, 8]
    print(" | ".join(f"{name:>{width}}" for name, width in zip(columns, widths)))
    print("-+-".join("-" * width for width in widths))
    for dim in args.dim:
        inputs = make_inputs(dim, device)
        calibration = warm_calibration(dim, device)
        loss_t2s, loss_s2t = check_agreement(inputs, calibration, device)
        fast, slow = time_both(inputs, calibration, device, args.repeats)
        cells = [f"{dim}", f"{loss_t2s:.4f}", f"{loss_s2t:.4f}", f"{fast:.2f}", f"{slow:.2f}",
                 f"{slow / fast:.1f}x"]
        print(" | ".join(f"{cell:>{width}}" for cell, width in zip(cells, widths)))
    print()
    print("Losses, fused labels, feature gradients and EMA updates of both variants agree "
          "(checked before timing).")


if __name__ == "__main__":
    main()
