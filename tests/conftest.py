"""Shared test set-up: a private synthetic-data cache and tiny configs that train in seconds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/fixtures.py builders

# Tiny everything: 8 training images per domain at 32x64, a ResNet-18 at 1/8 width.
TINY = [
    "data.synthetic.num_train=8", "data.synthetic.num_val=4", "data.synthetic.num_test=2", "data.synthetic.height=32",
    "data.synthetic.width=64", "data.crop=[32,64]", "model.width=0.125", "train.iters=6",
    "train.iters_per_round=4", "train.rounds=2", "train.eval_every=100", "train.checkpoint_every=2",
    "train.log_every=1", "train.quiet=true", "calibration.ramp_iters=4",
]


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bida-cache")


@pytest.fixture
def tiny_overrides(synthetic_cache) -> list[str]:
    return TINY + [f"data.synthetic.cache_dir={synthetic_cache}"]
