"""Masked image consistency (MIC, Hoyer et al., CVPR 2023): block masks of target images.

The target image is colour-augmented (DAFormer's strong view without the mix,
:func:`bida.mixing.strong_augment`) and then divided into square blocks of
``block_size`` pixels, each withheld with probability ``mask_ratio``: withheld pixels
become 0 in the network's normalised input, as MIC masks them. The student's prediction
on the masked image is trained against the teacher's labels of the whole, unmasked image
(:func:`bida.teacher.teacher_step`), so it has to infer the withheld regions from their
context.

As in :mod:`bida.mixing`, every draw comes from an explicit ``torch.Generator`` on the
images' device: no host synchronisation, and a run that restores the generator's state
draws the same masks and augmentations again; under torchrun a sample's draws depend on
its place in the global batch, not on the number of processes.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .mixing import STRONG_DRAWS, global_rand, strong_augment


def block_masks(batch: int, size: tuple[int, int], block_size: int, mask_ratio: float,
                generator: torch.Generator, device: torch.device | str = "cpu", rank: int = 0,
                world_size: int = 1) -> Tensor:
    """Per image, a grid of ``block_size`` x ``block_size`` blocks, each kept with probability
    ``1 - mask_ratio``; True where a pixel is kept.

    Blocks start at the top-left corner; where a side is not a multiple of ``block_size``
    the last row or column of blocks is cut by the image border (it is still one block).
    One uniform number per block, drawn row by row: a block is kept when its number is at
    least ``mask_ratio`` (so ratio 0 keeps every pixel). ``rank``, ``world_size``: the
    images are this rank's slice of a global batch (:func:`bida.mixing.global_rand`).

    Shape:
        - output: (batch, H, W) bool, (H, W) = ``size``
    """
    h, w = size
    gh, gw = math.ceil(h / block_size), math.ceil(w / block_size)
    u = global_rand(batch, gh, gw, generator=generator, device=device, rank=rank, world_size=world_size)
    keep = u >= mask_ratio  # (B, gh, gw)
    full = keep[:, :, None, :, None].expand(batch, gh, block_size, gw, block_size)
    return full.reshape(batch, gh * block_size, gw * block_size)[:, :h, :w]


def mask_image(img: Tensor, keep: Tensor) -> Tensor:
    """``img`` where ``keep``, 0 elsewhere (0 of the normalised input, as MIC masks).

    Shape:
        - img: (B, C, H, W); keep: (B, H, W) bool; output: (B, C, H, W), ``img``'s dtype
    """
    return torch.where(keep[:, None], img, torch.zeros((), dtype=img.dtype, device=img.device))


class MaskedImageConsistency:
    """MIC's masked view of a target batch; owns the generator its draws come from.

    ``masking(img_tgt)`` returns the colour-augmented, block-masked images and the keep
    mask. Per step it draws first the colour augmentation (as :class:`bida.mixing.ClassMix`
    does for its mixed image), then the blocks. Its state (the generator) goes into the
    checkpoint through :class:`bida.teacher.MeanTeacher`.
    """

    def __init__(self, block_size: int, mask_ratio: float, normalize: Literal["imagenet", "caffe"], seed: int,
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1):
        self.block_size, self.mask_ratio, self.normalize = block_size, mask_ratio, normalize
        self.rank, self.world_size = rank, world_size  # the batches are this slice of the global batch
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, img_tgt: Tensor) -> tuple[Tensor, Tensor]:
        """Shape: img_tgt (B, 3, H, W) -> masked images (B, 3, H, W), keep mask (B, H, W) bool."""
        g, b, rows = self.generator, img_tgt.shape[0], {"rank": self.rank, "world_size": self.world_size}
        u = global_rand(b, STRONG_DRAWS, generator=g, device=img_tgt.device, **rows)
        img = strong_augment(img_tgt, u, self.normalize)
        keep = block_masks(b, tuple(img.shape[-2:]), self.block_size, self.mask_ratio, g, img.device, **rows)
        return mask_image(img, keep), keep

    def tokens(self, img_tgt: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """VFM-UDA's variant: the colour-augmented images, unmasked, and which patch tokens of
        the model's ``grid`` (gh, gw) to keep (each withheld with probability ``mask_ratio``,
        for the model's mask token). The same draws as :meth:`__call__`, one per token.

        Shape: img_tgt (B, 3, H, W) -> images (B, 3, H, W), token keep mask (B, gh, gw) bool.
        """
        g, b, rows = self.generator, img_tgt.shape[0], {"rank": self.rank, "world_size": self.world_size}
        u = global_rand(b, STRONG_DRAWS, generator=g, device=img_tgt.device, **rows)
        img = strong_augment(img_tgt, u, self.normalize)
        return img, block_masks(b, grid, 1, self.mask_ratio, g, img.device, **rows)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())
