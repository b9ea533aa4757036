"""Inference (whole image, sliding window, flip) and confusion-matrix metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import EvalConfig, check_class_ids
from ..progress import progress_bar


# --------------------------------------------------------------------------- metrics


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; ignore pixels skipped.

    Shape:
        pred, label: any matching shape of class indices.
    """
    valid = (label != ignore_index) & (label >= 0) & (label < num_classes)
    idx = label[valid].long() * num_classes + pred[valid].long().clamp(0, num_classes - 1)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


def iou_from_confusion(conf: Tensor) -> Tensor:
    """Per-class IoU = TP / (TP + FP + FN); NaN where the class is in neither GT nor prediction."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def metrics_from_confusion(conf: Tensor, class_names: Sequence[str], eval_classes: Sequence[int] | None = None) -> dict:
    """mIoU (over ``eval_classes`` or all classes, NaNs skipped), per-class IoU and pixel accuracy.

    Returns:
        ``{"mIoU": float, "per_class_iou": {name: float | None}, "pixel_acc": float,
        "num_classes_evaluated": int}``; None marks a class absent from GT and prediction.
    """
    check_class_ids("data.eval_classes", eval_classes, conf.shape[0])
    classes = list(range(conf.shape[0])) if eval_classes is None else list(eval_classes)
    # IoU from the full matrix, then the subset: pixels predicted as an excluded class still
    # count as misses (the 16/13-class SYNTHIA protocols of UDA papers).
    iou = iou_from_confusion(conf)[classes]
    valid = ~torch.isnan(iou)
    miou = float(iou[valid].mean()) if valid.any() else 0.0
    total = conf.sum()
    return {
        "mIoU": miou,
        "per_class_iou": {class_names[c]: (None if math.isnan(v) else float(v)) for c, v in zip(classes, iou.tolist())},
        "pixel_acc": float(conf.diag().sum().double() / total.double()) if total > 0 else 0.0,
        "num_classes_evaluated": int(valid.sum()),
    }


# A model "predicts one class on nearly every pixel" when that class takes at least
# COLLAPSE_SHARE of its predictions while the other classes get less than COLLAPSE_RECALL of
# the pixels they cover. The second condition is relative, so that a 92 %-background source
# still warns (predicting background on 99.5 % of the pixels leaves the digits 0.5 % of
# their 8 %) and a class that truly covers 96 % of the labels, predicted as such, does not.
COLLAPSE_SHARE = 0.95
COLLAPSE_RECALL = 0.25


def majority_collapse(conf: Tensor, class_names: Sequence[str], split: str) -> str | None:
    """A one-line warning when a confusion matrix shows a model that predicts one class on
    nearly every pixel, else None (also for an empty matrix or labels of one class only).

    Args:
        conf: (K, K) counts, rows = ground truth, columns = prediction (:func:`confusion_matrix`).
        class_names: K names. split: the split's name, for the message.

    Shape:
        - conf: (K, K)
    """
    conf = conf.double()
    total = conf.sum()
    if total <= 0:
        return None
    predicted, labelled = conf.sum(0) / total, conf.sum(1) / total
    top = int(predicted.argmax())
    others_labelled, others_predicted = 1.0 - float(labelled[top]), 1.0 - float(predicted[top])
    if float(predicted[top]) < COLLAPSE_SHARE or others_labelled <= 0 or \
            others_predicted >= COLLAPSE_RECALL * others_labelled:
        return None
    return (f"bida: warning: the model predicts {class_names[top]} on {100 * float(predicted[top]):.1f} % of the "
            f"{split} pixels, where it covers {100 * float(labelled[top]):.1f} %: it has learnt little beyond the "
            "majority class; try more iterations (train.iters, train.source_iters), a pretrained backbone "
            "(model.pretrained) or a class-balanced source loss (loss.class_weights=inverse_sqrt_freq)")


def protocol_metrics(conf: Tensor, class_names: Sequence[str]) -> dict:
    """The standard class subsets of UDA papers when the classes are Cityscapes' 19.

    Returns ``{"mIoU_19": .., "mIoU_16": .., "mIoU_13": ..}`` (GTA5 is reported on 19
    classes, SYNTHIA on 16 and 13), or ``{}`` for another class list.
    """
    from ..labels import CITYSCAPES_CLASSES, SYNTHIA_13_CLASSES, SYNTHIA_16_CLASSES

    if tuple(class_names) != tuple(CITYSCAPES_CLASSES):
        return {}
    return {f"mIoU_{len(ids)}": metrics_from_confusion(conf, class_names, ids)["mIoU"]
            for ids in (range(19), SYNTHIA_16_CLASSES, SYNTHIA_13_CLASSES)}


def markdown_table(metrics: dict, title: str = "target val") -> str:
    """A Markdown table of per-class IoU, mIoU and pixel accuracy (percent)."""
    lines = [f"| class | IoU ({title}) |", "|---|---:|"]
    for name, v in metrics["per_class_iou"].items():
        lines.append(f"| {name} | {'n/a' if v is None else f'{100 * v:.1f}'} |")
    lines.append(f"| **mIoU** | **{100 * metrics['mIoU']:.1f}** |")
    lines.append(f"| pixel acc | {100 * metrics['pixel_acc']:.1f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- inference


def _forward_logits(model: torch.nn.Module, x: Tensor, domain: str) -> Tensor:
    return model(x, domain).logits.float()


def slide_logits(model: torch.nn.Module, x: Tensor, crop: tuple[int, int], stride: tuple[int, int],
                 num_classes: int, domain: str = "target") -> Tensor:
    """Sliding-window class scores at input resolution, overlapping windows averaged.

    Shape:
        x (B, 3, H, W) -> (B, K, H, W).
    """
    b, _, h, w = x.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    sh, sw = stride
    rows = max(1, math.ceil((h - ch) / sh) + 1)
    cols = max(1, math.ceil((w - cw) / sw) + 1)
    out = x.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = x.new_zeros((1, 1, h, w), dtype=torch.float32)
    corners = [(min(r * sh, h - ch), min(c * sw, w - cw)) for r in range(rows) for c in range(cols)]
    if getattr(model, "batched_slide", False):  # HRDA: every window in one forward, as its batched_slide
        windows = torch.cat([x[:, :, y0:y0 + ch, x0:x0 + cw] for y0, x0 in corners])
        window_logits = _forward_logits(model, windows, domain).split(b)
    else:
        window_logits = (_forward_logits(model, x[:, :, y0:y0 + ch, x0:x0 + cw], domain) for y0, x0 in corners)
    for (y0, x0), logits in zip(corners, window_logits):
        out[:, :, y0 : y0 + ch, x0 : x0 + cw] += F.interpolate(logits, (ch, cw), mode="bilinear", align_corners=False)
        count[:, :, y0 : y0 + ch, x0 : x0 + cw] += 1
    return out / count


@torch.no_grad()
def predict_probs(model: torch.nn.Module, x: Tensor, cfg: EvalConfig, num_classes: int,
                  out_size: tuple[int, int] | None = None, domain: str = "target") -> Tensor:
    """Softmax probabilities at ``out_size`` (default: input size).

    The image is optionally resized to ``cfg.size`` first; ``whole`` runs the network once,
    ``slide`` averages windows; ``flip`` averages with the mirrored prediction.

    Shape:
        x (B, 3, H, W) -> (B, K, *out_size).
    """
    out_size = tuple(out_size or x.shape[-2:])
    if cfg.size is not None and tuple(cfg.size) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=tuple(cfg.size), mode="bilinear", align_corners=False)
    views = [x, x.flip(-1)] if cfg.flip else [x]
    probs = None
    for i, v in enumerate(views):
        if cfg.mode == "slide":
            logits = slide_logits(model, v, tuple(cfg.crop), tuple(cfg.stride), num_classes, domain)
        else:
            logits = _forward_logits(model, v, domain)
        p = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False).softmax(1)
        p = p.flip(-1) if i == 1 else p
        probs = p if probs is None else probs + p
    return probs / len(views)


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, cfg: EvalConfig, class_names: Sequence[str],
             eval_classes: Sequence[int] | None = None, quiet: bool = True, ignore_index: int = 255,
             device: torch.device | str = "cpu", per_image: bool = False, autocast_dtype: torch.dtype | None = None,
             confusion_hook=None, check_stop: Callable[[], None] | None = None) -> dict:
    """Evaluate ``model`` on a labelled dataset (items with ``image`` and ``label``).

    Returns ``metrics_from_confusion`` plus ``confusion`` (list of lists) and, with
    ``per_image``, ``per_image_miou`` (list of floats, dataset order).
    ``confusion_hook`` (e.g. an all-reduce) is applied to the summed confusion matrix.
    ``check_stop`` is called before each image and may raise to abandon the evaluation
    (a pending SIGTERM: the trainer evaluates again after ``--resume``).
    """
    k = len(class_names)
    check_class_ids("data.eval_classes", eval_classes, k)  # before the pass, not after it
    was_training = model.training
    model.eval()
    conf = torch.zeros(k, k, dtype=torch.int64)
    per_image_scores: list[float] = []
    indices: Iterable[int] = range(len(dataset))
    for i in progress_bar(indices, desc="evaluate", disable=quiet, leave=False):
        if check_stop is not None:
            try:
                check_stop()
            except BaseException:
                model.train(was_training)
                raise
        item = dataset[i]
        x = item["image"].unsqueeze(0).to(device)
        label = item["label"].to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            probs = predict_probs(model, x, cfg, k, tuple(label.shape[-2:]))
        c = confusion_matrix(probs.argmax(1)[0], label, k, ignore_index)
        conf += c
        if per_image:
            per_image_scores.append(metrics_from_confusion(c, class_names, eval_classes)["mIoU"])
    if confusion_hook is not None:
        conf = confusion_hook(conf)
    model.train(was_training)
    result = metrics_from_confusion(conf, class_names, eval_classes)
    result.update(protocol_metrics(conf, class_names))
    result["confusion"] = conf.tolist()
    if per_image:
        result["per_image_miou"] = per_image_scores
    return result


def write_metrics(metrics: dict, path: Path) -> None:
    """``metrics.json``: mIoU, per-class IoU, pixel accuracy (+ whatever else is in the dict)."""
    from ..checkpoint import atomic_write_text

    atomic_write_text(Path(path), json.dumps(metrics, indent=2))
