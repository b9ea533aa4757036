"""Distributed data parallel through ``torchrun`` (nccl on GPU, gloo on CPU).

:func:`init_from_env` reads torchrun's environment; without it every method is a cheap
no-op, so the trainer has one code path. W processes with batch b compute what one
process computes with batch W*b (the sampler gives rank r the r-th slice of each global
batch, see :class:`~bida.data.datasets.InfiniteBatchSampler`):

- Prototypes: per-class feature sums and pixel counts are all-reduced (differentiably)
  before dividing (docs/method.md section 1), so every rank holds the prototypes of the global
  batch. Label transfer, the target prototypes and the calibration EMAs follow from
  them, hence agree across ranks without any further communication.
- Per-pixel mean losses (cross entropy with ignored pixels, entropy, contrast): a rank's
  local mean weighs its pixels by its own count. :meth:`GlobalBatch.global_means` turns
  it into ``W * local_sum / global_count``; DDP averages gradients over the W ranks, so
  the gradient (and the mean of the rank losses) is that of the global-batch mean.
- Logs: :meth:`DistContext.mean_logs` averages them over ranks, so that rank 0 logs the
  losses of the global batch.
- BatchNorm that trains (MiT/DINOv2 decoders, DeepLab-V2 without ``model.freeze_bn``):
  with ``model.sync_bn`` (the default) it is a :class:`~bida.models.sync_bn.SyncBatchNorm2d`
  that normalises with the global batch's statistics (all-reduced sums, differentiable),
  so its running statistics are equal on every rank, as one process's. With
  ``model.sync_bn: false`` each rank normalises with its own slice's statistics, as plain
  DDP does; the running statistics are then averaged over ranks
  (:meth:`DistContext.average_bn_statistics`) before each evaluation and each checkpoint,
  so every rank evaluates the model the checkpoint holds (the running-average update is
  linear, so averaging at any point gives the same statistics later, up to rounding). The
  paper freezes BN, which has no batch statistics.

``train.batch_size`` is the global batch on every schedule and stage: each of the W ranks
trains on its slice of ``batch_size / W`` images (:func:`~bida.engine.schedules.rank_batch`).

The mean-teacher schedule (``train.schedule: teacher``) runs several forwards of the student
in a step (source, mixed, MIC's masked and BiDA's unmixed target images), which DDP, one
forward per backward, does not allow; the student is left unwrapped and
:meth:`DistContext.average_gradients` averages the gradients after the backward, as DDP
would. ClassMix and MIC draw the random numbers of the whole global batch on every rank and
keep their rows (:func:`bida.mixing.global_rand`); the teacher's quality weight counts the
global batch (:meth:`GlobalBatch.sum`). With ``model.sync_bn: false`` the student's
BatchNorm running statistics are averaged over ranks after every step, where the EMA reads
them, so the student and the EMA teacher stay identical on every rank (synchronised
BatchNorm, and the teacher's with ``train.teacher_bn: batch``, use the global batch's).
Not reproduced: dropout and stochastic depth draw from each rank's own torch generator
(independent masks for every image, as in one process, but not the masks one process
draws); checkpoints hold every rank's generator state.

Stops: a SIGTERM/SIGINT that reaches one rank reaches all of them at the next point
where the ranks meet anyway: the step's finiteness all-reduce carries it
(:meth:`DistContext.step_flags`), evaluations poll it before each image
(:meth:`DistContext.poll`), and while rank 0 works alone (pseudo labels, pixel counts) the
other ranks poll it instead of waiting in a barrier, where their signal handler could
not run. Every rank then stops at the same point, saves once (rank 0 writes) and exits.

A rank that fails or stalls must not hang the others forever: every collective times
out after ``BIDA_DIST_TIMEOUT_S`` seconds (default 1800). While rank 0 alone generates a
round's pseudo labels, the others meet it once per image (see "Stops" above), so the
timeout bounds the time of one image or one checkpoint write, not of the whole pass.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from ..models import SegOutput
from ..models.sync_bn import AllReduceSum, SyncBatchNorm2d
from ..method.prototypes import class_sums, prototypes_from_sums

TIMEOUT_ENV = "BIDA_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0  # 30 min: far longer than any step, image or checkpoint write

# Whether init_from_env created the default process group (and so must destroy it):
# a group that a caller created itself is left to that caller.
_owns_group = False


class GlobalBatch:
    """Statistics of the global batch, computed from this rank's slice of it.

    What :func:`~bida.train_step.adapt_step` takes as ``reduce_sums`` (made by
    :meth:`DistContext.prototype_reducer`, in every rank of a running process group):
    ``reduce_sums(features, labels)`` gives the prototypes of the global batch and
    :meth:`global_means` rescales per-pixel mean losses.
    """

    def __init__(self, num_classes: int, world_size: int) -> None:
        self.num_classes = num_classes
        self.world_size = world_size

    def __call__(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Prototypes of the global batch from all-reduced class sums and counts.

        Sums and counts travel in one tensor (one collective forwards, one backwards);
        the all-reduce is differentiable, so every rank's features get the gradient of
        every rank's use of the prototypes.

        Shape:
            - features: (b, D, h, w), this rank's slice
            - labels: (b, h, w)
            - output: (K, D) prototypes and (K,) bool present
        """
        sums, counts = class_sums(features, labels, self.num_classes)  # (K, D), (K,)
        packed = AllReduceSum.apply(torch.cat([sums, counts[:, None]], dim=1))  # (K, D+1)
        return prototypes_from_sums(packed[:, :-1], packed[:, -1])

    @staticmethod
    def sum(tensor: Tensor) -> Tensor:
        """Sum over ranks of a statistic without gradient (e.g. pixel counts); a new tensor.

        One all-reduce on the tensor's device: no host synchronisation.
        """
        total = tensor.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    def global_means(self, means: dict[str, Tensor], counts: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's share of each global-batch mean: ``W * local_sum / global_count``.

        ``means[k]`` is a local mean over ``counts[k]`` pixels (0 when there are none, as
        every bida loss returns); terms without a count are returned unchanged. The counts
        of all terms are all-reduced in one collective.

        Args:
            means: Local per-pixel means (with graph).
            counts: Number of pixels behind each local mean (tensor or int).

        Returns:
            The rescaled terms, same keys as ``means``.
        """
        keys = sorted(k for k in means if k in counts)
        if not keys:
            return dict(means)
        device = means[keys[0]].device
        # float64: a global pixel count can pass 2**24, where float32 stops being exact.
        local = torch.stack([torch.as_tensor(counts[k], dtype=torch.float64).to(device) for k in keys])
        total = local.clone()
        dist.all_reduce(total)
        scale = (local.clamp_min(1) * self.world_size / total.clamp_min(1)).float()  # (len(keys),)
        scaled = {k: means[k] * scale[i] for i, k in enumerate(keys)}
        return {k: scaled.get(k, v) for k, v in means.items()}


class DomainPair(torch.nn.Module):
    """What DDP wraps: ``model`` on one domain, or on both in one call.

    DDP learns which parameters a step uses by walking back from the tensors one forward
    call returns, and expects a gradient for every parameter it reaches. Hence:

    - both domains in one call: with a separate target stem, a second call would declare
      the source stem unused and its gradient would arrive twice
      (:func:`~bida.train_step.forward_pair` makes this call under DDP);
    - ``uses_features=False`` (phases whose losses ignore the contrast features) returns
      them detached: a projection head (``method.feature: backbone``) that no loss uses
      would otherwise wait for a gradient forever.

    Shape:
        x (B, 3, H, W) -> SegOutput; with ``x_target``, (SegOutput, SegOutput).
    """

    def __init__(self, model: torch.nn.Module, uses_features: bool = True) -> None:
        super().__init__()
        self.model = model
        self.uses_features = uses_features

    def _run(self, x: Tensor, domain: str):
        out = self.model(x, domain)
        return out if self.uses_features else SegOutput(out.logits, out.features.detach())

    def forward(self, x: Tensor, domain: str = "source", x_target: Tensor | None = None):
        if x_target is None:
            return self._run(x, domain)
        return self._run(x, domain), self._run(x_target, "target")


@dataclass
class DistContext:
    """This process's place in the run; every method is a no-op when single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def wrap(self, model: torch.nn.Module, uses_features: bool = True) -> torch.nn.Module:
        """``model`` in DDP (unchanged when single process); see :class:`DomainPair`.

        ``uses_features``: whether the phase's losses use ``SegOutput.features`` (BiDA
        rounds). Wrap once per phase: which outputs reach the loss depends on it.
        """
        if not self.enabled:
            return model
        ids = [self.local_rank] if self.device is not None and self.device.type == "cuda" else None
        # Parameters outside a step's loss: the target stem in the source stage, the projection
        # head of method.feature=backbone in the baselines. Searching for them costs a graph
        # traversal per step, so only models that have them pay it.
        unused = getattr(model, "target_stem", None) is not None or getattr(model, "proj", None) is not None
        return torch.nn.parallel.DistributedDataParallel(DomainPair(model, uses_features), device_ids=ids,
                                                         find_unused_parameters=unused)

    def shard(self, dataset):
        """Every world_size-th item from this rank (evaluation and pseudo labels)."""
        if not self.enabled:
            return dataset
        return torch.utils.data.Subset(dataset, list(range(self.rank, len(dataset), self.world_size)))

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if not self.enabled:
            return tensor
        t = tensor.to(self.device or "cpu")
        dist.all_reduce(t)
        return t.to(tensor.device)

    def all_ranks(self, flag: bool) -> bool:
        """True when ``flag`` holds in every rank (e.g. "the loss is finite").

        Decisions that skip a collective (a backward pass) must be the same everywhere, or
        the ranks that go ahead wait for the others until the timeout.
        """
        if not self.enabled:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=self.device or "cpu")
        dist.all_reduce(t)
        return float(t) == 0.0

    def step_flags(self, finite: Tensor, stop: int) -> Tensor:
        """The step's one collective: whether ``finite`` holds on every rank, and any rank's stop.

        ``stop`` is the signal number a rank was stopped by (0: none). Single process:
        ``finite`` itself. Distributed: a (2,) float tensor on the device, (1 if some rank's
        step was not finite, the largest stop signal of any rank): one all-reduce (MAX) and
        no host sync (``torch.full`` writes the host value with a kernel, not a copy).

        Shape:
            - finite: () bool; output: () bool, or (2,) float
        """
        if not self.enabled:
            return finite
        flags = torch.stack([(~finite).float().reshape(()), torch.full((), float(stop), device=finite.device)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags

    def poll(self, stop: int, done: bool = False) -> tuple[int, bool]:
        """(largest stop signal of any rank, whether any rank is ``done``): one small all-reduce.

        The stop check of passes that every rank runs in step (evaluation shards), and the
        wait of ranks while rank 0 works alone: rank 0 polls before each item and once with
        ``done`` at the end, the others poll until they see a stop or ``done``.
        """
        if not self.enabled:
            return stop, done
        t = torch.tensor([float(stop), 1.0 if done else 0.0], device=self.device or "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        got_stop, got_done = t.tolist()
        return int(got_stop), got_done > 0

    def average_bn_statistics(self, model: torch.nn.Module) -> None:
        """Average the running statistics of trainable BatchNorm over ranks, in place (one all-reduce).

        Each rank updates them from its own slice of the batch; averaged, every rank holds
        the same model, so a checkpoint written by rank 0 is the model every rank evaluated.
        BatchNorm in eval mode (``model.freeze_bn``) is never updated and left alone, and so is
        a :class:`~bida.models.sync_bn.SyncBatchNorm2d` (``model.sync_bn``): its statistics are
        the global batch's, equal on every rank already, and averaging equal values is not
        exact for 3 or more ranks.
        """
        if not self.enabled:
            return
        stats = [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
                 and not isinstance(m, SyncBatchNorm2d) for b in (m.running_mean, m.running_var) if b is not None]
        if not stats:
            return
        flat = torch.cat([b.detach().reshape(-1).float() for b in stats]).to(self.device or "cpu")
        dist.all_reduce(flat)
        flat /= self.world_size
        with torch.no_grad():
            for b, part in zip(stats, flat.split([b.numel() for b in stats])):
                b.copy_(part.reshape(b.shape))

    def average_gradients(self, grads: list[Tensor]) -> None:
        """Average gradients over ranks in place, as DDP's reducer does (for steps DDP cannot wrap).

        Packed into flat buckets (:func:`_in_buckets`), one all-reduce each, on the device:
        no host synchronisation. Every rank must pass the gradients of the same parameters
        in the same order (one configuration gives every rank the same graph).
        """
        if not self.enabled:
            return

        def average(flat: Tensor) -> None:
            dist.all_reduce(flat)
            flat /= self.world_size

        _in_buckets(grads, average)

    def broadcast_module(self, model: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (what DDP does when it wraps a model)."""
        if not self.enabled:
            return
        with torch.no_grad():
            _in_buckets([t.data for t in (*model.parameters(), *model.buffers())], lambda flat: dist.broadcast(flat, 0))

    def all_gather_object(self, obj):
        """``[rank 0's obj, rank 1's, ...]`` on every rank (``[obj]`` when single process).

        Pickles through the host: for checkpoints, not for the step.
        """
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def mean_logs(self, logs: dict[str, float | Tensor]) -> dict[str, float]:
        """Log values averaged over ranks (NaNs skipped), so that rank 0 logs the global batch.

        Loss terms rescaled by :meth:`GlobalBatch.global_means` average to the global-batch
        loss; coverages (equal pixels per rank) to the global coverage; per-rank accuracies
        to the mean of the ranks' accuracies. Every rank must call this with the same keys.
        """
        if not self.enabled or not logs:
            return {k: float(v) for k, v in logs.items()}
        keys = sorted(logs)
        values = torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64)
        finite = torch.isfinite(values)
        packed = torch.stack([torch.where(finite, values, 0.0), finite.double()]).to(self.device or "cpu")
        dist.all_reduce(packed)
        sums, counts = packed.cpu()
        return {k: float(s / n) if n > 0 else math.nan for k, s, n in zip(keys, sums, counts)}

    def prototype_reducer(self, num_classes: int) -> GlobalBatch | None:
        """The global-batch statistics ``adapt_step`` takes as ``reduce_sums`` (None when single process)."""
        if not self.enabled:
            return None
        return GlobalBatch(num_classes, self.world_size)


BUCKET_ELEMENTS = 1 << 25  # 128 MiB of float32: a few collectives for the largest model, bounded extra memory


class BatchNormAverager:
    """BatchNorm running statistics of ``model`` averaged over the ranks before a checkpoint or
    an evaluation, so that the file and the metrics are those of the model every rank goes on with.

    ``in_sync``: the teacher phase averages them after every step already
    (:meth:`~bida.engine.schedules.TeacherPhase.start`); averaging equal values again is not
    exact for 3 or more ranks, so then they are left as they are.
    """

    def __init__(self, dist: DistContext, model: torch.nn.Module):
        self.dist, self.model = dist, model
        self.in_sync = False

    def average(self) -> None:
        if not self.in_sync:
            self.dist.average_bn_statistics(self.model)


def _in_buckets(tensors: list[Tensor], collective: Callable[[Tensor], None],
                bucket_elements: int = BUCKET_ELEMENTS) -> None:
    """Run ``collective`` (in place) on ``tensors`` packed into flat buckets per dtype, then
    copy the results back: a few large collectives instead of one per tensor. Works for
    any memory layout (channels_last parameters are read and written by index)."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        buckets: list[list[Tensor]] = [[]]
        size = 0
        for t in group:
            if buckets[-1] and size + t.numel() > bucket_elements:
                buckets.append([])
                size = 0
            buckets[-1].append(t)
            size += t.numel()
        for bucket in buckets:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            collective(flat)
            parts = flat.split([t.numel() for t in bucket])
            torch._foreach_copy_(bucket, [part.view_as(t) for t, part in zip(bucket, parts)])


def timeout_from_env() -> datetime.timedelta:
    """Collective timeout: ``$BIDA_DIST_TIMEOUT_S`` seconds, default 30 minutes."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw.strip() else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be positive, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def is_main_process() -> bool:
    """Whether this process is rank 0 of a torchrun job, or runs alone (prints the one stop message)."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def init_from_env() -> DistContext:
    """Join the process group that torchrun describes, or a single-process context."""
    global _owns_group
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timeout_from_env())
        _owns_group = True
    return DistContext(rank=rank, world_size=world, local_rank=local, device=device)


def shutdown() -> None:
    """Destroy the process group :func:`init_from_env` created (no-op otherwise).

    Called from a ``finally``: a rank that fails leaves the group at once, so the others'
    next collective fails (or times out) instead of waiting for it.
    """
    global _owns_group
    if _owns_group and dist.is_initialized():
        dist.destroy_process_group()
    _owns_group = False
