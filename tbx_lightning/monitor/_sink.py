"""Where monitor output goes: a run, or any object with a tensorboardX-style writer."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from tbx_lightning._notify import WebhookNotifier, alert_fields
from tbx_lightning.errors import ConfigTypeError

__all__ = ["MonitorSink", "SinkLinks", "as_sink"]


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
    elif hasattr(type(target), "monitor_sink"):
        raise ConfigTypeError(
            f"`sink` is a {type(target).__name__} whose run has not started: pass it after "
            "accelerator.init_trackers(...) (or the tracker's start()), or use "
            "ModelMonitor.from_accelerator(accelerator, model)."
        )
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


class SinkLinks:
    """What a monitor asks of its sink beyond writing: notices and the tokens/samples axes.

    A run-bound sink (both integrations' ``monitor_sink``) delivers the webhook notices
    itself (alerts, and the run's end and stalls on request) and writes the
    ``by_tokens``/``by_samples`` copies; for a plain writer the monitor delivers its
    alerts itself and the axes are not available.

    Args:
        sink: The monitor's sink, or ``None`` (a rank that writes nothing).
        options: The monitor's options (``alert_webhook``, ``webhook_events``,
            ``by_tokens``, ``by_samples``).
    """

    def __init__(self, sink: Any, options: Any) -> None:
        self._sink = sink
        self._options = options
        self._notifier: Any = None
        self._no_tokens_said = False
        url = options.webhook_url() if sink is not None else ""
        self.webhook = bool(url)
        use = getattr(sink, "use_webhook", None)
        if url and callable(use):
            use(url, options.webhook_events)
        elif url:
            self._notifier = WebhookNotifier(url)
        # Counts go to the run only for the axes asked for (each costs the run's lock).
        counting = getattr(sink, "count_seen", None)
        mirror = getattr(sink, "mirror_by", None)
        self._count_seen = None
        if (options.by_tokens or options.by_samples) and callable(counting) and callable(mirror):
            self._count_seen = counting
            mirror("tokens", options.by_tokens)
            mirror("samples", options.by_samples)

    def notify(self, alert: Any) -> None:
        """Sends a new alert to the webhook, through the run where it has one."""
        through_run = getattr(self._sink, "notify_alert", None)
        if callable(through_run):
            through_run(alert)
        elif self._notifier is not None and "alerts" in self._options.webhook_events:
            run = getattr(self._sink, "log_dir", None)
            self._notifier.notify({"kind": alert.kind, "run": run, **alert_fields(alert)})

    def count(self, step: int, tokens: float | None, samples: float | None) -> None:
        """The tokens and samples seen up to ``step`` (cumulative), for the axes."""
        if self._count_seen is None:
            return
        counts = {}
        if tokens is not None:
            counts["tokens"] = tokens
        elif self._options.by_tokens and not self._no_tokens_said:
            self._no_tokens_said = True
            logging.getLogger("tbx_lightning.monitor").warning(
                "by_tokens=%s writes nothing: the loop gives no token counts; pass "
                "tokens= to log_throughput (tokens_fn= to TrainingMonitor).",
                list(self._options.by_tokens),
            )
        if samples is not None:
            counts["samples"] = samples
        if counts:
            self._count_seen(step, **counts)

    def close(self) -> None:
        """Delivers what the monitor's own notifier holds (at most 2 s) and stops it."""
        if self._notifier is not None:
            self._notifier.close(timeout=2.0)
            self._notifier = None
