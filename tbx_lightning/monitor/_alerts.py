"""Alerts: detectors that read the monitor's host values and say when training is sick.

Every detector works on numbers that already reached the host in the monitor's one
packed transfer per interval, so checking costs no device synchronisation. Most compare
the run with its own recent history (spikes, explosions, vanishing updates); two compare
it with absolute bounds (an update/weight ratio that stays too high, a learning rate out
of the sane range of an adaptive optimizer), which catch a run that is wrong from step 0.

An alert is recorded once per kind and place: a row of the markdown table written as
the Text entry ``alerts`` (TensorBoard lists it as ``alerts/text_summary``) at the step
of the check that found it, so entries never go back in steps; the cumulative count as
the scalar ``vitals/alerts``; and one terminal line per kind and check through the
``tbx_lightning.alerts`` logger, naming the first layers and how many more. The action
(``on_alert``) is the monitor's to perform: see :attr:`AlertEngine.action`.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from dataclasses import dataclass
from typing import Any, Literal

from tbx_lightning.errors import ConfigError

__all__ = [
    "ALERT_COUNT_TAG",
    "ALERT_TEXT_TAG",
    "Alert",
    "AlertEngine",
    "AlertRules",
    "median_update_ratio",
]

# The Text entry of the alerts table (TensorBoard lists it as ``alerts/text_summary``)
# and the scalar of the cumulative count, which sorts with the run-level vitals.
ALERT_TEXT_TAG = "alerts"
ALERT_COUNT_TAG = "vitals/alerts"

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
            ``update_ratio_high``, ``lr_zero``, ``lr_jump``, ``lr_out_of_range`` or
            ``straggler``.
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
        update_ratio_max: An absolute bound on the update/weight ratio: the median ratio
            over the trainable layers above it for ``patience`` checks (or above 10x it
            once) means the learning rate is too high. Healthy training moves weights by
            about 1e-3 of their norm per step (up to a few 1e-2 for freshly initialised
            adapters); 0.1 is a step a tenth of the weights' size.
        adaptive_lr_max: The largest sane learning rate of an adaptive optimizer (Adam,
            AdamW, NAdam, RAdam, Adamax, Adagrad, Adadelta, RMSprop, Adafactor and their
            fused or 8-bit variants, found by class name): a larger one fires
            ``lr_out_of_range`` at the first check. Adaptive optimizers take steps of
            about the learning rate per weight whatever the gradient's scale, so 0.3
            moves every weight by about 0.3 at once. SGD-like optimizers have no bound.

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
    update_ratio_max: float | None = 0.1
    adaptive_lr_max: float | None = 0.03

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
            "update_ratio_max",
            "adaptive_lr_max",
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


def median_update_ratio(ratios: Iterable[float]) -> float | None:
    """The median of the finite, non-zero update ratios (the layers that moved), or None."""
    moving = sorted(v for v in ratios if math.isfinite(v) and v > 0)
    return _median(moving) if moving else None


class AlertEngine:
    """Runs the detectors on host values, records what they find and decides the action.

    The engine never raises and never stops anything itself: after :meth:`publish`,
    :attr:`action` says what the configured ``on_alert`` asks for (``"stop"`` or
    ``"raise"``, with :attr:`trigger` the alert that asked first), so the monitor can
    first agree on it with the other ranks. A callable ``on_alert`` is called here.

    Args:
        rules: The thresholds.
        on_alert: ``"warn"``, ``"stop"``, ``"raise"`` or a callable receiving each alert.
        write_text: Writes ``(tag, markdown, step)`` into the run, or ``None`` (no run).
        write_scalars: Writes ``(metrics, step)`` into the run, or ``None``.
        quiet: Log nothing to the terminal (a rank that does not write).
    """

    def __init__(
        self,
        rules: AlertRules,
        on_alert: OnAlert,
        write_text: Callable[[str, str, int], None] | None,
        write_scalars: Callable[[Mapping[str, float], int], None] | None,
        *,
        quiet: bool = False,
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
        self.quiet = quiet
        self.action: Literal["stop", "raise"] | None = None
        self.trigger: Alert | None = None
        self.alerts: list[Alert] = []
        self.counts: dict[tuple[str, str], int] = {}
        self.total = 0
        self.listeners: list[Callable[[Alert], None]] = []
        self._losses: deque[float] = deque(maxlen=rules.loss_window)
        self._grad_norms: deque[float] = deque(maxlen=max(rules.grad_min_history * 4, 20))
        self._streaks: dict[tuple[str, str], int] = {}
        self._last_lr: dict[str, float] = {}
        self._pending: list[Alert] = []
        self._written_total = 0
        self._text_step = -1

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

    def check_overflows(self, step: int, in_a_row: int, limit: int) -> None:
        """A gradient scaler that skipped ``limit`` steps in a row: its scale never settles."""
        if in_a_row == limit:
            self._fire(
                step,
                "nonfinite_grads",
                "",
                float(in_a_row),
                float(limit),
                f"the gradient scaler skipped {in_a_row} steps in a row up to step {step} "
                "(their gradients overflowed and the loss scale never settled): check the "
                "loss scale, the inputs and the learning rate",
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
        """Layers that do not change, layers whose updates vanish, updates that are too big.

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
        bound = self.rules.update_ratio_max
        if bound is None or not moving:
            return
        message = (
            f"the median update/weight ratio over {len(moving)} layers is {median:.3g} at step "
            f"{step}, above {bound:g}: each step moves the weights by that fraction of their "
            "size; lower the learning rate (healthy training is near 1e-3)"
        )
        if median > 10 * bound:
            self._fire(step, "update_ratio_high", "", median, 10 * bound, message)
        else:
            self._streak(step, "update_ratio_high", "", median > bound, median, bound, message)

    def check_lr(
        self, step: int, lrs: Mapping[str, float], adaptive: Set[str] = frozenset()
    ) -> None:
        """A learning rate that stays zero, grows by more than ``lr_jump_factor``, or is
        above ``adaptive_lr_max`` for the param groups of an adaptive optimizer (``adaptive``)."""
        factor = self.rules.lr_jump_factor
        bound = self.rules.adaptive_lr_max
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
            if bound is not None and where in adaptive and lr > bound:
                self._fire(
                    step,
                    "lr_out_of_range",
                    where,
                    lr,
                    bound,
                    f"learning rate of {where} is {lr:.3g} at step {step}, above {bound:g}, the "
                    "largest sane rate of an adaptive optimizer (Adam-like optimizers move each "
                    "weight by about the learning rate per step): check the config (a rate of "
                    "1e-5 to 1e-3 is usual; 1e-4 to 2e-3 for adapters)",
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

    def check_rank_losses(self, step: int, bad: Sequence[float]) -> None:
        """Ranks whose own losses were non-finite since the last check (counts per rank)."""
        for rank, count in enumerate(bad):
            if count > 0:
                self._fire(
                    step,
                    "nonfinite_loss",
                    f"rank {rank}",
                    count,
                    0.0,
                    f"{int(count)} non-finite losses on rank {rank} up to step {step}: check "
                    "that rank's batches and its device",
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
        if self.trigger is None and self.on_alert in ("stop", "raise"):
            self.trigger = alert
            self.action = self.on_alert  # type: ignore[assignment]

    @property
    def pending(self) -> bool:
        """Whether alerts were found that :meth:`publish` has not written yet."""
        return bool(self._pending) or self.total != self._written_total

    def publish(self, step: int) -> list[Alert]:
        """Writes the alerts found since the last call, at ``step``; returns them.

        All of them go into one Text entry at ``step`` (the check that found them; an
        earlier step than one already written is raised to it, so the entries of the
        ``alerts`` tag never go back), each row with the step its value belongs to.
        The terminal gets one line per kind.
        """
        new, self._pending = self._pending, []
        at = max(step, self._text_step)
        if self.total != self._written_total and self.write_scalars is not None:
            self.write_scalars({ALERT_COUNT_TAG: float(self.total)}, at)
        self._written_total = self.total
        if not new:
            return new
        if self.write_text is not None:
            self.write_text(ALERT_TEXT_TAG, _markdown(new), at)
            self._text_step = at
        if not self.quiet:
            for line in terminal_lines(new):
                _log.warning("%s", line)
        for alert in new:
            for listener in self.listeners:
                listener(alert)
            if callable(self.on_alert):
                self.on_alert(alert)
        return new

    def summary(self) -> str:
        """One line per kind and place that fired more than once, with its count."""
        return ", ".join(
            f"{kind}{f' ({where})' if where else ''} x{n}"
            for (kind, where), n in self.counts.items()
            if n > 1
        )


def terminal_lines(alerts: Sequence[Alert], shown: int = 3) -> list[str]:
    """One line per kind: the first alert's message, then the other places of that kind.

    Example:
        >>> a = [Alert(30, "nonfinite_grads", f"layers.{i}", 4.0, 0.0, f"4 non-finite grad values in layers.{i} at step 30") for i in range(6)]
        >>> terminal_lines(a)
        ['alert nonfinite_grads in 6 layers (layers.0, layers.1, layers.2 and 3 more): 4 non-finite grad values in layers.0 at step 30']
    """
    by_kind: dict[str, list[Alert]] = {}
    for alert in alerts:
        by_kind.setdefault(alert.kind, []).append(alert)
    lines = []
    for kind, found in by_kind.items():
        places = [a.where for a in found if a.where]
        if len(found) == 1:
            where = f" ({places[0]})" if places else ""
        else:
            noun = "ranks" if all(p.startswith("rank ") for p in places) else "layers"
            names = ", ".join(places[:shown])
            more = f" and {len(places) - shown} more" if len(places) > shown else ""
            where = f" in {len(found)} {noun} ({names}{more})"
        lines.append(f"alert {kind}{where}: {found[0].message}")
    return lines
