"""Spread over seeds: runs grouped by the config left when the ``--over`` keys are taken out.

``tbx-lightning hparams --over KEYS`` shows one row per group (mean, standard deviation
and count of each metric) and ``tbx-lightning aggregate --over KEYS`` writes one band
run per group; both group here, in one pass over the runs' HParams rows.

A key that holds the same value as an ``--over`` key in every run (an interpolated
copy, such as the templates' ``data.seed: ${seed}``) is taken out with it, or every
seed would stay a group of its own.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tbx_lightning.errors import ConfigError
from tbx_lightning.runs import RunRecord

__all__ = ["OWN_COLUMNS", "Group", "Grouping", "differing", "group_runs", "spread"]

# Status and duration have their own columns; the HParams row repeats them as keys.
OWN_COLUMNS = ("run.status", "run.duration_s")
_MISSING = object()


@dataclass
class Group:
    """Runs that share every config key but the ``--over`` keys.

    Attributes:
        config: The config they share (the ``--over`` keys and their copies left out).
        records: The runs, in path order.
    """

    config: dict[str, Any]
    records: list[RunRecord] = field(default_factory=list)


@dataclass(frozen=True)
class Grouping:
    """What :func:`group_runs` found.

    Attributes:
        groups: One per distinct remaining config, in the order of their first run.
        over: The config keys the runs were grouped over (those the patterns matched).
        copies: Keys taken out with them because they hold the same value in every run.
    """

    groups: list[Group]
    over: list[str]
    copies: list[str]


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _same_everywhere(records: Sequence[RunRecord], key: str, other: str) -> bool:
    for record in records:
        a = record.hparams.get(key, _MISSING)
        b = record.hparams.get(other, _MISSING)
        if (a is _MISSING) != (b is _MISSING):
            return False
        if a is not _MISSING and _text(a) != _text(b):
            return False
    return True


def _varies(records: Sequence[RunRecord], key: str) -> bool:
    return len({_text(r.hparams.get(key)) for r in records if key in r.hparams}) > 1


def group_runs(records: Sequence[RunRecord], patterns: Sequence[str]) -> Grouping:
    """Groups ``records`` by their config without the keys ``patterns`` match.

    Args:
        records: The runs, as :func:`tbx_lightning.runs.read_runs` returns them.
        patterns: Config keys or fnmatch patterns (``data.seed``, ``*seed``).

    Raises:
        ConfigError: no pattern matches a config key of these runs.
    """
    keys = sorted({k for r in records for k in r.hparams} - set(OWN_COLUMNS))
    over = [k for k in keys if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    if not over:
        raise ConfigError(
            f"--over {','.join(patterns)!r} matches no config key of these runs; the keys "
            f"that differ between them are: {', '.join(differing(records)) or '(none)'}"
        )
    varying = [k for k in over if _varies(records, k)]
    copies = [
        k
        for k in keys
        if k not in over
        and _varies(records, k)
        and any(_same_everywhere(records, k, o) for o in varying)
    ]
    left_out = {*over, *copies, *OWN_COLUMNS}
    groups: dict[str, Group] = {}
    for record in records:
        config = {k: v for k, v in record.hparams.items() if k not in left_out}
        groups.setdefault(_text(config), Group(config)).records.append(record)
    return Grouping(list(groups.values()), over, copies)


def differing(records: Sequence[RunRecord]) -> list[str]:
    """The config keys whose values differ between ``records`` (all keys for one run).

    Args:
        records: The runs (or one record per group, holding its config).
    """
    keys = sorted({key for record in records for key in record.hparams} - set(OWN_COLUMNS))
    if len(records) < 2:
        return keys
    return [key for key in keys if len({_text(r.hparams.get(key, _MISSING)) for r in records}) > 1]


def spread(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """``(mean, sample standard deviation, n)`` of the values that are not None.

    The standard deviation divides by ``n - 1`` and is None for a single value. A NaN
    among the values (a run that diverged) makes the mean and deviation NaN, so a bad
    seed is seen rather than averaged away.

    Args:
        values: One value per run; None for a run without one.

    Example:
        >>> spread([1.0, 2.0, None, 3.0])
        (2.0, 1.0, 3)
        >>> spread([0.5])
        (0.5, None, 1)
    """
    present = [float(v) for v in values if v is not None]
    n = len(present)
    if n == 0:
        return None, None, 0
    mean = math.fsum(present) / n
    if n == 1:
        return mean, None, 1
    variance = math.fsum((v - mean) ** 2 for v in present) / (n - 1)
    return mean, math.sqrt(variance), n
