"""One naming of the training metrics, for every template and both runners.

Each LightningModule of the templates computes its metrics per batch in a
``batch_metrics(logits, targets)`` method (``loss`` first). Lightning's modules and
the Accelerate loop log them under the same tags, at the same steps:

- ``train/loss``: the batch's loss, every ``trainer.log_every_n_steps`` steps, at
  step ``s`` (0-based) when ``(s + 1) % log_every_n_steps == 0``, as Lightning does:
  the curve to watch while training;
- ``train/<name>`` for every other metric (``acc``, ``perplexity``): the mean over the
  epoch's batches, weighted by batch size (one batch's accuracy is mostly noise);
- ``val/<name>``: the weighted mean over the validation batches, once per epoch.

Epoch-level values are written at the step of the epoch's last training batch. One
tag per metric and split keeps TensorBoard's first screens on the metrics: its HParams
table shows the first five metric columns by tag (``epoch``, ``train/acc``,
``train/loss``, ``val/acc``, ``val/loss`` for the quickstart). Learning rate and
throughput come from the training monitor, not from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "STEP_METRIC",
    "EpochMean",
    "epoch_metrics",
    "log_batch_metrics",
    "train_tag",
    "val_tag",
]

STEP_METRIC = "loss"
"""The one training metric logged per step; the others are epoch means."""


def train_tag(name: str) -> str:
    """``train/<name>``: per step for :data:`STEP_METRIC`, else the epoch's mean.

    Example:
        >>> train_tag("acc")
        'train/acc'
    """
    return f"train/{name}"


def val_tag(name: str) -> str:
    """``val/<name>``: the validation mean."""
    return f"val/{name}"


def log_batch_metrics(
    module: Any, split: str, values: Mapping[str, torch.Tensor], batch_size: int
) -> None:
    """Logs a batch's metrics from a LightningModule step under the tags above.

    Args:
        module: The LightningModule (its ``log`` is called).
        split: ``train`` or ``val``.
        values: Metric name to the batch's value; ``loss`` goes to the progress bar.
        batch_size: The weight of this batch in the epoch means.
    """
    for name, value in values.items():
        shown = name == "loss"
        if split == "train" and name == STEP_METRIC:
            module.log(train_tag(name), value, on_step=True, on_epoch=False, prog_bar=shown)
        elif split == "train":
            module.log(train_tag(name), value, on_step=False, on_epoch=True, batch_size=batch_size)
        else:
            module.log(
                val_tag(name),
                value,
                on_step=False,
                on_epoch=True,
                prog_bar=shown,
                batch_size=batch_size,
            )


class EpochMean:
    """Batch-size-weighted means of per-batch metrics, as Lightning's ``on_epoch`` gives.

    Example:
        >>> mean = EpochMean()
        >>> mean.add({"loss": torch.tensor(1.0)}, 3)
        >>> mean.add({"loss": torch.tensor(3.0)}, 1)
        >>> mean.means()
        {'loss': 1.5}
    """

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._weight = 0

    def add(self, values: Mapping[str, torch.Tensor | float], weight: int) -> None:
        """Adds one batch's values with its batch size as the weight."""
        for name, value in values.items():
            number = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
            self._sums[name] = self._sums.get(name, 0.0) + number * weight
        self._weight += weight

    def means(self) -> dict[str, float]:
        """The weighted mean of each metric (empty before the first batch)."""
        if not self._weight:
            return {}
        return {name: total / self._weight for name, total in self._sums.items()}


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def epoch_metrics(metrics: Mapping[str, Any], limit: int = 6) -> dict[str, float]:
    """The metrics to show at an epoch's end, by tag: ``val/*``, then ``train/*``.

    ``train/loss`` (one batch's value) comes after the epoch means; Lightning's
    ``*_step``/``*_epoch`` copies, the monitor's tags and ``trainer/epoch`` are left out.

    Example:
        >>> epoch_metrics({"train/loss": 0.9, "train/acc": 0.5, "val/loss": 1.0})
        {'val/loss': 1.0, 'train/acc': 0.5, 'train/loss': 0.9}
    """
    keys = {
        k
        for k in metrics
        if not k.startswith(("vitals/", "vitals_layers/")) and k not in ("epoch", "trainer/epoch")
    }
    keys = {k for k in keys if not k.endswith(("_step", "_epoch"))}

    def rank(key: str) -> tuple[int, str]:
        if key.startswith("val/"):
            return (0, key)
        if key == train_tag(STEP_METRIC):
            return (2, key)
        return (1, key)

    shown: dict[str, float] = {}
    for key in sorted(keys, key=rank):
        number = _number(metrics[key])
        if number is not None:
            shown[key] = number
    return dict(list(shown.items())[:limit])
