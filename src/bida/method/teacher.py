"""Mean-teacher self-training (``train.schedule: teacher``), after DAFormer.

An exponential moving average of the student labels each target batch online; the student
learns from ClassMix images of source classes pasted onto the target, whose target pixels
carry the teacher's labels weighted by its confidence. Optionally the student's source
backbone features are kept near a frozen ImageNet copy (feature distance).

With ``method: bida`` the same step adds BiDA's terms (label transfer, calibration and the
two contrasts, :func:`bida.train_step.adapt_step`) on the source crop and the *unmixed*
target crop: a mixed image holds pixels of both domains, so its features would blur the
per-domain prototypes the contrast compares. The static labels y_F of docs/method.md become
the teacher's labels on its confident pixels (``pseudo.teacher_threshold``); label transfer
completes the others, as it completes the round labels in the ``rounds`` schedule.
The unmixed target crop goes through the student in a forward of its own, after the
source and mixed images, with BatchNorm on its batch statistics but running statistics
left as they were (:func:`bn_batch_stats_only`): the forward the self-training losses
see is ``self_training``'s, so that the two rows differ by BiDA's terms alone. With all
four BiDA components off that forward is skipped, and ``bida`` trains bit-identically to
``self_training``. (The extra forward does draw the random numbers of its dropout and
stochastic depth from the global generator, so later draws shift.)
``method.target_features: mixed`` drops that forward: BiDA reads the ClassMix crop's own
forward at the pixels that came from the target image (:func:`mixed_target_batch`), with the
teacher's labels there; the pasted source pixels count on neither side. Those features come
from the strongly augmented crop, in the BN batch of the self-training forward.

DAFormer's choices where bida differs by default: ``train.student_forwards: separate``
forwards the source and the mixed images apart (each its own BN batch);
``loss.pseudo_ce_mean: all`` averages the teacher-label cross-entropies over all pixels.
``train.teacher_bn: batch`` lets the EMA teacher's BatchNorms label with batch statistics
(DAFormer keeps its EMA model in train mode, dropout and drop path off) rather than the
averaged running statistics. ``pseudo.ignore_top`` / ``pseudo.ignore_bottom`` give the
teacher labels of the top and bottom rows of each target crop weight 0 (DAFormer's
pseudo-label crop, :func:`banded_weight`); ``train.mix_classes: batch`` draws the ClassMix
classes from the batch's label values (:func:`bida.mixing.batch_class_mix_masks`);
``loss.source_ce_mean: all`` averages the source CE over every pixel.

With ``mic.weight > 0`` either method adds MIC's masked image consistency
(:mod:`bida.masking`): the student, forwarded once more on the colour-augmented target
image with random blocks masked, learns the teacher's labels of the unmasked image. With
``model.mask_token`` (DINOv2) random patch tokens are masked instead, by the mask token
(VFM-UDA's variant).

With ``model.hrda.enabled`` (HRDA, :mod:`bida.models.hrda`) every student forward (source,
ClassMix, MIC) is HRDA's: the crop is the context crop, with a detail crop drawn for each
image by :class:`bida.method.hrda.DetailCrops`; each forward's fused CE weighs
``1 - model.hrda.detail_loss_weight`` and its detail crop's CE the weight itself (logged
together as ``loss/hrda_detail``). ClassMix mixes, and MIC masks, the context crop, so both
crops see the same mix and mask. The teacher labels with HRDA's sliding fused prediction of
the whole crop. The feature distance and BiDA's contrast read the context crop's features:
the source forward's context branch, and for the target one forward of the unmixed target's
context crop alone (no detail crop). ``pseudo.margins`` (HRDA's image margins) weigh the
teacher labels as the crop bands do.

Under torchrun (:mod:`bida.distributed`) every rank trains on its slice of the global batch
``train.batch_size``: ClassMix and MIC draw by global sample index, the quality weight and
every per-pixel mean are the global batch's, BiDA's prototypes come from all-reduced sums.
Trainable BatchNorm normalises with the global batch's statistics (``model.sync_bn``; the
EMA teacher is a copy, so with ``train.teacher_bn: batch`` it labels with them too); with
``model.sync_bn: false`` :meth:`MeanTeacher.after_step` averages the student's BatchNorm
statistics where the EMA reads them. Either way the teacher is the same on every rank.

The schedule is model-agnostic: it uses ``model(x, domain) -> SegOutput`` and
``model.param_groups``, and for the feature distance ``model.backbone_output_module()``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models import unwrap_model
from ..config import Config
from .feature_distance import FeatureDistance
from .hrda import DetailCrops, detail_terms
from .losses import ce_pixel_count, seg_cross_entropy
from .masking import MaskedImageConsistency
from .mixing import ClassMix
from .train_step import StepResult, adapt_step, forward_domains

IGNORE = 255
# Offsets of the schedule's own random streams from the run seed (primes, away from the data seeds).
MIX_SEED_OFFSET = 7919
MASK_SEED_OFFSET = 7927
DETAIL_SEED_OFFSET = 7933


def ema_alpha(update: int, momentum: float) -> float:
    """DAFormer's warm-up rule: ``min(1 - 1 / (update + 1), momentum)`` (update counts from 1).

    Early updates follow the student closely (0.5, 0.67, ...) so that the teacher does not
    average over the untrained start; from ``1 / (1 - momentum) - 1`` updates on it is ``momentum``.
    """
    return min(1.0 - 1.0 / (update + 1), momentum)


class EMATeacher:
    """An exponential moving average of a student network, in eval mode, without gradients.

    Parameters and floating buffers (BatchNorm running statistics) are averaged; integer
    buffers are copied. Its state (weights and update count) goes into the checkpoint.
    ``bn``: its BatchNorms label with the averaged running statistics (``running``) or with
    the statistics of the batch they label (``batch``, DAFormer's EMA model in train mode);
    dropout and stochastic depth stay off either way, and running statistics stay the averages.
    """

    def __init__(self, momentum: float, bn: str = "running"):
        if bn not in ("running", "batch"):
            raise ValueError(f"bn must be 'running' or 'batch', not {bn!r}")
        self.momentum, self.bn = momentum, bn
        self.model: torch.nn.Module | None = None
        self.updates = 0

    @property
    def initialized(self) -> bool:
        return self.model is not None

    def reset(self, student: torch.nn.Module) -> None:
        """Start as an exact copy of ``student`` (the start of the adaptation phase)."""
        self.model = copy.deepcopy(unwrap_model(student))
        self.model.eval()
        self.model.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, student: torch.nn.Module) -> float:
        """One EMA step towards ``student``'s current weights; returns the alpha used."""
        assert self.model is not None, "reset() the teacher before updating it"
        self.updates += 1
        alpha = ema_alpha(self.updates, self.momentum)
        student = unwrap_model(student)
        t_params = list(self.model.parameters())
        s_params = [p.detach() for p in student.parameters()]
        torch._foreach_mul_(t_params, alpha)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - alpha)
        for t, s in zip(self.model.buffers(), student.buffers()):
            if t.is_floating_point():
                t.mul_(alpha).add_(s, alpha=1.0 - alpha)
            else:
                t.copy_(s)
        return alpha

    @torch.no_grad()
    def pseudo_labels(self, image: Tensor, valid: Tensor | None, threshold: float,
                      reduce: Callable[[Tensor], Tensor] | None = None,
                      flip: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher argmax labels at the image size, their confidence and the batch's quality weight.

        Quality = share of valid pixels whose teacher confidence is at least ``threshold``
        (DAFormer's ``pseudo_weight``, one number per batch); crop padding gets ignore and
        counts in neither part of the share. ``reduce``: see :func:`quality_weight`.
        ``flip`` (``pseudo.teacher_flip``, VFM-UDA's): labels and confidence come from the
        mean of the softmax of the image and of its horizontal mirror, each upsampled to the
        image size, the mirror's mirrored back.

        The mirror goes through the teacher in a forward of its own, not concatenated to the
        image: with ``bn="batch"`` each forward normalises with its own batch's statistics
        (as VFM-UDA's two teacher forwards), so the unmirrored half is exactly the teacher's
        forward without ``flip``, and peak memory stays that of one batch.

        Shape:
            - image: (B, 3, H, W); valid: (B, H, W) bool or None
            - output: labels (B, H, W) int64, confidence (B, H, W) float32, quality () float32
        """
        assert self.model is not None, "reset() the teacher before asking it for labels"
        with bn_batch_stats_only(self.model, eval_too=self.bn == "batch"):
            logits = self.model(image, "target").logits.float()
            if flip:
                logits_flip = self.model(image.flip(-1), "target").logits.float()
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        prob = logits.softmax(1)
        if flip:
            # Mirrored back at the image size: the logit grid may overhang the image (a ViT's
            # padded patches), so mirroring before the upsampling would misalign the two.
            logits_flip = F.interpolate(logits_flip, size=image.shape[-2:], mode="bilinear", align_corners=False)
            prob = (prob + logits_flip.flip(-1).softmax(1)) / 2
        conf, labels = prob.max(1)
        if valid is None:
            valid = torch.ones_like(labels, dtype=torch.bool)
        labels = torch.where(valid, labels, torch.full_like(labels, IGNORE))
        quality = quality_weight(conf, valid, threshold, reduce)
        return labels, conf, quality

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict() if self.model is not None else {}, "updates": self.updates}

    def load_state_dict(self, state: dict, student: torch.nn.Module) -> None:
        """Restore a saved teacher (``student`` gives the architecture); an empty one stays unset."""
        if not state.get("model"):
            self.model, self.updates = None, 0
            return
        self.reset(student)
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def quality_weight(conf: Tensor, valid: Tensor, threshold: float,
                   reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Share of ``valid`` pixels with ``conf >= threshold`` (0 when none is valid); a device scalar.

    ``reduce`` (distributed runs, :meth:`bida.distributed.GlobalBatch.sum`): the two counts
    are summed over ranks first, so that every rank weighs with the global batch's share.

    Shape:
        - conf: (B, H, W) float; valid: (B, H, W) bool; output: () float32
    """
    counts = torch.stack([((conf >= threshold) & valid).sum(), valid.sum()]).float()  # (confident, valid)
    if reduce is not None:
        counts = reduce(counts)
    return counts[0] / counts[1].clamp_min(1)


def banded_weight(quality: Tensor, shape: tuple[int, int, int], top: int, bottom: int,
                  valid: Tensor | None = None) -> Tensor:
    """The teacher-label weight of each target pixel: ``quality``, but 0 on the first ``top``
    and the last ``bottom`` rows of each crop (DAFormer's pseudo-label crop, ``croppl``).

    As DAFormer, the bands act on the weight only, after the quality weight was computed over
    the whole crop: they neither change the quality nor remove pixels from a mean. The bottom
    band ends at each crop's last row with a ``valid`` pixel (bida pads crops at the bottom;
    without padding, or with ``valid`` None, the crop's last row, DAFormer's indexing).

    Shape:
        - quality: (); valid: (B, H, W) bool or None; output: (B, H, W) float32, ``shape``
    """
    b, h, w = shape
    rows = torch.arange(h, device=quality.device)  # (H,)
    if valid is None:
        end = torch.full((1,), h, device=quality.device)
    else:  # one past the last row holding a valid pixel; 0 for an all-padding crop
        end = (valid.any(-1) * (rows + 1)).amax(-1)  # (B,)
    keep = (rows >= top) & (rows < end[:, None] - bottom)  # (1 or B, H)
    weight = torch.where(keep, quality.float(), torch.zeros((), device=quality.device))
    return weight[:, :, None].expand(b, h, w)


def weighted_cross_entropy(logits: Tensor, labels: Tensor, weight: Tensor, ignore_index: int = IGNORE,
                           mean_over: str = "labelled") -> Tensor:
    """Pixel-weighted cross entropy, ``sum(w * ce)`` over the labelled pixels divided by their
    number (``mean_over="labelled"``; 0 when nothing is labelled) or by all pixels (``"all"``:
    DAFormer's and MIC's mean, where an ignored pixel counts as a 0).

    Logits are upsampled bilinearly to the label size first, as :func:`bida.losses.seg_cross_entropy`.

    Shape:
        - logits: (B, K, h, w); labels: (B, H, W); weight: (B, H, W) or (); output: ()
    """
    count = ce_pixel_count(labels, mean_over, ignore_index)
    logits = logits.float()
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    ce = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="none")  # 0 on ignore
    return (ce * weight).sum() / count.clamp_min(1)


def bida_terms_on(cfg: Config) -> bool:
    """Whether a teacher step adds BiDA's terms: ``method: bida`` with any of its four
    components on. With all four off nothing reads the unmixed target crop, and the step is
    ``self_training``'s, bit for bit (the prototype memory of ``memory_partners`` alone then
    stays as it started: only a contrast reads it)."""
    m = cfg.method
    return m.name == "bida" and (m.t2s or m.s2t or m.dynamic_labels or m.calibration)


def mixed_target_batch(batch_tgt: dict[str, Tensor], img_mix: Tensor, mask_mix: Tensor) -> dict[str, Tensor]:
    """The target batch BiDA reads from the ClassMix crop (``method.target_features: mixed``).

    The pixels ClassMix took from the target image (``~mask_mix``), crop padding excluded,
    become the batch's ``valid`` pixels: :func:`bida.train_step.adapt_step` then treats the
    pasted source pixels as it treats padding, so that no label, label transfer, prototype,
    contrast term or moving average reads them on the target side. Labels (the teacher's y_F)
    and true labels are the unmixed crop's at the same pixels (ClassMix moves no pixel), set
    to ignore on the pasted ones. The pasted pixels serve no source term either: the source
    crop's own forward already gives every source pixel's feature.

    At the feature size the mask is sampled as the labels are (nearest): a feature cell counts
    as target-origin when the pixel its label comes from does, even where its receptive field
    also covers pasted pixels. Shares logged over feature pixels (``pseudo/dynamic_coverage``)
    count the pasted ones as unlabelled.

    Shape:
        - batch_tgt: "label", "gt" (B, H, W) int64, optional "valid" (B, H, W) bool
        - img_mix: (B, 3, H, W); mask_mix: (B, H, W) bool, True where a source pixel was pasted
        - output: "image" ``img_mix``, "label" and "gt" (B, H, W), "valid" (B, H, W) bool
    """
    keep = ~mask_mix
    if "valid" in batch_tgt:
        keep = keep & batch_tgt["valid"]

    def at_target_origin(labels: Tensor) -> Tensor:
        return torch.where(keep, labels, torch.full_like(labels, IGNORE))

    return {"image": img_mix, "label": at_target_origin(batch_tgt["label"]),
            "gt": at_target_origin(batch_tgt["gt"]), "valid": keep}


@contextlib.contextmanager
def bn_batch_stats_only(model: torch.nn.Module, eval_too: bool = False):
    """Forwards inside normalise with their own batch statistics, as in training, but leave
    every BatchNorm's running statistics and batch count untouched.

    BatchNorms in eval mode (frozen) keep using their stored statistics, unless ``eval_too``
    (the EMA teacher, whose whole model is in eval mode): then they too use batch statistics,
    while every other module (dropout, stochastic depth) stays in eval mode. Switches
    ``track_running_stats`` off (and, with ``eval_too``, ``training`` on) for the duration;
    nothing is copied and nothing waits for the device.
    """
    bns = [(m, m.training) for m in model.modules()
           if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (m.training or eval_too) and m.track_running_stats]
    for m, _ in bns:
        m.track_running_stats, m.training = False, True
    try:
        yield
    finally:
        for m, training in bns:
            m.track_running_stats, m.training = True, training


class MeanTeacher:
    """Everything stateful the teacher schedule adds: the EMA teacher, the ClassMix generator,
    with a MIC weight the masking generator and, with a feature-distance weight, the frozen
    ImageNet model. Saved in checkpoints.

    ``rank``, ``world_size``: under torchrun the batches are this rank's slice of the global
    batch; the generators draw for the whole global batch on every rank (equal states
    everywhere, so rank 0's checkpoint resumes every rank).
    """

    def __init__(self, cfg: Config, num_classes: int, device: torch.device | str,
                 imagenet_model: torch.nn.Module | None = None, rank: int = 0, world_size: int = 1):
        self.cfg, self.num_classes = cfg, num_classes
        self.teacher = EMATeacher(cfg.train.teacher_momentum, cfg.train.teacher_bn)
        rows = {"rank": rank, "world_size": world_size}
        # Its own stream, away from the run's other random draws (offset: not the data seeds).
        self.mixer = ClassMix(num_classes, cfg.data.normalize, seed=cfg.seed + MIX_SEED_OFFSET, device=device,
                              classes=cfg.train.mix_classes, **rows)
        self.masking = None
        if cfg.mic.weight > 0:
            self.masking = MaskedImageConsistency(cfg.mic.block_size, cfg.mic.mask_ratio, cfg.data.normalize,
                                                  seed=cfg.seed + MASK_SEED_OFFSET, device=device, **rows)
        self.feature_distance = None
        if cfg.loss.feature_distance_weight > 0:
            if imagenet_model is None:
                raise ValueError("a feature-distance weight needs the ImageNet model")
            # HRDA: the distance reads the context crop's features (HRDA's feature_scale 0.5), so the
            # frozen model encodes the context crop alone.
            self.feature_distance = FeatureDistance(imagenet_model.to(device), cfg.loss.feature_distance_classes,
                                                    num_classes,
                                                    {"context_only": True} if cfg.model.hrda.enabled else None)
        # HRDA: the detail crop of every student forward, drawn from a stream of its own.
        self.detail_crops = (DetailCrops(cfg.model.hrda, cfg.seed + DETAIL_SEED_OFFSET, device, **rows)
                             if cfg.model.hrda.enabled else None)

    def start(self, student: torch.nn.Module) -> None:
        """At the adaptation phase's first step: the teacher starts as a copy of the student."""
        if not self.teacher.initialized:
            self.teacher.reset(student)

    def after_step(self, student: torch.nn.Module,
                   sync_statistics: Callable[[torch.nn.Module], None] | None = None) -> None:
        """After each optimizer step that was taken (a skipped step leaves the teacher as it was).

        ``sync_statistics`` (distributed runs): averages the student's BatchNorm running
        statistics over ranks in place, just before the EMA reads them, so that student and
        teacher stay the same on every rank.
        """
        if sync_statistics is not None:
            sync_statistics(unwrap_model(student))
        self.teacher.update(student)

    def state_dict(self) -> dict:
        state = {"teacher": self.teacher.state_dict(), "mixer": self.mixer.state_dict()}
        if self.masking is not None:
            state["masking"] = self.masking.state_dict()
        if self.detail_crops is not None:
            state["detail_crops"] = self.detail_crops.state_dict()
        return state

    def load_state_dict(self, state: dict, student: torch.nn.Module) -> None:
        self.teacher.load_state_dict(state["teacher"], student)
        self.mixer.load_state_dict(state["mixer"])
        if self.masking is not None:
            self.masking.load_state_dict(state["masking"])
        if self.detail_crops is not None:
            self.detail_crops.load_state_dict(state["detail_crops"])


def teacher_step(model: torch.nn.Module, batch_src: dict, batch_tgt: dict, cfg: Config, state: MeanTeacher,
                 calibration=None, num_classes: int | None = None, reduce_sums=None,
                 adapt_iter: int | None = None, class_weights: Tensor | None = None) -> StepResult:
    """One mean-teacher iteration (``self_training``: DAFormer's; ``bida``: plus BiDA's terms;
    either plus MIC's masked image consistency when ``mic.weight > 0``).

    ``batch_tgt["label"]`` holds the target's true labels when it has any (all ignore
    otherwise): they are only logged against, never trained on. Logs are detached device
    tensors (no host synchronisation). ``reduce_sums`` (distributed runs,
    :class:`~bida.distributed.GlobalBatch`; the batches are this rank's slice of the global
    batch): the quality weight, BiDA's prototypes and every per-pixel mean are the global
    batch's.
    ``adapt_iter``: the contrast warm-up's count (:func:`~bida.train_step.adapt_step`).
    ``class_weights``: (K,) weights of the source CE's classes (``loss.class_weights``), or None.
    """
    lw, num_classes = cfg.loss, num_classes or state.num_classes
    detail_weight = cfg.model.hrda.detail_loss_weight if cfg.model.hrda.enabled else 0.0  # HRDA's lambda_d
    img_src, y_src, img_tgt = batch_src["image"], batch_src["label"], batch_tgt["image"]
    valid_tgt = batch_tgt.get("valid")
    reduce = reduce_sums.sum if reduce_sums is not None else None
    y_teacher, conf, quality = state.teacher.pseudo_labels(img_tgt, valid_tgt, cfg.pseudo.teacher_threshold, reduce,
                                                           flip=cfg.pseudo.teacher_flip)
    # The teacher-label weight: the quality, with pseudo.ignore_top/bottom its rows of weight 0
    # (or, with pseudo.margins, the image margins the crop holds).
    top, bottom = cfg.pseudo.ignore_top, cfg.pseudo.ignore_bottom
    w_tgt = banded_weight(quality, tuple(y_teacher.shape), top, bottom, valid_tgt) if top or bottom else quality
    if "pseudo_keep" in batch_tgt:  # pseudo.margins: weight 0 on the image's margins (HRDA's v2)
        w_tgt = torch.where(batch_tgt["pseudo_keep"], w_tgt.float(), torch.zeros((), device=w_tgt.device))
    img_src_loss, img_tgt_mix = img_src, img_tgt
    if cfg.data.weak_jitter:
        # VFM-UDA: the source loss sees a weakly jittered source image and ClassMix pastes the
        # clean source onto a weakly jittered target; the teacher labelled the clean target.
        img_src_loss, img_tgt_mix = state.mixer.weak_jitter(img_src), state.mixer.weak_jitter(img_tgt)
    img_mix, y_mix, w_mix, mask_mix = state.mixer(img_src, y_src, img_tgt_mix, y_teacher, w_tgt, reduce=reduce)

    shared = not cfg.model.separate_target_stem
    crops = state.detail_crops  # HRDA: each student forward on a context crop with a detail crop inside

    def student(img: Tensor, domain: str):
        return model(img, domain) if crops is None else model(img, domain, detail_box=crops(img))

    fd = state.feature_distance
    capture = fd.capture(model) if fd is not None else contextlib.nullcontext()
    logs: dict[str, Tensor] = {}
    terms: dict[str, Tensor] = {}  # per-pixel means, rescaled to the global batch's under torchrun
    counts: dict[str, Tensor] = {}  # the pixels behind each
    with capture:  # the feature distance reads the source rows of this forward
        if cfg.train.student_forwards == "separate":  # DAFormer: source and mixed images apart
            out_src, out_mix = student(img_src_loss, "source"), student(img_mix, "target")
        else:
            out_src, out_mix = forward_domains(model, [img_src_loss, img_mix], ["source", "target"], shared)
    if bida_terms_on(cfg):
        # y_F: the teacher's confident labels; label transfer completes the rest.
        y_static = torch.where(conf >= cfg.pseudo.teacher_threshold, y_teacher, torch.full_like(y_teacher, IGNORE))
        tgt = {"image": img_tgt, "label": y_static, "gt": batch_tgt["label"]}
        if valid_tgt is not None:
            tgt["valid"] = valid_tgt
        if cfg.method.target_features == "mixed":
            # The mixed crop's forward, read at its target-origin pixels alone: no forward of its own.
            out_tgt, tgt = out_mix, mixed_target_batch(tgt, img_mix, mask_mix)
        else:
            # The unmixed target crop in a forward of its own, after the main one: the forward the
            # self-training losses see (its BN batch and its random draws) stays self_training's.
            # HRDA: the context crop alone, the features the contrast reads on the source side too.
            with bn_batch_stats_only(model):
                out_tgt = model(img_tgt, "target") if crops is None else model(img_tgt, "target", context_only=True)
        result = adapt_step(model, batch_src, tgt, cfg, calibration, num_classes, outputs=(out_src, out_tgt),
                            seg_terms=False, reduce_sums=reduce_sums, adapt_iter=adapt_iter,
                            class_weights=class_weights, source_ce_weight=1.0 - detail_weight)
        loss = result.loss  # the source CE plus BiDA's terms (global-batch means already)
        logs.update({k: v for k, v in result.logs.items() if k != "loss/total"})
    else:
        loss, mean = 0.0, lw.source_ce_mean
        terms["seg_src"] = seg_cross_entropy(out_src.logits, y_src, mean_over=mean, class_weights=class_weights)
        counts["seg_src"] = ce_pixel_count(y_src, mean)
    weights = {"seg_src": 1.0, "seg_mix": lw.mix_weight, "mic": cfg.mic.weight,
               "feature_distance": lw.feature_distance_weight}
    terms["seg_mix"] = weighted_cross_entropy(out_mix.logits, y_mix, w_mix, mean_over=lw.pseudo_ce_mean)
    counts["seg_mix"] = ce_pixel_count(y_mix, lw.pseudo_ce_mean)
    detail = {}  # HRDA: each forward's CE term -> (its detail term's key, the labels and weights under it)
    if crops is not None:
        detail["seg_mix"] = ("hrda_detail_mix", out_mix, y_mix, w_mix)
        if "seg_src" in terms:  # else adapt_step weighed the fused source CE already
            detail["seg_src"] = ("hrda_detail_src", out_src, y_src, None)
        else:
            detail["bida_src"] = ("hrda_detail_src", out_src, y_src, None)
    if state.masking is not None:
        # MIC: the masked, colour-augmented target in its own forward (as MIC's own), against
        # the teacher's labels of the whole image, with the same weight as the mix's target pixels.
        if cfg.model.mask_token:  # VFM-UDA: patch tokens swapped for the mask token inside the ViT
            img_aug, keep = state.masking.tokens(img_tgt, unwrap_model(model).token_grid(*img_tgt.shape[-2:]))
            out_masked = model(img_aug, "target", token_keep=keep)
        else:
            # HRDA: the masked context crop, so that its detail crop is masked alike (as MIC(HRDA)).
            img_masked, _ = state.masking(img_tgt)
            out_masked = student(img_masked, "target")
        terms["mic"] = weighted_cross_entropy(out_masked.logits, y_teacher, w_tgt, mean_over=lw.pseudo_ce_mean)
        counts["mic"] = ce_pixel_count(y_teacher, lw.pseudo_ce_mean)
        if crops is not None:
            detail["mic"] = ("hrda_detail_mic", out_masked, y_teacher, w_tgt)
    if fd is not None:
        terms["feature_distance"], counts["feature_distance"] = fd.loss(img_src_loss, y_src, return_count=True)
    forward_weights: dict[str, float] = {}
    for key, (name, out, labels, weight) in detail.items():
        # HRDA's detail loss: the detail crop's CE weighs lambda_d, its forward's fused CE 1 - lambda_d
        # (the fused source CE of method=bida, "bida_src", was weighed inside adapt_step).
        terms[name], counts[name] = detail_terms(out, labels, weight, lw.source_ce_mean if weight is None
                                                 else lw.pseudo_ce_mean, weighted_cross_entropy,
                                                 class_weights if weight is None else None)
        forward_weight = 1.0 if key == "bida_src" else weights[key]
        weights[name], forward_weights[name] = forward_weight * detail_weight, forward_weight
        if key in weights and key != "bida_src":
            weights[key] = forward_weight * (1.0 - detail_weight)
    if reduce_sums is not None:
        terms = reduce_sums.global_means(terms, counts)
    detail_sum = None
    for key, term in terms.items():
        loss = loss + weights[key] * term
        if key.startswith("hrda_detail_"):  # logged once, summed with the forwards' weights
            scaled = forward_weights[key] * term.detach()
            detail_sum = scaled if detail_sum is None else detail_sum + scaled
        else:
            logs[f"loss/{key}"] = term.detach()
    if detail_sum is not None:
        logs["loss/hrda_detail"] = detail_sum
    logs["pseudo/teacher_quality"] = quality
    gt = batch_tgt["label"]
    both = (gt != IGNORE) & (y_teacher != IGNORE)
    n = both.sum()
    acc = ((y_teacher == gt) & both).sum().float() / n.clamp_min(1)
    logs["pseudo/teacher_acc"] = torch.where(n > 0, acc, torch.full_like(acc, math.nan))
    logs["loss/total"] = loss.detach()
    return StepResult(loss, logs)

