"""bida: unsupervised domain adaptive semantic segmentation with bi-directional
pixel-prototype contrast (BiDA, ECCV 2022) and the baselines it is compared with.

The method is described for users in ``docs/method.md``. The package is grouped by role:

- :mod:`bida.method`: the paper's pieces as pure tensor functions (prototypes, losses,
  pseudo labels, the training steps, the mean teacher, mixing and masking, presets);
- :mod:`bida.models`: segmentors and backbones;
- :mod:`bida.data`: files on disk to batches of tensors;
- :mod:`bida.engine`: the training loop and what runs it (schedules, run directory, stop
  and signals, logging, the step guard, checkpoints, evaluation, distributed, optimizers);
- :mod:`bida.tools`: what users call (CLI, demo and ablation, report, predict, features);
- :mod:`bida.config`, :mod:`bida.errors`, :mod:`bida.checkpoint` (atomic writes, checkpoint files): shared by every layer.

``bida.Segmenter`` (:mod:`bida.tools.inference`) predicts with a trained network from Python.

Every module keeps its old flat path: ``bida.losses``, ``bida.prototypes``,
``bida.pseudo_labels``, ``bida.labels``, ``bida.train``, ``bida.cli``, ... are the very module
objects of their new homes (see :data:`MOVED`), so ``import bida.train as tr`` and
``monkeypatch.setattr(tr, ...)`` reach the code that runs. Every module is imported on first
use, so that ``import bida`` stays cheap.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"

# Old flat path -> the module's home. ``bida.<old>`` imports as that very module object.
MOVED = {
    **{name: f"engine.{name}" for name in (
        "distributed", "evaluate", "launch", "optim", "round_labels", "train", "weights")},
    **{name: f"method.{name}" for name in (
        "losses", "masking", "mixing", "presets", "prototypes", "pseudo_labels", "teacher", "train_step")},
    **{name: f"tools.{name}" for name in ("cli", "demo", "features", "predict", "report")},
}

# Every module and subpackage of the package, importable as ``bida.<name>`` without an explicit import.
PUBLIC_MODULES = tuple(sorted({
    "checkpoint", "config", "data", "deeplabv2", "engine", "errors", "labels", "method", "models", "tools", *MOVED}))

# Public names defined in a module of the package -> that module (imported on first use).
PUBLIC_NAMES = {"Segmenter": "tools.inference"}

__all__ = ["__version__", *PUBLIC_NAMES, *PUBLIC_MODULES]


class _AliasLoader(importlib.abc.Loader):
    """Binds ``bida.<old>`` in ``sys.modules`` to the module at its new path (the module is never copied)."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        sys.modules[module.__name__] = importlib.import_module(self.target)


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.partition(".")
        if prefix != __name__ or name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(f"{__name__}.{MOVED[name]}"))


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _AliasFinder())


def __getattr__(name: str):
    if name in PUBLIC_NAMES:  # as the modules: imported on first use
        return getattr(importlib.import_module(f".{PUBLIC_NAMES[name]}", __name__), name)
    if name in PUBLIC_MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(PUBLIC_MODULES) | set(PUBLIC_NAMES))
