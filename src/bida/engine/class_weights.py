"""The source cross-entropy's class weights (``loss.class_weights``), counted once per run.

The class pixels of the source training labels are counted once, when a run starts, into
the run directory's ``rare_class_stats.json`` (the counts rare-class sampling and the
round-0 pseudo labels read too): a resumed run reads them back instead of reading every
label again (GTA5: 25k files).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..data.datasets import build_train_dataset
from ..data.rare_class import cached_class_pixel_counts
from ..method.losses import inverse_sqrt_frequency_weights
from .stop import StopControl, _Stopping


def source_class_weights(cfg: Config, src, num_classes: int, run_dir: Path, stop: StopControl,
                         device: torch.device) -> torch.Tensor | None:
    """The (K,) weights of ``loss.class_weights`` on ``device``, or None for ``none``.

    ``src``: the source domain; ``run_dir``: where the counts are cached. Rank 0 counts
    (stoppable, as rare-class sampling's count), the other ranks read its counts.
    """
    if cfg.loss.class_weights == "none":
        return None
    src_ds = build_train_dataset(cfg, src, cfg.data.source.train_split, require_labels=True)
    counts = None
    try:
        counts = stop.on_rank0(lambda check_stop: cached_class_pixel_counts(
            src_ds, num_classes, run_dir, check_stop=check_stop, quiet=cfg.train.quiet))
    except _Stopping:
        stop.check(True)
    if counts is None:  # another rank: rank 0 wrote them
        counts = cached_class_pixel_counts(src_ds, num_classes, run_dir)
    return inverse_sqrt_frequency_weights(torch.from_numpy(counts.sum(0))).to(device)
