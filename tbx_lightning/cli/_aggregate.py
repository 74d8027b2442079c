"""Bands in TensorBoard: one aggregate run per group of runs over seeds.

``tbx-lightning aggregate RUNS --over KEYS`` (and ``tbx-lightning sweep`` when it swept
a seed) groups the runs under ``RUNS`` as ``hparams --over`` does and writes, per
group, the run ``RUNS/aggregate/<group>``:

- each chosen scalar tag under its own name, holding the per-step **mean** over the
  group's runs, so the mean curve shows beside the runs in every dashboard;
- ``band/<tag>/lower`` and ``band/<tag>/upper``: mean minus and plus the sample
  standard deviation at that step (both the mean where only one run logged the step);
- a Custom Scalars layout with one Margin chart per tag (category ``bands``), which
  TensorBoard draws as the mean with a shaded band;
- :data:`tbx_lightning.runs.AGGREGATE_FILE`, saying what it aggregates; it keeps the
  run out of ``hparams``, ``alerts`` and later aggregates.

Points keep the step of the runs and the mean wall time of the runs at that step, so
TensorBoard's relative time axis shows the mean time to reach a step. Every rebuild
replaces the aggregate runs it finds under ``RUNS/aggregate``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import time
from collections.abc import Sequence
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import (
    AUDIO,
    COMPRESSED_HISTOGRAMS,
    HISTOGRAMS,
    IMAGES,
    SCALARS,
    TENSORS,
    EventAccumulator,
)

from tbx_lightning import RunWriter
from tbx_lightning.cli._spread import Group, differing, group_runs, spread
from tbx_lightning.cli._table import patterns, select_metrics
from tbx_lightning.errors import ConfigError
from tbx_lightning.runs import AGGREGATE_FILE, RunRecord, read_runs

__all__ = [
    "AGGREGATE_DIR",
    "BAND_CATEGORY",
    "aggregate",
    "band_tags",
    "write_aggregates",
]

AGGREGATE_DIR = "aggregate"
"""The folder under the runs directory that holds the aggregate runs."""
BAND_CATEGORY = "bands"
"""The Custom Scalars category of the Margin charts."""
_NAME_LIMIT = 80
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+\-]+")


def band_tags(tag: str) -> tuple[str, str]:
    """The lower and upper tags of ``tag``'s band.

    Example:
        >>> band_tags("val/loss")
        ('band/val/loss/lower', 'band/val/loss/upper')
    """
    return f"band/{tag}/lower", f"band/{tag}/upper"


def _names(groups: Sequence[Group]) -> list[str]:
    """Folder names that say which config each group is: ``model.optimizer.lr=0.01``."""
    if len(groups) == 1:
        return ["all"]
    keys = differing([RunRecord(run="", hparams=group.config) for group in groups])
    names = []
    for group in groups:
        text = ",".join(f"{key}={group.config.get(key)}" for key in keys) or "group"
        name = _UNSAFE.sub("_", text).strip("._") or "group"
        if len(name) > _NAME_LIMIT:
            digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
            name = f"{name[: _NAME_LIMIT - 9]}-{digest}"
        names.append(name)
    for index, name in enumerate(names):  # two groups may clip to one name
        if names.count(name) > 1:
            names[index] = f"{name}-{index}"
    return names


def _series(path: str, wanted: Sequence[str] | None) -> dict[str, dict[int, tuple[float, float]]]:
    """``tag -> step -> (value, wall time)`` of a run's scalars; the last value of a step wins."""
    guidance = {SCALARS: 0, TENSORS: 1, HISTOGRAMS: 1, COMPRESSED_HISTOGRAMS: 1, IMAGES: 1}
    accumulator = EventAccumulator(path, size_guidance={**guidance, AUDIO: 1})
    accumulator.Reload()
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for tag in accumulator.Tags().get("scalars", []):
        if wanted is not None and tag not in wanted:
            continue
        out[tag] = {e.step: (float(e.value), e.wall_time) for e in accumulator.Scalars(tag)}
    return out


def _clear(target: str) -> None:
    """Removes the aggregate runs under ``target``; refuses when it holds other runs."""
    if not os.path.isdir(target):
        return
    for current, subdirs, files in os.walk(target):
        if AGGREGATE_FILE in files:
            subdirs[:] = []
            continue
        if any("tfevents" in name for name in files):
            raise ConfigError(
                f"{current!r} holds a run that is not an aggregate (no {AGGREGATE_FILE}): "
                f"move it out of {target!r}, which `tbx-lightning aggregate` rewrites."
            )
    for name in os.listdir(target):
        child = os.path.join(target, name)
        if os.path.isfile(os.path.join(child, AGGREGATE_FILE)):
            shutil.rmtree(child)


