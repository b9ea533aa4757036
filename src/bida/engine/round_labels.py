"""Static pseudo labels y_F of a self-training round (class-balanced, docs/method.md section 3).

:class:`RoundLabels` gives each round of a run its labels: generated on rank 0 with the
current model into ``pseudo_labels/round_R`` (a stopped pass continues from its finished
images), read back when already there, and shared between runs that adapt from one
checkpoint (round 0, ``label_cache``).

Pass 1 predicts every target training image with the current model (scores upsampled to
the full label size), keeps each image's argmax and confidence in a temporary folder and a
bounded, seeded pixel subsample for the per-class thresholds. Pass 2 applies the union of
the class rule and the per-image rule and writes one uint8 PNG per image. Everything is
written under ``<out>.tmp`` and renamed to ``<out>`` when complete, so a crash never leaves
a half-written round behind; pass 1's per-image files survive a stop, so the pass resumes.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
import zipfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from ..checkpoint import atomic_write_bytes
from ..config import Config, to_dict
from ..data import datasets
from ..data.datasets import SegmentationDataset, pseudo_label_name
from ..data.rare_class import cached_class_pixel_counts
from ..errors import DataError
from ..method.pseudo_labels import class_thresholds, sample_confidences, static_labels
from .checkpointer import Checkpointer
from .distributed import DistContext
from .inference import confusion_matrix, predict_probs
from .run_dir import _copy_dir
from .runlog import RunLog, log_has
from .schedules import Phase
from .stop import StopControl, _Stopping
from ..progress import progress_bar

IGNORE = 255


def round_stats(conf_matrix: np.ndarray, labelled: np.ndarray, gt_pixels: np.ndarray, class_names: Sequence[str]) -> dict:
    """Coverage and accuracy per class from pseudo-label vs GT counts.

    Args:
        conf_matrix: (K, K) counts of (gt, pseudo) over pixels with both labels.
        labelled: (K,) pseudo-labelled pixels per predicted class (with or without GT).
        gt_pixels: (K,) GT pixels per class (0 when the target has no labels).
    """
    tp = np.diag(conf_matrix)
    per_class = {}
    for k, name in enumerate(class_names):
        per_class[name] = {
            "pixels": int(labelled[k]),
            "accuracy": float(tp[k] / conf_matrix[:, k].sum()) if conf_matrix[:, k].sum() else None,
            "coverage": float(conf_matrix[k].sum() / gt_pixels[k]) if gt_pixels[k] else None,
        }
    has_gt = gt_pixels.sum() > 0
    return {
        "accuracy": float(tp.sum() / conf_matrix.sum()) if conf_matrix.sum() else None,
        "coverage": float(conf_matrix.sum() / gt_pixels.sum()) if has_gt else None,
        "labelled_fraction": None,
        "per_class": per_class,
    }


def _load_raw_samples(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(sampled confidences, sampled classes, generator state after the image) of a finished image."""
    try:
        with np.load(path) as raw:
            return (torch.from_numpy(raw["sample_conf"]), torch.from_numpy(raw["sample_pred"]),
                    torch.from_numpy(raw["gen_state"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


@torch.no_grad()
def generate_static_labels(model: torch.nn.Module, dataset: SegmentationDataset, cfg: Config, out_dir: Path,
                           class_names: Sequence[str], seed: int, device: torch.device | str = "cpu",
                           quiet: bool = True, check_stop: Callable[[], None] | None = None,
                           source_pixels: np.ndarray | None = None) -> dict:
    """Write y_F for every image of ``dataset`` to ``out_dir`` and return statistics.

    ``dataset`` is the target training split without augmentation; its labels (when the
    target has any) are used only to measure pseudo-label accuracy and coverage.
    ``source_pixels``: (K,) labelled pixels of each class in the source training set
    (None: not known); a class without any is never pseudo-labelled, by either rule (its
    class threshold is +inf): the network never learnt it, so a prediction of it is noise
    (the official code sets SYNTHIA's thresholds of terrain, truck and train to 1).
    ``check_stop`` is called before each image of both passes and may raise (a pending
    SIGTERM): pass 1 keeps one finished file per image (written atomically, with the sampler's generator
    state), so a pass run again with the same model continues where it stopped and gives
    the same labels.
    """
    out_dir = Path(out_dir)
    if (out_dir / "stats.json").is_file():  # finished earlier (resumed run)
        return json.loads((out_dir / "stats.json").read_text())
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    (tmp / "raw").mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        stats = _two_passes(model, dataset, cfg, tmp, class_names, seed, device, quiet, check_stop, source_pixels)
    finally:
        model.train(was_training)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return stats


def _two_passes(model, dataset, cfg, tmp: Path, class_names, seed, device, quiet, check_stop, source_pixels) -> dict:
    k = len(class_names)
    gen = torch.Generator().manual_seed(seed)
    conf_samples, pred_samples = [], []
    for i in progress_bar(range(len(dataset)), desc="pseudo labels", disable=quiet, leave=False):
        raw_path = tmp / "raw" / f"{i}.npz"
        done = _load_raw_samples(raw_path) if raw_path.is_file() else None
        if done is not None:  # finished before a stop
            conf_samples.append(done[0])
            pred_samples.append(done[1])
            gen.set_state(done[2])
            continue
        if check_stop is not None:
            check_stop()
        item = dataset[i]
        probs = predict_probs(model, item["image"].unsqueeze(0).to(device), cfg.eval, k, tuple(item["label"].shape[-2:]))
        conf, pred = probs[0].max(0)  # (H, W)
        conf, pred = conf.cpu(), pred.cpu()
        c, p = sample_confidences(conf, pred, cfg.pseudo.max_pixels_per_image, gen)
        conf_samples.append(c)
        pred_samples.append(p)
        # Keep the true label (all ignore when absent) so pass 2 need not decode the image again.
        # Confidences stay float32: in fp16 everything above 0.9995 ties at 1.0, and the
        # class rule's top 10% would then keep every tied pixel (no class balance left).
        buf = io.BytesIO()
        np.savez(buf, conf=conf.float().numpy(), pred=pred.to(torch.uint8).numpy(),
                 gt=item["label"].to(torch.uint8).numpy(), sample_conf=c.numpy(), sample_pred=p.numpy(),
                 gen_state=gen.get_state().numpy())
        atomic_write_bytes(raw_path, buf.getvalue())  # a file under raw/ is always a finished image
    thresholds = class_thresholds(torch.cat(conf_samples), torch.cat(pred_samples), k, cfg.pseudo.class_fraction)
    allowed = None if source_pixels is None else torch.from_numpy(np.asarray(source_pixels) > 0)
    if allowed is not None:
        thresholds = torch.where(allowed, thresholds, torch.full_like(thresholds, float("inf")))

    cm = np.zeros((k, k), np.int64)
    labelled = np.zeros(k, np.int64)
    gt_pixels = np.zeros(k, np.int64)
    total_labelled, total_pixels = 0, 0
    for i in progress_bar(range(len(dataset)), desc="pseudo labels (write)", disable=quiet, leave=False):
        if check_stop is not None:  # pass 2 reads and writes every image too: stop within one
            check_stop()
        raw = np.load(tmp / "raw" / f"{i}.npz")
        conf = torch.from_numpy(raw["conf"]).float()[None]
        pred = torch.from_numpy(raw["pred"]).long()[None]
        y = static_labels(conf, pred, thresholds, cfg.pseudo.image_fraction,
                          labelled_classes=allowed)[0].numpy().astype(np.uint8)
        Image.fromarray(y).save(tmp / pseudo_label_name(dataset.samples[i].name))
        sel = y != IGNORE
        labelled += np.bincount(y[sel], minlength=k)[:k]
        total_labelled += int(sel.sum())
        total_pixels += y.size
        if dataset.samples[i].label is not None:
            gt = raw["gt"].astype(np.int64)
            valid = gt != IGNORE
            gt_pixels += np.bincount(gt[valid], minlength=k)[:k]
            # (gt, pseudo) counts over pixels that carry both labels
            both_gt = torch.from_numpy(np.where(sel, gt, IGNORE))
            cm += confusion_matrix(torch.from_numpy(y.astype(np.int64)), both_gt, k).numpy()
    shutil.rmtree(tmp / "raw")
    stats = round_stats(cm, labelled, gt_pixels, class_names)
    stats["labelled_fraction"] = total_labelled / max(1, total_pixels)
    stats["class_thresholds"] = {n: (None if not np.isfinite(t) else float(t)) for n, t in zip(class_names, thresholds.tolist())}
    stats["classes_without_source_pixels"] = [] if allowed is None else [
        n for n, ok in zip(class_names, allowed.tolist()) if not ok]
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


class RoundLabels:
    """The static pseudo labels of each self-training round of the run in ``run_dir``.

    Args:
        cfg: the run's config. model: the student that labels (the uncompiled module).
        classes: the run's classes. src, tgt: the source and target domains.
        log: the run log (one record of each round's label statistics).
        checkpointer: names the checkpoint to continue from when a target image is bad.
        dist, stop: the process group (rank 0 labels) and the stop control.
        device: where the model runs. info: prints a progress message.
        label_cache: where runs that adapt from one checkpoint share round 0 (None: not shared).
    """

    def __init__(self, run_dir: Path, cfg: Config, model: torch.nn.Module, classes, src, tgt, log: RunLog,
                 checkpointer: Checkpointer, dist: DistContext, stop: StopControl, device: torch.device,
                 info: Callable[[str], None], label_cache: Path | None = None):
        self.run_dir, self.cfg, self.model, self.classes, self.src, self.tgt = Path(run_dir), cfg, model, classes, src, tgt
        self.log, self.checkpointer, self.dist, self.stop, self.device, self.info = log, checkpointer, dist, stop, device, info
        self.label_cache = Path(label_cache) if label_cache is not None else None

    def for_phase(self, phase: Phase, step: int) -> Path | None:
        """The static labels of round ``phase`` (None: a phase without them), generated or loaded.

        ``step``: the run's step (the statistics' log record carries it).
        """
        cfg = self.cfg
        if phase.kind != "round" or cfg.method.name not in ("self_training", "bida"):
            return None
        out = self.run_dir / "pseudo_labels" / f"round_{phase.round}"

        def label(check_stop) -> None:  # rank 0 only
            t = cfg.data.target
            full = datasets.build_eval_dataset(cfg, self.tgt, t.train_split, require_labels=False, limit=False)
            shared = self.shared(phase)
            loaded = (out / "stats.json").is_file() or (shared is not None and (shared / "stats.json").is_file())
            if shared is not None and (shared / "stats.json").is_file() and not (out / "stats.json").is_file():
                _copy_dir(shared, out)
                self.info(f"round {phase.round}: loading static pseudo labels of round {phase.round} "
                          f"shared by runs from the same checkpoint ({shared})")
            elif (out / "stats.json").is_file():  # written before a stop: read, not generated again
                self.info(f"round {phase.round}: loading static pseudo labels of round {phase.round} from {out}")
            elif out.with_name(out.name + ".tmp").is_dir():
                self.info(f"round {phase.round}: continuing the static pseudo labels of {len(full)} target images")
            else:
                self.info(f"round {phase.round}: generating static pseudo labels for {len(full)} target images")
            start = time.perf_counter()
            try:
                source_pixels = None
                if not (out / "stats.json").is_file():  # classes the source never labels get no pseudo label
                    src_ds = datasets.build_train_dataset(cfg, self.src, cfg.data.source.train_split, require_labels=True)
                    source_pixels = cached_class_pixel_counts(src_ds, self.classes.num_classes, self.run_dir,
                                                              check_stop=check_stop, quiet=cfg.train.quiet).sum(0)
                stats = generate_static_labels(self.model, full, cfg, out, self.classes.names,
                                               seed=cfg.seed + phase.round, device=self.device,
                                               quiet=cfg.train.quiet, check_stop=check_stop,
                                               source_pixels=source_pixels)
            except DataError as err:  # a bad target image: last.pt is this phase's start
                raise self.checkpointer.bad_file(err) from None
            if shared is not None and not (shared / "stats.json").is_file():
                _copy_dir(out, shared)
            speed = {} if loaded else {"time/pseudo_label_images_per_s": len(full) / max(time.perf_counter() - start, 1e-9)}
            logged = log_has(self.run_dir, lambda rec: rec.get("round") == phase.round and "pseudo/static_accuracy" in rec)
            if not logged:  # a resumed round kept its record in the log
                self.log.log({"round": phase.round, **speed,
                              "pseudo/static_accuracy": stats["accuracy"],
                              "pseudo/static_coverage": stats["coverage"],
                              "pseudo/static_labelled_fraction": stats["labelled_fraction"],
                              "pseudo/per_class": stats["per_class"]}, step)

        self.dist.average_bn_statistics(self.model)  # rank 0 labels with the model of every rank
        try:  # last.pt is this phase's start: a stop here resumes the pass from its finished images
            self.stop.on_rank0(label)
        except _Stopping:
            self.stop.check(True)
        return out

    def shared(self, phase: Phase) -> Path | None:
        """Where round-0 labels live in ``label_cache``, keyed by everything they depend on.

        Round 0 labels the target with the init checkpoint itself, so runs that start from
        the same checkpoint file with the same seed, data, model, evaluation and pseudo-label
        settings get the same labels; they differ only from round 1 on.
        """
        if self.label_cache is None or phase.round != 0 or not self.cfg.model.init_checkpoint:
            return None
        from ..models.weights import weights_file

        digest = hashlib.sha256()
        with open(weights_file(self.cfg.model.init_checkpoint), "rb") as fh:  # a model folder: its weights
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        cfg = to_dict(self.cfg)
        key = {"checkpoint": digest.hexdigest(), "seed": self.cfg.seed, "data": cfg["data"], "eval": cfg["eval"],
               "pseudo": cfg["pseudo"], "model": {k: v for k, v in cfg["model"].items() if k != "init_checkpoint"}}
        name = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.label_cache / f"round_0-{name}"
