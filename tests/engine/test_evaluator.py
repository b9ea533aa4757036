"""bida.engine.evaluator: what the periodic and final evaluations read and record."""

from __future__ import annotations

import json
from pathlib import Path

import bida.data.datasets as datasets
from bida.config import load_config
from bida.engine.evaluator import Evaluator
from bida.tools.cli import main


def test_no_test_image_is_read_before_the_final_evaluation(tmp_path, tiny_overrides, monkeypatch):
    """Every image read is recorded: training, pseudo labels (two rounds) and the periodic
    evaluations that choose best.pt read no test image; only the final test evaluation does."""
    import bida.engine.train as tr

    reads: list[tuple[str, bool]] = []
    phase = {"final_test": False}
    real_load, real_test = datasets.SegmentationDataset.load, Evaluator.test

    def load(self, index):
        reads.append((str(self.samples[index].image), phase["final_test"]))
        return real_load(self, index)

    def evaluate_test(self, *a, **k):
        phase["final_test"] = True
        try:
            return real_test(self, *a, **k)
        finally:
            phase["final_test"] = False

    monkeypatch.setattr(datasets.SegmentationDataset, "load", load)
    monkeypatch.setattr(Evaluator, "test", evaluate_test)
    cfg = load_config(None, tiny_overrides + ["method=bida", "train.iters=2", "train.eval_every=2"])
    metrics = tr.train(cfg, tmp_path / "run")
    test_dir = f"{Path('images') / 'test'}"
    assert any(test_dir in path for path, _ in reads)  # the reads are seen at all
    assert all(final for path, final in reads if test_dir in path)  # test images only in the final evaluation
    assert all(test_dir not in path for path, final in reads if not final)
    assert len([p for p, final in reads if final]) == 2  # data.synthetic.num_test=2, read once each
    # metrics.json: val figures at the top level as always, the test split in its own block
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["split"] == "val" and saved["test"]["split"] == "test" and saved["test"]["checkpoint"] == "last"
    assert saved["best"]["step"] >= 0 and 0.0 <= saved["test"]["mIoU"] <= 1.0
    assert saved["test"]["mIoU"] == metrics["test"]["mIoU"] and len(saved["test"]["confusion"]) == 19
    # bida evaluate --split test gives the same figures from the same checkpoint; --split val the val ones
    ckpt = str(tmp_path / "run" / "checkpoints" / "last.pt")
    for split, ref in (("test", saved["test"]), ("val", saved)):
        out = tmp_path / f"eval_{split}"
        assert main(["evaluate", "--checkpoint", ckpt, "--split", split, "--out", str(out), "--quiet"]) == 0
        again = json.loads((out / "metrics.json").read_text())
        assert again["split"] == split and again["confusion"] == ref["confusion"]
