"""bida: unsupervised domain adaptive semantic segmentation with bi-directional
pixel-prototype contrast (BiDA, ECCV 2022) and the baselines it is compared with.

The method is described for users in ``docs/method.md``; ``docs/architecture.md`` maps the
package. The package is grouped by role:

- :mod:`bida.method`: the paper's pieces as pure tensor functions (prototypes, losses,
  pseudo labels, the training steps, the mean teacher, mixing and masking, presets);
- :mod:`bida.models`: segmentors, backbones and their weights;
- :mod:`bida.data`: files on disk to batches of tensors;
- :mod:`bida.engine`: the training loop and its components (schedules, run state, checkpoints,
  evaluation, round labels, run log, stops, distributed, optimizers);
- :mod:`bida.tools`: what users call (CLI, demo and ablation, report, predict, export, launch);
- :mod:`bida.config`, :mod:`bida.errors`, :mod:`bida.checkpoint` (atomic writes, checkpoint
  files) and :mod:`bida.labels` (class names, palettes, label-id tables): shared by every layer.

The public Python API, stable for other tooling: :class:`bida.Segmenter` (predict with a
trained network), :mod:`bida.losses`, :mod:`bida.prototypes` and :mod:`bida.pseudo_labels`
(the method's functions) and :mod:`bida.labels`. Every module is imported on first use, so
that ``import bida`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# The public modules and subpackages, importable as ``bida.<name>`` without an explicit import.
PUBLIC_MODULES = ("checkpoint", "config", "data", "engine", "errors", "labels", "losses", "method", "models",
                  "progress", "prototypes", "pseudo_labels", "tools")

# Public names defined in a module of the package -> that module (imported on first use).
PUBLIC_NAMES = {"Segmenter": "tools.segmenter"}

__all__ = ["__version__", *PUBLIC_NAMES, *PUBLIC_MODULES]


def __getattr__(name: str):
    if name in PUBLIC_NAMES:
        return getattr(importlib.import_module(f".{PUBLIC_NAMES[name]}", __name__), name)
    if name in PUBLIC_MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(PUBLIC_MODULES) | set(PUBLIC_NAMES))
