"""Rare-class sampling of source images (DAFormer, ``data.rare_class_sampling``).

Each source image of a batch is drawn in two steps: a class c with probability
softmax((1 - f_c) / T) over the source pixel frequencies f (temperature
``data.rcs_temperature``; classes without a pixel are never drawn), then uniformly one of
the images holding more than ``data.rcs_min_pixels`` pixels of c. Its random crop is drawn
again (up to 10 times) until it holds more than ``rcs_min_crop_ratio x rcs_min_pixels``
pixels of c. Class pixel counts are read once from the source labels (full resolution)
and cached in the run directory.

The sampler is addressed by the batch position, as :class:`bida.data.datasets.InfiniteBatchSampler`:
every draw of batch t comes from a generator seeded with (seed, t, slot), so the sampler's
whole state is the batch position the checkpoint already records, a resumed run draws the
same images and crops, and ranks of a distributed run take disjoint slices of one stream.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..checkpoint import atomic_write_text
from .datasets import _STOP_SIGNALS, SegmentationDataset, _mix, ignore_stop_signals
from ..errors import ConfigError
from ..progress import progress_bar

STATS_FILE = "rare_class_stats.json"
MAX_RECROPS = 10  # DAFormer's bound on re-drawing a crop that misses the sampled class


def class_pixel_counts(dataset: SegmentationDataset, num_classes: int,
                       check_stop: Callable[[], None] | None = None, quiet: bool = True) -> np.ndarray:
    """(N, K) int64: pixels of each class in each image's label, before augmentation.

    ``check_stop`` is called before each label and may raise (a pending SIGTERM): the scan
    reads every source label at full resolution, minutes at real scale.
    """
    counts = np.zeros((len(dataset), num_classes), np.int64)
    for i in progress_bar(range(len(dataset)), desc="class pixel counts", disable=quiet, leave=False):
        if check_stop is not None:
            check_stop()
        _, label = dataset.load(i)
        label = label[..., 0] if label.ndim == 3 else label
        counts[i] = np.bincount(label.ravel(), minlength=256)[:num_classes]
    return counts


def cached_class_pixel_counts(dataset: SegmentationDataset, num_classes: int, run_dir: Path,
                              check_stop: Callable[[], None] | None = None, quiet: bool = True) -> np.ndarray:
    """:func:`class_pixel_counts`, read from ``run_dir/rare_class_stats.json`` when it lists the same images."""
    path = Path(run_dir) / STATS_FILE
    names = [s.name for s in dataset.samples]
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            if stored.get("samples") == names and stored.get("num_classes") == num_classes:
                return np.asarray(stored["pixels"], np.int64).reshape(len(names), num_classes)
        except (json.JSONDecodeError, KeyError, ValueError):
            pass  # unreadable cache: count again
    counts = class_pixel_counts(dataset, num_classes, check_stop, quiet)
    write_class_pixel_counts(dataset, counts, run_dir)
    return counts


def write_class_pixel_counts(dataset: SegmentationDataset, counts: np.ndarray, run_dir: Path) -> None:
    """Keep ``counts`` (:func:`class_pixel_counts` of ``dataset``) in ``run_dir/rare_class_stats.json``."""
    names = [s.name for s in dataset.samples]
    atomic_write_text(Path(run_dir) / STATS_FILE, json.dumps({"num_classes": int(counts.shape[1]), "samples": names,
                                                              "pixels": counts.tolist()}))


def class_probabilities(counts: np.ndarray, temperature: float) -> np.ndarray:
    """softmax((1 - f) / T) over the classes with pixels (0 for the others).

    Shape:
        - counts: (N, K) or (K,) pixel counts; output: (K,) float64 summing to 1
    """
    total = counts.reshape(-1, counts.shape[-1]).sum(0).astype(np.float64)
    present = total > 0
    if not present.any():
        raise ConfigError("data.rare_class_sampling: the source labels hold no labelled pixel")
    freq = total / total.sum()
    logits = np.where(present, (1.0 - freq) / temperature, -np.inf)
    logits = logits - logits[present].max()
    p = np.exp(logits)
    return p / p.sum()


class RareClassSampler:
    """Endless batches of ``(index, augmentation seed, class)`` drawn by rare-class sampling.

    Args:
        counts: (N, K) class pixel counts per image. temperature, min_pixels: as the config.
        batch_size: per process. seed: run seed. start: first batch index.
    """

    def __init__(self, counts: np.ndarray, temperature: float, min_pixels: int, batch_size: int, seed: int,
                 start: int = 0, rank: int = 0, world_size: int = 1, class_names: list[str] | None = None):
        self.probs = class_probabilities(counts, temperature)
        self.classes = np.flatnonzero(self.probs > 0)
        self.images = {int(c): np.flatnonzero(counts[:, c] > min_pixels) for c in self.classes}
        empty = [int(c) for c in self.classes if len(self.images[int(c)]) == 0]
        if empty:
            names = [class_names[c] if class_names else str(c) for c in empty]
            raise ConfigError(f"data.rcs_min_pixels: no source image holds more than {min_pixels} pixels of "
                              f"class(es) {', '.join(names)}; lower it")
        self.class_probs = self.probs[self.classes]
        self.batch_size, self.seed, self.start = batch_size, seed, start
        self.rank, self.world_size = rank, world_size

    def draw(self, position: int) -> tuple[int, int, int]:
        """(image index, augmentation seed, class) of one slot of the global stream."""
        rng = np.random.default_rng(_mix(self.seed, position, 23))
        c = int(rng.choice(self.classes, p=self.class_probs))
        images = self.images[c]
        return int(images[rng.integers(len(images))]), _mix(self.seed, position, 29), c

    def batch(self, t: int) -> list[tuple[int, int, int]]:
        first = (t * self.world_size + self.rank) * self.batch_size
        return [self.draw(p) for p in range(first, first + self.batch_size)]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        t = self.start
        while True:
            yield self.batch(t)
            t += 1


class RareClassCrops(Dataset):
    """Items ``(index, seed, class)``: the crop of ``(index, seed)``, re-drawn until it shows the class."""

    def __init__(self, dataset: SegmentationDataset, min_crop_pixels: float):
        self.dataset, self.min_crop_pixels = dataset, min_crop_pixels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        index, seed, c = key
        item = self.dataset[(index, seed)]
        for j in range(MAX_RECROPS):
            if self.min_crop_pixels <= 0 or int((item["label"] == c).sum()) > self.min_crop_pixels:
                break
            item = self.dataset[(index, _mix(seed, j, 31))]
        return item


def rare_class_loader(dataset: SegmentationDataset, counts: np.ndarray, cfg, seed: int, start: int,
                      rank: int = 0, world_size: int = 1, class_names: list[str] | None = None,
                      batch_size: int | None = None) -> Iterator[dict]:
    """An endless iterator of rare-class-sampled source batches starting at batch ``start``.

    ``batch_size``: images per process (default: this process's share of the global batch
    ``train.batch_size``); rank ``rank`` of ``world_size`` takes its slice of each global
    batch of ``batch_size * world_size``.
    """
    d = cfg.data
    batch_size = batch_size or cfg.train.batch_size // world_size
    sampler = RareClassSampler(counts, d.rcs_temperature, d.rcs_min_pixels, batch_size, seed,
                               start, rank, world_size, class_names)
    crops = RareClassCrops(dataset, d.rcs_min_crop_ratio * d.rcs_min_pixels)
    # Its own generator, as datasets.train_loader: iter() must not draw from the global
    # generator that a resume restores (stochastic depth reads it).
    loader = DataLoader(crops, batch_sampler=sampler, num_workers=d.num_workers,
                        persistent_workers=d.num_workers > 0, worker_init_fn=ignore_stop_signals,
                        generator=torch.Generator().manual_seed(seed))
    if d.num_workers == 0:
        return iter(loader)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)  # as datasets.train_loader
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)