def _write_group(
    path: str,
    group: Group,
    tags: Sequence[str],
    over: Sequence[str],
    root: str,
) -> list[str]:
    """Writes one aggregate run; returns the tags it holds."""
    series = [_series(record.path, tags) for record in group.records]
    present = [tag for tag in tags if any(tag in s for s in series)]
    os.makedirs(path, exist_ok=True)
    info = {
        "format": 1,
        "over": list(over),
        "config": group.config,
        "runs": [os.path.relpath(record.path, root) for record in group.records],
        "value": "mean over the runs at each step",
        "lower": "mean - sample standard deviation",
        "upper": "mean + sample standard deviation",
        "tags": present,
        "written": time.time(),
    }
    # The marker first: a rebuild that stops half-way still leaves no ordinary run behind.
    marker = os.path.join(path, AGGREGATE_FILE)
    with open(marker + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2, default=str)
    os.replace(marker + ".tmp", marker)
    layout: dict[str, dict[str, list[Any]]] = {BAND_CATEGORY: {}}
    with RunWriter(path, flush_secs=3600) as writer:
        experiment = writer.experiment
        for tag in present:
            lower_tag, upper_tag = band_tags(tag)
            steps = sorted({step for s in series for step in s.get(tag, {})})
            for step in steps:
                points = [s[tag][step] for s in series if step in s.get(tag, {})]
                mean, std, _ = spread(value for value, _ in points)
                if mean is None:
                    continue
                width = 0.0 if std is None or math.isnan(std) else std
                wall = math.fsum(w for _, w in points) / len(points)
                experiment.add_scalar(tag, mean, step, walltime=wall)
                experiment.add_scalar(lower_tag, mean - width, step, walltime=wall)
                experiment.add_scalar(upper_tag, mean + width, step, walltime=wall)
            layout[BAND_CATEGORY][tag] = ["Margin", [tag, lower_tag, upper_tag]]
        if present:
            experiment.add_custom_scalars(layout)
    return present


def write_aggregates(
    runs_dir: str | os.PathLike[str],
    over: Sequence[str],
    *,
    metrics: Sequence[str] | None = None,
    records: Sequence[RunRecord] | None = None,
) -> list[tuple[str, int, list[str]]]:
    """Rebuilds ``runs_dir/aggregate``: one band run per group of runs over ``over``.

    Args:
        runs_dir: The directory of the runs (a sweep's experiment directory).
        over: Config keys or fnmatch patterns to aggregate over (``seed``, ``*seed``).
        metrics: fnmatch patterns of the scalar tags to aggregate (default: every tag
            but those the ``hparams`` table also leaves out: the monitor's ``vitals/*``
            and ``vitals_layers/*``, ``by_tokens/*``, ``by_samples/*`` and the epoch).
        records: The runs, if already read (default: :func:`tbx_lightning.runs.read_runs`).

    Returns:
        ``(aggregate run directory, number of runs, tags)`` per group.

    Raises:
        ConfigError: no runs, ``over`` matches no key, or ``runs_dir`` is one run itself.
    """
    root = os.path.abspath(os.fspath(runs_dir))
    if records is None:
        records = read_runs(root)
    if any(os.path.abspath(record.path) == root for record in records):
        raise ConfigError(
            f"{str(runs_dir)!r} is one run: point RUNS at the directory that holds the "
            "runs to aggregate (a sweep's experiment directory)."
        )
    grouping = group_runs(records, over)
    tags = select_metrics(records, metrics)
    target = os.path.join(root, AGGREGATE_DIR)
    _clear(target)
    written = []
    for name, group in zip(_names(grouping.groups), grouping.groups, strict=True):
        path = os.path.join(target, name)
        present = _write_group(path, group, tags, [*grouping.over, *grouping.copies], root)
        written.append((path, len(group.records), present))
    return written


def aggregate(args: argparse.Namespace) -> int:
    """``tbx-lightning aggregate RUNS --over KEYS``."""
    over = patterns(args.over) or []
    written = write_aggregates(args.runs_dir, over, metrics=patterns(args.metrics))
    root = os.path.abspath(args.runs_dir)
    for path, count, tags in written:
        print(f"{os.path.relpath(path, root)}: mean and band of {len(tags)} tags over {count} runs")
    print(
        "Bands (mean ± sample standard deviation) are Margin charts in TensorBoard's "
        "Custom Scalars dashboard:"
    )
    print(f"  tensorboard --logdir {shlex.quote(root)}")
    return 0
