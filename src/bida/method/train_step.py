"""One training iteration of each method, in the order of the paper.

``source_only``: CE on source. ``minent``: + lambda_e target entropy. ``self_training``:
+ lambda_t CE on the round's static pseudo labels and the entropy terms. ``bida``: + the
bi-directional pixel-prototype contrast with dynamic (label-transfer) pseudo labels and
calibrated source prototypes. Returns the weighted loss and a flat dict of log values.

Nothing here waits for the device: log values are detached 0-dim tensors (or Python
floats computed on the host), and the trainer brings them to the host only when it logs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable
from functools import partial

import torch
from torch import Tensor

from ..models import unwrap_model
from ..config import Config
from ..models import SegOutput
from .losses import ce_pixel_count, entropy, pixel_prototype_contrast, seg_cross_entropy
from .prototypes import class_prototypes, downsample_labels, pair_prototypes
from .pseudo_labels import Calibration, fuse_labels, label_transfer

IGNORE = 255


@dataclass
class StepResult:
    """The weighted loss and the step's log values (detached 0-dim tensors or host floats)."""

    loss: Tensor
    logs: dict[str, Tensor | float]


def _concat_ok(model: torch.nn.Module, images: list[Tensor], shared_stem: bool) -> bool:
    """Whether ``images`` may share one forward: a shared stem, one size, no module against it."""
    same = all(x.shape[-2:] == images[0].shape[-2:] for x in images)
    return shared_stem and same and all(getattr(m, "concat_domains_ok", True) for m in model.modules())


def forward_domains(model: torch.nn.Module, images: list[Tensor], domains: list[str], shared_stem: bool) -> list[SegOutput]:
    """One concatenated forward when the stem is shared and the sizes agree (also one BN batch),
    else one forward per image set in its own domain."""
    if _concat_ok(model, images, shared_stem):
        out = model(torch.cat(images), "source")
        outs, start = [], 0
        for x in images:
            end = start + x.shape[0]
            outs.append(SegOutput(out.logits[start:end], out.features[start:end]))
            start = end
        return outs
    return [model(x, d) for x, d in zip(images, domains)]


def forward_pair(model: torch.nn.Module, img_src: Tensor, img_tgt: Tensor, shared_stem: bool) -> tuple[SegOutput, SegOutput]:
    """Run both domains (:func:`forward_domains`); under DDP with separate forwards, one call."""
    # DDP needs one call a step (DomainPair); a compiled DDP module is checked through its original.
    if (not _concat_ok(model, [img_src, img_tgt], shared_stem)
            and isinstance(getattr(model, "_orig_mod", model), torch.nn.parallel.DistributedDataParallel)):
        return model(img_src, "source", img_tgt)
    out_src, out_tgt = forward_domains(model, [img_src, img_tgt], ["source", "target"], shared_stem)
    return out_src, out_tgt


def _labelled(labels: Tensor) -> Tensor:
    """Number of labelled pixels: what a cross entropy over ``labels`` averages over."""
    return (labels != IGNORE).sum()


def _label_accuracy(pred: Tensor, gt: Tensor) -> Tensor:
    """Accuracy of pseudo labels ``pred`` on the pixels that carry both them and a true label.

    A 0-dim float32 tensor, NaN when no pixel carries both; computed without a
    data-dependent selection, so that it never waits for the device.
    """
    labelled = (pred != IGNORE) & (gt != IGNORE)
    return (labelled & (pred == gt)).sum().float() / labelled.sum().float()  # 0 / 0 is NaN


@contextlib.contextmanager
def head_input_detached(model: torch.nn.Module):
    """Forwards inside feed the projection head (``model.proj``) a detached input: a loss on
    the contrast features then trains the head alone, never the segmentation path."""
    head = getattr(unwrap_model(model), "proj", None)
    if head is None:
        raise ValueError("the model has no projection head (method.feature=aspp_branches)")
    handle = head.register_forward_pre_hook(lambda module, args: tuple(a.detach() for a in args))
    try:
        yield
    finally:
        handle.remove()


