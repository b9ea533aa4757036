"""train.deterministic: the process-wide switches it sets, that a run restores them, and that on
CPU it changes no result (the kernels bida uses there are deterministic already)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bida.config import load_config
from bida.engine.setup import deterministic_algorithms, determinism_settings, restore_determinism
from bida.engine.train import train
from bida.errors import ConfigError


@pytest.fixture
def clean_switches(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = determinism_settings()
    yield
    restore_determinism(before)


def test_switch_sets_cuda_determinism_and_restores(clean_switches):
    before = determinism_settings()
    deterministic_algorithms(False)  # off: nothing is touched
    assert determinism_settings() == before and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    deterministic_algorithms(True)
    assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    restore_determinism(before)
    assert determinism_settings() == before


def test_a_user_workspace_setting_is_kept(clean_switches, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    deterministic_algorithms(True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_deterministic_run_on_cpu_equals_default_and_restores(tmp_path, tiny_overrides, clean_switches):
    before = determinism_settings()
    base = tiny_overrides + ["method=bida", "train.iters=3", "train.rounds=1", "train.iters_per_round=2"]
    a = train(load_config(None, base), tmp_path / "a")
    assert determinism_settings() == before  # the next run in this process starts clean
    b = train(load_config(None, base + ["train.deterministic=true"]), tmp_path / "b")
    assert determinism_settings() == before
    def logged(run):  # every logged value except the wall times
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
                for line in (run / "log.jsonl").read_text().splitlines()]

    assert logged(tmp_path / "a") == logged(tmp_path / "b") and a["mIoU"] == b["mIoU"]


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.deterministic"):
        load_config(None, ["train.deterministic=maybe"])
