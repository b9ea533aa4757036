"""HRDA on the teacher schedule: where each student forward's detail crop lies, and its loss.

The network side (context and detail crops, scale attention, fusion) is
:mod:`bida.models.hrda`. Here: :class:`DetailCrops` draws the detail crop of every image a
student forward sees, and :func:`detail_terms` gives the detail crop's own cross entropy,
which HRDA weighs ``detail_loss_weight`` (lambda_d, 0.1) against ``1 - lambda_d`` for the
fused prediction's (``bida.method.teacher.teacher_step`` applies the weights).

As the ClassMix and MIC draws (:mod:`bida.method.mixing`), the crops come from an explicit
generator saved in the checkpoint, and under torchrun every rank draws the whole global
batch's numbers and keeps its own rows: a sample's detail crop depends on its place in the
global batch, not on the number of processes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import HRDAConfig
from ..models.hrda import HRDAOutput, crop_boxes, draw_detail_boxes
from .losses import ce_pixel_count, seg_cross_entropy
from .mixing import global_rand

BOX_DRAWS = 2  # uniform numbers per image: the row and the column of its detail crop


class DetailCrops:
    """The detail-crop corners of each student forward; owns the generator they come from.

    ``crops(img)`` returns (B, 2) int64 corners (row, column) of ``detail_crop`` windows
    inside ``img``'s crop, on multiples of ``crop_divisible``
    (:func:`bida.models.hrda.draw_detail_boxes`: HRDA's offsets).
    """

    def __init__(self, cfg: HRDAConfig, seed: int, device: torch.device | str = "cpu", rank: int = 0,
                 world_size: int = 1):
        self.detail, self.divisible = tuple(cfg.detail_crop), cfg.crop_divisible
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, img: Tensor) -> Tensor:
        """Shape: img (B, 3, H, W) -> (B, 2) int64."""
        u = global_rand(img.shape[0], BOX_DRAWS, generator=self.generator, device=img.device, rank=self.rank,
                        world_size=self.world_size)
        return draw_detail_boxes(u, tuple(img.shape[-2:]), self.detail, self.divisible)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())


def detail_terms(out: HRDAOutput, labels: Tensor, weight: Tensor | None, mean_over: str,
                 weighted_ce, class_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The detail crop's cross entropy against the labels (and pixel weights) under it, and
    the pixel count behind its mean (for the global-batch mean under torchrun).

    ``weight`` None: the plain CE (:func:`bida.losses.seg_cross_entropy`, the source's, with
    ``class_weights`` as the fused source CE: ``loss.class_weights``);
    else the pixel-weighted CE ``weighted_ce`` of the teacher labels, with a per-pixel
    ``weight`` cropped like the labels (a scalar quality weight as it is).

    Shape:
        - out.detail_logits: (B, K, h', w'); labels: (B, H, W); weight: (), (B, H, W) or None
        - output: (term (), count ())
    """
    detail = _detail_size(out, labels)
    y = crop_boxes(labels, out.detail_box, detail)
    if weight is None:
        return (seg_cross_entropy(out.detail_logits, y, mean_over=mean_over, class_weights=class_weights),
                ce_pixel_count(y, mean_over))
    w = crop_boxes(weight, out.detail_box, detail) if weight.dim() == 3 else weight
    return weighted_ce(out.detail_logits, y, w, mean_over=mean_over), ce_pixel_count(y, mean_over)


def _detail_size(out: HRDAOutput, labels: Tensor) -> tuple[int, int]:
    """The detail crop's size in label pixels: its logits cover it at the fused logits' stride."""
    fh, fw = out.logits.shape[-2:]
    dh, dw = out.detail_logits.shape[-2:]
    return labels.shape[-2] * dh // fh, labels.shape[-1] * dw // fw