def source_step(model: torch.nn.Module, batch_src: dict, cfg: Config, reduce_sums=None,
                num_classes: int | None = None, class_weights: Tensor | None = None) -> StepResult:
    """CE on source; with ``method.pretrain_head`` also the supervised pixel-prototype contrast
    of the source pixels with their batch's source prototypes, on the projection head of
    detached features (the head learns it; the segmentation path's gradients stay CE's alone).
    ``class_weights``: (K,) weights of the source CE's classes (``loss.class_weights``), or None."""
    y_src = batch_src["label"]
    head = cfg.method.pretrain_head
    with head_input_detached(model) if head else contextlib.nullcontext():
        out = model(batch_src["image"], "source")
    mean = cfg.loss.source_ce_mean
    terms = {"seg_src": seg_cross_entropy(out.logits, y_src, mean_over=mean, class_weights=class_weights)}
    counts = {"seg_src": ce_pixel_count(y_src, mean)}
    if head:
        y_f = _mask_labels(downsample_labels(y_src, tuple(out.features.shape[-2:])),
                           _valid_at(batch_src, tuple(out.features.shape[-2:])))
        prototypes = reduce_sums or partial(class_prototypes, num_classes=num_classes or out.logits.shape[1])
        protos, present = prototypes(out.features, y_f)
        terms["head_contrast"], counts["head_contrast"] = pixel_prototype_contrast(
            out.features, y_f, protos, present, cfg.loss.temperature, return_count=True)
    if reduce_sums is not None:  # distributed: this rank's share of the global-batch mean
        terms = reduce_sums.global_means(terms, counts)
    loss = sum(terms.values())
    return StepResult(loss, {f"loss/{k}": v.detach() for k, v in terms.items()})


def _valid_at(batch: dict, size: tuple[int, int]) -> Tensor | None:
    """The batch's valid-pixel mask (False on crop padding) at ``size``, or None if it has none."""
    valid = batch.get("valid")
    if valid is None:
        return None
    return downsample_labels(valid.long(), size).bool()


def _mask_labels(labels: Tensor, valid: Tensor | None) -> Tensor:
    """``labels`` with the pixels outside ``valid`` set to ignore."""
    return labels if valid is None else torch.where(valid, labels, torch.full_like(labels, IGNORE))


def _fused_at_label_size(y_static: Tensor, y_dyn_f: Tensor, batch_tgt: dict) -> Tensor:
    """Full-resolution static labels ``y_static`` with their holes filled from the dynamic labels.

    Only the feature-size dynamic labels ``y_dyn_f`` (y_D) are brought to the label size
    (nearest): a fused feature-size map would also carry y_F's own nearest-neighbour
    samples, and upsampling it would copy a cell's static label onto the cell's unlabelled
    pixels even where there is no dynamic label at all. Crop padding stays ignore: nearest
    upsampling can copy a label from a valid feature pixel onto padded label pixels next to
    it when the sizes are not exact multiples.

    Shape:
        - y_static: (B, H, W)
        - y_dyn_f: (B, h, w)
        - output: (B, H, W)
    """
    size = tuple(y_static.shape[-2:])
    up = downsample_labels(y_dyn_f, size)  # a nearest resize, here upwards
    return fuse_labels(y_static, _mask_labels(up, _valid_at(batch_tgt, size)))


def _with_memory(protos: Tensor, present: Tensor, memory) -> tuple[Tensor, Tensor]:
    """Prototypes completed by the (detached) moving average for the classes they lack.

    Shape:
        - protos: (K, D), or (B, K, D) per image pair
        - present: (K,) or (B, K), bool
        - output: the same shapes
    """
    if memory is None:
        return protos, present
    fill = memory.initialized.to(present.device) & ~present
    return torch.where(fill[..., None], memory.value.to(protos.device), protos), present | fill


Count = Tensor | int


