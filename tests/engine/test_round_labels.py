"""bida.engine.round_labels: the static pseudo-label pass of a round, its counts and stops."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.errors import Interrupted
from bida.tools.cli import main
from helpers import _same_weights


def test_rounds_read_the_source_class_counts(tmp_path, tiny_overrides):
    """The embedded source never draws rider, truck, bus, train, motorcycle or bicycle."""
    from bida.engine.train import train

    cfg = load_config(None, tiny_overrides + ["method=self_training", "train.rounds=1", "train.iters=2",
                                              "train.iters_per_round=1"])
    train(cfg, tmp_path / "run")
    stats = json.loads((tmp_path / "run" / "pseudo_labels" / "round_0" / "stats.json").read_text())
    assert stats["classes_without_source_pixels"] == ["rider", "truck", "bus", "train", "motorcycle", "bicycle"]
    labels = np.stack([np.array(Image.open(p)) for p in (tmp_path / "run" / "pseudo_labels" / "round_0").glob("*.png")])
    assert not np.isin(labels, [12, 14, 15, 16, 17, 18]).any()


def test_sigterm_in_the_pseudo_label_pass_stops_at_once_and_the_pass_resumes(tmp_path, tiny_overrides, monkeypatch):
    # before: SIGTERM waited for the whole pass (at scale: the scheduler's SIGKILL came first)
    # and the pass restarted from its first image
    import bida.engine.round_labels as rl
    import bida.engine.train as tr

    cfg = load_config(None, tiny_overrides + ["method=self_training", "train.iters=2", "train.iters_per_round=2",
                                              "train.rounds=1"])
    tr.Trainer(cfg, tmp_path / "ref").fit()
    real, calls = rl.predict_probs, {"n": 0}

    def predict(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(rl, "predict_probs", predict)
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        tr.Trainer(cfg, run).fit()
    assert calls["n"] == 3 and len(list((run / "pseudo_labels" / "round_0.tmp" / "raw").iterdir())) == 3
    tr.Trainer(cfg, run, resume=True).fit()
    assert calls["n"] == 8  # the 5 images left, not 8 again
    _same_weights(tmp_path / "ref", run)
    ref_labels = sorted((tmp_path / "ref" / "pseudo_labels" / "round_0").glob("*.png"))
    for p in ref_labels:
        assert p.read_bytes() == (run / "pseudo_labels" / "round_0" / p.name).read_bytes()


def test_sigterm_in_the_second_pseudo_label_pass_stops_within_an_image(tmp_path, tiny_overrides, monkeypatch):
    # before: pass 2 (thresholds applied, one PNG written per image) ran to its end first
    import bida.engine.round_labels as rl
    import bida.engine.train as tr

    real, calls = rl.static_labels, {"n": 0}

    def signalled(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(rl, "static_labels", signalled)
    cfg = load_config(None, tiny_overrides + ["method=self_training", "train.iters=2", "train.iters_per_round=2",
                                              "train.rounds=1"])
    run = tmp_path / "run"
    with pytest.raises(Interrupted, match="at step 2"):
        tr.Trainer(cfg, run).fit()
    assert calls["n"] == 1
    assert not (run / "pseudo_labels" / "round_0").exists()  # pass 1's files are kept for the resume
    assert len(list((run / "pseudo_labels" / "round_0.tmp" / "raw").iterdir())) == 8
    assert main(["train", "--resume", str(run)]) == 0
    assert len(list((run / "pseudo_labels" / "round_0").glob("*.png"))) == 8


def test_sigterm_in_the_class_pixel_count_scan_stops_within_an_image(tmp_path, tiny_overrides, monkeypatch):
    # before: the scan read every source label at full resolution before the stop was seen.
    # The scan checks data.rcs_min_pixels, before the run directory exists: a stop there leaves nothing.
    import bida.engine.train as tr
    from bida.data.datasets import SegmentationDataset

    real, calls = SegmentationDataset.load, {"n": 0}

    def signalled(self, index):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, index)

    monkeypatch.setattr(SegmentationDataset, "load", signalled)
    overrides = tiny_overrides + ["data.rare_class_sampling=true", "data.rcs_min_pixels=0"]
    run = tmp_path / "run"
    with pytest.raises(Interrupted, match="before the run started; nothing was written"):
        tr.Trainer(load_config(None, overrides), run).fit()
    assert calls["n"] == 1 and not run.exists()
    monkeypatch.setattr(SegmentationDataset, "load", real)
    assert main(["train", "--out", str(run), *overrides]) == 0  # the same command again
