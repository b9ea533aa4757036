"""One training iteration of each method, in the order of the paper.

``source_only``: CE on source. ``minent``: + lambda_e target entropy. ``self_training``:
+ lambda_t CE on the round's static pseudo labels and the entropy terms. ``bida``: + the
bi-directional pixel-prototype contrast with dynamic (label-transfer) pseudo labels and
calibrated source prototypes. Returns the weighted loss and a flat dict of log values.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import Config
from .deeplabv2 import SegOutput
from .losses import entropy, pixel_prototype_contrast, seg_cross_entropy
from .prototypes import class_prototypes, downsample_labels, pair_prototypes
from .pseudo_labels import Calibration, fuse_labels, label_transfer

IGNORE = 255


@dataclass
class StepResult:
    loss: Tensor
    logs: dict[str, float]


def forward_pair(model: torch.nn.Module, img_src: Tensor, img_tgt: Tensor, shared_stem: bool) -> tuple[SegOutput, SegOutput]:
    """Run both domains; one concatenated forward when the stem is shared (also one BN batch)."""
    if shared_stem and img_src.shape[-2:] == img_tgt.shape[-2:]:
        out = model(torch.cat([img_src, img_tgt]), "source")
        b = img_src.shape[0]
        return (SegOutput(out.logits[:b], out.features[:b]), SegOutput(out.logits[b:], out.features[b:]))
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):  # DDP needs one call a step (DomainPair)
        return model(img_src, "source", img_tgt)
    return model(img_src, "source"), model(img_tgt, "target")


def _labelled(labels: Tensor) -> Tensor:
    """Number of labelled pixels: what a cross entropy over ``labels`` averages over."""
    return (labels != IGNORE).sum()


def _label_accuracy(pred: Tensor, gt: Tensor) -> float:
    """Accuracy of pseudo labels ``pred`` on the pixels that carry both them and a true label."""
    labelled = (pred != IGNORE) & (gt != IGNORE)
    return float((pred[labelled] == gt[labelled]).float().mean()) if labelled.any() else float("nan")


def source_step(model: torch.nn.Module, batch_src: dict, cfg: Config, reduce_sums=None) -> StepResult:
    out = model(batch_src["image"], "source")
    loss = seg_cross_entropy(out.logits, batch_src["label"])
    if reduce_sums is not None:  # distributed: this rank's share of the global-batch mean
        loss = reduce_sums.global_means({"seg_src": loss}, {"seg_src": _labelled(batch_src["label"])})["seg_src"]
    return StepResult(loss, {"loss/seg_src": float(loss.detach())})


def adapt_step(model: torch.nn.Module, batch_src: dict, batch_tgt: dict, cfg: Config,
               calibration: Calibration | None, num_classes: int, reduce_sums=None) -> StepResult:
    """One adaptation iteration (``minent``, ``self_training`` or ``bida``).

    ``batch_tgt["label"]`` holds the round's static pseudo labels y_F (all ignore for
    ``minent``); ``batch_tgt["gt"]``, when present, the true labels, used only for logging.
    ``reduce_sums`` (distributed runs, :class:`~bida.distributed.GlobalBatch`): prototypes
    and per-pixel means over the global batch rather than this rank's slice.
    """
    m, lw = cfg.method, cfg.loss
    out_src, out_tgt = forward_pair(model, batch_src["image"], batch_tgt["image"], not cfg.model.separate_target_stem)
    y_src, y_static = batch_src["label"], batch_tgt["label"]

    # Segmentation and entropy terms (weights applied here, never inside the losses).
    terms: dict[str, Tensor] = {"seg_src": seg_cross_entropy(out_src.logits, y_src)}
    weights: dict[str, float] = {"seg_src": 1.0}
    counts: dict[str, Tensor] = {}  # pixels behind each per-pixel mean (for distributed runs)
    if m.name == "minent":
        terms["ent_tgt"] = entropy(out_tgt.logits)
        weights["ent_tgt"] = lw.entropy_weight
    logs: dict[str, float] = {}

    if m.name in ("self_training", "bida"):
        terms["ent_src"] = entropy(out_src.logits)
        terms["ent_tgt"] = entropy(out_tgt.logits)
        weights["ent_src"] = lw.entropy_weight
        weights["ent_tgt"] = lw.entropy_weight * lw.seg_tgt_weight
        weights["seg_tgt"] = lw.seg_tgt_weight

    y_seg_tgt = y_static
    if m.name == "bida":
        feat_size = tuple(out_src.features.shape[-2:])
        f_src, f_tgt = out_src.features, out_tgt.features
        y_src_f = downsample_labels(y_src, feat_size)
        y_static_f = downsample_labels(y_static, feat_size)

        # 1. Source prototypes (masked average pooling; gradients flow through them).
        prototypes = reduce_sums or partial(class_prototypes, num_classes=num_classes)
        protos_src, present_src = prototypes(f_src, y_src_f)

        # 2. Target pseudo labels: static y_F completed by label transfer to calibrated prototypes.
        y_tgt_f = y_static_f
        if m.dynamic_labels:
            if calibration is not None and m.calibration:
                ref, ref_present = calibration.calibrate(protos_src.detach(), present_src)
            else:
                ref, ref_present = protos_src.detach(), present_src
            y_dyn_f = label_transfer(f_tgt.detach(), ref, ref_present, lw.temperature, cfg.pseudo.transfer_threshold)
            y_tgt_f = fuse_labels(y_static_f, y_dyn_f)
            logs["pseudo/dynamic_coverage"] = float((y_dyn_f != IGNORE).float().mean())
            logs["pseudo/fused_coverage"] = float((y_tgt_f != IGNORE).float().mean())
            if "gt" in batch_tgt:
                logs["pseudo/dynamic_acc"] = _label_accuracy(y_dyn_f, downsample_labels(batch_tgt["gt"], feat_size))
        # 3. Target prototypes from target features and fused labels.
        protos_tgt, present_tgt = prototypes(f_tgt, y_tgt_f)

        # 4. Bi-directional contrast (optionally per image pair, as the official code).
        if m.prototype_scope == "pair":
            ps_src, pp_src = pair_prototypes(f_src, y_src_f, num_classes)
            ps_tgt, pp_tgt = pair_prototypes(f_tgt, y_tgt_f, num_classes)
        else:
            ps_src, pp_src, ps_tgt, pp_tgt = protos_src, present_src, protos_tgt, present_tgt
        full_res = lw.contrast_resolution == "label"
        if full_res:
            size = tuple(y_src.shape[-2:])
            y_tgt_c = fuse_labels(y_static, F.interpolate(y_tgt_f[:, None].float(), size=size, mode="nearest")[:, 0].long())
            y_src_c = y_src
        else:
            y_tgt_c, y_src_c = y_tgt_f, y_src_f
        if m.t2s:
            terms["contrast_t2s"], counts["contrast_t2s"] = pixel_prototype_contrast(
                f_tgt, y_tgt_c, ps_src, pp_src, lw.temperature, resolution=lw.contrast_resolution, return_count=True)
            weights["contrast_t2s"] = lw.contrast_t2s_weight
        if m.s2t:
            terms["contrast_s2t"], counts["contrast_s2t"] = pixel_prototype_contrast(
                f_src, y_src_c, ps_tgt, pp_tgt, lw.temperature, resolution=lw.contrast_resolution, return_count=True)
            weights["contrast_s2t"] = lw.contrast_s2t_weight

        # 5. Calibration state follows both prototype sets.
        if calibration is not None and m.calibration:
            calibration.update(protos_src.detach(), present_src, protos_tgt.detach(), present_tgt)
            logs["calibration/weight"] = calibration.weight()
            logs["calibration/mean_shift"] = calibration.mean_shift()
        if cfg.pseudo.dynamic_for_segmentation:
            size = tuple(y_static.shape[-2:])
            y_seg_tgt = fuse_labels(y_static, F.interpolate(y_tgt_f[:, None].float(), size=size, mode="nearest")[:, 0].long())

    if "seg_tgt" in weights:
        terms["seg_tgt"] = seg_cross_entropy(out_tgt.logits, y_seg_tgt)
    if reduce_sums is not None:  # distributed: each per-pixel mean over the global batch
        counts |= {"seg_src": _labelled(y_src), "seg_tgt": _labelled(y_seg_tgt),
                   "ent_src": out_src.logits[:, 0].numel(), "ent_tgt": out_tgt.logits[:, 0].numel()}
        terms = reduce_sums.global_means(terms, counts)

    loss = sum(weights[k] * terms[k] for k in terms)
    logs.update({f"loss/{k}": float(v.detach()) for k, v in terms.items()})
    logs["loss/total"] = float(loss.detach())
    return StepResult(loss, logs)
