"""The round-label cache: the static pseudo labels of each self-training round.

Each round first labels the target training set with the current model, on rank 0, into
``pseudo_labels/round_R`` (a stopped pass continues from its finished images); runs that
adapt from one checkpoint share round 0's labels through ``label_cache``
(:func:`shared_round_labels`). The label generator and the dataset builder are passed in by
the loop (:mod:`bida.engine.train`).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ..config import to_dict
from ..data.datasets import build_eval_dataset
from ..data.rare_class import cached_class_pixel_counts
from ..errors import DataError
from .run_dir import _copy_dir
from .runlog import log_has
from .schedules import Phase
from .stop import _Stopping


def target_labels_dir(trainer, phase: Phase, generate_static_labels, build_train_dataset) -> Path | None:
    """The static labels of round ``phase`` (None: a phase without them), generated or loaded.

    ``generate_static_labels`` and ``build_train_dataset``: those of :mod:`bida.round_labels` and
    :mod:`bida.data.datasets`, as the loop calls them.
    """
    if phase.kind != "round" or trainer.cfg.method.name not in ("self_training", "bida"):
        return None
    out = trainer.run_dir / "pseudo_labels" / f"round_{phase.round}"

    def label(check_stop) -> None:  # rank 0 only
        t = trainer.cfg.data.target
        full = build_eval_dataset(trainer.cfg, trainer.tgt, t.train_split, require_labels=False, limit=False)
        shared = shared_round_labels(trainer, phase)
        loaded = (out / "stats.json").is_file() or (shared is not None and (shared / "stats.json").is_file())
        if shared is not None and (shared / "stats.json").is_file() and not (out / "stats.json").is_file():
            _copy_dir(shared, out)
            trainer._info(f"round {phase.round}: loading static pseudo labels of round {phase.round} "
                       f"shared by runs from the same checkpoint ({shared})")
        elif (out / "stats.json").is_file():  # written before a stop: read, not generated again
            trainer._info(f"round {phase.round}: loading static pseudo labels of round {phase.round} from {out}")
        elif out.with_name(out.name + ".tmp").is_dir():
            trainer._info(f"round {phase.round}: continuing the static pseudo labels of {len(full)} target images")
        else:
            trainer._info(f"round {phase.round}: generating static pseudo labels for {len(full)} target images")
        start = time.perf_counter()
        try:
            source_pixels = None
            if not (out / "stats.json").is_file():  # classes the source never labels get no pseudo label
                src_ds = build_train_dataset(trainer.cfg, trainer.src, trainer.cfg.data.source.train_split, require_labels=True)
                source_pixels = cached_class_pixel_counts(src_ds, trainer.num_classes, trainer.run_dir, check_stop=check_stop,
                                                          quiet=trainer.cfg.train.quiet).sum(0)
            stats = generate_static_labels(trainer.model, full, trainer.cfg, out, trainer.classes.names,
                                           seed=trainer.cfg.seed + phase.round, device=trainer.device,
                                           quiet=trainer.cfg.train.quiet, check_stop=check_stop,
                                           source_pixels=source_pixels)
        except DataError as err:  # a bad target image: last.pt is this phase's start
            raise trainer._bad_file(err) from None
        if shared is not None and not (shared / "stats.json").is_file():
            _copy_dir(out, shared)
        speed = {} if loaded else {"time/pseudo_label_images_per_s": len(full) / max(time.perf_counter() - start, 1e-9)}
        logged = log_has(trainer.run_dir, lambda rec: rec.get("round") == phase.round and "pseudo/static_accuracy" in rec)
        if not logged:  # a resumed round kept its record in the log
            trainer.logger.log({"round": phase.round, **speed,
                             "pseudo/static_accuracy": stats["accuracy"],
                             "pseudo/static_coverage": stats["coverage"],
                             "pseudo/static_labelled_fraction": stats["labelled_fraction"],
                             "pseudo/per_class": stats["per_class"]}, trainer.step)

    trainer.dist.average_bn_statistics(trainer.model)  # rank 0 labels with the model of every rank
    try:  # last.pt is this phase's start: a stop here resumes the pass from its finished images
        trainer.stop.on_rank0(label)
    except _Stopping:
        trainer.stop.check(True)
    return out


def shared_round_labels(trainer, phase: Phase) -> Path | None:
    """Where round-0 labels live in ``label_cache``, keyed by everything they depend on.

    Round 0 labels the target with the init checkpoint itself, so runs that start from
    the same checkpoint file with the same seed, data, model, evaluation and pseudo-label
    settings get the same labels; they differ only from round 1 on.
    """
    if trainer.label_cache is None or phase.round != 0 or not trainer.cfg.model.init_checkpoint:
        return None
    digest = hashlib.sha256()
    from ..models.weights import weights_file

    with open(weights_file(trainer.cfg.model.init_checkpoint), "rb") as fh:  # a model folder: its weights
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    cfg = to_dict(trainer.cfg)
    key = {"checkpoint": digest.hexdigest(), "seed": trainer.cfg.seed, "data": cfg["data"], "eval": cfg["eval"],
           "pseudo": cfg["pseudo"], "model": {k: v for k, v in cfg["model"].items() if k != "init_checkpoint"}}
    name = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return trainer.label_cache / f"round_0-{name}"
