"""Where monitor output goes: any object with a tensorboardX-style writer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class MonitorSink(Protocol):
    """Where a monitor writes: the package's ``RunWriter`` or anything shaped like it.

    ``log_scalars`` takes numbers or one-element tensors (all tensors of one call
    reach the host together); ``experiment`` is a tensorboardX ``SummaryWriter``,
    used for ``add_histogram_raw``.
    """

    @property
    def experiment(self) -> Any:  # pragma: no cover - protocol
        """A tensorboardX ``SummaryWriter``."""
        ...

    def log_scalars(
        self, metrics: Mapping[str, float | int | torch.Tensor], step: int
    ) -> None:  # pragma: no cover - protocol
        """Writes ``metrics`` at ``step``."""
        ...
