"""One naming of the training metrics, for every template and both runners.

Each LightningModule of the templates computes its metrics per batch in a
``batch_metrics(logits, targets)`` method (``loss`` first). Lightning's modules and
the Accelerate loop log them under the same tags, at the same steps:

- ``train/<name>``: the batch's value, every ``trainer.log_every_n_steps`` steps,
  at step ``s`` (0-based) when ``(s + 1) % log_every_n_steps == 0``, as Lightning does;
- ``train/<name>_epoch``: the mean over the epoch's batches, weighted by batch size;
- ``val/<name>``: the weighted mean over the validation batches, once per epoch.

Epoch-level values are written at the step of the epoch's last training batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "EpochMean",
    "epoch_metrics",
    "epoch_tag",
    "log_batch_metrics",
    "train_tag",
    "val_tag",
]


def train_tag(name: str) -> str:
    """``train/<name>``: the per-step value."""
    return f"train/{name}"


def epoch_tag(name: str) -> str:
    """``train/<name>_epoch``: the epoch's weighted mean.

    Example:
        >>> epoch_tag("loss")
        'train/loss_epoch'
    """
    return f"train/{name}_epoch"


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
        if split == "train":
            module.log(train_tag(name), value, on_step=True, on_epoch=False, prog_bar=shown)
            module.log(epoch_tag(name), value, on_step=False, on_epoch=True, batch_size=batch_size)
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
    """The epoch-level metrics to show, by tag: ``val/*`` first, then ``train/*_epoch``.

    Per-step values (``train/loss`` while ``train/loss_epoch`` exists, Lightning's
    ``*_step`` copies), ``monitor/*`` and ``epoch`` are left out; a per-step tag
    without an epoch aggregate (``train/lr``) is shown after them.

    Example:
        >>> epoch_metrics({"train/loss": 0.9, "train/loss_epoch": 1.2, "val/loss": 1.0})
        {'val/loss': 1.0, 'train/loss_epoch': 1.2}
    """
    keys = {k for k in metrics if not k.startswith("monitor/") and k != "epoch"}
    keys = {k for k in keys if not k.endswith("_step") and f"{k}_epoch" not in keys}

    def rank(key: str) -> tuple[int, str]:
        if key.startswith("val/"):
            return (0, key)
        if key.endswith("_epoch"):
            return (1, key)
        return (2, key)

    shown: dict[str, float] = {}
    for key in sorted(keys, key=rank):
        number = _number(metrics[key])
        if number is not None:
            shown[key] = number
    return dict(list(shown.items())[:limit])
