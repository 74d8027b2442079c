"""``MonitorOptions``: every option of the training monitors, in one object, checked once.

:class:`~tbx_lightning.monitor.ModelMonitor` (plain loops, Accelerate),
:class:`~tbx_lightning.TrainingMonitor` (Lightning) and the Hugging Face Trainer
callback all take it, with the same names, defaults and errors; each also accepts
the fields as keyword arguments (``TrainingMonitor(group_depth=3)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tbx_lightning.errors import ConfigError, ConfigTypeError
from tbx_lightning.monitor._alerts import AlertRules, OnAlert

__all__ = ["MonitorOptions", "resolve_options"]

_ON_ALERT = ("warn", "stop", "raise")
WEBHOOK_EVENTS = ("alerts", "end", "stall")


@dataclass(frozen=True)
class MonitorOptions:
    """What a training monitor measures, how often, and what an alert does.

    Args:
        group_depth: Module-tree depth of the parameter groups (see
            :func:`~tbx_lightning.monitor.group_name`); adapter models are grouped by
            the module each adapter wraps (:func:`~tbx_lightning.monitor.adapter_group`).
        group_fn: Maps a parameter name to its group; overrides ``group_depth``.
        hist_every_n_steps: Histogram period in optimizer steps; 0 turns histograms off.
        norm_every_n_steps: Period of every scalar statistic (norms, update ratios,
            learning rates, throughput, memory) and of the alert checks that read
            them; 0 turns them off.
        bins: Histogram bins, 2 to 1024.
        sample: ``None`` for exact histograms, or the number of elements sampled per
            group (at least 1024; see docs/monitor.md for the error bound).
        ratio_sample: Positions per group the update ratio compares (at least 1024),
            or ``None`` for an exact ratio (a copy of every trainable weight on scalar steps).
        log_weights: Log weight histograms and norms.
        log_grads: Log gradient histograms and norms.
        log_update_ratio: Log the update/weight ratio.
        sharded: Whether parameters are sharded across ranks; ``None`` detects DTensor
            (FSDP2), FSDP and DeepSpeed ZeRO-3 once the model is wrapped.
        reset_peak_memory: Make each ``vitals/peak_memory_mb`` the peak of its window.
        seed: Seed of the sampling generators.
        trainable_only: Statistics of trainable parameters only; ``None`` turns it on
            when most elements are frozen (adapters, a frozen backbone).
        alerts: ``True`` (the default :class:`AlertRules`), ``False`` (no detectors),
            or an :class:`AlertRules`.
        on_alert: ``"warn"`` (log and record), ``"stop"`` (end training cleanly, after
            a checkpoint of finite weights where the route saves one), ``"raise"``
            (raise :class:`~tbx_lightning.TrainingAlertError` on every rank) or a
            callable receiving each :class:`~tbx_lightning.monitor.Alert`.
        skip_nonfinite_steps: Check the gradients (and the loss, when given) for
            NaN/Inf on every optimizer step, before ``optimizer.step()``, and skip that
            update when any is found, so the weights stay finite. ``None`` turns it on
            with ``on_alert="stop"`` or ``"raise"``. Costs one small device-to-host
            read per optimizer step (as ``torch.amp.GradScaler`` does).
        flops_per_step: FLOPs of one optimizer step; ``None`` counts them on the
            first batch (when ``count_flops``).
        peak_flops: The device's peak FLOP/s for ``vitals/mfu``; ``None`` looks it up
            by device name.
        count_flops: Count the FLOPs of the first batch when ``flops_per_step`` is unset.
        stragglers: Under DDP/FSDP, share each rank's step time and alert on a rank
            that is consistently slower than the others. The same share carries the
            other ranks' non-finite losses to the writing rank: with ``False``, a NaN
            loss on another rank alone shows only through the non-finite gradients it
            causes.
        by_tokens: fnmatch patterns of scalar tags (e.g. ``["train/loss", "val/*"]``)
            also written against the number of tokens seen so far, as
            ``by_tokens/<tag>``, so runs with different batch or sequence sizes compare
            at equal data. Needs token counts (``tokens_fn`` or ``log_throughput(tokens=)``).
        by_samples: The same against the number of samples seen, as ``by_samples/<tag>``.
        alert_webhook: A URL that receives each new alert as JSON, delivered in the
            background with bounded timeouts and queue (Slack's form for
            ``hooks.slack.com``); ``None`` reads ``TBX_LIGHTNING_ALERT_WEBHOOK``, ``""``
            turns delivery off. See docs/monitor.md.
        webhook_events: What the webhook receives: ``"alerts"``, and on request
            ``"end"`` (the run's final status) and ``"stall"`` (no logging for longer
            than the run's own pace explains, at least 120 s, while the process lives).

    Example:
        >>> from tbx_lightning.monitor import AlertRules, MonitorOptions
        >>> options = MonitorOptions(group_depth=3, on_alert="stop")
        >>> options.skip_nonfinite_steps_on
        True
        >>> MonitorOptions(bins=1)
        Traceback (most recent call last):
        ...
        tbx_lightning.errors.ConfigError: Expected monitor option `bins` to be an int in [2, 1024], got 1.
    """

    group_depth: int = 2
    group_fn: Callable[[str], str] | None = None
    hist_every_n_steps: int = 100
    norm_every_n_steps: int = 10
    bins: int = 64
    sample: int | None = None
    ratio_sample: int | None = 65536
    log_weights: bool = True
    log_grads: bool = True
    log_update_ratio: bool = True
    sharded: bool | None = None
    reset_peak_memory: bool = True
    seed: int = 0
    trainable_only: bool | None = None
    alerts: bool | AlertRules = True
    on_alert: OnAlert = "warn"
    skip_nonfinite_steps: bool | None = None
    flops_per_step: float | None = None
    peak_flops: float | None = None
    count_flops: bool = True
    stragglers: bool = True
    by_tokens: Sequence[str] = ()
    by_samples: Sequence[str] = ()
    alert_webhook: str | None = None
    webhook_events: Sequence[str] = ("alerts",)

    def __post_init__(self) -> None:
        for key in ("group_depth", "hist_every_n_steps", "norm_every_n_steps", "seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(
                    f"Expected monitor option `{key}` to be an int >= 0, got {value!r}."
                )
        bins = self.bins
        if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= 1024:
            raise ConfigError(
                f"Expected monitor option `bins` to be an int in [2, 1024], got {bins!r}."
            )
        for key, exact in (
            ("sample", "exact histograms"),
            ("ratio_sample", "an exact update ratio"),
        ):
            size = getattr(self, key)
            if size is not None and (
                isinstance(size, bool) or not isinstance(size, int) or size < 1024
            ):
                raise ConfigError(
                    f"Expected monitor option `{key}` to be None ({exact}) or an int >= 1024, "
                    f"got {size!r}."
                )
        for key in (
            "log_weights",
            "log_grads",
            "log_update_ratio",
            "reset_peak_memory",
            "count_flops",
            "stragglers",
        ):
            if not isinstance(getattr(self, key), bool):
                raise ConfigTypeError(
                    f"Expected monitor option `{key}` to be True or False, got "
                    f"{getattr(self, key)!r}."
                )
        for key in ("sharded", "trainable_only", "skip_nonfinite_steps"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, bool):
                raise ConfigTypeError(
                    f"Expected monitor option `{key}` to be None (decide by itself), True or "
                    f"False, got {value!r}."
                )
        if self.group_fn is not None and not callable(self.group_fn):
            raise ConfigTypeError(
                f"Expected monitor option `group_fn` to be a callable (parameter name -> group "
                f"name) or None, got {type(self.group_fn).__name__}."
            )
        if not isinstance(self.alerts, bool | AlertRules):
            raise ConfigTypeError(
                "Expected monitor option `alerts` to be True, False or an AlertRules, got "
                f"{type(self.alerts).__name__}."
            )
        if not (callable(self.on_alert) or self.on_alert in _ON_ALERT):
            raise ConfigError(
                f"Expected monitor option `on_alert` to be 'warn', 'stop', 'raise' or a callable "
                f"taking an Alert, got {self.on_alert!r}."
            )
        for key in ("flops_per_step", "peak_flops"):
            number = getattr(self, key)
            if number is not None and (
                isinstance(number, bool) or not isinstance(number, int | float) or number <= 0
            ):
                raise ConfigError(
                    f"Expected monitor option `{key}` to be a number > 0 or None, got {number!r}."
                )
        for key in ("by_tokens", "by_samples"):
            patterns = getattr(self, key)
            if isinstance(patterns, str):
                patterns = (patterns,)
            if not isinstance(patterns, Sequence) or not all(
                isinstance(p, str) and p for p in patterns
            ):
                raise ConfigTypeError(
                    f"Expected monitor option `{key}` to be a list of tag patterns such as "
                    f"['train/loss', 'val/*'], got {getattr(self, key)!r}."
                )
            object.__setattr__(self, key, tuple(patterns))
        events = self.webhook_events
        if isinstance(events, str):
            events = (events,)
        if not isinstance(events, Sequence) or not set(events) <= set(WEBHOOK_EVENTS):
            raise ConfigError(
                f"Expected monitor option `webhook_events` to be a list of {WEBHOOK_EVENTS}, "
                f"got {self.webhook_events!r}."
            )
        object.__setattr__(self, "webhook_events", tuple(events))
        if self.alert_webhook is not None and not isinstance(self.alert_webhook, str):
            raise ConfigTypeError(
                "Expected monitor option `alert_webhook` to be a URL string, '' (off) or None "
                f"(read TBX_LIGHTNING_ALERT_WEBHOOK), got {type(self.alert_webhook).__name__}."
            )

    @property
    def rules(self) -> AlertRules | None:
        """The detectors' thresholds, or ``None`` when alerts are off."""
        if self.alerts is False:
            return None
        return self.alerts if isinstance(self.alerts, AlertRules) else AlertRules()

    @property
    def skip_nonfinite_steps_on(self) -> bool:
        """Whether every optimizer step is checked for NaN/Inf before it runs."""
        if self.skip_nonfinite_steps is not None:
            return self.skip_nonfinite_steps
        return self.alerts is not False and self.on_alert in ("stop", "raise")

    def webhook_url(self, environ: Mapping[str, str] | None = None) -> str:
        """The alert webhook: ``alert_webhook``, else ``$TBX_LIGHTNING_ALERT_WEBHOOK``; "" for none."""
        if self.alert_webhook is not None:
            return self.alert_webhook.strip()
        import os

        from tbx_lightning._notify import ENV_VAR

        return (os.environ if environ is None else environ).get(ENV_VAR, "").strip()

    @property
    def can_stop(self) -> bool:
        """Whether an alert can end training (so that every rank must agree on it)."""
        return self.alerts is not False and self.on_alert in ("stop", "raise")


_FIELDS = tuple(f.name for f in dataclasses.fields(MonitorOptions))


def resolve_options(
    options: MonitorOptions | Mapping[str, Any] | None, fields: Mapping[str, Any], *, owner: str
) -> MonitorOptions:
    """``options`` with ``fields`` (keyword arguments) applied, checked once.

    Example:
        >>> resolve_options(None, {"bins": 32}, owner="ModelMonitor").bins
        32
        >>> resolve_options(None, {"bin": 32}, owner="ModelMonitor")
        Traceback (most recent call last):
        ...
        tbx_lightning.errors.ConfigTypeError: ModelMonitor got an unknown option `bin`: did you mean `bins`? The options are the fields of MonitorOptions (docs/monitor.md).
    """
    unknown = [key for key in fields if key not in _FIELDS]
    if unknown:
        import difflib

        key = unknown[0]
        close = difflib.get_close_matches(key, _FIELDS, n=1)
        hint = f"did you mean `{close[0]}`? " if close else ""
        raise ConfigTypeError(
            f"{owner} got an unknown option `{key}`: {hint}The options are the fields of "
            "MonitorOptions (docs/monitor.md)."
        )
    if options is None:
        return MonitorOptions(**fields)
    if isinstance(options, Mapping):
        return resolve_options(None, {**options, **fields}, owner=owner)
    if not isinstance(options, MonitorOptions):
        raise ConfigTypeError(
            f"`options` of {owner} must be a MonitorOptions (or a dict of its fields), got "
            f"{type(options).__name__}."
        )
    return dataclasses.replace(options, **fields) if fields else options
