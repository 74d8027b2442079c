"""Reading one scalar step's packed transfer back into tags, and checking it.

The monitor stages every statistic of a scalar step on the device and moves them to
the host in one transfer; :class:`Readout` takes them back out in packing order, turns
them into tags (run-level under ``vitals/``, per layer under ``vitals_layers/``) and
hands each value to the alert detectors on the way.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tbx_lightning.monitor._alerts import AlertEngine, median_update_ratio
from tbx_lightning.monitor._lr import ChangedValues
from tbx_lightning.monitor._ratio import UpdateRatio
from tbx_lightning.monitor._sink import MonitorSink
from tbx_lightning.monitor._stats import LAYER_PREFIX

__all__ = ["Reader", "Readout"]


class Reader:
    """Hands out consecutive slices of the one host transfer, in packing order."""

    def __init__(self, values: list[float]) -> None:
        self._values = values
        self._pos = 0

    def take(self, n: int) -> list[float]:
        out = self._values[self._pos : self._pos + n]
        self._pos += n
        return out


class Readout:
    """Turns a scalar step's host values into tags and detector checks.

    Args:
        names: The group names, in order.
        ratio: The update-ratio state (a sampled zero is confirmed there).
    """

    def __init__(self, names: list[str], ratio: UpdateRatio) -> None:
        self.names = names
        self._ratio = ratio
        self._clipped = False
        self._lrs = ChangedValues()

    def read(
        self,
        step: int,
        staged: dict[str, Any],
        reader: Reader,
        checks: AlertEngine | None,
        sink: MonitorSink | None,
        *,
        overflow: bool = False,
    ) -> dict[str, float | int | torch.Tensor]:
        """The staged statistics as tags (read in the order they were packed), checked.

        ``overflow``: the step's gradients overflowed a gradient scaler, which skips the
        step; their NaN/Inf is written but not an alert.
        """
        scalars: dict[str, float | int | torch.Tensor] = {}
        names = self.names
        total_sumsq: float | None = None
        for key, label in (("weights", "weight_norm"), ("grads", "grad_norm")):
            if key not in staged:
                continue
            values, mask = staged[key]
            if isinstance(values, torch.Tensor):
                rows = reader.take(values.numel())
                pairs = [(rows[2 * i], rows[2 * i + 1]) for i in range(len(names))]
            else:
                pairs = [(float(a), float(b)) for a, b in values]
            nonfinite: dict[str, float] = {}
            for i, (sumsq, bad) in enumerate(pairs):
                if not mask[i]:
                    continue
                scalars[f"{LAYER_PREFIX}/{label}/{names[i]}"] = math.sqrt(sumsq)
                nonfinite[names[i]] = bad
            scalars[f"vitals/nonfinite/{key}"] = float(sum(nonfinite.values()))
            if checks is not None and not (overflow and key == "grads"):
                checks.check_nonfinite(step, key, nonfinite)
            if key == "grads" and nonfinite:
                total_sumsq = sum(pairs[i][0] for i in range(len(names)) if mask[i])
                scalars["vitals/grad_norm_total"] = math.sqrt(total_sumsq)
                if checks is not None:
                    checks.check_grad_norm(step, math.sqrt(total_sumsq))
        if "post_clip" in staged:
            (post,) = reader.take(1)
            pre = None if total_sumsq is None else math.sqrt(total_sumsq)
            if self._clipped or pre is None or not math.isclose(post, pre, rel_tol=1e-6):
                self._clipped = self._clipped or pre is not None
                scalars["vitals/grad_norm_total/post_clip"] = post
        if "ratios" in staged:
            values, mask, sampled = staged["ratios"]
            rows = reader.take(values.numel())
            ratios = {names[i]: rows[i] for i in range(len(names)) if mask[i]}
            scalars.update({f"{LAYER_PREFIX}/update_ratio/{k}": v for k, v in ratios.items()})
            median = median_update_ratio(ratios.values())
            if median is not None:
                scalars["vitals/update_ratio"] = median
            patience = checks.rules.patience if checks is not None else None
            unconfirmed = self._ratio.confirm_zeros(sampled, mask, rows, patience)
            if checks is not None:
                checks.check_update_ratios(step, ratios, unconfirmed=unconfirmed)
        if "lr" in staged:
            lrs: dict[str, float] = staged["lr"]
            changed, firsts = self._lrs.filter(step, lrs)
            scalars.update(changed)
            for tag, (first_step, value) in firsts.items():
                if sink is not None:
                    sink.log_scalars({tag: value}, first_step)
            if checks is not None:
                checks.check_lr(
                    step,
                    {
                        k.removeprefix("vitals/lr/"): v
                        for k, v in lrs.items()
                        if k.startswith("vitals/lr/")
                    },
                    adaptive=staged.get("adaptive", frozenset()),
                )
        return scalars
