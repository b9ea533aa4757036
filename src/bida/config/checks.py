"""The config's checks: the valid range of every numeric key (:data:`RANGES`) and the
checks across keys (test split, schedule, contrast designs, class ids, model choices).

They run on every loaded config (:func:`bida.config.loading.load_config`), before anything
is created; :func:`check_class_ids` runs once the data's class count is known.
"""

from __future__ import annotations

import typing
from fractions import Fraction
from typing import Any

from ..errors import ConfigError
from .schema import Config

# --------------------------------------------------------------------------- ranges

INF = float("inf")
# Upper bound of every image side (crops, resizes, evaluation sizes, synthetic images), in
# pixels: twice the largest real setting (Cityscapes' 2048-pixel width). A side beyond it is
# a typo that would allocate tens of GiB in a loader worker after the run had started.
MAX_SIDE = 4096
# The contrast's logits are cosines / temperature, up to 2 / temperature apart: below 0.01
# (a spread of 200) the softmax is a hard argmax and the loss, about 2 / temperature per
# misplaced pixel, swamps every other term (1e-9 gave a total loss of 3e8).
MIN_TEMPERATURE = 0.01
# Loader worker processes per loader: each holds a copy of the dataset and prefetches
# batches; beyond 64 a value is a typo that would fork hundreds of processes.
MAX_WORKERS = 64
# Valid range of every numeric key: (low, high, low inclusive, high inclusive). A value
# outside its range would end in a traceback (a zero divisor, an empty crop), a hang (a
# phase of 0 iterations never ends) or meaningless metrics, so it fails at load time,
# before anything is created. Tuple and list keys apply the range to every element.
RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "seed": (0, 2**32 - 1, True, True),  # numpy's seed range
    "data.synthetic.num_train": (1, INF, True, True),
    "data.synthetic.num_val": (1, INF, True, True),
    "data.synthetic.num_test": (0, INF, True, True),
    "data.synthetic.height": (8, MAX_SIDE, True, True),  # the network downsamples by 8
    "data.synthetic.width": (8, MAX_SIDE, True, True),
    "data.synthetic.seed": (0, 2**32 - 1, True, True),
    "data.resize": (1, MAX_SIDE, True, True),
    "data.source.resize": (1, MAX_SIDE, True, True),
    "data.target.resize": (1, MAX_SIDE, True, True),
    "data.crop": (1, MAX_SIDE, True, True),
    "data.scale_range": (0, INF, False, True),
    "data.eval_classes": (0, INF, True, True),
    "data.num_workers": (0, MAX_WORKERS, True, True),
    "data.rcs_temperature": (0, INF, False, True),
    "data.rcs_min_pixels": (0, INF, True, True),
    "data.rcs_min_crop_ratio": (0, INF, True, True),
    "model.width": (0, INF, False, True),
    "model.proj_dim": (1, INF, True, True),
    "model.decoder_dim": (1, INF, True, True),
    "model.input_scale": (0, INF, False, True),
    "model.drop_path": (0, 1, True, False),  # a rate of 1 drops every residual branch
    "model.hrda.context_scale": (0, 1, False, True),
    "model.hrda.detail_crop": (1, MAX_SIDE, True, True),
    "model.hrda.detail_loss_weight": (0, 1, True, False),  # 1 would leave the fused prediction untrained
    "model.hrda.crop_divisible": (1, MAX_SIDE, True, True),
    "train.iters": (1, INF, True, True),
    "train.source_iters": (0, INF, True, True),
    "train.warmup_iters": (0, INF, True, True),
    "train.warmup_ratio": (0, 1, False, True),
    "train.teacher_momentum": (0, 1, True, True),
    "train.batch_size": (1, INF, True, True),
    "train.lr": (0, INF, False, True),
    "train.head_lr_mult": (0, INF, False, True),
    "train.layer_decay": (0, 1, False, True),
    "train.momentum": (0, 1, True, False),
    "train.weight_decay": (0, INF, True, True),
    "train.poly_power": (0, INF, True, True),
    "train.rounds": (1, INF, True, True),
    "train.iters_per_round": (1, INF, True, True),
    "train.adapt_lr": (0, INF, False, True),
    "train.round_lr_decay": (0, 1, False, True),
    "train.poly_horizon": (1, INF, True, True),  # below 1 the LR reaches 0 before the round ends
    "train.eval_every": (1, INF, True, True),
    "train.checkpoint_every": (1, INF, True, True),
    "train.log_every": (1, INF, True, True),
    "train.max_bad_steps": (1, INF, True, True),
    "loss.temperature": (MIN_TEMPERATURE, INF, True, True),
    "loss.seg_tgt_weight": (0, INF, True, True),
    "loss.entropy_weight": (0, INF, True, True),
    "loss.contrast_t2s_weight": (0, INF, True, True),
    "loss.contrast_s2t_weight": (0, INF, True, True),
    "loss.contrast_warmup_iters": (0, INF, True, True),
    "loss.mix_weight": (0, INF, True, True),
    "loss.feature_distance_weight": (0, INF, True, True),
    "loss.feature_distance_classes": (0, INF, True, True),
    "pseudo.class_fraction": (0, 1, False, True),
    "pseudo.image_fraction": (0, 1, True, True),
    "pseudo.transfer_threshold": (0, 1, True, True),
    "pseudo.max_pixels_per_image": (1, INF, True, True),
    "pseudo.teacher_threshold": (0, 1, True, True),
    "pseudo.ignore_top": (0, MAX_SIDE, True, True),
    "pseudo.ignore_bottom": (0, MAX_SIDE, True, True),
    "pseudo.margins": (0, MAX_SIDE, True, True),
    "calibration.momentum": (0, 1, True, True),
    "calibration.max_weight": (0, INF, True, True),
    "calibration.ramp_iters": (0, INF, True, True),
    "mic.weight": (0, INF, True, True),
    "mic.mask_ratio": (0, 1, True, False),  # a ratio of 1 masks every block
    "mic.block_size": (1, MAX_SIDE, True, True),
    "eval.crop": (1, MAX_SIDE, True, True),
    "eval.stride": (1, MAX_SIDE, True, True),
    "eval.size": (1, MAX_SIDE, True, True),
    "eval.max_images": (1, INF, True, True),
}


