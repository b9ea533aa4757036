"""Joint (image, label) transforms on numpy arrays, driven by an explicit RNG.

Every random choice comes from the ``np.random.Generator`` passed in, which the sampler
derives from (seed, epoch, position): augmentation does not depend on worker processes or
on how many batches ran before, so a resumed run sees exactly the same crops.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# The DeepLab-V2 init checkpoint was trained on BGR images minus this mean (0..255 scale).
CAFFE_MEAN_BGR = np.array([104.00698793, 116.66876762, 122.67891434], dtype=np.float32)


def resize_pair(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize to ``size`` = (h, w): bilinear for the image, nearest for the label."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image, label
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    if label is not None and label.ndim == 3:  # several label maps stacked on the last axis
        label = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(label[..., c])).resize((w, h), Image.NEAREST))
                          for c in range(label.shape[-1])], -1)
    elif label is not None:
        label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
    return image, label


def shorter_side_size(shape: tuple[int, int], shorter: int) -> tuple[int, int]:
    """(h, w) with the shorter side equal to ``shorter``, aspect ratio kept."""
    h, w = shape
    s = shorter / min(h, w)
    return max(1, int(round(h * s))), max(1, int(round(w * s)))


def random_scale_crop_flip(
    image: np.ndarray,
    label: np.ndarray,
    rng: np.random.Generator,
    crop: tuple[int, int],
    scale_range: tuple[float, float],
    flip: bool,
    ignore_index: int = 255,
) -> tuple[np.ndarray, np.ndarray]:
    """Random rescale, pad to at least ``crop`` (label padded with ignore), crop, flip.

    Shape:
        image (H, W, 3) uint8, label (H, W) or (H, W, C) uint8 -> (ch, cw, 3), (ch, cw[, C]).
    """
    s = float(rng.uniform(scale_range[0], scale_range[1]))
    h, w = label.shape[:2]
    image, label = resize_pair(image, label, (max(1, int(round(h * s))), max(1, int(round(w * s)))))
    ch, cw = crop
    h, w = label.shape[:2]
    pad_h, pad_w = max(0, ch - h), max(0, cw - w)
    if pad_h or pad_w:
        # Pad the image with its mean colour (zero after normalisation) and the label with ignore.
        fill = image.reshape(-1, 3).mean(0).astype(np.uint8)
        padded = np.empty((h + pad_h, w + pad_w, 3), np.uint8)
        padded[:] = fill
        padded[:h, :w] = image
        image = padded
        widths = ((0, pad_h), (0, pad_w)) + ((0, 0),) * (label.ndim - 2)
        label = np.pad(label, widths, constant_values=ignore_index)
        h, w = label.shape[:2]
    y = int(rng.integers(0, h - ch + 1))
    x = int(rng.integers(0, w - cw + 1))
    image, label = image[y : y + ch, x : x + cw], label[y : y + ch, x : x + cw]
    if flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(label)


def to_tensor(image: np.ndarray, normalize: Literal["imagenet", "caffe"] = "imagenet") -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, normalised as the initial weights expect."""
    x = image.astype(np.float32)
    if normalize == "caffe":
        x = x[:, :, ::-1] - CAFFE_MEAN_BGR
    else:
        x = (x / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def denormalize(image: torch.Tensor, normalize: Literal["imagenet", "caffe"] = "imagenet") -> np.ndarray:
    """Inverse of :func:`to_tensor`: (3, H, W) float -> (H, W, 3) uint8 RGB (for pictures)."""
    x = image.detach().float().cpu().numpy().transpose(1, 2, 0)
    if normalize == "caffe":
        x = (x + CAFFE_MEAN_BGR)[:, :, ::-1]
    else:
        x = (x * IMAGENET_STD + IMAGENET_MEAN) * 255.0
    return np.clip(x, 0, 255).astype(np.uint8)
