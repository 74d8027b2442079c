"""The HParams table in the terminal: runs, differing config keys, last/best metrics, status.

Runs are read with TensorBoard's own ``EventAccumulator`` and HParams plugin parser,
so the table shows what TensorBoard's HParams dashboard shows.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tbx_lightning.errors import TableError

__all__ = ["RunRecord", "TableError", "read_runs", "render", "table_rows"]

_DEFAULT_EXCLUDE = ("monitor/*", "hp_metric", "epoch", "_hparams_/*")
_MIN_WORDS = ("loss", "perplexity", "ppl", "error", "err", "mse", "mae", "rmse", "nll")
FORMATS = ("table", "csv", "markdown", "json")




@dataclass
class RunRecord:
    """One run as the HParams dashboard sees it.

    Attributes:
        run: The run's directory relative to the directory that was read.
        hparams: Its hyperparameters by dot path (from the session start record).
        status: ``success``, ``failure``, ``running``, ``unknown``.
        start_time: Session start, seconds since the epoch (None without HParams).
        end_time: Session end, or the last event's time for a running run.
        scalars: Every scalar tag, as ``(step, value)`` pairs in step order.
    """

    run: str
    hparams: dict[str, Any] = field(default_factory=dict)
    status: str = "unknown"
    start_time: float | None = None
    end_time: float | None = None
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def duration(self) -> float | None:
        """Seconds from session start to end (or to the last event while running)."""
        if self.start_time is None or self.end_time is None:
            return None
        return max(0.0, self.end_time - self.start_time)


def minimizes(metric: str) -> bool:
    """Whether lower is better for a metric, judged by its name (loss, perplexity, error...)."""
    words = metric.lower().replace("-", "_").replace("/", "_").split("_")
    return any(word in _MIN_WORDS for word in words)


def _hparam_value(value: Any) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


def _run_dirs(root: str) -> list[str]:
    dirs = []
    for current, _subdirs, files in os.walk(root):
        if any("tfevents" in name for name in files):
            dirs.append(current)
    return sorted(dirs)


def read_run(path: str, root: str) -> RunRecord:
    """Reads one run directory (its events files) into a :class:`RunRecord`."""
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        TENSORS,
        EventAccumulator,
    )
    from tensorboard.plugins.hparams import api_pb2, metadata

    accumulator = EventAccumulator(path, size_guidance={SCALARS: 0, TENSORS: 0})
    accumulator.Reload()
    record = RunRecord(run=os.path.relpath(path, root))
    last_wall = 0.0
    for tag in accumulator.Tags().get("scalars", []):
        events = accumulator.Scalars(tag)
        record.scalars[tag] = [(e.step, float(e.value)) for e in events]
        if events:
            last_wall = max(last_wall, max(e.wall_time for e in events))
    try:
        content = accumulator.PluginTagToContent("hparams")
    except KeyError:  # no HParams records in this run
        content = {}
    start = content.get(metadata.SESSION_START_INFO_TAG)
    if start is not None:
        info = metadata.parse_session_start_info_plugin_data(start)
        record.hparams = {key: _hparam_value(value) for key, value in info.hparams.items()}
        record.start_time = info.start_time_secs or None
    end = content.get(metadata.SESSION_END_INFO_TAG)
    status = api_pb2.STATUS_UNKNOWN
    if end is not None:
        end_info = metadata.parse_session_end_info_plugin_data(end)
        status = end_info.status
        if end_info.end_time_secs:
            record.end_time = end_info.end_time_secs
    names = {
        api_pb2.STATUS_SUCCESS: "success",
        api_pb2.STATUS_FAILURE: "failure",
        api_pb2.STATUS_RUNNING: "running",
    }
    record.status = names.get(status, "unknown")
    if record.end_time is None and record.start_time is not None and last_wall:
        record.end_time = last_wall
    return record


def read_runs(runs_dir: str | os.PathLike[str]) -> list[RunRecord]:
    """Every run (directory with an events file) under ``runs_dir``, in path order.

    Raises:
        TableError: ``runs_dir`` does not exist or holds no events file.
    """
    root = os.path.abspath(os.fspath(runs_dir))
    if not os.path.isdir(root):
        raise TableError(f"RUNS_DIR {str(runs_dir)!r} is not a directory.")
    dirs = _run_dirs(root)
    if not dirs:
        raise TableError(
            f"No TensorBoard events files under {str(runs_dir)!r}: point RUNS_DIR at a "
            "directory that `tbx-lightning fit` or `sweep` wrote (e.g. runs/quickstart)."
        )
    records = [read_run(path, root) for path in dirs]
    return [r for r in records if r.hparams or r.scalars]


def _select_metrics(records: Sequence[RunRecord], patterns: Sequence[str] | None) -> list[str]:
    tags = sorted({tag for record in records for tag in record.scalars})
    if patterns:
        return [t for t in tags if any(fnmatch.fnmatchcase(t, p) for p in patterns)]
    return [t for t in tags if not any(fnmatch.fnmatchcase(t, p) for p in _DEFAULT_EXCLUDE)]


def _differing_keys(records: Sequence[RunRecord]) -> list[str]:
    keys = sorted({key for record in records for key in record.hparams})
    if len(records) < 2:
        return keys
    missing = object()
    return [
        key
        for key in keys
        if len({json.dumps(r.hparams.get(key, missing), default=str) for r in records}) > 1
    ]


def _best(values: list[tuple[int, float]], metric: str) -> float | None:
    finite = [v for _, v in values if math.isfinite(v)]
    if not finite:
        return None
    return min(finite) if minimizes(metric) else max(finite)


def table_rows(
    records: Sequence[RunRecord],
    *,
    sort: str | None = None,
    all_keys: bool = False,
    metrics: Sequence[str] | None = None,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of the table: run, keys, ``<metric> last``/``best``, status, seconds.

    Args:
        records: The runs, as :func:`read_runs` returns them.
        sort: A metric to sort by, best first (lower-is-better judged by its name).
        all_keys: Show every config key, not only those that differ between runs.
        metrics: fnmatch patterns of the metrics to show; default all but ``monitor/*``.

    Raises:
        TableError: ``sort`` names no metric of these runs.
    """
    chosen = _select_metrics(records, metrics)
    all_tags = sorted({tag for record in records for tag in record.scalars})
    if sort is not None and sort not in all_tags:
        raise TableError(
            f"--sort {sort!r} is not a metric of these runs; choose one of: "
            + ", ".join(chosen or all_tags)
        )
    if sort is not None and sort not in chosen:
        chosen = [sort, *chosen]
    keys = sorted({k for r in records for k in r.hparams}) if all_keys else _differing_keys(records)
    columns = ["run", *keys]
    for metric in chosen:
        columns += [f"{metric} last", f"{metric} best"]
    columns += ["status", "seconds"]
    rows = []
    for record in records:
        row: dict[str, Any] = {"run": record.run}
        for key in keys:
            row[key] = record.hparams.get(key)
        for metric in chosen:
            values = record.scalars.get(metric, [])
            row[f"{metric} last"] = values[-1][1] if values else None
            row[f"{metric} best"] = _best(values, metric)
        row["status"] = record.status
        duration = record.duration
        row["seconds"] = None if duration is None else round(duration, 1)
        rows.append(row)
    if sort is not None:
        column = f"{sort} best"
        present = [r for r in rows if r[column] is not None]
        absent = [r for r in rows if r[column] is None]
        present.sort(key=lambda r: r[column], reverse=not minimizes(sort))
        rows = present + absent
    return columns, rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def render(columns: Sequence[str], rows: Sequence[dict[str, Any]], fmt: str = "table") -> str:
    """The table as aligned text, CSV, a Markdown table or JSON (a list of row objects).

    Raises:
        TableError: Unknown ``fmt``.
    """
    if fmt == "json":
        return json.dumps(list(rows), indent=2, default=str)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row.get(c) for c in columns])
        return buffer.getvalue().rstrip("\n")
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in cells]
        return "\n".join(lines)
    if fmt != "table":
        raise TableError(f"--format {fmt!r} is not one of: {', '.join(FORMATS)}")
    widths = [max([len(c), *(len(line[i]) for line in cells)]) for i, c in enumerate(columns)]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    for line in cells:
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    return "\n".join(out)