# Why a bound is where it is, added to the message of a value outside it.
RANGE_REASONS: dict[str, str] = {
    "loss.temperature": f"the contrast's logits are cosines / temperature: below {MIN_TEMPERATURE} the loss "
                        "(about 2 / temperature a pixel) swamps every other term",
    **{key: f"twice the widest real image (Cityscapes: 2048 pixels); a larger side is a typo"
       for key, (_, hi, _, _) in RANGES.items() if hi == MAX_SIDE},
    "data.num_workers": f"each worker is a process of its own; more than {MAX_WORKERS} is a typo",
    "mic.mask_ratio": "a ratio of 1 masks every block: the student would see blank images",
}


def _number_text(v: float) -> str:
    """A bound as written: 4294967295, not 4.29497e+09; 0.01, not 0.010000."""
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _range_text(lo: float, hi: float, lo_in: bool, hi_in: bool) -> str:
    if hi == INF:
        return f"{'>=' if lo_in else '>'} {_number_text(lo)}"
    return f"in {'[' if lo_in else '('}{_number_text(lo)}, {_number_text(hi)}{']' if hi_in else ')'}"


def check_ranges(cfg: "Config") -> None:
    """Every numeric key within its :data:`RANGES` entry (NaN never is).

    Raises:
        ConfigError: naming the key, the value and the valid range.
    """
    for key, (lo, hi, lo_in, hi_in) in RANGES.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value is None:
            continue
        for i, v in enumerate(value if isinstance(value, (list, tuple)) else [value]):
            ok = (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)  # False for NaN
            if not ok:
                where = f"{key}[{i}]" if isinstance(value, (list, tuple)) else key
                why = f": {RANGE_REASONS[key]}" if key in RANGE_REASONS else ""
                raise ConfigError(f"{where}: {v!r} is out of range (must be {_range_text(lo, hi, lo_in, hi_in)}{why})")
    lo, hi = cfg.data.scale_range
    if lo > hi:
        raise ConfigError(f"data.scale_range: {[lo, hi]} is not a range (min > max)")
    if cfg.data.eval_classes is not None and not cfg.data.eval_classes:
        raise ConfigError("data.eval_classes: [] selects no class (mIoU would be 0); use null for every class")
    check_test_split(cfg)
    check_schedule(cfg)


def target_test_split(cfg: "Config") -> str | None:
    """The target's test split: ``data.target.test_split``; for the embedded pair, ``"test"``
    whenever ``data.synthetic.num_test > 0`` (its images are generated with the pair)."""
    t = cfg.data.target
    if t.test_split is None and t.kind == "synthetic" and cfg.data.synthetic.num_test > 0:
        return "test"
    return t.test_split


