"""The finiteness guard of a training step: a non-finite step is skipped and leaves no trace.

Before a step, :meth:`StepGuard.snapshot` copies what its forward may change (BatchNorm
running statistics of modules in training mode, the calibration memories); after the
backward, one device flag says whether the loss, every gradient and that state are finite
(:func:`_step_is_finite` reads it: the one host sync of a steady-state step); a step that is
not is undone with :meth:`StepGuard.restore`. :func:`_first_non_finite` keeps non-finite
tensors out of checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import BidaError


class TrainingDiverged(BidaError):
    """Too many non-finite losses or gradients in a row."""


def _first_non_finite(tree: Any, prefix: str = "") -> str | None:
    """Dotted name of the first floating tensor holding NaN or inf in a state tree, else None."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            found = _first_non_finite(v, f"{prefix}.{k}" if prefix else str(k))
            if found is not None:
                return found
    elif isinstance(tree, torch.Tensor) and tree.is_floating_point() and not bool(torch.isfinite(tree).all()):
        return prefix
    return None


def _grad_max_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Largest absolute gradient entry (inf-norm; NaN or inf when any entry is), on the device."""
    return torch.stack(torch._foreach_norm(grads, float("inf"))).max()


def _step_is_finite(flags: torch.Tensor) -> tuple[bool, int]:
    """Read the step's flags on the host: the one sync of a steady-state step.

    ``flags`` is :meth:`~bida.distributed.DistContext.step_flags`'s: the finiteness flag in
    one process, (not finite on some rank, any rank's stop signal) under torchrun. Returns
    whether the step is finite on every rank and that stop signal (0: none).
    """
    if flags.dim() == 0:
        return bool(flags), 0
    bad, stop = flags.tolist()
    return bad == 0, int(stop)


class StepGuard:
    """What a step's forward may change in ``model`` and ``calibration`` (None: no calibration)."""

    def __init__(self, model: torch.nn.Module, calibration=None):
        self.model, self.calibration = model, calibration
        self._step_buffers: list[torch.Tensor] = []  # what the current step's forward may change

    def snapshot(self) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict | None]:
        """Buffers a forward can change (those of modules in training mode: BatchNorm running
        statistics; frozen BN has none) and the calibration state, before a step."""
        buffers = [(b, b.detach().clone()) for m in self.model.modules() if m.training
                   for b in m.buffers(recurse=False)]
        cal = self.calibration.state_dict() if self.calibration is not None else None  # already a copy
        self._step_buffers = [b for b, _ in buffers if b.is_floating_point()]
        return buffers, cal

    def changed_state(self) -> list[torch.Tensor]:
        """Floating tensors the step's forward changed: running statistics of modules in
        training mode (listed by :meth:`snapshot`) and the calibration memories."""
        changed = list(self._step_buffers)
        if self.calibration is not None:
            changed += [m.value for m in (self.calibration.source, self.calibration.target)]
        return [t for t in changed if t.numel()]

    def restore(self, snapshot: tuple[list[tuple[torch.Tensor, torch.Tensor]], dict | None]) -> None:
        """Undo what the forward of a skipped step changed: a NaN batch poisons BN running stats."""
        buffers, cal = snapshot
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        if cal is not None:
            self.calibration.load_state_dict(cal)


def backward_and_step(trainer, loss: torch.Tensor, optimizer, scaler) -> bool:
    """Backward and step unless the loss or a gradient is not finite (then skip and count).

    The finiteness of the step is one device flag, read once (:func:`_step_is_finite`):
    the one host sync of a steady-state step. The host must know before it counts the
    step, sets the next step's learning rate, schedules checkpoints and restores what a
    skipped forward changed; the flag is read after backward, so the sync waits for
    work already queued and costs the launch gap before the optimizer step.
    """
    # Backward always runs (a NaN loss gives NaN gradients, caught below), so every rank
    # takes part in DDP's gradient all-reduce; the flag is then the same on every rank.
    scaler.scale(loss).backward()
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if trainer._average_gradients:  # the teacher schedule's student, outside DDP (see fit)
        # Before unscaling, as DDP averages in the backward: every rank's fp16 scaler then
        # sees the same gradients and keeps the same scale.
        trainer.dist.average_gradients(grads)
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    finite = torch.isfinite(loss.detach())
    if grads:
        finite = finite & torch.isfinite(_grad_max_norm(grads))
    changed = trainer.guard.changed_state()
    if changed:  # BN statistics pushed to inf by a finite loss: the step is not good either
        finite = finite & torch.isfinite(_grad_max_norm(changed))
    stop = trainer.stop.signal or 0  # under torchrun, a stop rides on the step's one all-reduce
    trainer.stop.flags_sent = True
    finite, stop = _step_is_finite(trainer.dist.step_flags(finite, stop))
    trainer.stop.agreed = stop or trainer.stop.agreed
    if finite:
        scaler.step(optimizer)
        scaler.update()
        trainer.bad_steps = 0
        return True
    if scaler.is_enabled():  # fp16: no step is taken; the scale drops when the gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return False
    optimizer.zero_grad(set_to_none=True)
    trainer.bad_steps += 1
    trainer.logger.log({"numerics/skipped_step": 1, "numerics/bad_steps_in_row": trainer.bad_steps}, trainer.step)
    return False
