"""Pixel features of both domains, for the report's feature-space view.

:func:`sample_features` runs a model over a few labelled images of each domain and keeps
a class-balanced random sample of pixel features at the feature resolution, together with
the per-domain class prototypes computed from *every* labelled pixel it saw (not only the
sampled ones). :func:`prototype_distances` compares the two prototype sets per class.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..method.prototypes import class_sums, downsample_labels, prototypes_from_sums

SOURCE, TARGET = 0, 1  # values of the ``domain`` array returned by sample_features


class _SmallestKeys:
    """Reservoir of the ``size`` rows with the smallest random keys: a uniform sample
    without replacement of every row ever offered, in bounded memory."""

    def __init__(self, size: int):
        self.size = size
        self.keys = np.zeros(0)
        self.rows: np.ndarray | None = None

    def offer(self, rows: np.ndarray, rng: np.random.Generator) -> None:
        keys = np.concatenate([self.keys, rng.random(len(rows))])
        rows = rows if self.rows is None else np.concatenate([self.rows, rows])
        keep = np.argsort(keys, kind="stable")[: self.size]
        self.keys, self.rows = keys[keep], rows[keep]

    def take(self, n: int) -> np.ndarray:
        """The ``n`` rows with the smallest keys (all rows if fewer)."""
        return self.rows[:n] if self.rows is not None else np.zeros((0, 0), np.float32)


@torch.no_grad()
def _domain_features(model: torch.nn.Module, dataset, num_classes: int, budget: int, max_images: int,
                     domain: str, ignore_index: int, rng: np.random.Generator,
                     device: torch.device | str) -> tuple[list[_SmallestKeys], Tensor, Tensor]:
    """Per-class reservoirs of at most ``budget`` features, and the class sums and counts."""
    reservoirs = [_SmallestKeys(budget) for _ in range(num_classes)]
    sums, counts = None, torch.zeros(num_classes)
    for i in range(min(len(dataset), max_images)):
        item = dataset[i]
        x = item["image"].unsqueeze(0).to(device)  # (1, 3, H, W)
        feats = model(x, domain).features.float()  # (1, D, h, w)
        labels = downsample_labels(item["label"].unsqueeze(0).to(device), tuple(feats.shape[-2:]))  # (1, h, w)
        # Images may differ in size, so they cannot share one batch: accumulate sums and
        # counts and divide once, which is class_prototypes over all the images together.
        s, c = class_sums(feats, labels, num_classes, ignore_index)
        sums = s.cpu() if sums is None else sums + s.cpu()
        counts += c.cpu()
        flat = feats[0].flatten(1).T.cpu().numpy()  # (h*w, D)
        flat_labels = labels[0].flatten().cpu().numpy()
        for k in np.unique(flat_labels):
            if 0 <= k < num_classes:
                reservoirs[k].offer(flat[flat_labels == k], rng)
    if sums is None:
        sums = torch.zeros(num_classes, getattr(model, "feature_dim", 0))
    return reservoirs, sums, counts


def sample_features(model: torch.nn.Module, src_ds, tgt_ds, num_classes: int, max_points: int = 1500,
                    device: torch.device | str = "cpu", max_images: int = 16, ignore_index: int = 255,
                    seed: int = 0) -> dict:
    """A class-balanced sample of pixel features from both domains, and their prototypes.

    Each domain gets ``max_points // 2`` points, split evenly over the classes present in
    its first ``max_images`` images; a class with fewer pixels than its share keeps all of
    them (the share is not handed to other classes, so the sample stays balanced). Labels
    are the ground truth of both datasets, brought to the feature size with
    :func:`~bida.prototypes.downsample_labels`.

    Args:
        model: A segmentation network returning ``.features`` (put in eval mode here).
        src_ds, tgt_ds: Labelled evaluation datasets (items with ``image`` and ``label``).
        num_classes: K.
        max_points: Upper bound on the number of sampled points over both domains.
        device: Where the model runs.
        max_images: Images read per domain.
        ignore_index: Label value of unlabelled pixels.
        seed: Seed of the random sampling.

    Returns:
        ``{"features": (N, D) float32, "labels": (N,) int64, "domain": (N,) int64 (0 source,
        1 target), "prototypes_src" / "prototypes_tgt": (K, D) float32, "present_src" /
        "present_tgt": (K,) bool}`` (numpy arrays), N <= max_points.
    """
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(seed)
    out: dict = {"features": [], "labels": [], "domain": []}
    for code, name, ds in ((SOURCE, "source", src_ds), (TARGET, "target", tgt_ds)):
        budget = max_points // 2
        pooled, sums, counts = _domain_features(model, ds, num_classes, budget, max_images, name,
                                                ignore_index, rng, device)
        protos, present = prototypes_from_sums(sums, counts)
        suffix = "src" if code == SOURCE else "tgt"
        out[f"prototypes_{suffix}"] = protos.numpy().astype(np.float32)
        out[f"present_{suffix}"] = present.numpy()
        classes = [k for k in range(num_classes) if pooled[k].rows is not None]
        quota = budget // len(classes) if classes else 0
        for k in classes:
            rows = pooled[k].take(quota)
            out["features"].append(rows)
            out["labels"].append(np.full(len(rows), k, np.int64))
            out["domain"].append(np.full(len(rows), code, np.int64))
    model.train(was_training)
    dim = out["prototypes_src"].shape[1]
    for key, empty in (("features", np.zeros((0, dim), np.float32)), ("labels", np.zeros(0, np.int64)),
                       ("domain", np.zeros(0, np.int64))):
        out[key] = np.concatenate(out[key]).astype(empty.dtype) if out[key] else empty
    return out


def prototype_distances(prototypes_src: np.ndarray | Tensor, present_src: np.ndarray | Tensor,
                        prototypes_tgt: np.ndarray | Tensor, present_tgt: np.ndarray | Tensor) -> np.ndarray:
    """Cosine distance ``1 - cos`` between the source and target prototype of each class.

    Returns:
        (K,) float64 in [0, 2]; NaN where the class is absent from either domain.

    Shape:
        - prototypes_src, prototypes_tgt: (K, D)
        - present_src, present_tgt: (K,)

    Examples:
        >>> p = np.eye(3, dtype=np.float32)
        >>> prototype_distances(p, np.ones(3, bool), -p, np.array([True, True, False])).tolist()[:2]
        [2.0, 2.0]
    """
    src = torch.as_tensor(np.asarray(prototypes_src), dtype=torch.float64)
    tgt = torch.as_tensor(np.asarray(prototypes_tgt), dtype=torch.float64)
    cos = F.cosine_similarity(src, tgt, dim=1).clamp(-1.0, 1.0)
    both = torch.as_tensor(np.asarray(present_src), dtype=torch.bool) & torch.as_tensor(np.asarray(present_tgt), dtype=torch.bool)
    return torch.where(both, 1.0 - cos, torch.full_like(cos, float("nan"))).numpy()


def prototype_alignment(prototypes_src: np.ndarray | Tensor, present_src: np.ndarray | Tensor,
                        prototypes_tgt: np.ndarray | Tensor, present_tgt: np.ndarray | Tensor) -> dict:
    """How well each target prototype finds its own class among the source prototypes.

    Raw cosine distances are not comparable across runs: on class-score features a shared
    component dominates every cosine, and a method that makes classes more distinct also
    moves each class's two prototypes apart in absolute terms. Two relative measures are:

    - margin of class c: ``cos(rho_T^c, rho_S^c) - max_{c' != c} cos(rho_T^c, rho_S^c')``
      (> 0: the target prototype is closer to its own source class than to any other);
    - nearest-own: whether the nearest source prototype of ``rho_T^c`` is ``rho_S^c``.

    Only classes present in both domains count; the other source prototypes present still
    compete as "other classes".

    Returns:
        ``{"margin": (K,) float64 (NaN where absent), "nearest_own": (K,) float64 (1/0,
        NaN where absent), "mean_margin": float, "nearest_own_share": float,
        "num_classes": int}``; the two summaries are NaN when no class is in both domains.

    Shape:
        - prototypes_src, prototypes_tgt: (K, D)
        - present_src, present_tgt: (K,)

    Examples:
        >>> p = np.eye(3, dtype=np.float32)
        >>> a = prototype_alignment(p, np.ones(3, bool), p + 0.1, np.ones(3, bool))
        >>> a["nearest_own_share"], round(a["mean_margin"], 3)
        (1.0, 0.99)
    """
    src = F.normalize(torch.as_tensor(np.asarray(prototypes_src), dtype=torch.float64), dim=1)
    tgt = F.normalize(torch.as_tensor(np.asarray(prototypes_tgt), dtype=torch.float64), dim=1)
    p_src = torch.as_tensor(np.asarray(present_src), dtype=torch.bool)
    p_tgt = torch.as_tensor(np.asarray(present_tgt), dtype=torch.bool)
    k = src.shape[0]
    cos = tgt @ src.T  # (K target, K source)
    own = cos.diagonal()
    others = cos.masked_fill(torch.eye(k, dtype=torch.bool) | ~p_src[None, :], float("-inf"))
    best_other = others.max(dim=1).values  # -inf when no other source class is present
    both = p_src & p_tgt
    nan = torch.full((k,), float("nan"), dtype=torch.float64)
    margin = torch.where(both & torch.isfinite(best_other), own - best_other, nan)
    nearest_own = torch.where(both, (own > best_other).double(), nan)
    n = int(both.sum())
    return {
        "margin": margin.numpy(), "nearest_own": nearest_own.numpy(),
        "mean_margin": float(np.nanmean(margin.numpy())) if torch.isfinite(margin).any() else float("nan"),
        "nearest_own_share": float(np.nanmean(nearest_own.numpy())) if n else float("nan"),
        "num_classes": n,
    }


def run_alignment(run_dir, device: torch.device | str = "cpu", max_images: int = 32) -> dict:
    """Prototype alignment of a run's last checkpoint on source train and target val labels.

    Prototypes come from the ground truth of the first ``max_images`` images of each
    domain (source train split, target val split), at the feature resolution.

    Returns:
        ``{"mean_margin", "nearest_own_share", "num_classes", "per_class_margin": {name: value}}``
        (values None where a class is absent), or ``{}`` when the target has no labelled val split.
    """
    from pathlib import Path

    from ..data.datasets import build_eval_dataset, resolve_domain
    from .predict import model_from_checkpoint

    run_dir = Path(run_dir)
    model, cfg, names = model_from_checkpoint(run_dir / "checkpoints" / "last.pt", device=device)[:3]
    if not cfg.data.target.val_split:
        return {}
    dom_src, dom_tgt = resolve_domain(cfg, "source"), resolve_domain(cfg, "target")
    src_ds = build_eval_dataset(cfg, dom_src, cfg.data.source.train_split, limit=False)
    tgt_ds = build_eval_dataset(cfg, dom_tgt, cfg.data.target.val_split, limit=False)
    with torch.no_grad():
        s = sample_features(model, src_ds, tgt_ds, len(names), max_points=0, device=device, max_images=max_images,
                            ignore_index=dom_tgt.classes.ignore_index)
    a = prototype_alignment(s["prototypes_src"], s["present_src"], s["prototypes_tgt"], s["present_tgt"])
    return {"mean_margin": a["mean_margin"], "nearest_own_share": a["nearest_own_share"], "num_classes": a["num_classes"],
            "per_class_margin": {n: (None if not np.isfinite(v) else float(v)) for n, v in zip(names, a["margin"])}}