def check_test_split(cfg: "Config") -> None:
    """``data.target.test_split`` names a split that can exist and that nothing else reads.

    Raises:
        ConfigError: naming the key.
    """
    t = cfg.data.target
    if cfg.data.source.test_split is not None:
        raise ConfigError("data.source.test_split: only the target has a test split; set data.target.test_split")
    if t.test_split is None:
        return
    if t.test_split in (t.train_split, t.val_split):
        raise ConfigError(f"data.target.test_split: '{t.test_split}' is also the target's train or val split; "
                          "a test split must be images that nothing trains or selects on")
    if t.kind == "synthetic" and (t.test_split != "test" or cfg.data.synthetic.num_test == 0):
        raise ConfigError(f"data.target.test_split: the embedded pair's test split is 'test' and needs "
                          f"data.synthetic.num_test > 0 (got '{t.test_split}', num_test={cfg.data.synthetic.num_test})")


def check_contrast_designs(cfg: "Config") -> None:
    """The contrast designs are set only where something reads them.

    Raises:
        ConfigError: naming the key.
    """
    m = cfg.method
    if m.name != "bida":
        if cfg.loss.contrast_warmup_iters > 0:
            raise ConfigError(f"loss.contrast_warmup_iters: only method=bida has a contrast (method={m.name})")
        if m.pretrain_head and m.name != "source_only":
            raise ConfigError(f"method.pretrain_head: the source stage of source_only or bida trains the head; "
                              f"method={m.name} has no contrast to use it")
    if m.pretrain_head and m.feature == "aspp_branches":
        raise ConfigError("method.pretrain_head: method.feature=aspp_branches contrasts the ASPP branch scores, "
                          "which have no projection head to train; use method.feature=backbone")


def check_schedule(cfg: "Config") -> None:
    """Keys that only one training schedule reads must not be set for the other.

    Raises:
        ConfigError: naming the key and the schedule that reads it.
    """
    check_contrast_designs(cfg)
    t = cfg.train
    if t.schedule == "teacher":
        if cfg.method.name == "minent":
            raise ConfigError("train.schedule: 'teacher' runs source_only, self_training or bida, not minent")
        if cfg.pseudo.dynamic_for_segmentation:
            raise ConfigError("pseudo.dynamic_for_segmentation: the teacher schedule trains the target CE on the "
                              "teacher's labels of ClassMix images; set it to false")
    # Read by the mean-teacher step alone: a source_only run (its source stage) has no teacher
    # labels to average and no ClassMix images to jitter.
    teacher_step_keys = (("pseudo.teacher_flip", cfg.pseudo.teacher_flip), ("data.weak_jitter", cfg.data.weak_jitter))
    for key, on in teacher_step_keys:
        if on and (t.schedule != "teacher" or cfg.method.name == "source_only"):
            raise ConfigError(f"{key}: only the mean-teacher step reads it (train.schedule=teacher with method "
                              f"self_training or bida, not {t.schedule} with {cfg.method.name}); set it to false")
    if cfg.method.target_features == "mixed" and (t.schedule != "teacher" or cfg.method.name != "bida"):
        raise ConfigError(f"method.target_features: 'mixed' reads BiDA's target pixels from the ClassMix crop of the "
                          f"mean-teacher step (train.schedule=teacher with method=bida, not {t.schedule} with "
                          f"{cfg.method.name}); set it to 'unmixed'")
    if t.schedule != "teacher":
        if cfg.loss.feature_distance_weight > 0:
            raise ConfigError("loss.feature_distance_weight: only the teacher schedule reads it (train.schedule=teacher)")
        if cfg.mic.weight > 0:
            raise ConfigError("mic.weight: masked image consistency learns from the mean teacher's labels; "
                              "it needs train.schedule=teacher")
        if t.student_forwards != "joint":
            raise ConfigError("train.student_forwards: only the teacher schedule reads it (train.schedule=teacher)")
        if cfg.loss.pseudo_ce_mean != "labelled":
            raise ConfigError("loss.pseudo_ce_mean: only the teacher schedule reads it (train.schedule=teacher)")
        if t.teacher_bn != "running":
            raise ConfigError("train.teacher_bn: only the teacher schedule reads it (train.schedule=teacher)")
        if t.mix_classes != "image":
            raise ConfigError("train.mix_classes: only the teacher schedule mixes (train.schedule=teacher)")
        for key in ("ignore_top", "ignore_bottom", "margins"):
            if any(getattr(cfg.pseudo, key) if key == "margins" else [getattr(cfg.pseudo, key)]):
                raise ConfigError(f"pseudo.{key}: only the teacher schedule weighs teacher labels "
                                  "(train.schedule=teacher)")
    top, bottom, height = cfg.pseudo.ignore_top, cfg.pseudo.ignore_bottom, cfg.data.crop[0]
    if top + bottom >= height:
        raise ConfigError(f"pseudo.ignore_top + pseudo.ignore_bottom: {top} + {bottom} rows leave no row of the "
                          f"{height}-pixel-high crop (data.crop) a pseudo-label weight; their sum must be < {height}")
    if any(cfg.pseudo.margins) and (top or bottom):
        raise ConfigError("pseudo.margins: the image margins (HRDA's pseudo-label cropping v2) replace the crop "
                          "bands pseudo.ignore_top/ignore_bottom (v1); set those to 0")
    if t.teacher_bn == "batch" and cfg.model.freeze_bn and not cfg.model.bn_batch_stats:
        raise ConfigError("train.teacher_bn: 'batch' with model.freeze_bn would label with batch statistics, which "
                          "the student never uses; set it to 'running' (or model.bn_batch_stats=true)")
    if cfg.loss.feature_distance_weight > 0 and not cfg.model.pretrained:
        raise ConfigError("loss.feature_distance_weight: the ImageNet feature distance needs model.pretrained "
                          "(the frozen backbone it compares with); set the weights or the weight to 0")


