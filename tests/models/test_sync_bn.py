"""bida.models.sync_bn: BatchNorm over the global batch of 2 gloo processes, and the conversion.

The reference is ``torch.nn.BatchNorm2d`` run by each process on the whole global batch
(outputs, input and parameter gradients, running statistics); without a process group the
converted module must be ``BatchNorm2d`` bit for bit.
"""

from __future__ import annotations

import pytest
import copy
import os

import torch
import torch.multiprocessing as mp
import torch.nn as nn

from bida.config import load_config
from bida.method.teacher import EMATeacher, bn_batch_stats_only
from bida.models import build_model
from bida.models.grad_checkpoint import checkpointed
from bida.models.sync_bn import SyncBatchNorm2d, convert_sync_bn
from helpers import WORLD

SLICES = (slice(0, 1), slice(1, 4))  # unequal slices: the statistics must weigh by pixel count


def _bn_pair(momentum: float | None = 0.1) -> tuple[nn.BatchNorm2d, nn.BatchNorm2d]:
    """A reference BatchNorm2d with non-trivial affine parameters and statistics, and a converted copy."""
    g = torch.Generator().manual_seed(3)
    ref = nn.BatchNorm2d(3, momentum=momentum)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=g)
        ref.bias.normal_(generator=g)
        ref.running_mean.normal_(generator=g)
        ref.running_var.uniform_(0.5, 2.0, generator=g)
    sync = copy.deepcopy(ref)
    assert convert_sync_bn(sync) == 1 and type(sync) is SyncBatchNorm2d
    return ref, sync


