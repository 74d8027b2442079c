"""Learning rates and momenta of an optimizer's param groups, as the monitor logs them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["ChangedValues", "lr_values", "unwrap_optimizer"]

# Words in the class names of adaptive optimizers (steps of about the learning rate per
# weight, whatever the gradient's scale), for AlertRules.adaptive_lr_max.
_ADAPTIVE = (
    "adam",
    "adagrad",
    "adadelta",
    "rmsprop",
    "adafactor",
    "lamb",
    "lion",
    "sophia",
    "came",
    "adan",
    "prodigy",
)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside Accelerate's and Lightning's wrappers (``optimizer``/``_optimizer``)."""
    inner = optimizer
    for _ in range(8):
        nxt = getattr(inner, "optimizer", None) or getattr(inner, "_optimizer", None)
        if nxt is None or nxt is inner or not hasattr(nxt, "param_groups"):
            break
        inner = nxt
    return inner


def lr_values(optimizer: Any, name: str | None) -> tuple[dict[str, float], frozenset[str]]:
    """``(tag -> value, adaptive param groups)`` of ``optimizer``'s learning rates and momenta.

    Example:
        >>> opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=3e-3)
        >>> lr_values(opt, None)
        ({'vitals/lr/group_0': 0.003, 'vitals/momentum/group_0': 0.9}, frozenset({'group_0'}))
    """
    inner = unwrap_optimizer(optimizer)
    prefix = "" if name is None else f"{name}/"
    adaptive = any(word in type(inner).__name__.lower() for word in _ADAPTIVE)
    out: dict[str, float] = {}
    flagged: set[str] = set()
    for i, group in enumerate(getattr(inner, "param_groups", [])):
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor):
            lr = lr.item() if lr.device.type == "cpu" else None  # a device lr: no sync
        if lr is not None:
            out[f"vitals/lr/{prefix}group_{i}"] = float(lr)
            if adaptive:
                flagged.add(f"{prefix}group_{i}")
        momentum = group.get("momentum")
        if momentum is None and isinstance(group.get("betas"), Sequence):
            momentum = group["betas"][0]
        if isinstance(momentum, int | float):
            out[f"vitals/momentum/{prefix}group_{i}"] = float(momentum)
    return out, frozenset(flagged)


class ChangedValues:
    """Learning rates and momenta, once they differ from their first value.

    A constant schedule says nothing a config does not: it gets no curve. When a value
    first changes, its first value is returned too, to be written at its first step.
    """

    def __init__(self) -> None:
        self._first: dict[str, tuple[int, float]] = {}
        self._changed: set[str] = set()

    def filter(
        self, step: int, values: Mapping[str, float]
    ) -> tuple[dict[str, float], dict[str, tuple[int, float]]]:
        """``(values to write at step, first values to write at their own step)``."""
        out: dict[str, float] = {}
        firsts: dict[str, tuple[int, float]] = {}
        for tag, value in values.items():
            first = self._first.setdefault(tag, (step, value))
            if tag not in self._changed and value != first[1]:
                self._changed.add(tag)
                if first[0] != step:
                    firsts[tag] = first
            if tag in self._changed:
                out[tag] = value
        return out, firsts
