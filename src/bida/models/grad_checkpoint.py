"""Activation checkpointing (``model.grad_checkpoint``) that leaves training unchanged.

A checkpointed module keeps only its inputs during the forward and runs its forward again
in the backward to get the activations its gradients need: less memory for more compute.
For the result to be the plain model's, bit for bit, the second run must draw the same
random numbers and must not count as a second step:

- stochastic depth and dropout: the non-reentrant checkpoint saves the CPU and device
  generator states before the forward and replays them in the recomputation (then puts the
  generators back), so the masks are the same and the run's random stream goes on as
  without checkpointing (exact resume holds);
- BatchNorm in training mode: the forward updates the running statistics (and
  ``num_batches_tracked``); a second forward would update them twice. The recomputation
  normalises with the same batch statistics and its updates of the buffers are undone.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def checkpointing(module: nn.Module, enabled: bool) -> bool:
    """Whether ``module`` should checkpoint now: asked for, in training mode and with grad enabled.

    In evaluation and under ``torch.no_grad`` (pseudo labels, the EMA teacher) there is no
    backward, so nothing would be saved.
    """
    return enabled and module.training and torch.is_grad_enabled()


def _running_stats(module: nn.Module) -> list[Tensor]:
    """The buffers that a training forward of ``module`` updates (BatchNorm statistics)."""
    return [b for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
            for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]


@contextlib.contextmanager
def _kept(buffers: list[Tensor]) -> Iterator[None]:
    """``buffers`` after the block are what they were before it.

    The recomputation must normalise exactly as the forward did (batch statistics) and save
    the same tensors for the backward, so BN runs unchanged and its buffers are put back.
    """
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def checkpointed(module: nn.Module, *args: Any) -> Tensor:
    """``module(*args)``, its activations recomputed in the backward instead of kept.

    Gives the same outputs, gradients, BatchNorm statistics and random stream as ``module(*args)``.
    Under ``torch.compile`` the compiler replays the block inside its own graphs, where the
    buffer updates are not repeated, so nothing is put back (and none can be: the compiler
    takes no recomputation context).
    """
    buffers = [] if torch.compiler.is_compiling() else _running_stats(module)
    if not buffers:
        return checkpoint(module, *args, use_reentrant=False)
    return checkpoint(module, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _kept(buffers)))
