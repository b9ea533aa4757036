"""Segmentation datasets, domain resolution and the resumable infinite sampler.

A domain (``DomainConfig``) names a reader kind and a root; :func:`resolve_domain` turns it
into a concrete (kind, root) pair, generating the embedded synthetic pair on first use.
:class:`SegmentationDataset` reads samples with :mod:`bida.data.readers` and applies the joint
transforms. Training batches come from :class:`InfiniteBatchSampler`, whose position is a
single integer: a resumed or distributed run sees exactly the batches of a plain run.
"""

from __future__ import annotations

import hashlib
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..config import Config, DomainConfig
from ..errors import DataError
from ..labels import ClassInfo
from .listing import Sample, list_samples
from .readers import class_info, read_pair
from .synthetic import SyntheticSpec, ensure_synthetic
from .transforms import random_scale_crop_flip, resize_pair, shorter_side_size, to_tensor


@dataclass(frozen=True)
class Domain:
    """A resolved domain: reader kind, root directory and class information."""

    kind: str
    root: Path
    classes: ClassInfo
    resize: int | None = None  # shorter side of training images (data.<role>.resize, else data.resize)


def resolve_domain(cfg: Config, which: str) -> Domain:
    """The concrete domain behind ``data.source`` or ``data.target``."""
    dom: DomainConfig = getattr(cfg.data, which)
    if dom.kind == "synthetic":
        syn = cfg.data.synthetic
        spec = SyntheticSpec(num_train=syn.num_train, num_val=syn.num_val, height=syn.height, width=syn.width,
                             seed=syn.seed, num_test=syn.num_test)
        root = ensure_synthetic(spec, Path(syn.cache_dir) if syn.cache_dir else None) / (dom.synthetic_domain or which)
        kind = "folder"
    else:
        if not dom.root:
            raise DataError(f"data.{which}.root is not set (required for kind '{dom.kind}')")
        root, kind = Path(dom.root).expanduser(), dom.kind
        if not root.is_dir():
            raise DataError(f"data.{which}.root: dataset root {root} does not exist")
    resize = dom.resize if dom.resize is not None else cfg.data.resize
    return Domain(kind=kind, root=root, classes=class_info(kind, root), resize=resize)


def check_same_classes(src: Domain, tgt: Domain) -> ClassInfo:
    """Source and target must list the same classes; returns them."""
    if tuple(src.classes.names) != tuple(tgt.classes.names):
        raise DataError(
            f"source ({src.root}) and target ({tgt.root}) list different classes: "
            f"{list(src.classes.names)} vs {list(tgt.classes.names)}"
        )
    return src.classes


def pseudo_label_name(name: str) -> str:
    """File name of a sample's pseudo label (sample names may contain '/')."""
    return name.replace("/", "__") + ".png"


