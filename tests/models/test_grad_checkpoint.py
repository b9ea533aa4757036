"""Activation checkpointing (``model.grad_checkpoint``) changes memory, never results.

Each test runs the plain and the checkpointed model from the same weights, seed and input
and asks for bit-identical losses, gradients, buffers (BatchNorm statistics) and random
stream, then whole training runs (and their resumes) with the key on and off.
"""

from __future__ import annotations

import pytest
import torch

from bida.checkpoint import load_checkpoint
from bida.config import load_config
from bida.engine.train import Trainer, train
from bida.models import DINOv2Segmentor, DeepLabV2, MiTSegmentor
from bida.models.deeplabv2 import Stage


MIT_TINY = ["model.backbone=mit_b0", "model.width=0.25", "model.decoder_dim=32", "model.proj_dim=16"]


def _mit(grad_checkpoint: bool) -> MiTSegmentor:
    # drop path 0.5 and the decoder's dropout: random masks in every block
    return MiTSegmentor(5, width=0.25, decoder_dim=16, proj_dim=8, drop_path=0.5, decoder="daformer",
                        grad_checkpoint=grad_checkpoint)


def _dinov2(grad_checkpoint: bool) -> DINOv2Segmentor:
    # drop path 0.5, the decoder's dropout and the pyramid's BatchNorm; registers
    return DINOv2Segmentor(5, "dinov2_vits14_reg", width=0.125, decoder_dim=16, proj_dim=8, drop_path=0.5,
                           grad_checkpoint=grad_checkpoint)


def _resnet(grad_checkpoint: bool, **kw) -> DeepLabV2:
    # trained BatchNorm (running statistics updated by every training forward), both stems
    args = {"backbone": "resnet50", "width": 0.125, "freeze_bn": False, "feature": "backbone", "proj_dim": 8,
            "separate_target_stem": True} | kw
    return DeepLabV2(5, grad_checkpoint=grad_checkpoint, **args)


def _step(model, x: torch.Tensor, amp: bool):
    """One training forward and backward of both domains; what it leaves behind."""
    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        outs = [model(x, "source"), model(x.flip(-1), "target")]
        loss = sum(o.logits.float().square().mean() + o.features.float().square().mean() for o in outs)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, model.state_dict(), torch.rand(4)  # the generator after the step


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("make", [_mit, _dinov2, _resnet, lambda c: _resnet(c, freeze_bn=True, bn_batch_stats=True)],
                         ids=["mit_drop_path", "dinov2_drop_path", "resnet_bn", "resnet_bn_batch_stats"])
def test_checkpointed_step_is_bit_identical(make, amp):
    torch.manual_seed(0)
    plain = make(False).train()
    ckpt = make(True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    loss_a, grads_a, state_a, rand_a = _step(plain, x, amp)
    loss_b, grads_b, state_b, rand_b = _step(ckpt, x, amp)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    for name in state_a:  # running_mean/var and num_batches_tracked counted once per forward
        assert torch.equal(state_a[name], state_b[name]), name
    assert torch.equal(rand_a, rand_b)  # the recomputation put the generator back
    if isinstance(plain, DeepLabV2):  # the statistics did move (the comparison above is not vacuous)
        assert int(state_a["layer1.0.bn1.num_batches_tracked"]) == int(before["layer1.0.bn1.num_batches_tracked"]) + 1
        assert not torch.equal(state_a["layer3.0.bn2.running_mean"], before["layer3.0.bn2.running_mean"])


def test_checkpointing_only_in_training_with_grad(monkeypatch):
    """Evaluation and no-grad forwards (pseudo labels, the EMA teacher) run the blocks plainly."""
    import bida.models.grad_checkpoint as ckpt_mod

    calls = []
    real = ckpt_mod.checkpoint
    monkeypatch.setattr(ckpt_mod, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = _mit(True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        m.train()(x)
    m.eval()(x)
    assert calls == []
    m.train()(x)
    assert len(calls) == sum(m.backbone.depths)  # every MiT block, once
    calls.clear()
    d = _dinov2(True)
    d.train()(x)
    assert len(calls) == 12  # every ViT-S block, once
    calls.clear()
    r = _resnet(True, separate_target_stem=False, backbone="resnet18")
    r.train()(x)
    assert len(calls) == 8  # resnet18: 2 blocks in each of layer1..layer4
    assert all(isinstance(getattr(r, f"layer{i}"), Stage) for i in range(1, 5))


def test_layer4_forward_hook_fires_once_per_forward():
    """The feature distance hooks layer4; the recomputation in the backward must not call it again."""
    m = _resnet(True, separate_target_stem=False).train()
    seen = []
    m.layer4.register_forward_hook(lambda mod, i, o: seen.append(o))
    out = m(torch.randn(2, 3, 64, 64))
    out.logits.sum().backward()
    assert len(seen) == 1


def _final(run):
    ck = load_checkpoint(run / "checkpoints" / "last.pt")
    return ck["model"], ck.get("mean_teacher")


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("schedule", ["mit_teacher", "resnet_rounds"])
def test_checkpointed_run_equals_plain_run_and_resumes_exactly(tmp_path, tiny_overrides, schedule):
    if schedule == "mit_teacher":
        extra = MIT_TINY + ["model.drop_path=0.3", "method=bida", "train.schedule=teacher", "train.iters=3",
                            "train.optimizer=adamw", "train.lr=6e-4", "train.weight_decay=0.01"]
        stop = 2
    else:  # the default tiny ResNet trains its BatchNorms
        extra = ["method=bida", "train.iters=2", "train.iters_per_round=2", "train.rounds=1"]
        stop = 3  # mid round
    plain = load_config(None, tiny_overrides + extra)
    cfg = load_config(None, tiny_overrides + extra + ["model.grad_checkpoint=true"])
    assert cfg.model.grad_checkpoint and not plain.model.grad_checkpoint
    train(plain, tmp_path / "plain")
    train(cfg, tmp_path / "full")
    assert Trainer(cfg, tmp_path / "part").fit(stop_after=stop) is None
    Trainer(cfg, tmp_path / "part", resume=True).fit()
    (a, ta), (b, tb), (c, tc) = (_final(tmp_path / r) for r in ("plain", "full", "part"))
    _assert_same_weights(a, b)  # checkpointing changes nothing
    _assert_same_weights(b, c)  # and resumes exactly
    if schedule == "mit_teacher":
        _assert_same_weights(ta["teacher"]["model"], tb["teacher"]["model"])
        _assert_same_weights(tb["teacher"]["model"], tc["teacher"]["model"])


@pytest.mark.slow
def test_compiled_checkpointed_step_matches_the_plain_one():
    """Under torch.compile the compiler replays the blocks itself: BN statistics still move once."""
    torch.manual_seed(0)
    plain = _resnet(False, backbone="resnet18", separate_target_stem=False, feature="aspp_branches").train()
    ckpt = _resnet(True, backbone="resnet18", separate_target_stem=False, feature="aspp_branches").train()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    loss_a = plain(x).logits.square().mean()
    loss_a.backward()
    loss_b = torch.compile(ckpt, backend="aot_eager")(x).logits.square().mean()
    loss_b.backward()
    assert torch.equal(loss_a, loss_b)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.equal(a, b), name
