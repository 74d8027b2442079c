"""Where monitor output goes: a run, or any object with a tensorboardX-style writer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from tbx_lightning.errors import ConfigTypeError

__all__ = ["MonitorSink", "as_sink"]


@runtime_checkable
class MonitorSink(Protocol):
    """Where a monitor writes: the package's ``RunWriter`` or anything shaped like it.

    ``log_scalars`` takes numbers or one-element tensors (all tensors of one call
    reach the host together); ``experiment`` is a tensorboardX ``SummaryWriter``,
    used for ``add_histogram_raw`` and ``add_text``.

    A sink may also have ``alert_stopped(alert, action)`` (records that an alert ended
    the run, so its status is failure with the alert as the reason),
    ``notify_alert(alert)`` (delivers an alert elsewhere), ``count_seen(step, *,
    tokens, samples)`` and ``mirror_by(axis, patterns)`` (tags also written against
    tokens or samples seen): the run-bound sinks of both integrations have them.
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


def as_sink(target: Any) -> MonitorSink | None:
    """The sink to write into for ``target``.

    ``TBXLogger``, ``TBXTracker`` and a ``Run`` give their ``monitor_sink``: it
    follows the run across reopenings (a resumed fit moves the logger to the
    checkpoint's run after callbacks were set up) and records an alert stop in the
    run's status. Anything else must have ``log_scalars`` and ``experiment``.
    """
    if target is None:
        return None
    bound = getattr(target, "monitor_sink", None)
    if bound is not None:
        target = bound
    if not (
        callable(getattr(target, "log_scalars", None))
        and (hasattr(type(target), "experiment") or hasattr(target, "experiment"))
    ):
        raise ConfigTypeError(
            "`sink` must be a RunWriter, a TBXLogger, a TBXTracker (accelerator.get_tracker"
            "('tbx')) or have `log_scalars(metrics, step)` and `experiment`, got "
            f"{type(target).__name__}."
        )
    return target  # type: ignore[no-any-return]
