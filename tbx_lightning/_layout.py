"""The Custom Scalars layout of a run: train and val curves of each metric on one chart.

TensorBoard's Custom Scalars dashboard draws charts from a layout a run writes
(tag ``custom_scalars__config__``). Of the layouts one run wrote, it uses the last;
across runs it merges categories of the same title and keeps each distinct chart
once. So every chart here is described by regular expressions that depend only on
the metric's name (``loss``, ``acc``), never on which splits a run happened to log:
the charts of a sweep's runs are equal and merge into one.

- **metrics**: one chart per metric logged under a split prefix (``train/``,
  ``val/``, ``test/``, ... or ``train_``, ``val_``...; Lightning's ``_step`` and
  ``_epoch`` suffixes belong to the same chart), ``loss`` first, then accuracy,
  then the others by name.
- **vitals**: one chart per family of the training monitor's statistics, run-level
  ones (``vitals/lr/*``, ``vitals/grad_norm_total``, ``vitals/alerts``, ...) first,
  then the per-layer ones (``vitals_layers/grad_norm/*``, ...), every layer's curve
  on its family's chart.

Tags outside these namespaces (``epoch``, ``lr-Adam``) are left to the Scalars
dashboard. :class:`LayoutBuilder` rebuilds the layout only when a new tag name
changes it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

from tensorboardX.proto.event_pb2 import Event
from tensorboardX.summary import custom_scalars

__all__ = [
    "LAYOUT_TAG",
    "METRICS_CATEGORY",
    "MONITOR_CATEGORY",
    "SPLITS",
    "LayoutBuilder",
    "layout",
    "layout_event",
    "metric_name",
    "monitor_family",
]

LAYOUT_TAG = "custom_scalars__config__"
METRICS_CATEGORY = "metrics"
MONITOR_CATEGORY = "vitals"
# The training monitor's tag namespaces: run-level, then per layer. Both sort after
# train/ and val/ on purpose, and the per-layer one after the run-level one.
MONITOR_NAMESPACE = "vitals"
LAYER_NAMESPACE = "vitals_layers"
# Prefixes that name the split a metric was measured on, in the order users expect.
SPLITS: tuple[str, ...] = (
    "train",
    "training",
    "val",
    "valid",
    "validation",
    "eval",
    "test",
)
_SPLITS = "|".join(SPLITS)
_SPLIT_TAG = re.compile(rf"^(?:{_SPLITS})[/_](.+?)(?:_step|_epoch)?$")
_ACCURACY = ("acc", "accuracy")

Layout = dict[str, dict[str, list[object]]]


def metric_name(tag: str) -> str | None:
    """The metric a split-prefixed tag measures (``val/loss_epoch`` -> ``loss``), else None.

    Example:
        >>> metric_name("train/loss_step"), metric_name("val_acc"), metric_name("epoch")
        ('loss', 'acc', None)
    """
    match = _SPLIT_TAG.match(tag)
    return match.group(1) if match else None


def monitor_family(tag: str) -> str | None:
    """The monitor chart a tag belongs to (``vitals_layers/grad_norm/fc`` -> ``vitals_layers/grad_norm``).

    Example:
        >>> monitor_family("vitals_layers/grad_norm/fc"), monitor_family("vitals/alerts")
        ('vitals_layers/grad_norm', 'vitals/alerts')
    """
    parts = tag.split("/")
    if parts[0] in (MONITOR_NAMESPACE, LAYER_NAMESPACE) and len(parts) > 1 and parts[1]:
        return f"{parts[0]}/{parts[1]}"
    return None


def _metric_order(name: str) -> tuple[int, str]:
    if name == "loss":
        return (0, name)
    if name in _ACCURACY:
        return (1, name)
    if "loss" in name:
        return (2, name)
    if "acc" in name:
        return (3, name)
    return (4, name)


def _metric_regex(name: str) -> str:
    return rf"^(?:{_SPLITS})[/_]{re.escape(name)}(?:_step|_epoch)?$"


def _family_regex(family: str) -> str:
    return rf"^{re.escape(family)}(?:/.*)?$"


def _charts(tags: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    metrics: set[str] = set()
    families: set[str] = set()
    for tag in tags:
        name = metric_name(tag)
        if name is not None:
            metrics.add(name)
            continue
        family = monitor_family(tag)
        if family is not None:
            families.add(family)
    return tuple(sorted(metrics, key=_metric_order)), tuple(sorted(families))


def layout(tags: Iterable[str]) -> Layout:
    """The layout for a run's scalar tags, as tensorboardX's ``custom_scalars`` takes it.

    Example:
        >>> layout(["val/acc", "train/loss", "val/loss", "vitals/lr/group_0"])["metrics"]
        {'loss': ['Multiline', ['^(?:train|training|val|valid|validation|eval|test)[/_]loss(?:_step|_epoch)?$']], 'acc': ['Multiline', ['^(?:train|training|val|valid|validation|eval|test)[/_]acc(?:_step|_epoch)?$']]}
    """
    metrics, families = _charts(tags)
    out: Layout = {}
    if metrics:
        out[METRICS_CATEGORY] = {name: ["Multiline", [_metric_regex(name)]] for name in metrics}
    if families:
        out[MONITOR_CATEGORY] = {
            family: ["Multiline", [_family_regex(family)]] for family in families
        }
    return out


def layout_event(tags: Iterable[str], step: int, wall_time: float | None = None) -> Event | None:
    """The layout of ``tags`` as one event at ``step``; None when no tag has a chart."""
    charts = layout(tags)
    if not charts:
        return None
    return Event(
        wall_time=time.time() if wall_time is None else wall_time,
        step=step,
        summary=custom_scalars(charts),
    )


class LayoutBuilder:
    """Keeps a run's layout current: a new event only when a new tag changes the charts.

    Example:
        >>> builder = LayoutBuilder()
        >>> builder.update(["train/loss"], step=0) is not None
        True
        >>> builder.update(["train/loss", "train/loss_epoch"], step=1) is None  # same charts
        True
    """

    def __init__(self) -> None:
        self._charts: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())

    def update(self, tags: Iterable[str], step: int) -> Event | None:
        """The event to write for ``tags`` (all scalar tags of the run), or None if unchanged."""
        tags = list(tags)
        charts = _charts(tags)
        if charts == self._charts:
            return None
        self._charts = charts
        return layout_event(tags, step)
