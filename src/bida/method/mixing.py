"""ClassMix of source onto target, with colour jitter and Gaussian blur (DAFormer's strong view).

Every function works on whole batches of device tensors and draws its randomness from an
explicit ``torch.Generator`` on the tensors' device: no Python loop over samples or classes,
no host synchronisation, and a run that restores the generator's state draws the same masks
and augmentations again.

Under torchrun every rank draws the random numbers of the whole global batch from its
identically seeded generator and keeps the rows of its own slice (:func:`global_rand`): a
sample's mask and augmentation depend on its place in the global batch, not on the number
of processes, and the generators stay equal on every rank.

Strengths follow DAFormer (colour jitter of strength 0.2 applied with probability 0.8,
Gaussian blur with sigma in [0.15, 1.15] applied with probability 0.5), decided per sample
here rather than once per batch. VFM-UDA's weak jitter (``data.weak_jitter``,
:meth:`ClassMix.weak_jitter`) is the same jitter with its own strengths, a multiplicative
brightness (torchvision's ``ColorJitter``) and probability 0.9, drawn from the same generator.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.transforms import CAFFE_MEAN_BGR, IMAGENET_MEAN, IMAGENET_STD

IGNORE = 255
JITTER_STRENGTH = 0.2  # brightness, contrast, saturation and hue (DAFormer: color_jitter_s)
JITTER_PROB = 0.8  # DAFormer applies jitter when U(0, 1) > color_jitter_p = 0.2
BLUR_PROB = 0.5
BLUR_SIGMA = (0.15, 1.15)
# VFM-UDA's weak jitter (torchvision ColorJitter(brightness=32/255, contrast=0.5,
# saturation=0.5, hue=18/360) applied with probability 0.9 per image): the brightness is a
# factor in 1 +- 32/255 there (torchvision multiplies), the hue a shift of up to 0.05 turn.
WEAK_JITTER_STRENGTHS = (32 / 255, 0.5, 0.5, 18 / 360)  # brightness, contrast, saturation, hue
WEAK_JITTER_PROB = 0.9
WEAK_DRAWS = 5  # uniform numbers :meth:`ClassMix.weak_jitter` reads per sample: [jitter?, 4 factors]


def global_rand(rows: int, *size: int, generator: torch.Generator, device: torch.device | str,
                rank: int = 0, world_size: int = 1) -> Tensor:
    """Uniform numbers for this rank's ``rows`` rows of a global batch of ``rows * world_size``.

    Every rank draws the whole global batch's numbers and keeps rows
    ``[rank * rows, (rank + 1) * rows)``: row i of the global batch gets the same numbers
    whatever the number of processes, and every rank's generator advances alike. One
    process (``world_size`` 1) draws exactly ``torch.rand(rows, *size)``.

    Shape:
        - output: (rows, *size) float32
    """
    u = torch.rand(rows * world_size, *size, generator=generator, device=device)
    return u[rank * rows:(rank + 1) * rows] if world_size > 1 else u


def class_mix_masks(labels_src: Tensor, num_classes: int, generator: torch.Generator,
                    ignore_index: int = IGNORE, rank: int = 0, world_size: int = 1) -> Tensor:
    """Per image, the pixels of a random half of the classes present in its source label.

    Of the n classes present in an image (ignore excluded), ceil(n / 2) are chosen uniformly
    without replacement, as ClassMix and DAFormer do; the mask is True on their pixels.
    ``rank`` and ``world_size``: the images are this rank's slice of a global batch, and
    their draws that slice's rows (:func:`global_rand`).

    Shape:
        - labels_src: (B, H, W) class ids or ``ignore_index``
        - output: (B, H, W) bool
    """
    b = labels_src.shape[0]
    ids = torch.where(labels_src == ignore_index, torch.full_like(labels_src, num_classes), labels_src).long()
    flat = ids.reshape(b, -1)
    present = torch.zeros(b, num_classes + 1, dtype=torch.bool, device=labels_src.device)
    present.scatter_(1, flat, True)
    present = present[:, :num_classes]
    scores = global_rand(b, num_classes, generator=generator, device=labels_src.device, rank=rank,
                         world_size=world_size)
    scores = torch.where(present, scores, torch.full_like(scores, 2.0))  # absent classes rank last
    rank = scores.argsort(1).argsort(1)
    n_choose = (present.sum(1, keepdim=True) + 1) // 2
    chosen = present & (rank < n_choose)
    chosen = torch.cat([chosen, torch.zeros_like(chosen[:, :1])], 1)  # the ignore column is never chosen
    return chosen.gather(1, flat).reshape(labels_src.shape)


def batch_class_mix_masks(labels_src: Tensor, num_classes: int, generator: torch.Generator,
                          ignore_index: int = IGNORE, rank: int = 0, world_size: int = 1,
                          reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Per image, its pixels of a random half of the label values found in the whole batch.

    DAFormer's and MIC's rule (``get_class_masks``): the candidates are the n distinct values
    of the batch's source labels, ``ignore_index`` included when some pixel carries it; each
    image independently chooses ceil(n / 2) of them uniformly without replacement, and its
    mask is True on its own pixels of the chosen values (a chosen value the image lacks
    pastes nothing; a chosen ``ignore_index`` pastes unlabelled pixels, which the loss then
    ignores). ``rank``, ``world_size``: the images are this rank's slice of a global batch,
    their draws that slice's rows (:func:`global_rand`); ``reduce`` (distributed runs, a sum
    over processes) makes the candidates those of the global batch.

    Shape:
        - labels_src: (B, H, W) class ids in [0, num_classes) or ``ignore_index``
        - output: (B, H, W) bool
    """
    b = labels_src.shape[0]
    # the ignore label takes column num_classes: a candidate like any class
    ids = torch.where(labels_src == ignore_index, torch.full_like(labels_src, num_classes), labels_src).long()
    flat = ids.reshape(b, -1)
    present = torch.zeros(num_classes + 1, dtype=torch.bool, device=labels_src.device)
    present.scatter_(0, flat.reshape(-1), True)  # (K + 1,): the batch's distinct values
    if reduce is not None:
        present = reduce(present.long()) > 0
    scores = global_rand(b, num_classes + 1, generator=generator, device=labels_src.device, rank=rank,
                         world_size=world_size)
    scores = torch.where(present, scores, torch.full_like(scores, 2.0))  # absent values rank last
    order = scores.argsort(1).argsort(1)  # (B, K + 1): each image's own random order of the candidates
    chosen = present & (order < (present.sum() + 1) // 2)
    return chosen.gather(1, flat).reshape(labels_src.shape)


def mix(mask: Tensor, src: Tensor, tgt: Tensor) -> Tensor:
    """``src`` where ``mask``, ``tgt`` elsewhere; ``mask`` (B, H, W) broadcasts over channels."""
    m = mask if src.dim() == mask.dim() else mask[:, None]
    return torch.where(m, src, tgt)


_GRAY = (0.299, 0.587, 0.114)
# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane.
_RGB_TO_YIQ = torch.tensor(((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312)), dtype=torch.float64)
_CONSTANTS = {
    "caffe_mean": torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1),
    "imagenet_mean": torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
    "imagenet_std": torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
    "gray": torch.tensor(_GRAY).view(1, 3, 1, 1),
    "rgb_to_yiq": _RGB_TO_YIQ.float(),
    "yiq_to_rgb": torch.linalg.inv(_RGB_TO_YIQ).float(),
    "weak_jitter": torch.tensor(WEAK_JITTER_STRENGTHS),
}
_on_device: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}


