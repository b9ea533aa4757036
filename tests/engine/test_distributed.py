"""bida.engine.distributed: ranks against one process on the global batch, collectives, timeouts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from bida.config import load_config
from bida.engine import distributed
from bida.engine.distributed import DistContext, init_from_env, timeout_from_env
from bida.engine.train import train
from helpers import WORLD, _free_port


def test_single_process_context_is_a_no_op():
    ctx = DistContext()
    assert not ctx.enabled and ctx.prototype_reducer(3) is None
    assert ctx.mean_logs({"loss/total": 1.5}) == {"loss/total": 1.5}
    assert ctx.all_ranks(False) is False and ctx.all_ranks(True) is True
    model = torch.nn.Linear(2, 2)
    assert ctx.wrap(model) is model
    distributed.shutdown()  # no group: nothing to destroy


def test_collectives_in_buckets_cover_every_tensor_once_in_any_layout():
    # What average_gradients and broadcast_module run their collectives on: flat buckets per
    # dtype of at most bucket_elements values (a tensor larger than that gets one of its own),
    # results written back by index (channels_last too).
    from bida.engine.distributed import _in_buckets

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g).double(),
               torch.randn(2, 3, 4, 4, generator=g).to(memory_format=torch.channels_last), torch.arange(3),
               torch.randn(7, generator=g), torch.randn(2, generator=g)]
    before = [t.clone() for t in tensors]
    buckets = []

    def collective(flat: torch.Tensor) -> None:
        buckets.append((flat.dtype, flat.numel()))
        flat.mul_(2)

    _in_buckets(tensors, collective, bucket_elements=20)
    assert all(torch.equal(t, 2 * b) for t, b in zip(tensors, before))
    assert tensors[2].is_contiguous(memory_format=torch.channels_last)
    # float32: 12, then 96 (alone: larger than a bucket), then 7 + 2; float64: 5; int64: 3
    assert buckets == [(torch.float32, 12), (torch.float32, 96), (torch.float32, 9), (torch.float64, 5),
                       (torch.int64, 3)]


def test_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("BIDA_DIST_TIMEOUT_S", raising=False)
    assert timeout_from_env().total_seconds() == 1800
    monkeypatch.setenv("BIDA_DIST_TIMEOUT_S", "7.5")
    assert timeout_from_env().total_seconds() == 7.5
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv("BIDA_DIST_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="BIDA_DIST_TIMEOUT_S"):
            timeout_from_env()


STALLED_PEER = textwrap.dedent("""
    import sys, time
    from bida.engine import distributed
    ctx = distributed.init_from_env()
    try:
        if ctx.rank == 1:
            time.sleep(60)  # stuck: never reaches the barrier
        ctx.barrier()
    finally:
        distributed.shutdown()
""")


@pytest.mark.slow
def test_a_stalled_rank_makes_the_others_fail_after_the_timeout_not_hang():
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), BIDA_DIST_TIMEOUT_S="3")
        procs.append(subprocess.Popen([sys.executable, "-c", STALLED_PEER], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=45)
        assert procs[0].returncode != 0
        assert time.monotonic() - start < 45
        assert "timed out" in err.lower() or "timeout" in err.lower(), err[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# Rare-class sampling, ClassMix, MIC and BiDA's terms on; train.batch_size is the global batch.
TEACHER = ["method=bida", "train.schedule=teacher", "train.batch_size=4", "train.optimizer=adamw", "train.lr=6e-4",
           "data.rare_class_sampling=true", "data.rcs_min_pixels=2", "mic.weight=1", "mic.block_size=8",
           "pseudo.teacher_threshold=0.07", "train.checkpoint_every=1000"]  # 0.07: tiny models are unsure


def test_a_global_batch_that_the_ranks_cannot_split_is_a_one_line_config_error_on_every_schedule(
        tmp_path, tiny_overrides, monkeypatch, capsys):
    from bida.tools.cli import main

    # Rank 0 of 2 (no process group is needed: the check comes before any collective).
    monkeypatch.setattr(distributed, "init_from_env", lambda: DistContext(rank=0, world_size=2))
    for name, schedule in (("teacher", TEACHER), ("rounds", ["method=bida"]), ("source", ["method=source_only"])):
        run = tmp_path / name
        code = main(["train", *tiny_overrides, *schedule, "train.batch_size=3", "--out", str(run)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, (name, err)
        assert "train.batch_size: 3" in err[0] and "world size, 2 processes" in err[0], (name, err)
        assert not run.exists(), name


def test_train_under_torchrun_without_out_is_a_one_line_error(tmp_path, tiny_overrides, monkeypatch, capsys):
    # before: the default run directory holds the process id, so rank 1 chose a directory of its
    # own, found none of rank 0's files there (rare-class counts, pseudo labels) and failed
    from bida.tools.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["train", *tiny_overrides, *TEACHER]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs --out DIR" in err[0], err
    assert not (tmp_path / "runs").exists()
