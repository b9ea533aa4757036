"""BatchNorm over the global batch of a distributed run (``model.sync_bn``).

Under torchrun each process holds a slice of the global batch. A plain BatchNorm in
training normalises with its slice's statistics, so W processes compute something else
than one process on the whole batch. :class:`SyncBatchNorm2d` all-reduces the per-channel
sums first: every process normalises with, and updates its running statistics from, the
mean and variance of the global batch, and the gradients flow through the all-reduce, so
W processes give one process's losses, gradients and statistics (up to reduction order).

``torch.nn.SyncBatchNorm`` refuses CPU tensors (its kernels are GPU-only), so gloo runs
could not use it; this module is plain autograd around two all-reduces per forward and
works on any device. It is a :class:`torch.nn.BatchNorm2d` with no state of its own:
same parameters, buffers and state-dict keys, so checkpoints move freely between
world sizes, and outside a process group of two or more (one process, evaluation, eval
mode) its forward *is* ``BatchNorm2d.forward``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor


class AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: the backward sums the gradients over ranks too.

    Rank r's loss depends on every rank's contribution to the sum, so the gradient of rank
    q's contribution is the sum over r of dL_r/d(sum); DDP then averages over ranks, which
    gives the gradient of the mean of the rank losses.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # noqa: ARG004 - autograd API
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: ARG004 - autograd API
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def _distributed() -> bool:
    """Whether a process group of two or more processes is running (a host check, no device sync)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _channel(v: Tensor) -> Tensor:
    """(C,) -> (1, C, 1, 1), to broadcast over an (N, C, H, W) batch."""
    return v.reshape(1, -1, 1, 1)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` that, in training under a process group, uses the global batch's statistics.

    Normalises with the biased variance and updates ``running_var`` with the unbiased one,
    as ``BatchNorm2d`` does. The statistics are computed in float32 whatever the input's
    dtype (autocast), and the output has the input's dtype, as ``BatchNorm2d``'s.
    Every process must run the same training forwards (collectives pair up in order);
    forwards in eval mode, or with no process group, communicate nothing.

    Shape:
        - input: (N, C, H, W), this process's slice of the batch (N may differ by process)
        - output: same as input
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _distributed()):
            return super().forward(x)
        self._check_input_dim(x)
        xf = x.float()
        # Sums and the pixel count in one float64 collective: a count past 2**24 stays exact.
        local = torch.cat([xf.sum(dim=(0, 2, 3)).double(),
                           torch.full((1,), x.numel() // x.shape[1], dtype=torch.float64, device=x.device)])
        total = AllReduceSum.apply(local)  # (C + 1,)
        count = total[-1]
        mean = (total[:-1] / count.clamp_min(1)).float()  # (C,)
        centred = xf - _channel(mean)
        # Squared deviations from the global mean (a second pass): no cancellation, unlike E[x^2] - E[x]^2.
        sq = AllReduceSum.apply(centred.square().sum(dim=(0, 2, 3)).double())  # (C,)
        var = (sq / count.clamp_min(1)).float()
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        y = centred * _channel(scale)
        if self.bias is not None:
            y = y + _channel(self.bias)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), (sq / (count - 1).clamp_min(1)).float().detach())
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        """``BatchNorm2d``'s update: exponential (``momentum``) or cumulative (``momentum=None``) average."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # a device tensor: no host read of the count
            factor = 1.0 / self.num_batches_tracked.to(mean.dtype)
            self.running_mean.mul_(1 - factor).add_(factor * mean)
            self.running_var.mul_(1 - factor).add_(factor * unbiased_var)
        else:
            self.running_mean.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(unbiased_var, alpha=self.momentum)


def convert_sync_bn(model: nn.Module) -> int:
    """Make every ``BatchNorm2d`` of ``model`` that is in training mode a :class:`SyncBatchNorm2d`, in place.

    BatchNorms in eval mode (frozen: ``model.freeze_bn``) never use batch statistics and stay
    as they are. The conversion changes the class only: parameters, buffers, hooks and
    every reference to the modules (an optimizer, a target-stem copy) stay valid.

    Returns:
        How many BatchNorms were converted.
    """
    converted = 0
    for m in model.modules():
        if type(m) is nn.BatchNorm2d and m.training:
            m.__class__ = SyncBatchNorm2d
            converted += 1
    return converted
