"""The finiteness guard of a training step: a non-finite step is skipped and leaves no trace.

Before a step, :meth:`StepGuard.snapshot` copies what its forward may change (BatchNorm
running statistics of modules in training mode, the calibration memories); after the
backward, one device flag (:func:`finite_flag`) says whether the loss, every gradient and
that state are finite (:func:`_step_is_finite` reads it: the one host sync of a
steady-state step); a step that is not is undone with :meth:`StepGuard.restore`. The loop
(:mod:`bida.engine.train`) does the backward, the check and the optimizer step in that order.
:func:`_first_non_finite` keeps non-finite tensors out of checkpoints.
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

    ``flags`` is :meth:`~bida.engine.distributed.DistContext.step_flags`'s: the finiteness flag in
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


def gradients(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The gradients the optimizer is about to apply (parameters without one are left out)."""
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def finite_flag(loss: torch.Tensor, grads: list[torch.Tensor], changed: list[torch.Tensor]) -> torch.Tensor:
    """One 0-dim bool flag on the device: the loss, every gradient and every tensor the forward
    changed (``changed``: :meth:`StepGuard.changed_state`) are finite. Nothing is read on the host."""
    finite = torch.isfinite(loss.detach())
    if grads:
        finite = finite & torch.isfinite(_grad_max_norm(grads))
    if changed:  # BN statistics pushed to inf by a finite loss: the step is not good either
        finite = finite & torch.isfinite(_grad_max_norm(changed))
    return finite
