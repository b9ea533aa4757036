"""The run report's figures: training curves, predictions and the feature view.

Figures are drawn on :class:`matplotlib.figure.Figure` objects, which render with the Agg
backend without touching pyplot's global state.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..config import Config
from ..errors import BidaError
from .report_runs import Run, _finite
from .report_tables import _compare_row, _e, _pct, _table

if TYPE_CHECKING:
    from .report import _Page

SOURCE_MARKER, TARGET_MARKER = "o", "^"


def _colors(palette: Sequence[Sequence[int]], k: int) -> list[tuple[float, float, float]]:
    return [tuple(c / 255.0 for c in palette[i]) for i in range(k)]


def _curves(page: _Page, runs: list[Run]) -> None:
    page.section("curves", "Training curves")
    for run in runs:
        train = [r for r in run.records if "lr" in r]
        if not train:
            page.note(f"{run.name}: log.jsonl has no training records.")
            continue
        fig = Figure(figsize=(15, 3.6), layout="constrained")
        ax_loss, ax_lr, ax_miou = fig.subplots(1, 3)
        keys = sorted({k for r in train for k in r if k.startswith("loss/")})
        positive = True
        for key in keys:
            pts = [(r["step"], r[key]) for r in train if _finite(r.get(key))]
            if pts:
                ax_loss.plot(*zip(*pts), label=key[len("loss/"):], lw=1.2)
                positive = positive and min(v for _, v in pts) > 0
        if positive and keys:
            ax_loss.set_yscale("log")
        ax_loss.set_title("losses")
        ax_loss.legend(fontsize=8, ncol=2)
        ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:gray")
        ax_lr.set_title(f"learning rate (backbone; head ×{run.cfg.train.head_lr_mult:g})")
        evals = [(r["step"], 100 * r["eval/mIoU"]) for r in run.records if _finite(r.get("eval/mIoU"))]
        if evals:
            ax_miou.plot(*zip(*evals), marker="o", color="tab:green")
        else:
            ax_miou.text(0.5, 0.5, "no target evaluation logged", ha="center", va="center", transform=ax_miou.transAxes)
        ax_miou.set_title("target val mIoU (%)")
        round_starts = sorted({r["step"] for r in run.records if "pseudo/per_class" in r})
        for ax in (ax_loss, ax_lr, ax_miou):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            for s in round_starts:
                ax.axvline(s, color="k", ls=":", lw=0.8)
        fig.suptitle(f"{run.name} ({run.method_label()})", fontsize=12)
        caption = f"{run.name}: losses, learning rate and target mIoU" + (
            "; dotted lines mark the start of each self-training round" if round_starts else "")
        page.figure(fig, f"curves_{run.slug}", caption)


def _load_models(runs: list[Run], device) -> dict[str, tuple]:
    from .predict import model_from_checkpoint

    return {run.name: model_from_checkpoint(run.checkpoint, device=device) for run in runs if run.checkpoint}


def _target_val(cfg: Config):
    """(domain, labelled target-val dataset) or a reason why there is none."""
    from ..data.datasets import build_eval_dataset, resolve_domain

    if not cfg.data.target.val_split:
        return None, "data.target.val_split is not set"
    try:
        dom = resolve_domain(cfg, "target")
        return (dom, build_eval_dataset(cfg, dom, cfg.data.target.val_split)), ""
    except BidaError as err:
        return None, str(err)


@torch.no_grad()
def _predict(model, cfg: Config, item: dict, k: int, device) -> np.ndarray:
    from ..engine.inference import predict_probs

    x = item["image"].unsqueeze(0).to(device)
    return predict_probs(model, x, cfg.eval, k, tuple(item["label"].shape[-2:])).argmax(1)[0].cpu().numpy().astype(np.uint8)


def _image_miou(pred: np.ndarray, label: torch.Tensor, names: Sequence[str], cfg: Config, ignore: int) -> float:
    from ..engine.inference import confusion_matrix, metrics_from_confusion

    conf = confusion_matrix(torch.from_numpy(pred.astype(np.int64)), label, len(names), ignore)
    return metrics_from_confusion(conf, names, cfg.data.eval_classes)["mIoU"]


def _predictions(page: _Page, runs: list[Run], models: dict, max_images: int, scan_images: int, device) -> None:
    from ..labels import colorize

    page.section("predictions", "Target validation predictions")
    for run in runs:
        if run.name not in models:
            page.note(f"{run.name}: no checkpoints/last.pt; left out of the predictions and the feature view.")
    last = runs[-1]
    if last.name not in models:
        page.note(f"{last.name} has no checkpoints/last.pt: cannot rank the validation images.")
        return
    found, why = _target_val(last.cfg)
    if found is None:
        page.note(f"No labelled target validation images ({why}).")
        return
    dom, ds = found
    names, ignore = list(dom.classes.names), dom.classes.ignore_index
    k = len(names)
    model_last, cfg_last = models[last.name][0], models[last.name][1]
    n_scan = min(len(ds), scan_images)
    n_show = min(max_images, n_scan)
    if n_show <= 0:
        page.note("max_images is 0: no images shown.")
        return
    scores = np.array([_image_miou(_predict(model_last, cfg_last, item, k, device), item["label"], names, cfg_last, ignore)
                       for item in (ds[i] for i in range(n_scan))])
    order = [int(i) for i in np.argsort(-scores, kind="stable")]
    n_best = math.ceil(n_show / 2)
    best = order[:n_best]
    worst = [i for i in reversed(order) if i not in best][: n_show - n_best]  # the very worst first
    chosen = best + worst
    shown = [run for run in runs if run.name in models]
    cols = 2 + len(shown)
    image0, _ = ds.load(chosen[0])
    h, w = image0.shape[:2]
    cell_w = 2.6
    fig = Figure(figsize=(cell_w * cols, len(chosen) * cell_w * h / w + 1.4), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(chosen), cols))
    palette = dom.classes.palette
    seen: set[int] = set()
    for r, idx in enumerate(chosen):
        item = ds[idx]
        image, _ = ds.load(idx)
        label = item["label"].numpy()
        seen |= set(np.unique(label[label != ignore]).tolist())
        tag = f"best #{r + 1}" if r < n_best else f"worst #{r - n_best + 1}"
        panels = [(image, f"{tag}: {ds.samples[idx].name}"),
                  (colorize(np.where(label == ignore, 255, label).astype(np.uint8), palette), "ground truth")]
        for run in shown:
            model, cfg = models[run.name][0], models[run.name][1]
            pred = _predict(model, cfg, item, k, device)
            seen |= set(np.unique(pred).tolist())
            miou = _image_miou(pred, item["label"], names, cfg, ignore)
            panels.append((colorize(pred, palette), f"{run.name}: {100 * miou:.1f}"))
        for c, (img, title) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
    colors = _colors(palette, k)
    fig.legend(handles=[Patch(color=colors[c], label=names[c]) for c in sorted(seen) if c < k],
               loc="outside lower center", ncol=min(10, max(1, len(seen))), fontsize=8)
    page.figure(fig, "predictions",
                f"Best and worst target validation images by the per-image mIoU of {last.name} "
                f"(ranked over the first {n_scan} images); titles give each run's per-image mIoU (%); black: ignore")


def _pseudo(page: _Page, runs: list[Run]) -> None:
    page.section("pseudo", "Pseudo-label quality over rounds")
    for run in runs:
        rounds = run.rounds()
        if not rounds:
            page.note(f"{run.name}: no self-training rounds ({run.method_label()}).")
            continue
        classes = list(dict.fromkeys(c for r in rounds for c in r["pseudo/per_class"]))
        acc = np.array([[_nan(r["pseudo/per_class"].get(c, {}).get("accuracy")) for r in rounds] for c in classes])
        cov = np.array([[_nan(r["pseudo/per_class"].get(c, {}).get("coverage")) for r in rounds] for c in classes])
        if np.isnan(acc).all() and np.isnan(cov).all():
            page.note(f"{run.name}: the target training images have no labels, so pseudo-label quality is unknown.")
            continue
        dynamic = [r for r in run.records if "pseudo/dynamic_coverage" in r or "calibration/weight" in r]
        ncols = 4 if dynamic else 3
        fig = Figure(figsize=(4.2 * ncols, max(4.0, 0.28 * len(classes) + 1.5)), layout="constrained")
        axes = fig.subplots(1, ncols)
        labels = [str(r["round"]) for r in rounds]
        axes[0].plot(labels, [100 * _nan(r.get("pseudo/static_accuracy")) for r in rounds], marker="o", label="accuracy")
        axes[0].plot(labels, [100 * _nan(r.get("pseudo/static_coverage")) for r in rounds], marker="s", label="coverage")
        axes[0].set_xlabel("round")
        axes[0].set_ylabel("%")
        axes[0].set_ylim(0, 100)
        axes[0].grid(alpha=0.3)
        axes[0].legend()
        axes[0].set_title("static pseudo labels (all classes)")
        for ax, values, title in ((axes[1], acc, "accuracy per class (%)"), (axes[2], cov, "coverage per class (%)")):
            im = ax.imshow(100 * values, cmap=colormaps["viridis"].with_extremes(bad="#e8e8e8"), vmin=0, vmax=100,
                           aspect="auto")
            ax.set_xticks(range(len(rounds)), labels)
            ax.set_yticks(range(len(classes)), classes, fontsize=8)
            ax.set_xlabel("round")
            ax.set_title(title)
            for i in range(len(classes)):
                for j in range(len(rounds)):
                    if _finite(values[i, j]):
                        ax.text(j, i, f"{100 * values[i, j]:.0f}", ha="center", va="center", fontsize=7,
                                color="white" if values[i, j] < 0.5 else "black")
            fig.colorbar(im, ax=ax, shrink=0.8)
        if dynamic:
            ax = axes[3]
            for key in ("pseudo/dynamic_coverage", "pseudo/dynamic_acc", "pseudo/fused_coverage", "calibration/weight"):
                pts = [(r["step"], r[key]) for r in dynamic if _finite(r.get(key))]
                if pts:
                    ax.plot(*zip(*pts), label=key, lw=1.2)
            ax.set_xlabel("step")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            ax.set_title("per iteration")
        fig.suptitle(run.name)
        caption = (f"{run.name}: accuracy (share of the pixels pseudo-labelled as a class that truly belong to it) "
                   "and coverage (share of a class's true pixels that received a pseudo label) of the static labels "
                   "of each round; grey: undefined (no such pixels)")
        if dynamic:
            caption += "; right: dynamic labels and calibration during training"
        page.figure(fig, f"pseudo_{run.slug}", caption)
        header = ["class"] + [f"acc r{l}" for l in labels] + [f"cov r{l}" for l in labels]
        rows = [[(c, "")] + [(_pct(v), "") for v in acc[i]] + [(_pct(v), "") for v in cov[i]] for i, c in enumerate(classes)]
        page.add(f"<details><summary>{_e(run.name)}: per-class table</summary>{_table(header, rows)}</details>")


def _nan(value) -> float:
    return float(value) if _finite(value) else float("nan")


def _tsne(features: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = len(features)
    # perplexity must stay below the number of points; ~n/3 keeps small samples meaningful.
    perplexity = float(max(2, min(30, (n - 1) // 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    # One OpenMP thread: on shared or busy CPUs the spinning worker threads of the
    # Barnes-Hut gradient made it 5-25x slower (measured), and 1500 points need no more.
    with threadpool_limits(limits=1):
        return tsne.fit_transform(features)


def _features(page: _Page, runs: list[Run], models: dict, feature_points: int, feature_images: int, device) -> None:
    from ..data.datasets import build_eval_dataset, resolve_domain
    from .features import prototype_alignment, prototype_distances, sample_features

    page.section("features", "Feature space")
    shown = [run for run in runs if run.name in models]
    if not shown:
        page.note("No run has checkpoints/last.pt: no features to show.")
        return
    last = shown[-1]
    found, why = _target_val(last.cfg)
    if found is None:
        page.note(f"No labelled target validation images ({why}): target features cannot be labelled.")
        return
    dom_tgt, tgt_ds = found
    try:
        dom_src = resolve_domain(last.cfg, "source")
        src_ds = build_eval_dataset(last.cfg, dom_src, last.cfg.data.source.train_split)
    except BidaError as err:
        page.note(f"No labelled source images ({err}).")
        return
    names, palette = list(dom_tgt.classes.names), dom_tgt.classes.palette
    k = len(names)
    samples = {run.name: sample_features(models[run.name][0], src_ds, tgt_ds, k,
                                         feature_points if run is last else 0, device, max_images=feature_images,
                                         ignore_index=dom_tgt.classes.ignore_index)
               for run in shown}
    s = samples[last.name]
    n = len(s["features"])
    if n < 10:
        page.note(f"{last.name}: only {n} labelled feature pixels sampled; no t-SNE view.")
    else:
        fig = _tsne_figure(s, names, palette, last.name)
        page.figure(fig, "tsne",
                    f"{last.name}: t-SNE of {n} pixel features (class-balanced sample of source train "
                    f"and target val pixels, ground-truth colours, first {feature_images} images of each), with the "
                    "class prototypes of each domain as large outlined markers joined by a grey line")
    dists = {name: prototype_distances(v["prototypes_src"], v["present_src"], v["prototypes_tgt"], v["present_tgt"])
             for name, v in samples.items()}
    _distance_section(page, shown, dists, names)
    aligned = {name: prototype_alignment(v["prototypes_src"], v["present_src"], v["prototypes_tgt"], v["present_tgt"])
               for name, v in samples.items()}
    _alignment_section(page, shown, aligned, names)


def _alignment_section(page: _Page, runs: list[Run], aligned: dict[str, dict], names: Sequence[str]) -> None:
    page.add("<h3>Source-target alignment per class (margin)</h3>")
    keep = [c for c in range(len(names)) if any(_finite(a["margin"][c]) for a in aligned.values())]
    if not keep:
        page.note("No class is present in both domains' labelled images.")
        return
    base = runs[0].name
    header = ["class", base] + [h for run in runs[1:] for h in (run.name, f"Δ {run.name}")]
    rows = []
    for label, get in [(names[c], lambda a, c=c: float(a["margin"][c])) for c in keep] + [
            ("mean margin", lambda a: a["mean_margin"]), ("nearest-own share", lambda a: a["nearest_own_share"])]:
        rows.append(_compare_row(label, get(aligned[base]), [get(aligned[run.name]) for run in runs[1:]],
                                 lower_is_better=False))
    page.add(_table(header, rows, total_last=True))
    page.add("<p>A measure that is fair across runs: for each class, cos(target prototype, its own source "
             "prototype) minus the highest cos with another class's source prototype. Positive: the target "
             "prototype is nearer its own source class than any other; raw distances above are dominated by a "
             "component every class-score feature shares, and grow when a method makes classes more distinct. "
             "Nearest-own share: the fraction of classes whose target prototype has its own source prototype "
             "as nearest. Δ against the first run (green: better aligned).</p>")


def _tsne_figure(s: dict, names: Sequence[str], palette, title: str) -> Figure:
    from .features import SOURCE, TARGET

    k = len(names)
    feats = s["features"]
    protos = [(code, c, s[f"prototypes_{suf}"][c]) for code, suf in ((SOURCE, "src"), (TARGET, "tgt"))
              for c in range(k) if s[f"present_{suf}"][c]]
    stacked = np.concatenate([feats, np.stack([p for _, _, p in protos])]) if protos else feats
    # Cosine geometry (what the contrastive losses use): unit-normalise before t-SNE.
    stacked = stacked / np.linalg.norm(stacked, axis=1, keepdims=True).clip(min=1e-12)
    emb = _tsne(stacked.astype(np.float32))
    pts, proto_pts = emb[: len(feats)], emb[len(feats):]
    colors = np.array(_colors(palette, k))
    fig = Figure(figsize=(11, 8), layout="constrained")
    ax = fig.subplots()
    for code, marker in ((SOURCE, SOURCE_MARKER), (TARGET, TARGET_MARKER)):
        m = s["domain"] == code
        ax.scatter(pts[m, 0], pts[m, 1], c=colors[s["labels"][m]], marker=marker, s=18, alpha=0.6, linewidths=0)
    by_class: dict[int, dict[int, np.ndarray]] = {}
    for (code, c, _), xy in zip(protos, proto_pts):
        by_class.setdefault(c, {})[code] = xy
        ax.scatter(*xy, color=colors[c], marker=SOURCE_MARKER if code == SOURCE else TARGET_MARKER, s=260,
                   edgecolors="black", linewidths=1.6, zorder=3)
    for ends in by_class.values():
        if len(ends) == 2:
            (x0, y0), (x1, y1) = ends[SOURCE], ends[TARGET]
            ax.plot([x0, x1], [y0, y1], color="0.4", lw=1, zorder=2)
    present = sorted(set(s["labels"].tolist()) | set(by_class))
    handles = [Patch(color=colors[c], label=names[c]) for c in present]
    handles += [ax.scatter([], [], marker=SOURCE_MARKER, color="0.5", label="source"),
                ax.scatter([], [], marker=TARGET_MARKER, color="0.5", label="target"),
                ax.scatter([], [], marker="o", s=200, facecolor="white", edgecolors="black", linewidths=1.6,
                           label="prototype (large)")]
    fig.legend(handles=handles, loc="outside right upper", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title}: pixel features of both domains (t-SNE)")
    return fig


def _distance_section(page: _Page, runs: list[Run], dists: dict[str, np.ndarray], names: Sequence[str]) -> None:
    page.add("<h3>Source-target prototype distance per class</h3>")
    base = runs[0].name
    keep = [c for c in range(len(names)) if any(_finite(d[c]) for d in dists.values())]
    if not keep:
        page.note("No class is present in both domains' labelled images.")
        return
    before = " (before)" if len(runs) > 1 else ""
    header = ["class", base + before]
    for run in runs[1:]:
        header += [run.name, f"Δ {run.name}"]
    # One row per class, then the mean over the classes present in both domains.
    values = {name: [float(d[c]) for c in keep] + [float(np.nanmean(d[keep])) if np.isfinite(d[keep]).any() else math.nan]
              for name, d in dists.items()}
    rows = []
    for i, label in enumerate([names[c] for c in keep] + ["mean"]):
        rows.append(_compare_row(label, values[base][i], [values[run.name][i] for run in runs[1:]],
                                 lower_is_better=True))
    page.add(_table(header, rows, total_last=True))
    page.add("<p>Cosine distance 1 − cos between the source prototype (source train, ground truth) and the target "
             "prototype (target val, ground truth) of each class, from each run's last checkpoint; 0 is perfectly "
             "aligned, 2 opposite. Δ against the first run (green: closer).</p>")
    fig = Figure(figsize=(max(9, 0.55 * len(keep) + 3), 3.8), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(runs)
    x = np.arange(len(keep))
    for i, run in enumerate(runs):
        vals = [v if _finite(v := float(dists[run.name][c])) else 0.0 for c in keep]
        ax.bar(x + (i - (len(runs) - 1) / 2) * width, vals, width, label=run.name + (before if i == 0 else ""))
    ax.set_xticks(x, [names[c] for c in keep], rotation=45, ha="right")
    ax.set_ylabel("1 − cos(source, target)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9)
    page.figure(fig, "prototype_distance", "Per-class cosine distance between source and target prototypes")