def _batches() -> tuple[torch.Tensor, torch.Tensor]:
    """A global batch of 4 (mean far from 0: a one-pass variance would lose digits) and loss weights."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 5, 6, generator=g) * 3 + 20, torch.randn(4, 3, 5, 6, generator=g)


def _close(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=what)


def _rank(rank: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        x, w = _batches()
        part = SLICES[rank]
        for momentum in (0.1, None):  # exponential and cumulative running averages, two steps each
            ref, sync = _bn_pair(momentum)
            for step in range(2):
                x_ref, x_own = x.clone().requires_grad_(), x[part].clone().requires_grad_()
                y_ref = ref(x_ref)
                (y_ref * w).sum().backward()
                y = sync(x_own)
                (y * w[part]).sum().backward()
                _close(y.detach(), y_ref.detach()[part], f"output {momentum} {step}")
                # The input gradient: the global loss's (the all-reduce sums the other rank's share).
                _close(x_own.grad, x_ref.grad[part], f"input grad {momentum} {step}")
                # Parameter gradients: this rank's share; summed over ranks, the global batch's.
                grads = torch.stack([sync.weight.grad, sync.bias.grad])
                dist.all_reduce(grads)
                _close(grads, torch.stack([ref.weight.grad, ref.bias.grad]), f"param grads {momentum} {step}")
                for p in (*ref.parameters(), *sync.parameters()):
                    p.grad = None
                _close(sync.running_mean, ref.running_mean, f"running mean {momentum} {step}")
                _close(sync.running_var, ref.running_var, f"running var {momentum} {step}")
                assert int(sync.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
        # Eval mode: the stored statistics, no collective (rank 1 alone could not pair one up).
        ref, sync = _bn_pair()
        ref.eval(), sync.eval()
        if rank == 1:
            assert torch.equal(sync(x), ref(x))
        dist.barrier()
        # bf16 autocast: the output keeps the input's dtype, the statistics are float32 ones.
        ref, sync = _bn_pair()
        x16 = x.bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = sync(x16[part])
        assert y.dtype == torch.bfloat16
        with torch.no_grad():
            y_ref = ref(x16.float())
        _close(y.float(), y_ref[part], "bf16 output", rtol=1e-2, atol=2e-2)
        _close(sync.running_var, ref.running_var, "bf16 running var")
        # The EMA teacher's batch mode (bn_batch_stats_only on an eval-mode copy): the global
        # batch's statistics, its own left untouched.
        ref, sync = _bn_pair()
        sync.eval()
        before = copy.deepcopy(sync.state_dict())
        with torch.no_grad(), bn_batch_stats_only(sync, eval_too=True):
            y = sync(x[part])
        assert not sync.training and all(torch.equal(before[k], v) for k, v in sync.state_dict().items())
        with torch.no_grad():
            _close(y, ref(x)[part], "batch statistics of an eval-mode copy")
        # Inside activation checkpointing (the recomputation communicates again, and its
        # buffer updates are undone) and under torch.compile: the same as the plain module.
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        convert_sync_bn(net)
        plain, ckpt, compiled = net, copy.deepcopy(net), copy.deepcopy(net)
        outs = []
        for model, run in ((plain, plain), (ckpt, lambda t: checkpointed(ckpt, t)),
                           (compiled, torch.compile(compiled, backend="aot_eager"))):
            inp = x[part].clone().requires_grad_()
            out = run(inp)
            (out * out).sum().backward()
            outs.append((out.detach(), inp.grad, model[0].weight.grad, model[1].running_var.clone(),
                         int(model[1].num_batches_tracked)))
        for name, got in zip(("checkpointed", "compiled"), outs[1:]):
            for a, b in zip(got[:4], outs[0][:4]):
                _close(a, b, name, rtol=1e-6, atol=1e-6)
            assert got[4] == outs[0][4] == 1, name
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_normalise_with_the_global_batch_as_batchnorm_does():
    from helpers import _free_port

    mp.spawn(_rank, args=(_free_port(),), nprocs=WORLD, join=True)


def test_conversion_takes_the_batchnorms_that_train_and_changes_nothing_in_one_process():
    tiny = ["model.width=0.125", "model.decoder_dim=16", "model.proj_dim=16"]
    mit = build_model(load_config(None, tiny + ["model.backbone=mit_b0", "data.normalize=imagenet"]).model, 5)
    frozen = build_model(load_config(None, tiny + ["model.freeze_bn=true"]).model, 5)
    batch_stats = build_model(load_config(None, tiny + ["model.freeze_bn=true", "model.bn_batch_stats=true"]).model, 5)
    trainable = build_model(load_config(None, tiny).model, 5)
    for model in (mit, frozen, batch_stats, trainable):
        model.train()
    counts = {name: (sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()),
                     sum(isinstance(m, nn.BatchNorm2d) and m.training for m in model.modules()))
              for name, model in (("mit", mit), ("frozen", frozen), ("bn_batch_stats", batch_stats),
                                  ("trainable", trainable))}
    plain = copy.deepcopy(mit)
    converted = {name: convert_sync_bn(model) for name, model in (("mit", mit), ("frozen", frozen),
                                                                  ("bn_batch_stats", batch_stats),
                                                                  ("trainable", trainable))}
    # Every BatchNorm in training mode (the decoder's; DeepLab's unless frozen in eval mode), none other.
    assert converted == {name: training for name, (_, training) in counts.items()}
    assert converted["frozen"] == 0 and converted["mit"] > 0
    assert converted["bn_batch_stats"] == counts["bn_batch_stats"][0]  # all of them: in training mode
    frozen.train()  # DeepLab-V2's train() keeps frozen BN in eval mode, converted or not
    assert not any(m.training for m in frozen.modules() if isinstance(m, nn.BatchNorm2d))
    # The same state dict (keys, values): checkpoints load across world sizes.
    assert plain.state_dict().keys() == mit.state_dict().keys()
    assert all(torch.equal(v, mit.state_dict()[k]) for k, v in plain.state_dict().items())
    # Without a process group a training forward is BatchNorm2d's, bit for bit (statistics too).
    x = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    ref = plain(x, "source").logits
    torch.manual_seed(1)
    got = mit(x, "source").logits
    assert torch.equal(got, ref)
    assert all(torch.equal(v, mit.state_dict()[k]) for k, v in plain.state_dict().items())
    # The EMA teacher is a copy: synchronised too, and its batch mode leaves its statistics alone.
    teacher = EMATeacher(0.9, bn="batch")
    teacher.reset(mit)
    assert sum(isinstance(m, SyncBatchNorm2d) for m in teacher.model.modules()) == converted["mit"]
    before = copy.deepcopy(teacher.model.state_dict())
    teacher.pseudo_labels(x, None, 0.5)
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in before.items())


def test_a_run_synchronises_its_batchnorms_only_under_torchrun_with_model_sync_bn():
    from bida.engine.distributed import DistContext
    from bida.engine.setup import build_student

    def synced(world: int, *overrides: str) -> int:
        cfg = load_config(None, ["model.width=0.125", *overrides])
        model = build_student(cfg, 5, DistContext(world_size=world), torch.device("cpu"))
        return sum(isinstance(m, SyncBatchNorm2d) for m in model.modules())

    trainable = sum(isinstance(m, nn.BatchNorm2d) for m in build_model(load_config(None, ["model.width=0.125"]).model,
                                                                      5).modules())
    assert synced(2) == trainable > 0  # the default: on under torchrun
    assert synced(1) == 0  # one process: the plain model, saved and loaded as ever
    assert synced(2, "model.sync_bn=false") == 0
    assert synced(2, "model.freeze_bn=true") == 0  # frozen (eval-mode) BatchNorm stays as it is
