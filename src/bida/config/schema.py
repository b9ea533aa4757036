"""The config's schema: the frozen dataclasses of every section and their defaults.

Each field carries its default and a comment saying what it sets and why; the checks of
the values are in :mod:`bida.config.checks`, the loading in :mod:`bida.config.loading`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

# The packaged experiment, beside the package root (``bida/defaults.yaml``, package data).
DEFAULTS_FILE = Path(__file__).parent.with_name("defaults.yaml")
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
    # teacher schedule, adaptation methods: VFM-UDA's weak colour jitter (probability 0.9 per
    # image; brightness factor in 1 +- 32/255, contrast and saturation in 1 +- 0.5, hue +- 0.05
    # turn) of the source images the source loss sees and of the target images pasted into
    # ClassMix. The teacher labels, and MIC masks, the clean target image; ClassMix pastes the
    # clean source. false: no weak jitter (DAFormer, MIC).
    weak_jitter: bool = False


@dataclass(frozen=True)
class HRDAConfig:
    """HRDA's multi-resolution training (Hoyer et al., ECCV 2022), see :mod:`bida.models.hrda`.

    Each training crop (data.crop, the *context* crop; HRDA: 1024x1024) goes through the
    segmentor downscaled by ``context_scale``; a *detail* crop of ``detail_crop`` pixels
    inside it goes through the same segmentor at full resolution; a scale-attention head on
    the context features fuses the two on the detail region. Teacher schedule with MiT or
    DINOv2 (input_scale 1, not the light decoder) only."""

    enabled: bool = False  # false: the plain segmentor, bit-identical to a config without this section
    # Downscale factor of the context crop (HRDA: scales=[1, 0.5]; the detail crop is at full resolution).
    context_scale: float = 0.5
    # (h, w) of the detail crop at full resolution (HRDA: hr_crop_size 512x512, half the context crop).
    detail_crop: tuple[int, int] = (512, 512)
    # lambda_d: the fused CE weighs 1 - lambda_d and the detail crop's own CE lambda_d (HRDA: hr_loss_weight 0.1).
    detail_loss_weight: float = 0.1
    # The scale attention has one channel per class (HRDA: attention_classwise=True) or one for all.
    attention_classwise: bool = True
    # Forwards without a training crop (the teacher's labels, evaluation windows) run the detail
    # branch on overlapping detail crops (stride half a crop) over the whole input and fuse them
    # with the attention (HRDA: hr_slide_inference=True); false: one detail forward of the whole input.
    slide_pseudo_labels: bool = True
    # Detail crop corners are drawn on multiples of this (HRDA: crop_coord_divisible 8 = the
    # output stride 4 / context_scale 0.5), so that the crop falls on whole cells of both grids.
    crop_divisible: int = 8


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
    # MiT and DINOv2. segformer: all-MLP head; daformer: context-aware fusion (dilated separable convs);
    # light (dinov2_* only): VFM-UDA's head, two 2x2 transposed convs and a 3x3 conv with
    # LayerNorms on the last block alone, no feature pyramid (decoder_dim unused)
    decoder: Literal["segformer", "daformer", "light"] = "segformer"
    decoder_dim: int = 256  # MiT decoder channels: SegFormer-B0/B1 256, B2-B5 768; DAFormer 256
    # dinov2_* only: every input (crop, window, image) is resized bilinearly to
    # floor(side x input_scale / 14) x 14 per side before the ViT, and the outputs stay on that
    # grid (losses and evaluation upsample them to the label size). VFM-UDA: 1.1 (its 1024
    # crops go to the ViT at 1120). 1.0: no resize, sides padded to multiples of 14.
    input_scale: float = 1.0
    # dinov2_* with mic.weight > 0 only: the encoder keeps DINOv2's pretraining mask token as a
    # trained parameter (loaded from the weights file, in the embeddings' LR group), and MIC
    # replaces each patch token with it with probability mic.mask_ratio instead of zeroing
    # pixel blocks of mic.block_size (VFM-UDA's token masking: true). false: MIC's pixel blocks.
    mask_token: bool = False
    drop_path: float = 0.1  # MiT/ViT stochastic-depth rate of the last block (SegFormer, DAFormer: 0.1)
    # Activation checkpointing of the MiT blocks / the ResNet blocks of layer1..layer4: their
    # activations are recomputed in the backward instead of kept. Same losses, gradients and
    # BN statistics, lower peak memory for about one more forward of the encoder per step:
    # for GPUs that cannot hold a step otherwise (benchmarks/memory.py).
    grad_checkpoint: bool = False
    # Under torchrun (2 or more processes): the BatchNorms that train (not frozen by
    # freeze_bn; the MiT/DINOv2 decoders', DeepLab-V2's with freeze_bn off or bn_batch_stats)
    # normalise with, and update their running statistics from, the statistics of the global
    # batch, so N processes train what one process does. SegFormer's multi-GPU mmseg configs
    # use SyncBN; DAFormer trains on one GPU with plain BN, which is what this gives on any
    # number of processes. false: each process's own slice (plain DDP; no collectives per
    # BatchNorm). One process, frozen BN and evaluation are the same either way (nothing is
    # converted), so there is no separate "auto".
    sync_bn: bool = True
    # HRDA's context + detail crops with a learnt scale attention (off by default).
    hrda: HRDAConfig = field(default_factory=HRDAConfig)


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
    # Mean-teacher schedule with method=bida: where BiDA reads the target pixels of its
    # contrast, label transfer and target prototypes. unmixed: the unmixed target crop in a
    # forward of its own (one more student forward a step). mixed: the ClassMix crop's
    # forward, which the self-training loss runs anyway, at its target-origin pixels only
    # (the pasted source pixels count on neither side: the source crop's own forward gives
    # the source features). BiDA publishes neither (it has no mean teacher); unmixed keeps
    # each domain's features apart, mixed saves the forward (see bida.method.teacher).
    target_features: Literal["unmixed", "mixed"] = "unmixed"


@dataclass(frozen=True)
class TrainConfig:
    # rounds: offline self-training rounds (docs/method.md section 5). teacher: one adaptation phase
    # with an EMA teacher labelling ClassMix images online (DAFormer), see bida.teacher.
    schedule: Literal["rounds", "teacher"] = "rounds"
    # rounds: length of a source_only run and of the source stage of adaptation.
    # teacher: length of the adaptation phase (or of a source_only run).
    iters: int = 1500
    source_iters: int = 0  # teacher: source-only stage before adaptation (DAFormer: none); skipped with init_checkpoint
    # Images per domain in a step, the global batch on every schedule and stage: under
    # torchrun each of N processes takes batch_size / N of them (a multiple of N), so a config
    # trains the same run on any number of processes. (Before, the rounds schedule took it per
    # process: for 2 images per GPU on 4 GPUs, set 8.)
    batch_size: int = 2
    lr: float = 2.5e-3  # backbone; the classifier gets head_lr_mult x this
    head_lr_mult: float = 10.0
    # Layer-wise LR decay of a ViT encoder (dinov2_* only; 1.0 = off): the final norm trains
    # at lr, block i (of N, from 0) at lr x layer_decay^(N - i), the patch/position embeddings
    # and class/register tokens at lr x layer_decay^(N + 1). These are the encoder's layer ids
    # of BEiT's decay as mmsegmentation's LayerDecayOptimizerConstructor assigns them (there the
    # head shares the final norm's layer and LR); the head's head_lr_mult x lr is bida's own
    # decoder multiplier (DAFormer's 10x), applied on top. VFM-UDA's rule differs (the final
    # norm sits with the embeddings, the last block at lr), but its configs leave decay off (1.0).
    layer_decay: float = 1.0
    # dinov2_* only. false: biases, norms and LayerScale gammas of the encoder are exempt from
    # weight decay (DINOv2's own rule); true: every parameter decays, as VFM-UDA's AdamW (one
    # weight decay for all its parameter groups).
    decay_norms_biases: bool = False
    optimizer: Literal["sgd", "adamw"] = "sgd"  # DAFormer: adamw, lr 6e-5, weight_decay 0.01
    momentum: float = 0.9  # sgd only (adamw: betas 0.9, 0.999)
    weight_decay: float = 5e-4
    poly_power: float = 0.9  # DAFormer: 1.0
    # Linear warm-up over the first warmup_iters of each phase, from warmup_ratio x the scheduled LR
    # (mmcv's rule, DAFormer: 1500); 0 = none.
    warmup_iters: int = 0
    # The share of the scheduled LR the warm-up starts from: 1e-6 (mmcv's warmup_ratio, DAFormer);
    # VFM-UDA's warm-up starts at 1e-3 (start_warmup_lr).
    warmup_ratio: float = 1e-6
    teacher_momentum: float = 0.999  # EMA teacher: alpha = min(1 - 1 / (t + 1), this) at update t
    # teacher schedule: the student's source and ClassMix images in one concatenated forward
    # (joint: one BN batch of both) or in two (separate: each its own BN batch, as DAFormer).
    student_forwards: Literal["joint", "separate"] = "joint"
    # teacher schedule: the EMA teacher's BatchNorms label with its averaged running statistics
    # (running) or with the statistics of the target batch they label (batch: DAFormer's EMA
    # model stays in train mode, dropout and drop path off). Not with model.freeze_bn.
    teacher_bn: Literal["running", "batch"] = "running"
    # teacher schedule: which classes ClassMix draws from for each image. image: half (rounded
    # up) of the classes in that image's own source label, ignore excluded (ClassMix's rule).
    # batch: half (rounded up) of the label values found in the whole (global) batch's source
    # labels, the ignore label included, drawn independently for each image, which then pastes
    # its own pixels of the chosen values (DAFormer's and MIC's get_class_masks: torch.unique
    # over the batch; a chosen value the image lacks pastes nothing, a chosen 255 pastes
    # unlabelled pixels). Published (DAFormer, MIC): batch.
    mix_classes: Literal["image", "batch"] = "image"
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
    # CUDA: cuDNN's deterministic kernels, a fixed cuBLAS workspace and PyTorch's deterministic
    # implementations where they exist (ops without one warn once). CPU: changes no result; a
    # config repeats bit-identically on one CPU model, torch build and thread count anyway.
    # docs/reliability.md says what is and is not guaranteed.
    deterministic: bool = False
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
    # Every schedule: the source cross-entropy averages over the labelled pixels (labelled) or
    # over every pixel of the crop, ignored and padded ones counting 0 (all: mmseg's
    # CrossEntropyLoss as DAFormer and MIC pin it, v0.16 without avg_non_ignore; smaller by
    # the labelled share). Published (DAFormer, MIC): all.
    source_ce_mean: Literal["labelled", "all"] = "labelled"
    # Every schedule: the source cross-entropy's per-class weights. none: every pixel weighs 1
    # (the paper, DAFormer, MIC). inverse_sqrt_freq: a pixel of class c weighs 1/sqrt(f_c), f_c
    # the class's share of the source training labels (counted once per run, kept in the run
    # directory), scaled so that the pixel-weighted mean weight is 1; for a source whose
    # majority class (e.g. 92 % background) a model from random weights otherwise learns alone.
    class_weights: Literal["none", "inverse_sqrt_freq"] = "none"
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
    # teacher schedule: pseudo-label weight 0 on the top ignore_top and bottom ignore_bottom
    # pixel rows of each target crop (DAFormer's and MIC's croppl, psweight_ignore_top/bottom:
    # published 15 and 120 for Cityscapes at 1024x512 with 512 crops, against rectification
    # artefacts at the top and the ego car at the bottom). The quality weight is computed
    # first, over every valid pixel, banded ones included (as DAFormer); the bands then zero
    # the teacher-label weight there, in the ClassMix loss (where target pixels show: pasted
    # source pixels keep weight 1) and in MIC's loss. They remove no pixel from a mean
    # (loss.pseudo_ce_mean). The bottom band ends at the crop's last unpadded row (DAFormer's
    # crops are never padded). They weigh only these pseudo CEs: BiDA's target labels y_F,
    # label transfer, prototypes and contrast are unaffected. 0 = no band (bida's default).
    ignore_top: int = 0
    ignore_bottom: int = 0
    # teacher schedule: pseudo-label weight 0 on margins of [top, bottom, left, right] pixels of
    # each target *image* (after data.resize, before the random crop), so that a crop loses
    # them only where it touches the image's border (HRDA's and MIC(HRDA)'s "pseudo-label
    # cropping v2", crop_pseudo_margins: published [30, 240, 30, 30] on Cityscapes at 2048x1024).
    # Weighs as the crop bands do (after the quality weight, in the ClassMix and MIC losses);
    # not together with ignore_top/ignore_bottom (the bands of every crop, v1). 0s: none.
    margins: tuple[int, int, int, int] = (0, 0, 0, 0)
    # teacher schedule: the teacher's labels and confidences come from the mean of its softmax
    # on the target image and on its horizontal mirror (mirrored back), as VFM-UDA's
    # (true); false: from the image alone (DAFormer, MIC). Costs a second teacher forward.
    teacher_flip: bool = False


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
