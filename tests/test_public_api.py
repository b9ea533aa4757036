"""The public modules of bida and what the package exposes."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import bida.checkpoint
import bida.method.train_step


def test_public_modules_are_attributes_of_the_package():
    import bida

    assert callable(bida.losses.pixel_prototype_contrast) and bida.losses.__doc__
    # The public method modules expose the very functions of bida.method, and name each in __all__.
    for name in ("prototypes", "pseudo_labels", "losses"):
        public, home = importlib.import_module(f"bida.{name}"), importlib.import_module(f"bida.method.{name}")
        assert getattr(bida, name) is public and public.__all__ == home.__all__
        assert all(getattr(public, n) is getattr(home, n) for n in public.__all__)
    import bida.labels

    assert bida.labels.CITYSCAPES_CLASSES[0] == "road" and callable(bida.labels.colorize)
    # The list covers every public module and subpackage on disk, so it cannot go stale.
    package = Path(bida.__file__).parent
    modules = {p.stem for p in package.glob("*.py") if not p.stem.startswith("_")}
    modules |= {p.parent.name for p in package.glob("*/__init__.py")}
    assert modules == set(bida.PUBLIC_MODULES)
    for name in bida.PUBLIC_MODULES:
        assert getattr(bida, name).__name__ == f"bida.{name}"
    assert bida.Segmenter.__module__ == "bida.tools.segmenter"
    # Internal modules have one path: the old flat ones are gone.
    for old in ("train", "cli", "teacher", "weights", "deeplabv2"):
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(f"bida.{old}")
    with pytest.raises(AttributeError):
        bida.no_such_module  # noqa: B018