def check_class_ids(key: str, ids: typing.Sequence[int] | None, num_classes: int) -> None:
    """A class-id list (``data.eval_classes``) names classes of the data: checked once the
    class count is known, before a run directory is created (and again on every resume).

    Raises:
        ConfigError: naming the key, the ids and the number of classes.
    """
    if ids is None:
        return
    bad = sorted({c for c in ids if c >= num_classes})
    if bad:
        raise ConfigError(f"{key}: {list(ids)} names class id(s) {bad} >= {num_classes} "
                          f"(the data has classes 0..{num_classes - 1})")
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{key}: {list(ids)} lists a class twice (it would count twice in the mean)")


MIT_MIN_CROP = 32  # MiT's first stage (stride 4) reduces keys/values by 8 more


DECODER_BACKBONES = ("mit_", "dinov2_")  # backbone families with a decoder (MiT, DINOv2)


def default_feature(backbone: str) -> str:
    """``method.feature`` when the config leaves it unset: the map that ``backbone`` contrasts
    by default (``decoder`` for ``mit_b*`` and ``dinov2_*``, the official code's
    ``aspp_branches`` for ``resnet*``)."""
    return "decoder" if backbone.startswith(DECODER_BACKBONES) else "aspp_branches"


def check_model_choices(cfg: "Config") -> None:
    """Options that only one segmentor family has (or lacks) fit ``model.backbone``.

    Raises:
        ConfigError: naming the key that does not fit.
    """
    m, backbone = cfg.model, cfg.model.backbone
    check_hrda(cfg)
    if cfg.train.layer_decay != 1.0 and not backbone.startswith("dinov2_"):
        raise ConfigError(f"train.layer_decay={cfg.train.layer_decay:g}: layer-wise LR decay is defined for the "
                          f"blocks of a ViT (model.backbone=dinov2_*), not model.backbone={backbone}; set it to 1.0")
    vit_only = (("model.decoder=light", m.decoder == "light"), (f"model.input_scale={m.input_scale:g}", m.input_scale != 1.0),
                ("model.mask_token=true", m.mask_token),
                ("train.decay_norms_biases=true", cfg.train.decay_norms_biases))  # its parameter groups read it
    for what, on in vit_only:
        if on and not backbone.startswith("dinov2_"):
            raise ConfigError(f"{what}: only the DINOv2 segmentor has it (model.backbone=dinov2_*), "
                              f"not model.backbone={backbone}")
    if m.mask_token and cfg.mic.weight <= 0:
        raise ConfigError("model.mask_token=true: only MIC's token masking uses the mask token; "
                          "set mic.weight > 0 (with train.schedule=teacher) or model.mask_token=false")
    if not backbone.startswith(DECODER_BACKBONES):
        if cfg.method.feature == "decoder":
            raise ConfigError(f"method.feature=decoder: model.backbone={backbone} (DeepLab-V2) has no decoder "
                              "feature; use aspp_branches or backbone, or a mit_b* or dinov2_* backbone")
        return
    family = "MiT" if backbone.startswith("mit_") else "DINOv2"
    deeplab_only = (
        ("model.separate_target_stem", m.separate_target_stem, f"{family} has no ResNet stem to duplicate"),
        ("model.bn_batch_stats", m.bn_batch_stats, f"{family} has no frozen BatchNorm"),
        ("model.freeze_bn", m.freeze_bn, f"{family}'s only BatchNorms are in the randomly initialised "
                                         f"{'decoder' if family == 'MiT' else 'pyramid and decoder'}, "
                                         "whose statistics must be learnt"),
    )
    for key, value, why in deeplab_only:
        if value:
            raise ConfigError(f"{key}=true is a DeepLab-V2 option: {why} (model.backbone={backbone})")
    if cfg.data.normalize != "imagenet":
        raise ConfigError(f"data.normalize={cfg.data.normalize}: model.backbone={backbone} takes RGB images with "
                          f"ImageNet normalisation (the {family} checkpoints' input); use data.normalize=imagenet")
    if cfg.method.feature != "decoder":
        raise ConfigError(f"method.feature={cfg.method.feature}: model.backbone={backbone} contrasts its decoder "
                          "feature; use method.feature=decoder or leave the key unset")
    if family != "MiT":  # a ViT pads any input to its patch grid
        return
    for key, crop in (("data.crop", cfg.data.crop), ("eval.crop", cfg.eval.crop if cfg.eval.mode == "slide" else None)):
        if crop is not None and min(crop) < MIT_MIN_CROP:
            raise ConfigError(f"{key}: {list(crop)} is too small for model.backbone={backbone} "
                              f"(at least {MIT_MIN_CROP} pixels a side)")


