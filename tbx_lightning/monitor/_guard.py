"""The check before each optimizer step: NaN/Inf on any rank skips the update.

With ``skip_nonfinite_steps`` (on with ``on_alert="stop"``/``"raise"``) the monitor asks
:class:`StepGuard` after every backward pass whether the gradients or the loss hold
NaN/Inf on any rank (one small read, see :func:`._ranks.nonfinite_per_rank`). If so,
the coming optimizer step is made to leave the weights as they are. A gradient
scaler's own overflow steps (fp16) are left to the scaler.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tbx_lightning.monitor._groups import GroupedParam
from tbx_lightning.monitor._ranks import nonfinite_per_rank

__all__ = ["OVERFLOWS_IN_A_ROW", "StepGuard"]

# A gradient scaler that skips this many steps in a row has a scale that never settles.
OVERFLOWS_IN_A_ROW = 32


class StepGuard:
    """NaN/Inf before the optimizer step, and what makes that step do nothing.

    Args:
        params: The monitor's parameters (their gradients are checked and cleared).
        process_group: The group whose ranks agree on the answer.

    Attributes:
        grad_scaler: A ``torch.amp.GradScaler`` whose skipped steps are expected (fp16
            mixed precision), or ``None``; the Lightning and Trainer callbacks and
            ``ModelMonitor.from_accelerator`` set it.
        overflows: The scaler's overflow steps in a row.
    """

    def __init__(self, params: list[GroupedParam], process_group: Any = None) -> None:
        self._params = params
        self.process_group = process_group
        self.grad_scaler: Any = None
        self.overflows = 0

    @property
    def scaler_on(self) -> bool:
        """Whether an enabled gradient scaler skips overflowing steps itself."""
        enabled = getattr(self.grad_scaler, "is_enabled", None)
        return bool(callable(enabled) and enabled())

    def check(self, loss: float | torch.Tensor | None, device: torch.device) -> list[list[float]]:
        """``[[grads bad, loss bad], ...]`` per rank (the same list on every rank)."""
        grads = [p.param.grad for p in self._params if p.param.grad is not None]
        per_rank = nonfinite_per_rank(grads, loss, device, self.process_group)
        if not any(g or los for g, los in per_rank):
            self.overflows = 0
        return per_rank

    def is_overflow(self, per_rank: list[list[float]]) -> bool:
        """Whether NaN/Inf gradients with finite losses are the gradient scaler's overflow.

        A ``GradScaler`` starts with a large loss scale and halves it on every step
        whose gradients overflow, skipping that step: such steps are expected, not
        alerts. :attr:`overflows` counts them in a row (the caller reports a scale
        that never settles).
        """
        if not self.scaler_on or any(los for _, los in per_rank):
            return False  # a non-finite loss is no overflow of the scale
        self.overflows += 1
        return True

    def skip_update(self, grads_bad: bool) -> None:
        """Makes the coming optimizer step leave the weights as they are.

        torch's optimizers skip parameters without a gradient, so the gradients are
        cleared. A gradient scaler skips a step whose gradients hold NaN/Inf by itself
        and insists on seeing them (``scaler.step`` fails without any), so with one the
        gradients stay, and one value is made NaN where they were finite.
        """
        if not self.scaler_on:
            for p in self._params:
                p.param.grad = None
            return
        if not grads_bad:
            grad = next((p.param.grad for p in self._params if p.param.grad is not None), None)
            if grad is not None:
                grad.view(-1)[0] = math.nan