class SegmentationDataset(Dataset):
    """Images and labels of one domain split.

    Items are dicts: ``image`` (3, H, W) float32, ``label`` (H, W) int64 (all ignore when the
    sample has no label), ``valid`` (H, W) bool (False on the padding a crop larger than
    the rescaled image adds: no loss or prototype may read those pixels), ``index`` int;
    with ``pseudo_margins`` (training only) ``pseudo_keep`` (H, W) bool, False on the image's
    margins (marked before the crop) and on padding. Training items are addressed by ``(index, seed)``
    and augmented with an RNG made from that seed; evaluation items by a plain index.

    Args:
        samples: from :func:`bida.data.listing.list_samples`.
        kind: reader kind (label mapping).
        num_classes: labels outside [0, K) and not ignore are an error.
        train: apply random scale/crop/flip.
        label_dir: read labels from ``label_dir/<name>.png`` instead (pseudo labels).
    """

    def __init__(
        self,
        samples: list[Sample],
        kind: str,
        num_classes: int,
        *,
        train: bool,
        crop: tuple[int, int] = (512, 512),
        scale_range: tuple[float, float] = (1.0, 1.0),
        flip: bool = False,
        resize: int | None = None,
        normalize: str = "imagenet",
        ignore_index: int = 255,
        label_dir: Path | None = None,
        pseudo_margins: tuple[int, int, int, int] | None = None,
    ):
        self.samples = samples
        self.kind = kind
        self.num_classes = num_classes
        self.train = train
        self.crop, self.scale_range, self.flip = crop, scale_range, flip
        self.resize, self.normalize, self.ignore_index = resize, normalize, ignore_index
        self.label_dir = label_dir
        self.pseudo_margins = pseudo_margins if pseudo_margins and any(pseudo_margins) else None

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(image (H, W, 3) uint8, label (H, W) uint8) of a sample, before augmentation.

        With ``label_dir`` the label is (H, W, 2): the pseudo label and the true label
        (all ignore when the sample has none), augmented together.
        """
        sample = self.samples[index]
        image, label = read_pair(sample, self.kind, self.num_classes)
        if label is None:
            label = np.full(image.shape[:2], self.ignore_index, np.uint8)
        if self.label_dir is not None:
            path = self.label_dir / pseudo_label_name(sample.name)
            try:
                with Image.open(path) as im:
                    pseudo = np.asarray(im)
            except (OSError, SyntaxError, ValueError) as err:
                raise DataError(f"cannot read pseudo label {path}: {err}; remove {self.label_dir} "
                                "to label the round again") from None
            if pseudo.shape != image.shape[:2]:
                _, pseudo = resize_pair(image, pseudo, image.shape[:2])
            label = np.stack([pseudo, label], -1)
        return image, label

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, seed = (key, None) if isinstance(key, (int, np.integer)) else key
        image, label = self.load(int(index))
        maps = label if label.ndim == 3 else label[..., None]  # (H, W, C): label [, gt]
        if self.train:
            # One more map marks padding: 0 on image pixels, and the crop pads every map with
            # ignore, so after augmentation ``pad == ignore`` is exactly the padded area.
            maps = np.concatenate([maps, np.zeros(maps.shape[:2] + (1,), np.uint8)], -1)
            if self.resize:
                image, maps = resize_pair(image, maps, shorter_side_size(maps.shape[:2], self.resize))
            if self.pseudo_margins is not None:  # marked on the image, before the crop (HRDA's v2)
                maps = np.concatenate([maps[..., :-1], margin_map(maps.shape[:2], self.pseudo_margins), maps[..., -1:]], -1)
            rng = np.random.default_rng(seed)
            image, maps = random_scale_crop_flip(image, maps, rng, self.crop, self.scale_range, self.flip, self.ignore_index)
            valid, maps = maps[..., -1] != self.ignore_index, maps[..., :-1]
            if self.pseudo_margins is not None:  # padding (ignore) is outside the image: weight 0 too
                pseudo_keep, maps = maps[..., -1] == 0, maps[..., :-1]
        else:
            valid = np.ones(maps.shape[:2], bool)
        item = {"image": to_tensor(image, self.normalize), "index": int(index),
                "label": torch.from_numpy(maps[..., 0].astype(np.int64)),
                "valid": torch.from_numpy(np.ascontiguousarray(valid))}
        if maps.shape[-1] == 2:
            item["gt"] = torch.from_numpy(maps[..., 1].astype(np.int64))
        if self.train and self.pseudo_margins is not None:
            item["pseudo_keep"] = torch.from_numpy(np.ascontiguousarray(pseudo_keep))
        return item


def _mix(*values: int) -> int:
    """A stable 63-bit integer from a few integers (augmentation seeds)."""
    digest = hashlib.blake2b(np.array(values, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class InfiniteBatchSampler:
    """Endless batches of ``(index, augmentation seed)`` from per-epoch permutations.

    Position p of the global stream is image ``perm_e[p % n]`` of epoch ``e = p // n``; global
    batch t covers positions [t*B*W, (t+1)*B*W) and rank r takes its r-th slice of B. So a
    run resumed at batch t, or W processes with batch B, see exactly the images (and crops)
    that one process with batch W*B sees.

    Args:
        n: dataset size. batch_size: per process. seed: run seed. start: first batch index.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1):
        if n <= 0:
            raise DataError("cannot sample batches from an empty dataset")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.rank, self.world_size = start, rank, world_size
        self._perm_epoch, self._perm = -1, None

    def _perm_for(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 17))
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).numpy(), epoch
        return self._perm

    def batch(self, t: int) -> list[tuple[int, int]]:
        first = (t * self.world_size + self.rank) * self.batch_size
        out = []
        for p in range(first, first + self.batch_size):
            epoch, i = divmod(p, self.n)
            out.append((int(self._perm_for(epoch)[i]), _mix(self.seed, epoch, i)))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        t = self.start
        while True:
            yield self.batch(t)
            t += 1


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def ignore_stop_signals(worker_id: int) -> None:  # noqa: ARG001 - worker_init_fn API
    """DataLoader workers ignore SIGTERM/SIGINT and leave shutdown to the main process.

    SLURM, Kubernetes and ``timeout`` signal the whole process group: a worker that died
    first would make the main process fail inside its final save instead of stopping cleanly.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked by train_loader while forking


def close_loader(batches: Iterator[dict] | None) -> None:
    """Stop a training iterator's worker processes through the loader's own shutdown.

    Workers ignore SIGTERM (:func:`ignore_stop_signals`), so they must never be left for
    ``multiprocessing`` to terminate by signal at interpreter exit: that would wait forever.
    """
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def train_loader(dataset: SegmentationDataset, batch_size: int, seed: int, start: int, num_workers: int,
                 rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> Iterator[dict]:
    """An endless iterator of training batches starting at batch ``start``."""
    sampler = InfiniteBatchSampler(len(dataset), batch_size, seed, start, rank, world_size)
    # Its own generator: without one, every iter(loader) draws its base seed from the global
    # torch generator, and a resumed run (which builds its loaders after restoring that
    # generator) would draw different dropout and stochastic-depth masks than the run it continues.
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                        persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals,
                        generator=torch.Generator().manual_seed(seed))
    if num_workers == 0:
        return iter(loader)
    # Workers inherit the blocked mask, so a signal sent while they start stays pending until
    # ignore_stop_signals runs (then it is discarded); the main process gets its own on unblock.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def build_train_dataset(cfg: Config, domain: Domain, split: str, *, require_labels: bool,
                        label_dir: Path | None = None, target: bool = False) -> SegmentationDataset:
    """Augmented training crops of a split; ``target``: the target's, whose items carry
    ``pseudo_keep`` with ``pseudo.margins``."""
    samples = list_samples(domain.kind, domain.root, split, require_labels=require_labels)
    return SegmentationDataset(
        samples, domain.kind, domain.classes.num_classes, train=True, crop=tuple(cfg.data.crop),
        scale_range=tuple(cfg.data.scale_range), flip=cfg.data.flip, resize=domain.resize,
        normalize=cfg.data.normalize, ignore_index=domain.classes.ignore_index, label_dir=label_dir,
        pseudo_margins=tuple(cfg.pseudo.margins) if target else None,
    )


def margin_map(shape: tuple[int, int], margins: tuple[int, int, int, int]) -> np.ndarray:
    """1 on the [top, bottom, left, right] margins of an image of ``shape``, 0 inside.

    Shape:
        output: (H, W, 1) uint8
    """
    h, w = shape
    top, bottom, left, right = margins
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    inside = (rows >= top) & (rows < h - bottom) & (cols >= left) & (cols < w - right)
    return (~inside).astype(np.uint8)[..., None]


def build_eval_dataset(cfg: Config, domain: Domain, split: str, *, require_labels: bool = True,
                       limit: bool = True) -> SegmentationDataset:
    """Un-augmented images of a split; ``limit`` applies ``eval.max_images``."""
    samples = list_samples(domain.kind, domain.root, split, require_labels=require_labels)
    if limit and cfg.eval.max_images is not None:
        samples = samples[: cfg.eval.max_images]
    return SegmentationDataset(samples, domain.kind, domain.classes.num_classes, train=False,
                               normalize=cfg.data.normalize, ignore_index=domain.classes.ignore_index)