class _Terms:
    """The loss terms of one step, in the order they are added: each a per-pixel mean with its
    weight and, for distributed runs (``reduce_sums``), the number of pixels behind it.

    A count is given as a value or as a function that computes it; the function runs only
    when ``reduce_sums`` needs the count, so a single process does no counting work.
    """

    def __init__(self, reduce_sums=None) -> None:
        self.reduce_sums = reduce_sums
        self.values: dict[str, Tensor] = {}
        self.weights: dict[str, float] = {}
        self.counts: dict[str, Count] = {}

    def add(self, name: str, value: Tensor, weight: float, count: Count | Callable[[], Count]) -> None:
        self.values[name], self.weights[name] = value, weight
        if self.reduce_sums is not None:
            self.counts[name] = count() if callable(count) else count

    def result(self, logs: dict[str, Tensor | float]) -> StepResult:
        """The weighted sum (each term a global-batch mean under ``reduce_sums``) and the logs."""
        rs = self.reduce_sums
        values = self.values if rs is None else rs.global_means(self.values, self.counts)
        loss = sum(self.weights[k] * values[k] for k in values)
        logs.update({f"loss/{k}": v.detach() for k, v in values.items()})
        logs["loss/total"] = loss.detach()
        return StepResult(loss, logs)


def adapt_step(model: torch.nn.Module, batch_src: dict, batch_tgt: dict, cfg: Config,
               calibration: Calibration | None, num_classes: int, reduce_sums=None,
               outputs: tuple[SegOutput, SegOutput] | None = None, seg_terms: bool = True,
               adapt_iter: int | None = None, class_weights: Tensor | None = None,
               source_ce_weight: float = 1.0) -> StepResult:
    """One adaptation iteration (``minent``, ``self_training`` or ``bida``): docs/method.md's
    total loss (section 5),

        L = CE(p_S, y_S) + λ_t CE(p_T, y_F) + λ_e [H(p_S) + λ_t H(p_T)] + λ_1 L_t2s + λ_2 L_s2t,

    with BiDA's contrast and pseudo labels in :func:`_bida_contrast` (sections 1–4).

    ``batch_tgt["label"]`` holds the round's static pseudo labels y_F (all ignore for
    ``minent``); ``batch_tgt["gt"]``, when present, the true labels, used only for logging;
    ``batch_*["valid"]``, when present, marks the pixels that are not crop padding: no loss,
    prototype, pseudo label or moving average reads the others.
    ``calibration``: the prototype moving averages (None without method.calibration and
    method.memory_partners); they calibrate label transfer only with ``method.calibration``.
    ``reduce_sums`` (distributed runs, :class:`~bida.distributed.GlobalBatch`): prototypes
    and per-pixel means over the global batch rather than this rank's slice.
    ``outputs``: the two domains' forwards when the caller ran them (the teacher schedule);
    ``seg_terms=False`` leaves out the entropy terms and the target CE (the teacher schedule
    trains the target through its ClassMix loss instead).
    ``adapt_iter``: iterations of the adaptation phase done before this one; the contrast
    terms weigh 0 while it is below ``loss.contrast_warmup_iters``.
    ``class_weights``: (K,) weights of the source CE's classes (``loss.class_weights``), or None.
    ``source_ce_weight``: the weight of CE(p_S, y_S) (HRDA's 1 - lambda_d for its fused
    prediction; the teacher step adds the detail crop's CE).
    """
    m, lw = cfg.method, cfg.loss
    out_src, out_tgt = outputs or forward_pair(model, batch_src["image"], batch_tgt["image"],
                                               not cfg.model.separate_target_stem)
    y_src, y_static = batch_src["label"], batch_tgt["label"]
    logit_size = tuple(out_src.logits.shape[-2:])
    valid_src_l, valid_tgt_l = _valid_at(batch_src, logit_size), _valid_at(batch_tgt, logit_size)
    terms = _Terms(reduce_sums)  # weights are applied here, never inside the losses
    logs: dict[str, Tensor | float] = {}

    # CE(p_S, y_S): the source cross entropy (over labelled pixels, or all with loss.source_ce_mean).
    mean = lw.source_ce_mean
    terms.add("seg_src", seg_cross_entropy(out_src.logits, y_src, mean_over=mean, class_weights=class_weights),
              source_ce_weight,
              lambda: ce_pixel_count(y_src, mean))
    # λ_e [H(p_S) + λ_t H(p_T)]: the entropy terms (minent: the target's alone, weight λ_e).
    target_seg = m.name in ("self_training", "bida") and seg_terms
    if m.name == "minent":
        terms.add("ent_tgt", entropy(out_tgt.logits, valid_tgt_l), lw.entropy_weight,
                  lambda: _num_valid(out_tgt.logits, valid_tgt_l))
    elif target_seg:
        terms.add("ent_src", entropy(out_src.logits, valid_src_l), lw.entropy_weight,
                  lambda: _num_valid(out_src.logits, valid_src_l))
        terms.add("ent_tgt", entropy(out_tgt.logits, valid_tgt_l), lw.entropy_weight * lw.seg_tgt_weight,
                  lambda: _num_valid(out_tgt.logits, valid_tgt_l))
    # λ_1 L_t2s + λ_2 L_s2t, with y_T = y_F completed by label transfer (BiDA).
    y_seg_tgt = y_static
    if m.name == "bida":
        y_seg_tgt = _bida_contrast(terms, logs, out_src, out_tgt, batch_src, batch_tgt, valid_tgt_l, cfg,
                                   calibration, num_classes, reduce_sums, adapt_iter)
    # λ_t CE(p_T, y_F): the target cross entropy on the static pseudo labels.
    if target_seg:
        terms.add("seg_tgt", seg_cross_entropy(out_tgt.logits, y_seg_tgt), lw.seg_tgt_weight,
                  lambda: _labelled(y_seg_tgt))
    return terms.result(logs)


