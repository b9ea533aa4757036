"""Typed, validated experiment configuration.

A config is a tree of frozen dataclasses. YAML files under ``configs/`` give one complete
experiment each (no inheritance); command-line overrides use ``dotted.key=value``, the
value parsed as YAML. Unknown keys, wrong types, values outside a ``Literal`` and numbers
outside their :data:`RANGES` entry fail with a :class:`~bida.errors.ConfigError` naming
the key. Nothing mutates a config after loading:
use :func:`replace_path` to derive a new one.

``method`` is both the name of the method and a section of options: ``method: bida`` in
YAML or ``method=bida`` on the command line set ``method.name``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError

DEFAULTS_FILE = Path(__file__).with_name("defaults.yaml")
Methods = Literal["source_only", "minent", "self_training", "bida"]
DomainKinds = Literal["synthetic", "gta5", "synthia", "cityscapes", "folder"]


@dataclass(frozen=True)
class SyntheticConfig:
    """The embedded procedural domain pair (used when a domain's kind is ``synthetic``)."""

    num_train: int = 200  # images per domain; enough for the classes to co-occur often
    num_val: int = 60
    # Target test images: their own generation stream (adding them changes no train/val image);
    # never used for training, pseudo labels, best.pt or any choice; evaluated once at the end.
    num_test: int = 0
    height: int = 64  # small so that a narrow network trains in minutes on a CPU
    width: int = 128
    seed: int = 0
    cache_dir: Optional[str] = None  # default: $BIDA_CACHE or ~/.cache/bida


@dataclass(frozen=True)
class DomainConfig:
    """One domain: a reader kind, its root and the splits used for training and validation."""

    kind: DomainKinds = "synthetic"
    root: Optional[str] = None  # ignored for ``synthetic`` (the cache directory is used)
    train_split: str = "train"
    val_split: Optional[str] = "val"  # target: the split evaluated during training (best.pt, choices)
    # Target only: a held-out split (folder layout: images/<split> + labels/<split>) evaluated
    # once, on the last checkpoint, after training; nothing selects on it. None: no test split,
    # except that a synthetic target has split "test" when data.synthetic.num_test > 0.
    test_split: Optional[str] = None
    synthetic_domain: Optional[Literal["source", "target"]] = None  # which synthetic rendering (default: the role)
    resize: Optional[int] = None  # this domain's shorter side before augmentation; None: data.resize


@dataclass(frozen=True)
class DataConfig:
    source: DomainConfig = field(default_factory=DomainConfig)
    target: DomainConfig = field(default_factory=DomainConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    resize: Optional[int] = None  # shorter side before augmentation (paper: 850; source-only stage: 720)
    crop: tuple[int, int] = (64, 128)  # (h, w) random crop; paper: 730x730
    scale_range: tuple[float, float] = (0.75, 1.25)  # random rescale; paper's source stage 0.5-1.5
    flip: bool = True
    normalize: Literal["imagenet", "caffe"] = "imagenet"  # caffe = BGR minus mean, for DeepLab_init.pth
    eval_classes: Optional[list[int]] = None  # class subset for mIoU (SYNTHIA 16/13 protocols)
    num_workers: int = 0
    check: bool = True  # cheap data check at the start of training
    # Rare-class sampling of source images (DAFormer): draw a class c with probability
    # softmax((1 - f_c) / rcs_temperature) over the source pixel frequencies f, then an image
    # holding more than rcs_min_pixels pixels of c (full resolution), re-cropped up to 10
    # times until the crop holds rcs_min_crop_ratio x rcs_min_pixels of them.
    rare_class_sampling: bool = False
    rcs_temperature: float = 0.01
    rcs_min_pixels: int = 3000
    rcs_min_crop_ratio: float = 0.5


@dataclass(frozen=True)
class ModelConfig:
    # resnet*: DeepLab-V2 (output stride 8); mit_b*: Mix Transformer + decoder (stride 4);
    # dinov2_*: DINOv2 ViT (patch 14; _reg: with 4 register tokens) + simple feature pyramid
    # + decoder (stride 3.5)
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101",
                      "mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5",
                      "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitg14",
                      "dinov2_vits14_reg", "dinov2_vitb14_reg", "dinov2_vitl14_reg", "dinov2_vitg14_reg"] = "resnet18"
    width: float = 1.0  # channel multiplier (ResNet channels, MiT stage widths, ViT width); < 1 for CPU demos and tests
    pretrained: Optional[str] = None  # ImageNet/DeepLab init weights (local file)
    init_checkpoint: Optional[str] = None  # start from a bida checkpoint (e.g. source-only)
    freeze_bn: bool = False  # the paper freezes BN (pretrained stats); random init needs training BN
    separate_target_stem: bool = False  # official code: own conv1/bn1/layer1 for target images
    # With freeze_bn: affine frozen but BN in train mode: per-forward batch statistics (each
    # domain forwarded separately), running stats updated and used at evaluation -- the official code.
    bn_batch_stats: bool = False
    proj_dim: int = 256  # projection head size when method.feature = backbone or decoder
    # MiT and DINOv2. segformer: all-MLP head; daformer: context-aware fusion (dilated separable convs)
    decoder: Literal["segformer", "daformer"] = "segformer"
    decoder_dim: int = 256  # MiT decoder channels: SegFormer-B0/B1 256, B2-B5 768; DAFormer 256
    drop_path: float = 0.1  # MiT/ViT stochastic-depth rate of the last block (SegFormer, DAFormer: 0.1)
    # Activation checkpointing of the MiT blocks / the ResNet blocks of layer1..layer4: their
    # activations are recomputed in the backward instead of kept. Same losses, gradients and
    # BN statistics, lower peak memory for about one more forward of the encoder per step:
    # for GPUs that cannot hold a step otherwise (benchmarks/memory.py).
    grad_checkpoint: bool = False


@dataclass(frozen=True)
class MethodConfig:
    name: Methods = "source_only"
    t2s: bool = True  # target pixels vs source prototypes (L_t2s)
    s2t: bool = True  # source pixels vs target prototypes (L_s2t)
    dynamic_labels: bool = True  # complete static pseudo labels by label transfer
    calibration: bool = True  # shift source prototypes by the EMA domain bias
    # Which map the contrast reads. DeepLab-V2: aspp_branches (the official code) or backbone
    # (layer4 through a projection head). MiT: decoder (the fused decoder feature through a
    # projection head). Unset (null): the backbone's own, aspp_branches for resnet*, decoder
    # for mit_b* (see default_feature); a loaded config always holds the chosen one.
    feature: Optional[Literal["aspp_branches", "backbone", "decoder"]] = None
    prototype_scope: Literal["batch", "pair"] = "batch"  # official code: pair
    # Complete each prototype set with its moving average (the calibration state, kept with
    # calibration=false too) for classes absent from the batch (prototype_scope=pair: from
    # the image), so that every pixel meets more negatives.
    memory_partners: bool = False
    # The projection head arrives trained: the source stage (a source_only run, or the source
    # stage of an adaptation run) trains it with a supervised pixel-prototype contrast on
    # source, on detached features (the segmentation path is the same with and without it),
    # and an adaptation run from model.init_checkpoint keeps the checkpoint's head. Needs a
    # head: method.feature backbone or decoder (aspp_branches has none).
    pretrain_head: bool = False


@dataclass(frozen=True)
class TrainConfig:
    # rounds: offline self-training rounds (docs/method.md section 5). teacher: one adaptation phase
    # with an EMA teacher labelling ClassMix images online (DAFormer), see bida.teacher.
    schedule: Literal["rounds", "teacher"] = "rounds"
    # rounds: length of a source_only run and of the source stage of adaptation.
    # teacher: length of the adaptation phase (or of a source_only run).
    iters: int = 1500
    source_iters: int = 0  # teacher: source-only stage before adaptation (DAFormer: none); skipped with init_checkpoint
    # Images per domain in a step: per process under torchrun, except with schedule teacher,
    # where it is the global batch (split over the processes; a multiple of their number).
    batch_size: int = 2
    lr: float = 2.5e-3  # backbone; the classifier gets head_lr_mult x this
    head_lr_mult: float = 10.0
    # Layer-wise LR decay of a ViT encoder (dinov2_* only; 1.0 = off): the final norm trains
    # at lr, block i (of N, from 0) at lr x layer_decay^(N - i), the patch/position embeddings
    # at lr x layer_decay^(N + 1); the head keeps head_lr_mult x lr (BEiT/mmseg rule).
    layer_decay: float = 1.0
    optimizer: Literal["sgd", "adamw"] = "sgd"  # DAFormer: adamw, lr 6e-5, weight_decay 0.01
    momentum: float = 0.9  # sgd only (adamw: betas 0.9, 0.999)
    weight_decay: float = 5e-4
    poly_power: float = 0.9  # DAFormer: 1.0
    # Linear warm-up over the first warmup_iters of each phase, from 1e-6 x the scheduled LR
    # (mmcv's rule, DAFormer: 1500); 0 = none.
    warmup_iters: int = 0
    teacher_momentum: float = 0.999  # EMA teacher: alpha = min(1 - 1 / (t + 1), this) at update t
    # teacher schedule: the student's source and ClassMix images in one concatenated forward
    # (joint: one BN batch of both) or in two (separate: each its own BN batch, as DAFormer).
    student_forwards: Literal["joint", "separate"] = "joint"
    # teacher schedule: the EMA teacher's BatchNorms label with its averaged running statistics
    # (running) or with the statistics of the target batch they label (batch: DAFormer's EMA
    # model stays in train mode, dropout and drop path off). Not with model.freeze_bn.
    teacher_bn: Literal["running", "batch"] = "running"
    rounds: int = 3  # self-training rounds (paper: 10)
    iters_per_round: int = 300  # paper: 10000 for GTA5
    adapt_lr: Optional[float] = None  # base LR of the adaptation rounds (paper 7.5e-5); default lr
    round_lr_decay: float = 0.5  # base LR multiplied by this after each round
    poly_horizon: float = 1.2  # poly LR max_iter = horizon x iters of the round
    eval_every: int = 500
    checkpoint_every: int = 100
    log_every: int = 10
    amp: Literal["none", "bf16", "fp16"] = "none"
    # Measured slower on an H100 in every precision (see benchmarks/README.md): off by default.
    channels_last: bool = False
    # torch.compile of the training forward: false (eager), true or "default", "reduce-overhead"
    # (CUDA graphs: fewer launches, more memory) or "max-autotune" (longer compile, tuned kernels).
    compile: Union[bool, Literal["default", "reduce-overhead", "max-autotune"]] = False
    # The compiler behind train.compile: "inductor" (generated kernels, the one that speeds
    # training up) or "aot_eager" (traces and runs the same graphs with eager kernels: fast to
    # compile, for checking that a model compiles; the mode is ignored).
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    max_bad_steps: int = 10  # stop after this many non-finite steps in a row
    quiet: bool = False  # no progress bar


@dataclass(frozen=True)
class LossConfig:
    temperature: float = 0.1
    seg_tgt_weight: float = 0.3  # lambda_t
    entropy_weight: float = 0.4  # lambda_e
    contrast_t2s_weight: float = 0.2  # lambda_1
    contrast_s2t_weight: float = 0.2  # lambda_2
    contrast_resolution: Literal["feature", "label"] = "feature"  # official code: label
    # The contrast terms count (weight > 0) from this iteration of the adaptation phase on
    # (rounds: counted over all rounds); before it they are computed and logged at weight 0.
    # 0 = from the start (the paper).
    contrast_warmup_iters: int = 0
    # teacher schedule: weight of the quality-weighted CE on ClassMix images (DAFormer: 1).
    mix_weight: float = 1.0
    # teacher schedule: distance of the student's source backbone features to a frozen copy
    # of the model.pretrained backbone (DAFormer: 0.005), on pixels of feature_distance_classes
    # (DAFormer: the Cityscapes thing classes; null = every class). Needs model.pretrained.
    feature_distance_weight: float = 0.0
    # teacher schedule: the confidence-weighted CE on teacher labels (ClassMix, MIC) averages
    # over the labelled pixels (labelled) or over all pixels, ignored ones counting 0 (all:
    # DAFormer's and MIC's mean, smaller by the labelled share).
    pseudo_ce_mean: Literal["labelled", "all"] = "labelled"
    feature_distance_classes: Optional[list[int]] = field(default_factory=lambda: [6, 7, 11, 12, 13, 14, 15, 16, 17, 18])


@dataclass(frozen=True)
class PseudoConfig:
    class_fraction: float = 0.1  # top share of each predicted class kept (class-balanced)
    image_fraction: float = 0.1  # top share of each image kept
    transfer_threshold: float = 0.8  # min label-transfer probability for a dynamic label
    dynamic_for_segmentation: bool = False  # train target CE on y_F (false) or fused y_T (true)
    max_pixels_per_image: int = 20000  # subsample for the class thresholds (bounded memory)
    # teacher schedule: quality weight of a target batch = share of its pixels whose teacher
    # confidence exceeds this (DAFormer: 0.968).
    teacher_threshold: float = 0.968


@dataclass(frozen=True)
class CalibrationConfig:
    momentum: float = 0.99
    max_weight: float = 1.0
    ramp_iters: int = 600


@dataclass(frozen=True)
class MICConfig:
    """Masked image consistency (MIC, Hoyer et al.) on the teacher schedule, see bida.masking.

    The student's prediction on a colour-augmented target image with random blocks set to 0
    is trained against the teacher's labels of the unmasked image, with the batch's quality
    weight (as the ClassMix loss)."""

    weight: float = 0.0  # weight of the masked-image loss; 0 = off (MIC: 1)
    mask_ratio: float = 0.7  # probability that a block is masked (MIC: 0.7)
    # Block side in pixels of the training crop. MIC: 64 at full resolution (HRDA's 1024 crops);
    # its DAFormer runs on half-resolution images (512 crops of 1024x512 Cityscapes) use 32.
    block_size: int = 64


@dataclass(frozen=True)
class EvalConfig:
    mode: Literal["whole", "slide"] = "whole"
    crop: tuple[int, int] = (512, 512)  # sliding window size
    stride: tuple[int, int] = (341, 341)
    flip: bool = False  # horizontal-flip test-time augmentation
    size: Optional[tuple[int, int]] = None  # (h, w) to predict at, e.g. (730, 1460) for Cityscapes
    max_images: Optional[int] = None  # evaluate a subset (quick checks)


@dataclass(frozen=True)
class Config:
    method: MethodConfig = field(default_factory=MethodConfig)
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    mic: MICConfig = field(default_factory=MICConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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
    "model.drop_path": (0, 1, True, False),  # a rate of 1 drops every residual branch
    "train.iters": (1, INF, True, True),
    "train.source_iters": (0, INF, True, True),
    "train.warmup_iters": (0, INF, True, True),
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
    else:
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
    if cfg.train.layer_decay != 1.0 and not backbone.startswith("dinov2_"):
        raise ConfigError(f"train.layer_decay={cfg.train.layer_decay:g}: layer-wise LR decay is defined for the "
                          f"blocks of a ViT (model.backbone=dinov2_*), not model.backbone={backbone}; set it to 1.0")
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


# --------------------------------------------------------------------------- building


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert YAML lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: must not be null")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: {value!r} is not one of {choices}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 and 1e6 (no dot) as strings
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .inf would pass every ">= x" check, .nan every comparison
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover


# Keys that were measured and removed (README: "Does the contrast count?", "Contrast designs from the field"), with the value that
# kept the paper's behaviour: a config holding that value (an older run directory) still loads,
# the key dropped; any other value is refused with the reason.
REMOVED_KEYS: dict[str, tuple[Any, str]] = {
    "method.center_features": ("none", "centred features were measured over seeds and did not help the contrast"),
    "method.t2s_dynamic": ("fused", "scoring y_D pixels apart in L_t2s was measured over seeds and did not help"),
    "method.dynamic_t2s_weight": (1.0, "it weighed method.t2s_dynamic=separate, which was measured over seeds "
                                       "and did not help"),
    "method.contrast_design": ("prototype", "the distribution-aware contrast was measured over 5 seeds on both "
                                            "paths and lost to the prototype contrast"),
    "method.teacher_prototypes": (False, "prototypes from the EMA teacher were measured over 5 seeds and lost "
                                         "to the student's"),
}


def _check_removed(full: str, value: Any) -> bool:
    """True when ``full`` is a removed key holding its former default (to be dropped).

    Raises:
        ConfigError: a removed key with any other value.
    """
    if full not in REMOVED_KEYS:
        return False
    default, why = REMOVED_KEYS[full]
    if value != default:
        raise ConfigError(f"{full}: removed ({why}; its rows stay in README); delete the key")
    return True


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in data.items() if k in names or not _check_removed(f"{prefix}.{k}" if prefix else str(k), v)}
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown config key '{full}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _normalise_method(data: dict) -> dict:
    # ``method: bida`` is shorthand for ``method: {name: bida}``.
    if isinstance(data.get("method"), str):
        data = dict(data)
        data["method"] = {"name": data["method"]}
    return data


def to_dict(cfg: Any) -> Any:
    """A plain dict/list tree of a config (tuples become lists), for YAML and logs."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 (core schema) numbers.

    YAML 1.1, which PyYAML implements, reads ``010`` as 8 (octal), ``1:30`` as 90
    (sexagesimal) and ``1_000`` as 1000, and needs a dot in ``1.0e-3``. Here ``010`` is 10,
    ``1:30`` and ``1_000`` are strings (refused by a number key), ``1e-3`` is a float, and
    only ``0o17`` and ``0x1f`` are octal and hexadecimal.
    """


_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT_TAG, _FLOAT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(_INT_TAG, re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                    list("-+0123456789"))
_Yaml12Loader.add_implicit_resolver(
    _FLOAT_TAG, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                           r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _construct_int_12(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    try:
        return int(text, 10)  # leading zeros are decimal
    except ValueError:
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not a YAML 1.2 integer",
                                                node.start_mark) from None


_Yaml12Loader.add_constructor(_INT_TAG, _construct_int_12)


def yaml_load(text: str) -> Any:
    """Parse YAML with YAML 1.2 numbers (:class:`_Yaml12Loader`): config files and overrides."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a", "b", "c"], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"malformed override '{text}': expected dotted.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p or not p.replace("_", "a").isalnum() for p in parts):
        raise ConfigError(f"malformed override '{text}': bad key '{key}'")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"malformed override '{text}': value is not valid YAML") from None
    if parts == ["method"] and isinstance(value, str):
        parts = ["method", "name"]
    return parts, value


def _set_path(tree: dict, parts: list[str], value: Any, text: str) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            raise ConfigError(f"unknown config key '{'.'.join(parts[: i + 1])}' in override '{text}'")
        node = child
    if parts[-1] not in node:
        if _check_removed(".".join(parts), value):
            return
        raise ConfigError(f"unknown config key '{'.'.join(parts)}' in override '{text}'")
    node[parts[-1]] = value


def from_dict(data: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Build a validated :class:`Config` from a (partial) dict and dotted overrides."""
    tree = to_dict(_build(Config, _normalise_method(data or {})))
    for text in overrides:
        parts, value = parse_override(text)
        _set_path(tree, parts, value, text)
    return _build_checked(tree)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the packaged ``defaults.yaml`` when ``path`` is None) and apply overrides.

    Raises:
        ConfigError: unreadable file, invalid YAML, unknown key, wrong type or bad override.
    """
    data: dict = {}
    if path is None:
        # Without -c: the packaged CPU-sized experiment on the embedded synthetic pair.
        path = DEFAULTS_FILE
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
        try:
            data = yaml_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
    return from_dict(data, overrides)


def replace_path(cfg: Config, **dotted: Any) -> Config:
    """A copy of ``cfg`` with ``a__b=value`` (for ``a.b``) replaced and re-validated."""
    tree = to_dict(cfg)
    for key, value in dotted.items():
        parts = key.split("__")
        _set_path(tree, parts, to_dict(value), key)
    return _build_checked(tree)


def _build_checked(tree: dict) -> Config:
    """The :class:`Config` of a full tree, with every numeric key range-checked.

    Keys whose default depends on others (``method.feature`` on ``model.backbone``) are
    resolved here, after the file and the overrides, so that the config holds explicit
    values (a dumped config reads back the same).
    """
    if tree.get("method", {}).get("feature") is None:
        backbone = tree.get("model", {}).get("backbone", ModelConfig.backbone)
        tree = {**tree, "method": {**tree.get("method", {}), "feature": default_feature(backbone)}}
    cfg = _build(Config, tree)
    check_ranges(cfg)
    check_model_choices(cfg)
    return cfg


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as YAML atomically (a crash never leaves a half-written config)."""
    from .checkpoint import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
