"""``tbx-lightning alerts RUNS``: every alert of every run, newest first.

The training monitor writes each new alert into its run (a Text entry under the tag
``alerts``, see :func:`tbx_lightning.runs.read_alerts`); this lists them across a
whole sweep, for people (a table) and for scripts and agents (``--format json``).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from tbx_lightning.cli._table import cell_text, clip, render
from tbx_lightning.runs import AlertRecord, read_alerts

__all__ = ["COLUMNS", "alert_rows", "alerts"]

COLUMNS = ("time", "run", "step", "kind", "where", "value", "threshold", "message")
"""The fields of each alert, in every format (``time`` is UTC, ISO 8601)."""
_MIN_MESSAGE = 24


def alert_rows(found: list[AlertRecord]) -> list[dict[str, Any]]:
    """One row per alert, with :data:`COLUMNS`."""
    return [
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(alert.wall_time)),
            "run": alert.run,
            "step": alert.step,
            "kind": alert.kind,
            "where": alert.where,
            "value": alert.value,
            "threshold": alert.threshold,
            "message": alert.message,
        }
        for alert in found
    ]


def _fit_messages(rows: list[dict[str, Any]], width: int) -> list[dict[str, Any]]:
    """Messages clipped so that a table line fits ``width``: the other columns stay whole."""
    others = [c for c in COLUMNS if c != "message"]
    widths = [max([len(c), *(len(cell_text(r[c])) for r in rows)]) for c in others]
    room = max(_MIN_MESSAGE, width - sum(widths) - 2 * len(others))
    return [{**row, "message": clip(row["message"], room)} for row in rows]


def alerts(args: argparse.Namespace) -> int:
    """``tbx-lightning alerts RUNS``."""
    found = read_alerts(args.runs_dir)
    if args.limit is not None:
        found = found[: max(0, args.limit)]
    rows = alert_rows(found)
    if args.format == "table":
        if not rows:
            print(f"No alerts in {args.runs_dir}.")
            return 0
        if args.width:
            rows = _fit_messages(rows, args.width)
        print(render(list(COLUMNS), rows, "table", width=0))
    else:
        print(render(list(COLUMNS), rows, args.format))
    return 0