def _bida_contrast(terms: _Terms, logs: dict, out_src: SegOutput, out_tgt: SegOutput, batch_src: dict,
                   batch_tgt: dict, valid_tgt_l: Tensor | None, cfg: Config, calibration: Calibration | None,
                   num_classes: int, reduce_sums, adapt_iter: int | None) -> Tensor:
    """BiDA's part of one iteration, docs/method.md sections 1–4: adds L_t2s and L_s2t to ``terms``
    (and pseudo-label figures to ``logs``), updates the moving averages, and returns the
    target labels of the segmentation loss (y_F, or y_T upsampled with
    ``pseudo.dynamic_for_segmentation``). ``valid_tgt_l``: the target's valid mask at the
    logit size (None without padding)."""
    m, lw = cfg.method, cfg.loss
    y_src, y_static = batch_src["label"], batch_tgt["label"]
    f_src, f_tgt = out_src.features, out_tgt.features
    feat_size = tuple(f_src.shape[-2:])
    # Features and logits share the output stride: reuse the mask when the sizes agree (under
    # HRDA the features are the context crop's, on a coarser grid than the fused logits).
    same = valid_tgt_l is None or feat_size == tuple(valid_tgt_l.shape[-2:])
    valid_tgt_f = valid_tgt_l if same else _valid_at(batch_tgt, feat_size)
    y_src_f = downsample_labels(y_src, feat_size)
    y_static_f = _mask_labels(downsample_labels(y_static, feat_size), valid_tgt_f)

    # 1. Source prototypes ρ_S (masked average pooling; gradients flow through them).
    prototypes = reduce_sums or partial(class_prototypes, num_classes=num_classes)
    protos_src, present_src = prototypes(f_src, y_src_f)

    # 3. Target pseudo labels y_T: static y_F completed by label transfer y_D to the
    # calibrated source prototypes ρ̂_S (section 4).
    y_tgt_f = y_static_f
    y_dyn_f = torch.full_like(y_static_f, IGNORE)
    if m.dynamic_labels:
        if calibration is not None and m.calibration:
            ref, ref_present = calibration.calibrate(protos_src.detach(), present_src)
        else:
            ref, ref_present = protos_src.detach(), present_src
        y_dyn_f = label_transfer(f_tgt.detach(), ref, ref_present, lw.temperature, cfg.pseudo.transfer_threshold)
        y_dyn_f = _mask_labels(y_dyn_f, valid_tgt_f)  # padding never gets a label
        y_tgt_f = fuse_labels(y_static_f, y_dyn_f)
        # Shares of all feature pixels (padding counts as unlabelled): equal denominators on
        # every rank, so the mean over ranks is the global batch's share.
        logs["pseudo/dynamic_coverage"] = (y_dyn_f != IGNORE).float().mean()
        logs["pseudo/fused_coverage"] = (y_tgt_f != IGNORE).float().mean()
        if "gt" in batch_tgt:
            logs["pseudo/dynamic_acc"] = _label_accuracy(y_dyn_f, downsample_labels(batch_tgt["gt"], feat_size))
    # 1. Target prototypes ρ_T from the target features and y_T.
    protos_tgt, present_tgt = prototypes(f_tgt, y_tgt_f)

    # 2. The bi-directional contrast: the batch's prototypes, or each image pair's (the official
    # code: each pair's mean over its pixels, then the mean over the pairs); with
    # method.memory_partners, classes a batch (or pair) lacks take their moving average.
    per_pair = m.prototype_scope == "pair"
    if per_pair:
        ps_src, pp_src = pair_prototypes(f_src, y_src_f, num_classes)
        ps_tgt, pp_tgt = pair_prototypes(f_tgt, y_tgt_f, num_classes)
    else:
        ps_src, pp_src, ps_tgt, pp_tgt = protos_src, present_src, protos_tgt, present_tgt
    if m.memory_partners and calibration is not None:
        ps_src, pp_src = _with_memory(ps_src, pp_src, calibration.source)
        ps_tgt, pp_tgt = _with_memory(ps_tgt, pp_tgt, calibration.target)
    full_res = lw.contrast_resolution == "label"
    if full_res:  # y_F itself, its holes filled from y_D alone (never from y_F's own samples)
        y_t2s = _fused_at_label_size(y_static, y_dyn_f, batch_tgt) if m.dynamic_labels else y_static
    else:
        y_t2s = y_tgt_f
    contrast = partial(pixel_prototype_contrast, temperature=lw.temperature, resolution=lw.contrast_resolution,
                       return_count=True, per_image=per_pair)
    on = 0.0 if adapt_iter is not None and adapt_iter < lw.contrast_warmup_iters else 1.0  # the warm-up
    if m.t2s:  # target pixels (labels y_T) against the source prototypes
        loss, count = contrast(f_tgt, y_t2s, ps_src, pp_src)
        terms.add("contrast_t2s", loss, on * lw.contrast_t2s_weight, count)
    if m.s2t:  # source pixels (labels y_S) against the target prototypes
        y_s2t = y_src if full_res else y_src_f
        loss, count = contrast(f_src, y_s2t, ps_tgt, pp_tgt)
        terms.add("contrast_s2t", loss, on * lw.contrast_s2t_weight, count)

    # 4. The moving averages follow both prototype sets (kept for memory_partners alone too).
    if calibration is not None:
        calibration.update(protos_src.detach(), present_src, protos_tgt.detach(), present_tgt)
        if m.calibration:
            logs["calibration/weight"] = calibration.weight()  # a host float: the ramp follows the step count
            logs["calibration/mean_shift"] = calibration.mean_shift_tensor()
    if cfg.pseudo.dynamic_for_segmentation:
        return _fused_at_label_size(y_static, y_dyn_f, batch_tgt)
    return y_static


def _num_valid(logits: Tensor, valid: Tensor | None) -> Tensor | int:
    """Pixels an entropy term averages over."""
    return logits[:, 0].numel() if valid is None else valid.sum()
