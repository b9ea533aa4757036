"""bida: unsupervised domain adaptive semantic segmentation with bi-directional
pixel-prototype contrast (BiDA, ECCV 2022) and the baselines it is compared with.

The method is described for users in ``docs/method.md``. Its building blocks are public
modules, reachable as attributes of the package (``bida.losses``, ``bida.prototypes``,
``bida.pseudo_labels``, ``bida.labels``, ...); each is imported on first use, so that
``import bida`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Every module and subpackage of the package, importable as ``bida.<name>`` without an explicit import.
PUBLIC_MODULES = (
    "checkpoint", "cli", "config", "data", "deeplabv2", "demo", "distributed", "errors", "evaluate", "features",
    "labels", "launch", "losses", "masking", "mixing", "models", "optim", "predict", "presets", "prototypes",
    "pseudo_labels", "report", "round_labels", "teacher", "train", "train_step", "weights",
)

__all__ = ["__version__", *PUBLIC_MODULES]


def __getattr__(name: str):
    if name in PUBLIC_MODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(PUBLIC_MODULES))
