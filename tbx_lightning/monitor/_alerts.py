"""Alerts: detectors that read the monitor's host values and say when training is sick.

Every detector works on numbers that already reached the host in the monitor's one
packed transfer per interval, so checking costs no device synchronisation. An alert is
written once per kind and place (a Text entry under ``alerts`` and the cumulative
``alerts/count``), logged once in the terminal through the ``tbx_lightning.alerts``
logger, and handed to the configured action every time it fires.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any, Literal

from tbx_lightning.errors import ConfigError, TrainingAlertError

__all__ = ["Alert", "AlertRules", "TrainingAlertError"]

_log = logging.getLogger("tbx_lightning.alerts")

# 1.4826 * MAD estimates the standard deviation of normally distributed values.
_MAD_TO_SIGMA = 1.4826

OnAlert = Literal["warn", "stop", "raise"] | Callable[["Alert"], Any]


@dataclass(frozen=True)
class Alert:
    """One finding of the monitor's detectors.

    Attributes:
        step: The optimizer step the value belongs to.
        kind: ``nonfinite_loss``, ``nonfinite_grads``, ``nonfinite_weights``,
            ``loss_spike``, ``grad_explosion``, ``vanishing_update``, ``not_training``,
            ``lr_zero``, ``lr_jump`` or ``straggler``.
        where: The layer (parameter group), param group or rank; ``""`` for the whole model.
        value: The value that fired the detector.
        threshold: The limit it crossed.
        message: One readable sentence with all of the above and what to check.
    """

    step: int
    kind: str
    where: str
    value: float
    threshold: float
    message: str


@dataclass
class AlertRules:
    """Thresholds of the monitor's detectors; ``None`` turns one detector off.

    Args:
        loss_window: Finite losses kept as the run's recent history.
        loss_min_history: Losses needed before the spike detector judges.
        loss_spike_k: A loss is a spike when it exceeds ``median + k * scale`` of the
            history, ``scale = max(1.4826 * MAD, 0.01 * |median|)``.
        grad_explosion_factor: The total gradient norm explodes when it exceeds this
            multiple of the median of its recent checks.
        grad_min_history: Checks of the gradient norm needed before judging.
        vanishing_factor: A layer's update ratio is vanishing when it stays below this
            multiple of the median ratio over all layers.
        patience: Consecutive checks a slow condition (vanishing update, layer not
            training, zero learning rate, straggler) must hold before it fires.
        lr_jump_factor: The learning rate jumps when it grows by more than this factor
            from one check to the next.
        straggler_factor: A rank straggles when its step time (waits for other ranks left
            out) exceeds this multiple of the median over the other ranks.

    Example:
        >>> rules = AlertRules(loss_spike_k=6.0, lr_jump_factor=None)
        >>> rules.patience
        3
    """

    loss_window: int = 50
    loss_min_history: int = 10
    loss_spike_k: float | None = 8.0
    grad_explosion_factor: float | None = 10.0
    grad_min_history: int = 5
    vanishing_factor: float | None = 1e-3
    patience: int = 3
    lr_jump_factor: float | None = 10.0
    straggler_factor: float | None = 1.25

    def __post_init__(self) -> None:
        for key in ("loss_window", "loss_min_history", "grad_min_history", "patience"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Expected AlertRules.{key} to be an int >= 1, got {value!r}.")
        for key in (
            "loss_spike_k",
            "grad_explosion_factor",
            "vanishing_factor",
            "lr_jump_factor",
            "straggler_factor",
        ):
            value = getattr(self, key)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
            ):
                raise ConfigError(
                    f"Expected AlertRules.{key} to be a number > 0 or None (off), got {value!r}."
                )


def robust_threshold(history: Sequence[float], k: float) -> tuple[float, float]:
    """``(median, median + k * scale)`` of ``history`` with ``scale`` from the MAD.

    Example:
        >>> robust_threshold([1.0, 1.1, 0.9, 1.0, 1.2], k=8.0)
        (1.0, 2.18608)
    """
    values = sorted(history)
    median = _median(values)
    mad = _median(sorted(abs(v - median) for v in values))
    scale = max(_MAD_TO_SIGMA * mad, 0.01 * abs(median), 1e-12)
    return median, round(median + k * scale, 12)


def _markdown(alerts: Sequence[Alert]) -> str:
    rows = ["| step | alert | where | value | threshold |", "|---|---|---|---|---|"]
    rows += [
        f"| {a.step} | {a.kind} | {a.where or 'model'} | {a.value:.6g} | {a.threshold:.6g} |"
        for a in alerts
    ]
    return "\n".join(rows) + "\n\n" + "\n\n".join(f"- {a.message}" for a in alerts)


def _median(values: Sequence[float]) -> float:
    n = len(values)
    mid = n // 2
    return values[mid] if n % 2 else 0.5 * (values[mid - 1] + values[mid])


class AlertEngine:
    """Runs the detectors on host values and performs the alert action.

    Args:
        rules: The thresholds.
        on_alert: ``"warn"`` logs, ``"stop"`` also sets :attr:`should_stop`,
            ``"raise"`` raises :class:`TrainingAlertError`, a callable receives each alert.
        write_text: Writes ``(tag, markdown, step)`` into the run, or ``None`` (no run).
        write_scalars: Writes ``(metrics, step)`` into the run, or ``None``.
    """

    def __init__(
        self,
        rules: AlertRules,
        on_alert: OnAlert,
        write_text: Callable[[str, str, int], None] | None,
        write_scalars: Callable[[Mapping[str, float], int], None] | None,
    ) -> None:
        if not (callable(on_alert) or on_alert in ("warn", "stop", "raise")):
            raise ConfigError(
                f"Expected `on_alert` to be 'warn', 'stop', 'raise' or a callable taking an "
                f"Alert, got {on_alert!r}."
            )
        self.rules = rules
        self.on_alert = on_alert
        self.write_text = write_text
        self.write_scalars = write_scalars
        self.should_stop = False
        self.alerts: list[Alert] = []
        self.counts: dict[tuple[str, str], int] = {}
        self.total = 0
        self._losses: deque[float] = deque(maxlen=rules.loss_window)
        self._grad_norms: deque[float] = deque(maxlen=max(rules.grad_min_history * 4, 20))
        self._streaks: dict[tuple[str, str], int] = {}
        self._last_lr: dict[str, float] = {}
        self._pending: list[Alert] = []
        self._written_total = 0

    # ------------------------------------------------------------------ detectors
    def check_losses(self, losses: Sequence[tuple[int, float]]) -> None:
        """Non-finite losses and spikes against the run's recent finite losses."""
        k = self.rules.loss_spike_k
        for step, loss in losses:
            if not math.isfinite(loss):
                self._fire(
                    step,
                    "nonfinite_loss",
                    "",
                    loss,
                    math.inf,
                    f"loss is {loss} at step {step}: check the learning rate, the inputs of "
                    "this batch and mixed-precision scaling",
                )
                continue
            if k is not None and len(self._losses) >= self.rules.loss_min_history:
                median, limit = robust_threshold(self._losses, k)
                if loss > limit:
                    self._fire(
                        step,
                        "loss_spike",
                        "",
                        loss,
                        limit,
                        f"loss {loss:.4g} at step {step} is above {limit:.4g} (median "
                        f"{median:.4g} of the last {len(self._losses)} losses + {k:g} robust "
                        "deviations): check this batch and the learning rate",
                    )
                    continue  # a spike does not become part of the normal history
            self._losses.append(loss)

    def check_nonfinite(self, step: int, kind: str, counts: Mapping[str, float]) -> None:
        """Fires once per layer holding NaN/Inf ``kind`` (``weights`` or ``grads``)."""
        for where, count in counts.items():
            if count > 0:
                self._fire(
                    step,
                    f"nonfinite_{kind}",
                    where,
                    count,
                    0.0,
                    f"{int(count)} non-finite {kind[:-1]} values in {where} at step {step}",
                )

    def check_grad_norm(self, step: int, total: float) -> None:
        """The total gradient norm against the median of its recent checks."""
        factor = self.rules.grad_explosion_factor
        if not math.isfinite(total):
            return  # the non-finite gradient alert says it
        history = self._grad_norms
        if factor is not None and len(history) >= self.rules.grad_min_history:
            median = _median(sorted(history))
            limit = factor * median
            if median > 0 and total > limit:
                self._fire(
                    step,
                    "grad_explosion",
                    "",
                    total,
                    limit,
                    f"total gradient norm {total:.4g} at step {step} is over {factor:g}x its "
                    f"recent median {median:.4g}: lower the learning rate or clip gradients",
                )
                return
        history.append(total)

    def check_update_ratios(
        self, step: int, ratios: Mapping[str, float], *, unconfirmed: Set[str] = frozenset()
    ) -> None:
        """Layers that do not change, and layers whose updates vanish next to the rest.

        ``unconfirmed`` names layers whose ratio of 0 comes from a sample, which may have
        missed a sparse update: that 0 does not count as not training.
        """
        finite = {k: v for k, v in ratios.items() if math.isfinite(v)}
        moving = sorted(v for v in finite.values() if v > 0)
        median = _median(moving) if moving else 0.0
        factor = self.rules.vanishing_factor
        for where, ratio in finite.items():
            self._streak(
                step,
                "not_training",
                where,
                ratio == 0.0 and where not in unconfirmed,
                ratio,
                0.0,
                f"{where} has trainable parameters but did not change for "
                f"{self.rules.patience} checks (update ratio 0): is it in the optimizer, "
                "is its gradient cut off?",
            )
            vanishing = factor is not None and len(moving) >= 2 and 0.0 < ratio < factor * median
            self._streak(
                step,
                "vanishing_update",
                where,
                vanishing,
                ratio,
                (factor or 0.0) * median,
                f"update ratio of {where} is {ratio:.3g}, under {factor:g}x the median "
                f"{median:.3g} of all layers for {self.rules.patience} checks",
            )

    def check_lr(self, step: int, lrs: Mapping[str, float]) -> None:
        """A learning rate that stays zero, or grows by more than ``lr_jump_factor``."""
        factor = self.rules.lr_jump_factor
        for where, lr in lrs.items():
            self._streak(
                step,
                "lr_zero",
                where,
                lr == 0.0,
                lr,
                0.0,
                f"learning rate of {where} is 0 for {self.rules.patience} checks: "
                "check the scheduler",
            )
            last = self._last_lr.get(where)
            if factor is not None and last is not None and last > 0 and lr > factor * last:
                self._fire(
                    step,
                    "lr_jump",
                    where,
                    lr,
                    factor * last,
                    f"learning rate of {where} jumped from {last:.3g} to {lr:.3g} at step "
                    f"{step}: check the scheduler",
                )
            self._last_lr[where] = lr

    def check_step_times(self, step: int, times: Sequence[float]) -> None:
        """A rank whose step time exceeds ``straggler_factor`` times the other ranks' median.

        The median leaves the rank itself out: with two ranks, a median that counted the
        slow rank would let it be 67% slower before a factor of 1.25 is crossed.
        """
        factor = self.rules.straggler_factor
        if factor is None or len(times) < 2:
            return
        for rank, seconds in enumerate(times):
            median = _median(sorted(t for r, t in enumerate(times) if r != rank))
            self._streak(
                step,
                "straggler",
                f"rank {rank}",
                median > 0 and seconds > factor * median,
                seconds,
                factor * median,
                f"rank {rank} takes {seconds * 1e3:.1f} ms per step (waits for other ranks "
                f"left out), over {factor:g}x the median {median * 1e3:.1f} ms of the other "
                f"{len(times) - 1} ranks, for {self.rules.patience} checks: check its device, "
                "data loading and host",
            )

    # ------------------------------------------------------------------ output
    def _streak(
        self,
        step: int,
        kind: str,
        where: str,
        condition: bool,
        value: float,
        threshold: float,
        message: str,
    ) -> None:
        key = (kind, where)
        if not condition:
            self._streaks.pop(key, None)
            return
        self._streaks[key] = self._streaks.get(key, 0) + 1
        if self._streaks[key] >= self.rules.patience:
            self._fire(step, kind, where, value, threshold, message)

    def _fire(
        self, step: int, kind: str, where: str, value: float, threshold: float, message: str
    ) -> None:
        alert = Alert(step, kind, where, float(value), float(threshold), message)
        key = (kind, where)
        seen = self.counts.get(key, 0)
        self.counts[key] = seen + 1
        self.total += 1
        if seen == 0:
            self.alerts.append(alert)
            self._pending.append(alert)
            _log.warning("alert %s%s: %s", kind, f" ({where})" if where else "", message)

    def publish(self, step: int) -> None:
        """Writes the new alerts of this check and runs the action on them."""
        new, self._pending = self._pending, []
        if self.total != self._written_total and self.write_scalars is not None:
            self.write_scalars({"alerts/count": float(self.total)}, step)
        self._written_total = self.total
        if not new:
            return
        if self.write_text is not None:
            by_step: dict[int, list[Alert]] = {}
            for alert in new:
                by_step.setdefault(alert.step, []).append(alert)
            for at, found in by_step.items():
                self.write_text("alerts", _markdown(found), at)
        for alert in new:
            if self.on_alert == "stop":
                self.should_stop = True
            elif self.on_alert == "raise":
                raise TrainingAlertError(alert)
            elif callable(self.on_alert):
                self.on_alert(alert)

    def summary(self) -> str:
        """One line per kind and place that fired more than once, with its count."""
        return ", ".join(
            f"{kind}{f' ({where})' if where else ''} x{n}"
            for (kind, where), n in self.counts.items()
            if n > 1
        )
