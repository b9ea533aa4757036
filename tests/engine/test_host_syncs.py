"""A steady-state training step never waits for the device.

On a GPU, every read of a device value on the host (``.item()``, ``float(t)``, ``bool(t)``,
``.tolist()``, ``.cpu()``) and every op whose output size depends on the data
(``nonzero``, boolean-mask indexing) stalls the launch queue. These tests run real CPU
training steps of every method and record both kinds of reads inside the step (forward,
losses, method extras, backward, optimizer, log accumulation); log records, evaluation
and checkpoints are outside it. The one read allowed is the step's finiteness flag
(:func:`bida.engine.guard._step_is_finite`), once a step.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bida.config import load_config
from bida.engine import guard
from bida.engine.runlog import LogAccumulator
from bida.engine.stop import StopControl
import bida.method.train_step
import bida.method.teacher

HOST_READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "cpu", "numpy")
ATEN = torch.ops.aten
DATA_DEPENDENT = {ATEN._local_scalar_dense.default, ATEN.nonzero.default, ATEN.masked_select.default,
                  ATEN.is_nonzero.default, ATEN.unique_dim.default, ATEN._unique2.default}


def _allowed() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "_step_is_finite":
            return True
        frame = frame.f_back
    return False


class _Recorder(TorchDispatchMode):
    """Records data-dependent ops (the ones that synchronise on a GPU) while ``active``."""

    def __init__(self, state: dict):
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.state["depth"] and not _allowed():
            bool_index = func is ATEN.index.Tensor and any(
                i is not None and i.dtype == torch.bool for i in args[1])
            if func in DATA_DEPENDENT or bool_index:
                self.state["reads"].append(str(func))
        return func(*args, **kwargs)


def _watch(monkeypatch) -> dict:
    import bida.engine.train as tr

    state = {"depth": 0, "reads": [], "flag_reads": 0, "steps": 0}
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def wrapped(self, *args, _real=real, _name=name, **kwargs):
            if state["depth"]:
                if _allowed():
                    state["flag_reads"] += 1
                else:
                    state["reads"].append(_name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)

    def in_step(fn, count=False):
        def run(*args, **kwargs):
            state["depth"] += 1
            state["steps"] += count
            try:
                with _Recorder(state):  # only inside the step: evaluation and pseudo labels run at full speed
                    return fn(*args, **kwargs)
            finally:
                state["depth"] -= 1
        return run

    monkeypatch.setattr(bida.method.train_step, "source_step", in_step(bida.method.train_step.source_step, count=True))
    monkeypatch.setattr(bida.method.train_step, "adapt_step", in_step(bida.method.train_step.adapt_step, count=True))
    monkeypatch.setattr(bida.method.teacher, "teacher_step", in_step(bida.method.teacher.teacher_step, count=True))
    # The loop's part of a step (Trainer._train_phase): backward, the gradients, the finiteness
    # flag and its one read, the optimizer step.
    monkeypatch.setattr(torch.Tensor, "backward", in_step(torch.Tensor.backward))
    monkeypatch.setattr(guard, "gradients", in_step(guard.gradients))
    monkeypatch.setattr(guard, "finite_flag", in_step(guard.finite_flag))
    monkeypatch.setattr(StopControl, "agree_on_step", in_step(StopControl.agree_on_step))
    monkeypatch.setattr(torch.amp.GradScaler, "step", in_step(torch.amp.GradScaler.step))
    monkeypatch.setattr(torch.amp.GradScaler, "update", in_step(torch.amp.GradScaler.update))
    monkeypatch.setattr(LogAccumulator, "add", in_step(LogAccumulator.add))
    return state


# source_only's step is the source phase of each of these runs.
# The last case turns on the BiDA options off by default that add work to the step.
BIDA_OPTIONS = ["loss.contrast_resolution=label", "method.memory_partners=true"]
# The contrast designs: the source stage trains the head, warm-up over the first of two steps.
DESIGNS = ["method.feature=backbone", "model.proj_dim=8",
           "method.pretrain_head=true", "loss.contrast_warmup_iters=1"]


# self_training's terms are a subset of bida's.
@pytest.mark.parametrize("method, options", [("minent", []), ("bida", []), ("bida", BIDA_OPTIONS), ("bida", DESIGNS)],
                         ids=["minent", "bida", "bida-options", "bida-designs"])
def test_steady_state_steps_read_nothing_from_the_device_but_their_finite_flag(tmp_path, tiny_overrides,
                                                                               monkeypatch, method, options):
    import bida.engine.train as tr

    cfg = load_config(None, tiny_overrides + options + [
        f"method={method}", "train.iters=2", "train.iters_per_round=2", "train.rounds=1", "train.log_every=1000",
        "train.checkpoint_every=1000", "train.eval_every=1000", "pseudo.dynamic_for_segmentation=true",
        "eval.max_images=1"])
    trainer = tr.Trainer(cfg, tmp_path / "run")
    state = _watch(monkeypatch)
    trainer.fit()
    assert state["steps"] == 4  # 2 source steps, then 2 of the method
    assert state["reads"] == [], f"host reads inside a {method} step: {sorted(set(state['reads']))}"
    assert state["flag_reads"] == state["steps"]  # one finiteness read a step, no more
    logged = [r for r in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"loss/' in r]
    assert len(logged) == 2  # one record at the end of each phase


# The mean-teacher step of both methods, with ClassMix, rare-class sampling and MIC's masking.
# SGD: on a CPU, AdamW reads its step counter (a host tensor) with .item(), which the recorder
# cannot tell from a device read.
DINOV2 = ["model.backbone=dinov2_vits14_reg", "model.decoder=daformer", "model.decoder_dim=16", "model.proj_dim=8",
          "model.drop_path=0.1", "train.layer_decay=0.9"]


TEACHER_DESIGNS = ["method.memory_partners=true", "loss.contrast_warmup_iters=1"]
# DAFormer's published switches (the DAFormer and MIC configs): crop bands, the batch's
# ClassMix candidates, all-pixel CE means, separate forwards, teacher BN batch statistics.
DAFORMER = ["pseudo.ignore_top=3", "pseudo.ignore_bottom=5", "train.mix_classes=batch", "loss.source_ce_mean=all",
            "loss.pseudo_ce_mean=all", "train.student_forwards=separate", "train.teacher_bn=batch"]
# VFM-UDA's switches: light head, input resize, token masking, flip-averaged teacher, weak jitter.
VFM_UDA = ["model.backbone=dinov2_vits14", "model.decoder=light", "model.input_scale=1.1", "model.mask_token=true",
           "model.proj_dim=8", "model.drop_path=0.0", "train.decay_norms_biases=true", "train.teacher_bn=batch",
           "pseudo.teacher_flip=true", "data.weak_jitter=true"]


@pytest.mark.parametrize("method, extra", [("self_training", []), ("bida", []), ("bida", DINOV2),
                                           ("bida", TEACHER_DESIGNS), ("bida", DAFORMER), ("bida", VFM_UDA),
                                           ("bida", DAFORMER + ["method.target_features=mixed"])],
                         ids=["self_training", "bida", "bida_dinov2", "bida_designs", "bida_daformer_switches",
                              "bida_vfm_uda", "bida_mixed_target_features"])
def test_teacher_steps_with_mic_read_nothing_from_the_device_but_their_finite_flag(tmp_path, tiny_overrides,
                                                                                   monkeypatch, method, extra):
    import bida.engine.train as tr

    cfg = load_config(None, tiny_overrides + extra + [
        f"method={method}", "train.schedule=teacher", "train.iters=2",
        "train.log_every=1000", "train.checkpoint_every=1000", "train.eval_every=1000", "eval.max_images=1",
        "data.rare_class_sampling=true", "data.rcs_min_pixels=2", "mic.weight=1", "mic.block_size=8"])
    trainer = tr.Trainer(cfg, tmp_path / "run")
    state = _watch(monkeypatch)
    trainer.fit()
    assert state["steps"] == 2
    assert state["reads"] == [], f"host reads inside a teacher {method} step: {sorted(set(state['reads']))}"
    assert state["flag_reads"] == state["steps"]
    logged = [r for r in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"loss/mic"' in r]
    assert len(logged) == 1  # one record at the end of the phase


def test_the_recorder_sees_the_reads_it_forbids(monkeypatch):
    state = _watch(monkeypatch)
    x = torch.arange(4.0)
    state["depth"] = 1
    with _Recorder(state):
        float(x.sum())
        x[x > 1].sum()
        x.tolist()
    state["depth"] = 0
    assert "__float__" in state["reads"] and "tolist" in state["reads"]
    assert str(ATEN._local_scalar_dense.default) in state["reads"]
    assert str(ATEN.index.Tensor) in state["reads"]


def _teacher_rank_reads(rank: int, world: int, overrides: list[str], run: str, port: int) -> None:
    """Rank ``rank`` of a 2-process gloo teacher run, recording its host reads (as the test above)."""
    import json
    import os
    from pathlib import Path

    import bida.engine.train as tr
    from bida.engine import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), BIDA_DIST_TIMEOUT_S="120")
    torch.set_num_threads(1)
    patch = pytest.MonkeyPatch()
    try:
        trainer = tr.Trainer(load_config(None, overrides), Path(run))
        state = _watch(patch)
        trainer.fit()
        (Path(run).parent / f"reads-rank{rank}.json").write_text(json.dumps(state))
    finally:
        patch.undo()
        distributed.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], DAFORMER], ids=["defaults", "daformer_switches"])
def test_teacher_steps_under_two_ranks_read_nothing_from_the_device_but_their_finite_flag(tmp_path, tiny_overrides,
                                                                                         extra):
    # The collectives the teacher step adds under torchrun (global quality weight and means,
    # BiDA's prototypes, the batch's ClassMix candidates, the gradient average, the flags)
    # stay on the device.
    import json

    import torch.multiprocessing as mp
    from helpers import _free_port

    overrides = tiny_overrides + extra + [
        "method=bida", "train.schedule=teacher", "train.batch_size=4", "train.iters=2", "train.log_every=1000",
        "train.checkpoint_every=1000", "train.eval_every=1000", "eval.max_images=1", "data.rare_class_sampling=true",
        "data.rcs_min_pixels=2", "mic.weight=1", "mic.block_size=8"]
    mp.spawn(_teacher_rank_reads, args=(2, overrides, str(tmp_path / "run"), _free_port()), nprocs=2, join=True)
    for rank in range(2):
        state = json.loads((tmp_path / f"reads-rank{rank}.json").read_text())
        assert state["steps"] == 2
        assert state["reads"] == [], f"host reads inside rank {rank}'s teacher step: {sorted(set(state['reads']))}"
        assert state["flag_reads"] == state["steps"]
