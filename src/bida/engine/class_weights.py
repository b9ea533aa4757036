"""The source cross-entropy's class weights (``loss.class_weights``), counted once per run.

The class pixels of the source training labels are counted once, when a run starts, into
the run directory's ``rare_class_stats.json`` (the counts rare-class sampling and the
round-0 pseudo labels read too): a resumed run reads them back instead of reading every
label again (GTA5: 25k files).
"""

from __future__ import annotations

import torch

from ..data.datasets import build_train_dataset
from ..data.rare_class import cached_class_pixel_counts
from ..method.losses import inverse_sqrt_frequency_weights
from .stop import _Stopping


def source_class_weights(trainer) -> torch.Tensor | None:
    """The (K,) weights of ``loss.class_weights`` on the trainer's device, or None for ``none``.

    Rank 0 counts (stoppable, as rare-class sampling's count), the other ranks read its counts.
    """
    cfg = trainer.cfg
    if cfg.loss.class_weights == "none":
        return None
    src_ds = build_train_dataset(cfg, trainer.src, cfg.data.source.train_split, require_labels=True)
    counts = None
    try:
        counts = trainer.stop.on_rank0(lambda check_stop: cached_class_pixel_counts(
            src_ds, trainer.num_classes, trainer.run_dir, check_stop=check_stop, quiet=cfg.train.quiet))
    except _Stopping:
        trainer.stop.check(True)
    if counts is None:  # another rank: rank 0 wrote them
        counts = cached_class_pixel_counts(src_ds, trainer.num_classes, trainer.run_dir)
    return inverse_sqrt_frequency_weights(torch.from_numpy(counts.sum(0))).to(trainer.device)