# Input pixels per output cell of the segmentors HRDA wraps (MiT: ceil(H/4); DINOv2 at
# input_scale 1: ceil(2H/7); DeepLab-V2's encode, floor-mode pool: H/8 for multiples of 8).
HRDA_OUTPUT_STRIDES = {"mit_": Fraction(4), "dinov2_": Fraction(7, 2), "resnet": Fraction(8)}


def check_hrda(cfg: "Config") -> None:
    """``model.hrda``: a segmentor, schedule and crop geometry that HRDA supports.

    The detail crop lies inside the context crop (``data.crop``), and the context crop, the
    detail crop and ``crop_divisible`` are whole multiples of the alignment unit
    ``output_stride / context_scale`` (8 for MiT at 0.5, 7 for DINOv2, 16 for DeepLab-V2), so that every crop
    falls on whole cells of both output grids.

    Raises:
        ConfigError: one line naming the key.
    """
    h, m = cfg.model.hrda, cfg.model
    if not h.enabled:
        return
    stride = next((s for prefix, s in HRDA_OUTPUT_STRIDES.items() if m.backbone.startswith(prefix)), None)
    if stride is None:
        raise ConfigError(f"model.hrda.enabled: HRDA wraps a MiT, DINOv2 or DeepLab-V2 segmentor, not "
                          f"model.backbone={m.backbone}")
    for what, on in (("model.decoder=light", m.decoder == "light"), (f"model.input_scale={m.input_scale:g}",
                     m.input_scale != 1.0), ("model.mask_token=true", m.mask_token)):
        if on:
            raise ConfigError(f"model.hrda.enabled: HRDA does not support {what} (the scale attention needs a "
                              "segformer or daformer decoder on an unresized input)")
    t = cfg.train
    if t.schedule != "teacher" or cfg.method.name not in ("self_training", "bida") or t.source_iters:
        raise ConfigError(f"model.hrda.enabled: HRDA trains on the mean-teacher schedule (train.schedule=teacher, "
                          f"method self_training or bida, train.source_iters=0), not {t.schedule} with "
                          f"{cfg.method.name}" + (f" and source_iters={t.source_iters}" if t.source_iters else ""))
    if t.student_forwards != "separate":
        raise ConfigError("model.hrda.enabled: each student forward draws its own detail crop, as HRDA's; set "
                          "train.student_forwards=separate")
    ratio = 1 / Fraction(str(h.context_scale))
    unit = stride * ratio
    if ratio.denominator != 1 or unit.denominator != 1:
        raise ConfigError(f"model.hrda.context_scale: {h.context_scale:g} must be 1 / a whole number that makes "
                          f"output_stride / context_scale ({stride} / {h.context_scale:g}) whole, e.g. 0.5")
    unit = int(unit)
    for key, sides in (("data.crop", cfg.data.crop), ("model.hrda.detail_crop", h.detail_crop),
                       ("model.hrda.crop_divisible", [h.crop_divisible])):
        if any(side % unit for side in sides):
            raise ConfigError(f"{key}: {list(sides) if len(sides) > 1 else sides[0]} must be a multiple of {unit} "
                              f"(output stride {stride} / model.hrda.context_scale {h.context_scale:g}) for the "
                              "detail crop to align with the context crop")
    if any(d > c for d, c in zip(h.detail_crop, cfg.data.crop)):
        raise ConfigError(f"model.hrda.detail_crop: {list(h.detail_crop)} is larger than the context crop "
                          f"data.crop {list(cfg.data.crop)}")
