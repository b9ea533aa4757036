"""Contrast designs (issue 20): distribution-aware contrast, a head trained in the source
stage, teacher prototypes and a contrast warm-up. Maths on hand-computed cases, config
errors, tiny runs with exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.errors import ConfigError
from bida.losses import distribution_contrast
from bida.prototypes import ClassDistribution, class_prototypes
from bida.pseudo_labels import Calibration
from bida.train import Trainer, train

TEACHER = ["train.schedule=teacher", "train.iters=4", "train.optimizer=adamw", "train.weight_decay=0.01",
           "train.lr=6e-4", "train.warmup_iters=2", "train.poly_power=1.0"]


def _records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- distribution contrast
def test_distribution_contrast_matches_hand_computed_value():
    # One pixel q = (1, 0) (already unit), label 0; classes 0, 1 present, class 2 absent.
    f = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    y = torch.zeros(1, 1, 1, dtype=torch.long)
    means = torch.tensor([[0.5, 0.0], [0.0, 0.5], [9.0, 9.0]])
    var = torch.tensor([[0.02, 0.0], [0.04, 0.0], [1.0, 1.0]])
    present = torch.tensor([True, True, False])
    tau = 0.5
    # s_0 = 0.5 / 0.5 + 0.02 / (2 * 0.25) = 1.04; s_1 = 0 + 0.04 / 0.5 = 0.08
    # loss = logsumexp(1.04, 0.08) - 1.0 (the positive's mean term only)
    expected = math.log(math.exp(1.04) + math.exp(0.08)) - 1.0
    loss = distribution_contrast(f, y, means, var, present, tau)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected, abs=1e-6)
    # The features are normalised: a scaled pixel gives the same loss.
    assert distribution_contrast(3 * f, y, means, var, present, tau).item() == pytest.approx(expected, abs=1e-6)


def test_distribution_contrast_zero_variance_is_a_dot_product_contrast_and_edge_cases():
    torch.manual_seed(0)
    f, y = torch.randn(2, 4, 3, 3), torch.randint(0, 3, (2, 3, 3))
    y[0, 0, 0] = 255
    means = torch.randn(3, 4)
    present = torch.tensor([True, False, True])
    got = distribution_contrast(f, y, means, torch.zeros(3, 4), present, 0.1)
    q = torch.nn.functional.normalize(f, dim=1)
    logits = torch.einsum("bdhw,kd->bkhw", q, means) / 0.1
    logits[:, 1] = -1e9
    ce = torch.nn.functional.cross_entropy(logits, torch.where((y == 1) | (y == 255), 255, y), ignore_index=255)
    assert got.item() == pytest.approx(ce.item(), rel=1e-5)
    # nothing valid, or no class present: 0 with a graph
    f.requires_grad_(True)
    for labels, pres in ((torch.full_like(y, 255), present), (y, torch.zeros(3, dtype=torch.bool))):
        loss = distribution_contrast(f, labels, means, torch.zeros(3, 4), pres, 0.1)
        loss.backward()
        assert loss.item() == 0.0 and f.grad is not None and torch.isfinite(f.grad).all()
    # autocast: the same float32 value
    var = torch.rand(3, 4) * 0.01
    ref = distribution_contrast(f.detach(), y, means, var, present, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = distribution_contrast(f.detach().bfloat16(), y, means, var, present, 0.1)
    assert amp.dtype == torch.float32 and amp.item() == pytest.approx(
        distribution_contrast(f.detach().bfloat16().float(), y, means, var, present, 0.1).item(), rel=1e-6)
    assert ref.item() == pytest.approx(amp.item(), rel=2e-2)


def test_class_distribution_moving_average_of_normalised_features():
    dist = ClassDistribution(num_classes=3, dim=2, momentum=0.5)
    # two pixels of class 0: q = (1, 0) and (0, 1); class 1 one pixel (3, 4) -> (0.6, 0.8); class 2 absent
    f = torch.tensor([[1.0, 0.0, 3.0], [0.0, 1.0, 4.0]]).view(1, 2, 1, 3)
    y = torch.tensor([[[0, 0, 1]]])
    dist.update(*ClassDistribution.batch_moments(f, y, lambda a, b: class_prototypes(a, b, 3)))
    assert dist.present.tolist() == [True, True, False]
    assert torch.allclose(dist.mean.value[0], torch.tensor([0.5, 0.5]))
    assert torch.allclose(dist.variance()[0], torch.tensor([0.25, 0.25]))  # E[q^2] - E[q]^2 = 0.5 - 0.25
    assert torch.allclose(dist.variance()[1], torch.zeros(2), atol=1e-7)
    # second batch: class 0 at (1, 0) only; momentum 0.5
    dist.update(*ClassDistribution.batch_moments(f[..., :1], y[..., :1], lambda a, b: class_prototypes(a, b, 3)))
    assert torch.allclose(dist.mean.value[0], torch.tensor([0.75, 0.25]))
    assert torch.allclose(dist.second.value[0], torch.tensor([0.75, 0.25]))
    cal = Calibration(3, 2, ramp_iters=4, momentum=0.5, distribution=True)
    cal.distribution.load_state_dict(dist.state_dict())
    other = Calibration(3, 2, ramp_iters=4, momentum=0.5, distribution=True)
    other.load_state_dict(cal.state_dict())
    assert torch.equal(other.distribution.variance(), dist.variance())


# --------------------------------------------------------------------------- config
def test_contrast_design_keys_are_checked():
    for bad, match in ((["method=self_training", "method.contrast_design=distribution"], "method.contrast_design"),
                       (["method=self_training", "loss.contrast_warmup_iters=5"], "loss.contrast_warmup_iters"),
                       (["method=bida", "loss.contrast_warmup_iters=-1"], "loss.contrast_warmup_iters"),
                       (["method=bida", "method.teacher_prototypes=true"], "method.teacher_prototypes"),
                       (["method=bida", "method.pretrain_head=true"], "aspp_branches"),
                       (["method=self_training", "method.pretrain_head=true", "method.feature=backbone"],
                        "method.pretrain_head"),
                       (["method=bida", "method.contrast_design=gaussian"], "method.contrast_design")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, bad)
    load_config(None, ["method=bida", *TEACHER, "method.teacher_prototypes=true"])
    load_config(None, ["method=source_only", "method.pretrain_head=true", "method.feature=backbone"])


# --------------------------------------------------------------------------- runs
@pytest.mark.parametrize("extra", [["method.contrast_design=distribution"], ["loss.contrast_warmup_iters=3"]])
def test_rounds_run_with_a_design_resumes_exactly(tmp_path, tiny_overrides, extra):
    over = tiny_overrides + ["method=bida", "train.iters=2", "train.rounds=1", *extra]
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
    if "distribution" in extra[0]:
        da, db = a["calibration"]["distribution"], b["calibration"]["distribution"]
        assert torch.equal(da["second"]["value"], db["second"]["value"]) and bool(da["mean"]["initialized"].any())


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


def test_teacher_prototypes_run_and_resume_exactly(tmp_path, tiny_overrides):
    cfg = load_config(None, tiny_overrides + ["method=bida", *TEACHER, "train.iters=3",
                                              "method.teacher_prototypes=true", "loss.contrast_warmup_iters=1"])
    full, part = tmp_path / "full", tmp_path / "part"
    ref = train(cfg, full)
    steps = [r for r in _records(full) if r.get("phase") == "teacher"]
    assert len(steps) == 3 and all(math.isfinite(r["loss/contrast_t2s"]) for r in steps)
    assert Trainer(cfg, part).fit(stop_after=2) is None
    assert Trainer(cfg, part, resume=True).fit()["mIoU"] == ref["mIoU"]
    a, b = (load_checkpoint(r / "checkpoints" / "last.pt") for r in (full, part))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_teacher_prototypes_are_the_teachers():
    """adapt_step builds the prototypes from proto_features: with them equal to the student's
    features the loss is the same, with other features it changes."""
    from bida.models import SegOutput
    from bida.train_step import adapt_step

    torch.manual_seed(0)
    cfg = load_config(None, ["method=bida", "method.calibration=false"])
    f_src, f_tgt = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)
    logits = torch.randn(2, 3, 4, 4)
    src = {"image": torch.zeros(2, 3, 4, 4), "label": torch.randint(0, 3, (2, 4, 4))}
    tgt = {"image": torch.zeros(2, 3, 4, 4), "label": torch.randint(0, 3, (2, 4, 4))}
    outs = (SegOutput(logits, f_src), SegOutput(logits, f_tgt))

    def loss(pf):
        r = adapt_step(None, src, tgt, cfg, None, 3, outputs=outs, seg_terms=False, proto_features=pf)
        return r.logs["loss/contrast_t2s"].item()

    assert loss(None) == loss((f_src, f_tgt))
    assert loss((f_src + 1.0, f_tgt)) != loss(None)


def test_removed_variants_are_refused_unless_at_their_former_default(tmp_path):
    for key, value in (("method.center_features", "batch"), ("method.t2s_dynamic", "separate"),
                       ("method.t2s_dynamic", "prototypes_only"), ("method.dynamic_t2s_weight", 0.5)):
        with pytest.raises(ConfigError, match=rf"^{key}: removed \(.*did not help"):
            load_config(None, ["method=bida", f"{key}={value}"])
    # an older run directory's config holds the former defaults: it still loads
    old = tmp_path / "config.yaml"
    old.write_text("method: {name: bida, center_features: none, t2s_dynamic: fused, dynamic_t2s_weight: 1.0}\n")
    cfg = load_config(old)
    assert cfg.method.name == "bida" and not hasattr(cfg.method, "center_features")
    old.write_text("method: {name: bida, center_features: batch}\n")
    with pytest.raises(ConfigError, match="method.center_features: removed"):
        load_config(old)


def test_preset_plus_adds_the_designs_that_won_on_its_schedule():
    from bida.presets import preset_overrides, preset_overrides_for

    base = preset_overrides("plus")
    rounds, teacher = preset_overrides("plus", "rounds"), preset_overrides("plus", "teacher")
    assert "method.pretrain_head=true" in teacher and "method.pretrain_head=true" not in rounds
    assert "loss.contrast_warmup_iters=100" in rounds and "loss.contrast_warmup_iters=100" not in teacher
    assert set(base) <= set(rounds) and set(base) <= set(teacher)
    from bida.demo import TRANSFORMER_DEMO_FILE

    mit = str(TRANSFORMER_DEMO_FILE)
    assert preset_overrides_for("plus", mit, []) == teacher
    cfg = load_config(mit, ["method=bida", *teacher])
    assert cfg.method.pretrain_head and cfg.method.memory_partners
    # DeepLab-V2: rounds, or the teacher schedule on ASPP features (no head): the preset alone
    assert preset_overrides_for("plus", None, []) == rounds and preset_overrides_for(None, None, []) == []
    assert preset_overrides_for("plus", None, ["train.schedule=teacher"]) == base
    assert preset_overrides_for("plus", None, ["train.schedule=teacher", "method.feature=backbone"]) == teacher