def _const(name: str, like: Tensor) -> Tensor:
    """A constant on ``like``'s device and dtype, copied there once (a copy per step would wait for the device)."""
    key = (name, like.device, like.dtype)
    if key not in _on_device:
        _on_device[key] = _CONSTANTS[name].to(like.device, like.dtype)
    return _on_device[key]


def to_unit_rgb(x: Tensor, normalize: Literal["imagenet", "caffe"]) -> Tensor:
    """Network-normalised images (B, 3, H, W) -> RGB in [0, 1] (inverse of ``transforms.to_tensor``)."""
    if normalize == "caffe":
        return (x + _const("caffe_mean", x)).flip(1) / 255.0
    return x * _const("imagenet_std", x) + _const("imagenet_mean", x)


def from_unit_rgb(x: Tensor, normalize: Literal["imagenet", "caffe"]) -> Tensor:
    """Inverse of :func:`to_unit_rgb`."""
    if normalize == "caffe":
        return (x * 255.0).flip(1) - _const("caffe_mean", x)
    return (x - _const("imagenet_mean", x)) / _const("imagenet_std", x)


def color_jitter(rgb: Tensor, u: Tensor, strength: float | Tensor = JITTER_STRENGTH,
                 brightness: Literal["add", "mul"] = "add") -> Tensor:
    """Brightness, contrast, saturation and hue jitter of RGB images in [0, 1], per sample.

    ``u`` (B, 4) uniform in [0, 1) draws the four factors: brightness offset in
    [-s, s] (``brightness="add"``, DAFormer's strong view) or factor in [1 - s, 1 + s]
    (``"mul"``, torchvision's), contrast and saturation factors in [1 - s, 1 + s], hue rotation
    in [-s, s] turns (a rotation of the YIQ chroma plane, a linear stand-in for an HSV hue
    shift). ``strength``: one s for all four, or a (4,) tensor on ``u``'s device of
    (brightness, contrast, saturation, hue). Applied in that order, clamped to [0, 1] after each.

    Shape:
        - rgb: (B, 3, H, W); u: (B, 4); strength: () or (4,); output: (B, 3, H, W)
    """
    f = (2 * u - 1) * strength  # (B, 4) in [-s, s]
    view = (-1, 1, 1, 1)
    gray_w = _const("gray", rgb)
    if brightness == "mul":
        x = (rgb * (1 + f[:, 0]).view(view)).clamp(0, 1)
    else:
        x = (rgb + f[:, 0].view(view)).clamp(0, 1)
    gray_mean = (x * gray_w).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = ((x - gray_mean) * (1 + f[:, 1]).view(view) + gray_mean).clamp(0, 1)
    gray = (x * gray_w).sum(1, keepdim=True)
    x = ((x - gray) * (1 + f[:, 2]).view(view) + gray).clamp(0, 1)
    angle = f[:, 3] * 2 * math.pi
    cos, sin = angle.cos(), angle.sin()
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rot = torch.stack([torch.stack([one, zero, zero], -1), torch.stack([zero, cos, -sin], -1),
                       torch.stack([zero, sin, cos], -1)], -2)  # (B, 3, 3)
    m = _const("yiq_to_rgb", rgb) @ rot @ _const("rgb_to_yiq", rgb)  # (B, 3, 3) RGB -> RGB
    return torch.einsum("bij,bjhw->bihw", m, x).clamp(0, 1)


