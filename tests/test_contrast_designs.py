"""Contrast designs: a head trained in the source stage and a contrast warm-up (the designs
that won); the distribution-aware contrast and teacher prototypes, which lost, are refused.
Config errors, tiny runs with exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.errors import ConfigError
from bida.engine.train import Trainer, train

TEACHER = ["train.schedule=teacher", "train.iters=4", "train.optimizer=adamw", "train.weight_decay=0.01",
           "train.lr=6e-4", "train.warmup_iters=2", "train.poly_power=1.0"]


def _records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- config
def test_contrast_design_keys_are_checked():
    for bad, match in ((["method=self_training", "loss.contrast_warmup_iters=5"], "loss.contrast_warmup_iters"),
                       (["method=bida", "loss.contrast_warmup_iters=-1"], "loss.contrast_warmup_iters"),
                       (["method=bida", "method.pretrain_head=true"], "aspp_branches"),
                       (["method=self_training", "method.pretrain_head=true", "method.feature=backbone"],
                        "method.pretrain_head")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, bad)
    load_config(None, ["method=source_only", "method.pretrain_head=true", "method.feature=backbone"])


# --------------------------------------------------------------------------- runs
def test_rounds_run_with_a_warm_up_resumes_exactly(tmp_path, tiny_overrides):
    over = tiny_overrides + ["method=bida", "train.iters=2", "train.rounds=1", "loss.contrast_warmup_iters=3"]
    cfg = load_config(None, over)
    full, part = tmp_path / "full", tmp_path / "part"
    ref = train(cfg, full)
    assert Trainer(cfg, part).fit(stop_after=4) is None  # mid round, inside the warm-up
    assert Trainer(cfg, part, resume=True).fit()["mIoU"] == ref["mIoU"]
    a, b = (load_checkpoint(r / "checkpoints" / "last.pt") for r in (full, part))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    steps = [r for r in _records(full) if r.get("phase") == "round"]
    assert all(math.isfinite(r["loss/contrast_t2s"]) for r in steps)


def test_warm_up_keeps_the_contrast_out_of_the_loss(tmp_path, tiny_overrides):
    """During the warm-up the total is the self-training terms; after it the contrast counts."""
    # from a tiny source-only model, one round of 3 steps, warm-up 2
    so = tmp_path / "so"
    train(load_config(None, tiny_overrides + ["train.iters=2"]), so)
    cfg = load_config(None, tiny_overrides + ["method=bida", f"model.init_checkpoint={so}/checkpoints/last.pt",
                                              "train.rounds=1", "train.iters_per_round=3",
                                              "loss.contrast_warmup_iters=2"])
    run = tmp_path / "bida"
    train(cfg, run)
    lw = cfg.loss
    steps = [r for r in _records(run) if r.get("phase") == "round"]
    assert len(steps) == 3
    for r in steps:
        seg = (r["loss/seg_src"] + lw.seg_tgt_weight * r["loss/seg_tgt"] + lw.entropy_weight * r["loss/ent_src"]
               + lw.entropy_weight * lw.seg_tgt_weight * r["loss/ent_tgt"])
        contrast = lw.contrast_t2s_weight * r["loss/contrast_t2s"] + lw.contrast_s2t_weight * r["loss/contrast_s2t"]
        expected = seg + (contrast if r["step"] > 2 else 0.0)
        assert r["loss/total"] == pytest.approx(expected, rel=1e-5), r["step"]
        assert r["loss/contrast_t2s"] > 0


def test_trained_head_leaves_the_segmentation_weights_unchanged(tmp_path, tiny_overrides):
    base = tiny_overrides + ["method.feature=backbone", "train.iters=3", "model.proj_dim=8"]
    plain, head = tmp_path / "plain", tmp_path / "head"
    train(load_config(None, base), plain)
    train(load_config(None, base + ["method.pretrain_head=true"]), head)
    a, b = (load_checkpoint(r / "checkpoints" / "last.pt")["model"] for r in (plain, head))
    assert a.keys() == b.keys()
    for k in a:
        if k.startswith("proj."):
            assert not torch.equal(a[k], b[k]), k  # the head learnt
        else:
            assert torch.equal(a[k], b[k]), k
    steps = [r for r in _records(head) if r.get("phase") == "source"]
    assert all(r["loss/head_contrast"] > 0 for r in steps)
    # the default DeepLab-V2 source-only model (ASPP features, no head): the same segmentation weights
    aspp = tmp_path / "aspp"
    train(load_config(None, tiny_overrides + ["train.iters=3"]), aspp)
    c = load_checkpoint(aspp / "checkpoints" / "last.pt")["model"]
    for k in c:
        assert torch.equal(c[k], b[k]), k

    # adaptation keeps the trained head; a checkpoint without one is refused
    ckpt = head / "checkpoints" / "last.pt"
    over = tiny_overrides + ["method=bida", "method.feature=backbone", "model.proj_dim=8", "train.rounds=1",
                             "method.pretrain_head=true", "train.iters_per_round=1"]
    run = tmp_path / "adapt"
    t = Trainer(load_config(None, over + [f"model.init_checkpoint={ckpt}"]), run)
    assert torch.equal(t.model.state_dict()["proj.0.weight"], b["proj.0.weight"])
    with pytest.raises(ConfigError, match="method.pretrain_head"):
        Trainer(load_config(None, over + [f"model.init_checkpoint={plain}/checkpoints/last.pt"]), tmp_path / "x")
    # a row without a head (ASPP features) adapts from the checkpoint with a head
    Trainer(load_config(None, tiny_overrides + ["method=bida", f"model.init_checkpoint={ckpt}"]), tmp_path / "y")
    # a row with a head that does not ask for the trained one starts with the untrained head of its
    # seed (the one a source-only run without head training passes on: no gradient reaches it)
    t = Trainer(load_config(None, [o for o in over if o != "method.pretrain_head=true"]
                            + [f"model.init_checkpoint={ckpt}"]), tmp_path / "z")
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, a[k] if k.startswith("proj.") else b[k]), k


def test_preset_plus_adds_the_designs_that_won_on_its_schedule():
    from bida.method.presets import preset_overrides, preset_overrides_for

    base = preset_overrides("plus")
    rounds, teacher = preset_overrides("plus", "rounds"), preset_overrides("plus", "teacher")
    assert "method.pretrain_head=true" in teacher and "method.pretrain_head=true" not in rounds
    assert "loss.contrast_warmup_iters=100" in rounds and "loss.contrast_warmup_iters=100" not in teacher
    assert set(base) <= set(rounds) and set(base) <= set(teacher)
    from bida.tools.demo import TRANSFORMER_DEMO_FILE

    mit = str(TRANSFORMER_DEMO_FILE)
    assert preset_overrides_for("plus", mit, []) == teacher
    cfg = load_config(mit, ["method=bida", *teacher])
    assert cfg.method.pretrain_head and cfg.method.memory_partners
    # DeepLab-V2: rounds, or the teacher schedule on ASPP features (no head): the preset alone
    assert preset_overrides_for("plus", None, []) == rounds and preset_overrides_for(None, None, []) == []
    assert preset_overrides_for("plus", None, ["train.schedule=teacher"]) == base
    assert preset_overrides_for("plus", None, ["train.schedule=teacher", "method.feature=backbone"]) == teacher
