"""Walk a dataset and report every problem at once, with a class histogram.

``check_domain(..., full=True)`` reads every file (``bida data check``);
``full=False`` is the cheap start-of-training check: the listing of every split plus
the first few files of each. Problems are collected, never raised, so one run shows
them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bida.errors import DataError
from ..labels import IGNORE_INDEX
from .listing import Sample, list_samples, non_png_label_hint, orphan_labels
from .readers import check_label_values, class_info, read_image, read_label, size_mismatch_message

QUICK_CHECK_FILES = 2  # files read per split when full=False and max_files is not given
IGNORE_NAME = "(ignore)"  # histogram key of ignored pixels; parentheses avoid clashing with a class
_MARKDOWN_LIST_LIMIT = 50  # lines shown per list in the markdown report


@dataclass
class CheckReport:
    """What :func:`check_domain` found. ``histogram[split][class name]`` counts pixels of
    the labels read; ``checked[split]`` is how many samples were read."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # images per split
    histogram: dict[str, dict[str, int]] = field(default_factory=dict)
    checked: dict[str, int] = field(default_factory=dict)  # samples read per split
    domain: str = ""  # "kind root", the title of the markdown report
    class_names: tuple[str, ...] = ()  # the domain's classes: the order of the histogram

    def ok(self) -> bool:
        return not self.errors

    def to_markdown(self) -> str:
        status = "OK" if self.ok() else f"{len(self.errors)} error(s)"
        lines = [f"# Data check: {self.domain}", ""]
        lines += [f"**Status:** {status}, {len(self.warnings)} warning(s)", ""]
        lines += ["| split | images | read |", "|---|---:|---:|"]
        lines += [f"| {s} | {n} | {self.checked.get(s, 0)} |" for s, n in self.counts.items()]
        for title, items in (("Errors", self.errors), ("Warnings", self.warnings)):
            if items:
                lines += ["", f"## {title}", ""]
                lines += [f"- {item}" for item in items[:_MARKDOWN_LIST_LIMIT]]
                if len(items) > _MARKDOWN_LIST_LIMIT:
                    lines.append(f"- ... and {len(items) - _MARKDOWN_LIST_LIMIT} more")
        if self.histogram:
            splits = list(self.histogram)
            names = self._histogram_rows()
            totals = {s: max(1, sum(self.histogram[s].values())) for s in splits}
            lines += ["", "## Class histogram (pixels, % of the split)", ""]
            lines += ["| class | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
            for name in names:
                cells = []
                for s in splits:
                    count = self.histogram[s].get(name, 0)
                    cells.append(f"{count} ({100 * count / totals[s]:.2f}%)")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


    def _histogram_rows(self) -> list[str]:
        """Histogram keys in class order: the domain's classes, other values by number, ignore last."""
        keys = {n for h in self.histogram.values() for n in h}
        order = {name: i for i, name in enumerate(self.class_names)}

        def rank(key: str) -> tuple[int, int]:
            if key in order:
                return 0, order[key]
            if key == IGNORE_NAME:
                return 2, 0
            return 1, int(key) if key.isdigit() else 0

        return sorted(keys, key=rank)


def _class_names(kind: str, root: Path, report: CheckReport) -> tuple[str, ...] | None:
    try:
        return class_info(kind, root).names
    except DataError as err:
        report.errors.append(str(err))
        return None


def _add_histogram(
    histogram: dict[str, int], label: np.ndarray, names: tuple[str, ...] | None
) -> None:
    counts = np.bincount(label.ravel(), minlength=256)
    for value in np.nonzero(counts)[0]:
        if value == IGNORE_INDEX:
            key = IGNORE_NAME
        elif names is not None and value < len(names):
            key = names[value]
        else:
            key = str(value)
        histogram[key] = histogram.get(key, 0) + int(counts[value])


def check_domain(
    kind: str,
    root: Path | str,
    splits: dict[str, bool],
    num_classes: int | None = None,
    full: bool = True,
    max_files: int | None = None,
) -> CheckReport:
    """Check the given splits (split -> labels required) of one domain.

    Reports: missing root, split or images; images without labels (errors where labels
    are required); labels without images (warnings); unreadable images and labels;
    image/label size mismatches (warnings for gta5, whose reader resizes them, errors
    otherwise); label values outside the class set; and the class histogram of the
    labels read. ``num_classes`` defaults to the domain's class count. Files read per
    split: ``max_files`` if given, else all when ``full``, else ``QUICK_CHECK_FILES``.
    """
    root = Path(root)
    report = CheckReport(domain=f"{kind} {root}")
    names = _class_names(kind, root, report)
    report.class_names = tuple(names or ())
    if num_classes is None and names is not None:
        num_classes = len(names)
    limit = max_files if max_files is not None else (None if full else QUICK_CHECK_FILES)

    orphans: set[Path] = set()
    for split, labels_required in splits.items():
        try:
            samples = list_samples(kind, root, split, require_labels=False)
        except DataError as err:
            report.errors.append(str(err))
            report.counts[split] = 0
            continue
        report.counts[split] = len(samples)
        for sample in samples:
            if sample.label is None and labels_required:
                report.errors.append(f"image {sample.image} has no label (split {split!r})"
                                     + non_png_label_hint(kind, root, split, sample))
        orphans.update(orphan_labels(kind, root, split))

        histogram: dict[str, int] = {}
        to_read = samples if limit is None else samples[:limit]
        for sample in to_read:
            _check_sample(sample, kind, num_classes, names, histogram, report)
        report.checked[split] = len(to_read)
        if any(s.label is not None for s in to_read):
            report.histogram[split] = histogram

    report.warnings += [f"label {path} has no image" for path in sorted(orphans, key=Path.as_posix)]
    return report


def _check_sample(
    sample: Sample,
    kind: str,
    num_classes: int | None,
    names: tuple[str, ...] | None,
    histogram: dict[str, int],
    report: CheckReport,
) -> None:
    """Read one sample, adding its problems to ``report`` and its pixels to ``histogram``."""
    image_hw = None
    try:
        image_hw = read_image(sample.image).shape[:2]
    except DataError as err:
        report.errors.append(str(err))
    if sample.label is None:
        return
    try:
        label = read_label(sample.label, kind)
    except DataError as err:
        report.errors.append(str(err))
        return
    if num_classes is not None:
        try:
            check_label_values(label, num_classes, sample.label)
        except DataError as err:
            report.errors.append(str(err))
    if image_hw is not None and label.shape != image_hw:
        message = size_mismatch_message(sample, image_hw, label.shape)
        if kind == "gta5":
            report.warnings.append(f"{message}: the reader resizes it with nearest")
        else:
            report.errors.append(message)
    _add_histogram(histogram, label, names)