def blur_kernel_size(height: int) -> int:
    """DAFormer's odd kernel size: about a tenth of the image height."""
    c = math.ceil(0.1 * height)
    return int(math.floor(c - 0.5 + c % 2))


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with one sigma per sample (reflect padding).

    Shape:
        - x: (B, C, H, W); sigma: (B,); output: (B, C, H, W)
    """
    b, c, h, w = x.shape
    k = blur_kernel_size(h)
    r = k // 2
    pos = torch.arange(k, device=x.device, dtype=x.dtype) - r
    kern = torch.exp(-0.5 * (pos[None] / sigma[:, None].to(x.dtype)) ** 2)
    kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, k)
    y = x.reshape(1, b * c, h, w)
    pad_w, pad_h = min(r, w - 1), min(r, h - 1)  # reflect needs pad < size; tiny images blur less
    y = F.conv2d(F.pad(y, (pad_w, pad_w, 0, 0), mode="reflect"), kern[:, None, None, r - pad_w: r + pad_w + 1],
                 groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, pad_h, pad_h), mode="reflect"), kern[:, None, r - pad_h: r + pad_h + 1, None],
                 groups=b * c)
    return y.reshape(b, c, h, w)


STRONG_DRAWS = 7  # uniform numbers :func:`strong_augment` reads per sample


def strong_augment(img: Tensor, u: Tensor, normalize: Literal["imagenet", "caffe"]) -> Tensor:
    """Colour jitter (probability ``JITTER_PROB``) then blur (``BLUR_PROB``), per sample.

    The images are network-normalised; jitter and blur act on their RGB in [0, 1].

    Shape:
        - img: (B, 3, H, W); u: (B, 7) uniform in [0, 1): [jitter?, 4 jitter factors, blur?, sigma]
        - output: (B, 3, H, W), ``img``'s dtype
    """
    view = (-1, 1, 1, 1)
    rgb = to_unit_rgb(img.float(), normalize)
    rgb = torch.where((u[:, 0] < JITTER_PROB).view(view), color_jitter(rgb, u[:, 1:5]), rgb)
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[:, 6]
    rgb = torch.where((u[:, 5] < BLUR_PROB).view(view), gaussian_blur(rgb, sigma), rgb)
    return from_unit_rgb(rgb, normalize).to(img.dtype)


def weak_jitter(img: Tensor, u: Tensor, normalize: Literal["imagenet", "caffe"]) -> Tensor:
    """VFM-UDA's weak view: with probability ``WEAK_JITTER_PROB`` per sample, colour jitter of
    strengths ``WEAK_JITTER_STRENGTHS`` with a multiplicative brightness (torchvision's
    ``ColorJitter`` factors; its random order of the four and its HSV hue are not reproduced:
    the order is fixed and the hue a YIQ rotation, as :func:`color_jitter`).

    The images are network-normalised; the jitter acts on their RGB in [0, 1].

    Shape:
        - img: (B, 3, H, W); u: (B, 5) uniform in [0, 1): [jitter?, 4 jitter factors]
        - output: (B, 3, H, W), ``img``'s dtype
    """
    rgb = to_unit_rgb(img.float(), normalize)
    jittered = color_jitter(rgb, u[:, 1:5], _const("weak_jitter", u), brightness="mul")
    rgb = torch.where((u[:, 0] < WEAK_JITTER_PROB).view(-1, 1, 1, 1), jittered, rgb)
    return from_unit_rgb(rgb, normalize).to(img.dtype)


class ClassMix:
    """ClassMix with DAFormer's strong augmentation; owns the generator its draws come from.

    ``mixer(img_src, y_src, img_tgt, y_tgt, w_tgt)`` pastes a random half of each source
    image's classes onto its target partner and returns the jittered and blurred mixed
    images, their labels (source labels under the mask, target pseudo labels elsewhere)
    and pixel weights (1 under the mask, ``w_tgt`` elsewhere), and the mask.
    ``classes``: the candidates of each image's half, its own classes (``image``,
    :func:`class_mix_masks`) or the batch's label values (``batch``, DAFormer's,
    :func:`batch_class_mix_masks`).
    """

    def __init__(self, num_classes: int, normalize: Literal["imagenet", "caffe"], seed: int,
                 device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                 classes: Literal["image", "batch"] = "image"):
        if classes not in ("image", "batch"):
            raise ValueError(f"classes must be 'image' or 'batch', not {classes!r}")
        self.num_classes, self.normalize, self.classes = num_classes, normalize, classes
        self.rank, self.world_size = rank, world_size  # the batches are this slice of the global batch
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, img_src: Tensor, y_src: Tensor, img_tgt: Tensor, y_tgt: Tensor, w_tgt: Tensor,
                 reduce: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Shape: images (B, 3, H, W), labels (B, H, W), ``w_tgt`` () or (B, H, W) -> same shapes.

        ``reduce`` (distributed runs, a sum over processes): with ``classes="batch"``, the
        candidates are the global batch's.
        """
        g, rows = self.generator, {"rank": self.rank, "world_size": self.world_size}
        if self.classes == "batch":
            mask = batch_class_mix_masks(y_src, self.num_classes, g, reduce=reduce, **rows)
        else:
            mask = class_mix_masks(y_src, self.num_classes, g, **rows)
        img = mix(mask, img_src, img_tgt)
        labels = mix(mask, y_src, y_tgt)
        weight = torch.where(mask, torch.ones((), device=mask.device), w_tgt.float())
        # one draw for every random choice
        u = global_rand(img.shape[0], STRONG_DRAWS, generator=g, device=img.device, **rows)
        img = self.strong_augment(img, u)
        return img, labels, weight, mask

    def strong_augment(self, img: Tensor, u: Tensor) -> Tensor:
        """:func:`strong_augment` in this mixer's normalisation."""
        return strong_augment(img, u, self.normalize)

    def weak_jitter(self, img: Tensor) -> Tensor:
        """VFM-UDA's weak colour jitter (:func:`weak_jitter`), drawn from this mixer's generator
        (the global batch's rows, as the mix), so that a resumed run jitters alike.

        Shape:
            - img: (B, 3, H, W) network-normalised; output: (B, 3, H, W), ``img``'s dtype
        """
        u = global_rand(img.shape[0], WEAK_DRAWS, generator=self.generator, device=img.device,
                        rank=self.rank, world_size=self.world_size)
        return weak_jitter(img, u, self.normalize)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())
