"""The HParams table in the terminal: runs, differing config keys, last/best metrics, status.

A run's metrics come from its ``summary.json`` (see ``_summary``) when that covers
exactly the event files the run has, at their current sizes, so the table costs
O(runs) rather than O(logged points); its hyperparameters and status come from the
HParams session records near the start of its event file, which are updated in
place. Runs without a current summary are read with TensorBoard's own
``EventAccumulator``, and both routes parse the records with TensorBoard's HParams
plugin, so the table shows what TensorBoard's HParams dashboard shows.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tbx_lightning import _fs
from tbx_lightning._events import read_records
from tbx_lightning._summary import TagStats, minimizes, read_summary
from tbx_lightning.errors import TableError

__all__ = [
    "RunRecord",
    "TableError",
    "main_metrics",
    "minimizes",
    "read_run",
    "read_run_dir",
    "read_runs",
    "render",
    "table_rows",
]

_DEFAULT_EXCLUDE = ("vitals/*", "hp_metric", "epoch", "_hparams_/*")
FORMATS = ("table", "csv", "markdown", "json")
_SESSION_MARK = b"_hparams_/session_"
# TensorBoard's HParams plugin: its name, data version and session record tags. The
# plugin's protos are read directly; its ``metadata`` module would import TensorBoard's
# TensorFlow stub, which costs more than reading a thousand summaries.
_PLUGIN_NAME = "hparams"
_PLUGIN_DATA_VERSION = 0
_START_TAG = "_hparams_/session_start_info"
_END_TAG = "_hparams_/session_end_info"


@dataclass
class RunRecord:
    """One run as the HParams dashboard sees it.

    Attributes:
        run: The run's directory relative to the directory that was read.
        hparams: Its hyperparameters by dot path (from the session start record).
        status: ``success``, ``failure``, ``running``, ``unknown``.
        start_time: Session start, seconds since the epoch (None without HParams).
        end_time: Session end; for a run still running (or killed), its last scalar's time.
        stats: Per scalar tag: count, last, min and max (float32 values, as stored).
        source: ``summary`` when the metrics came from the run's summary, else ``events``.
    """

    run: str
    hparams: dict[str, Any] = field(default_factory=dict)
    status: str = "unknown"
    start_time: float | None = None
    end_time: float | None = None
    stats: dict[str, TagStats] = field(default_factory=dict)
    source: str = "events"

    @property
    def duration(self) -> float | None:
        """Seconds from session start to end (or to the last scalar while running)."""
        if self.start_time is None or self.end_time is None:
            return None
        return max(0.0, self.end_time - self.start_time)


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


def _plugin_data(content: bytes, which: str) -> Any:
    """``session_start_info`` or ``session_end_info`` of a record's HParams plugin data."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    if data.version != _PLUGIN_DATA_VERSION or not data.HasField(which):
        raise TableError(
            f"An HParams record holds no {which} of plugin data version "
            f"{_PLUGIN_DATA_VERSION} (found version {data.version}): was the run written "
            "by a newer TensorBoard?"
        )
    return getattr(data, which)


def _apply_session(
    record: RunRecord, start: bytes | None, end: bytes | None, last_wall: float | None
) -> None:
    """Fills hparams, status and times from the session records' plugin contents."""
    from tensorboard.plugins.hparams import api_pb2

    if start is not None:
        info = _plugin_data(start, "session_start_info")
        record.hparams = {key: _hparam_value(value) for key, value in info.hparams.items()}
        record.start_time = info.start_time_secs or None
    status = api_pb2.STATUS_UNKNOWN
    if end is not None:
        end_info = _plugin_data(end, "session_end_info")
        status = end_info.status
        if end_info.end_time_secs:
            record.end_time = end_info.end_time_secs
    names = {
        api_pb2.STATUS_SUCCESS: "success",
        api_pb2.STATUS_FAILURE: "failure",
        api_pb2.STATUS_RUNNING: "running",
    }
    record.status = names.get(status, "unknown")
    # A run that is still running (or was killed) has run until its last point.
    if (
        record.start_time is not None
        and last_wall
        and (
            record.end_time is None
            or (record.status in ("running", "unknown") and last_wall > record.end_time)
        )
    ):
        record.end_time = last_wall


def _event_files(path: str) -> list[str]:
    """The names of a run directory's event files, in the order TensorBoard reads them."""
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return sorted(name for name in names if "tfevents" in name)


def _run_dirs(root: str) -> list[str]:
    dirs = []
    for current, _subdirs, files in os.walk(root):
        if any("tfevents" in name for name in files):
            dirs.append(current)
    return sorted(dirs)


def read_run(path: str, root: str) -> RunRecord:
    """Reads one run directory from its event files into a :class:`RunRecord`."""
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        TENSORS,
        EventAccumulator,
    )

    accumulator = EventAccumulator(path, size_guidance={SCALARS: 0, TENSORS: 0})
    accumulator.Reload()
    record = RunRecord(run=os.path.relpath(path, root), source="events")
    last_wall = 0.0
    for tag in accumulator.Tags().get("scalars", []):
        events = accumulator.Scalars(tag)
        if events:
            record.stats[tag] = TagStats.of([float(e.value) for e in events])
            last_wall = max(last_wall, max(e.wall_time for e in events))
    try:
        content = accumulator.PluginTagToContent("hparams")
    except KeyError:  # no HParams records in this run
        content = {}
    _apply_session(
        record,
        content.get(_START_TAG),
        content.get(_END_TAG),
        last_wall,
    )
    return record


def _session_contents(path: str, names: Sequence[str]) -> tuple[bytes | None, bytes | None]:
    """The first session start and end records of a run, as TensorBoard keeps them.

    Both are written once, near the start of the run's first event file, and updated
    in place, so the scan usually stops after a few records.
    """
    from tensorboard.compat.proto import event_pb2

    wanted = (_START_TAG, _END_TAG)
    found: dict[str, bytes] = {}
    for name in names:
        with open(os.path.join(path, name), "rb") as handle:
            for data in read_records(handle, os.path.join(path, name)):
                if _SESSION_MARK not in data:
                    continue
                try:
                    event = event_pb2.Event.FromString(data)
                except Exception:  # a damaged record: TensorBoard skips it too
                    continue
                for value in event.summary.value:
                    if (
                        value.tag in wanted
                        and value.tag not in found
                        and value.HasField("metadata")
                        and value.metadata.plugin_data.plugin_name == _PLUGIN_NAME
                    ):
                        found[value.tag] = value.metadata.plugin_data.content
                if len(found) == len(wanted):
                    return found[wanted[0]], found[wanted[1]]
    return found.get(wanted[0]), found.get(wanted[1])


def _current_summary(path: str, names: Sequence[str]) -> Any:
    """The run's summary if it covers exactly these event files at their sizes, else None."""
    fs, inner = _fs.resolve(path)
    summary = read_summary(fs, inner)
    # The records file holds no scalars and is rewritten in place: the summary ignores it.
    names = [name for name in names if name != _fs.RECORDS_FILE]
    if summary is None or [name for name, _ in summary.files] != list(names):
        return None
    for name, size in summary.files:
        try:
            if os.path.getsize(os.path.join(path, name)) != size:
                return None
        except OSError:
            return None
    return summary


def read_run_dir(path: str, root: str, *, summaries: bool = True) -> RunRecord:
    """One run: from its summary when that is current (see :mod:`_summary`), else its events."""
    names = _event_files(path)
    summary = _current_summary(path, names) if summaries else None
    if summary is None:
        return read_run(path, root)
    record = RunRecord(run=os.path.relpath(path, root), stats=dict(summary.tags), source="summary")
    start, end = _session_contents(path, names)
    _apply_session(record, start, end, summary.last_time)
    return record


def read_runs(runs_dir: str | os.PathLike[str], *, summaries: bool = True) -> list[RunRecord]:
    """Every run (directory with an events file) under ``runs_dir``, in path order.

    Args:
        runs_dir: A run directory or a directory of runs.
        summaries: Use runs' current summaries (False: read every run's events).

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
    records = [read_run_dir(path, root, summaries=summaries) for path in dirs]
    return [r for r in records if r.hparams or r.stats]


def _select_metrics(records: Sequence[RunRecord], patterns: Sequence[str] | None) -> list[str]:
    tags = sorted({tag for record in records for tag in record.stats})
    if patterns:
        return [t for t in tags if any(fnmatch.fnmatchcase(t, p) for p in patterns)]
    return [t for t in tags if not any(fnmatch.fnmatchcase(t, p) for p in _DEFAULT_EXCLUDE)]


def main_metrics(records: Sequence[RunRecord]) -> list[str]:
    """The default metrics: every ``val/*`` tag and the training loss, epoch mean if logged.

    Per-step copies (Lightning's ``*_step``) are left out; the training loss is
    ``train/loss_epoch`` when the runs log it, else ``train/loss``.
    """
    tags = set(_select_metrics(records, None))
    chosen = sorted(t for t in tags if t.startswith("val/") and not t.endswith("_step"))
    for loss in ("train/loss_epoch", "train/loss"):
        if loss in tags:
            return [*chosen, loss]
    return chosen


# Status and duration have their own columns; the HParams row repeats them as keys.
_OWN_COLUMNS = ("run.status", "run.duration_s")


def _differing_keys(records: Sequence[RunRecord]) -> list[str]:
    keys = sorted({key for record in records for key in record.hparams} - set(_OWN_COLUMNS))
    if len(records) < 2:
        return keys
    missing = object()
    return [
        key
        for key in keys
        if len({json.dumps(r.hparams.get(key, missing), default=str) for r in records}) > 1
    ]


def table_rows(
    records: Sequence[RunRecord],
    *,
    sort: str | None = None,
    all_keys: bool = False,
    metrics: Sequence[str] | None = None,
    keys: Sequence[str] | None = None,
    best: bool = False,
    all_metrics: bool = False,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of the table: run, keys, metrics, status, seconds.

    A metric's column, named by its tag, holds its last value; ``<tag> best`` its
    best (lowest for names with loss, perplexity, error; highest otherwise), shown by
    default for the ``val/*`` metrics.

    Args:
        records: The runs, as :func:`read_runs` returns them.
        sort: A metric to sort by, best first; its ``best`` column is shown.
        all_keys: Show every config key, not only those that differ between runs.
        metrics: fnmatch patterns of the metrics to show (last values; ``best`` adds
            the best); default :func:`main_metrics`.
        keys: fnmatch patterns of the config keys to show (instead of the differing ones).
        best: Show a ``best`` column after every metric.
        all_metrics: Show every metric but ``vitals/*`` (when ``metrics`` is not given).

    Raises:
        TableError: ``sort`` names no metric of these runs.
    """
    every = metrics or all_metrics
    chosen = _select_metrics(records, metrics) if every else main_metrics(records)
    # By default the val/* metrics show their best too: what a sweep or a search picks by.
    with_best = {m for m in chosen if best or (not every and m.startswith("val/"))}
    all_tags = sorted({tag for record in records for tag in record.stats})
    if sort is not None and sort not in all_tags:
        raise TableError(
            f"--sort {sort!r} is not a metric of these runs; choose one of: "
            + ", ".join(chosen or all_tags)
        )
    if sort is not None and sort not in chosen:
        chosen = [sort, *chosen]
    every_key = sorted({k for r in records for k in r.hparams} - set(_OWN_COLUMNS))
    if keys:
        shown_keys = [k for k in every_key if any(fnmatch.fnmatchcase(k, p) for p in keys)]
    else:
        shown_keys = every_key if all_keys else _differing_keys(records)
    columns = ["run", *shown_keys]
    for metric in chosen:
        columns.append(metric)
        if metric in with_best or metric == sort:
            columns.append(f"{metric} best")
    columns += ["status", "seconds"]
    rows = []
    for record in records:
        row: dict[str, Any] = {"run": record.run}
        for key in shown_keys:
            row[key] = record.hparams.get(key)
        for metric in chosen:
            stats = record.stats.get(metric)
            row[metric] = None if stats is None else stats.last
            if f"{metric} best" in columns:
                row[f"{metric} best"] = None if stats is None else stats.best(metric)
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


DEFAULT_WIDTH = 120
"""Characters a line of the table format (``hparams --width``, the sweep's closing table)."""
_CELL_WIDTH = 24
_FIXED = ("run", "status", "seconds")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _table_width(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> int:
    widths = [max([len(h), *(len(line[i]) for line in cells)]) for i, h in enumerate(headers)]
    return sum(widths) + 2 * (len(widths) - 1)


def _short_headers(columns: Sequence[str], parts: int) -> list[str]:
    """Config keys cut to their last ``parts`` dotted parts, where that stays unique."""
    short = [c if c in _FIXED or "/" in c else ".".join(c.split(".")[-parts:]) for c in columns]
    return [
        name if short.count(name) == 1 and (name == full or name not in columns) else full
        for name, full in zip(short, columns, strict=True)
    ]


def _fit(
    columns: Sequence[str], cells: list[list[str]], width: int
) -> tuple[list[str], list[list[str]], int]:
    """Headers and cells narrowed to ``width`` characters a line.

    Long cells are clipped first, then config keys shortened (``model.optimizer.lr``
    to ``optimizer.lr``, then ``lr``), long cells clipped shorter, then columns left
    out from the right: ``best`` columns, then metrics but the first, then config keys
    but the first (never run, status or seconds). Returns the headers, the cells and
    how many columns were left out.
    """
    cells = [[_clip(cell, _CELL_WIDTH) for cell in line] for line in cells]
    headers = list(columns)
    for parts in (2, 1):
        if _table_width(headers, cells) <= width:
            break
        headers = _short_headers(columns, parts)
    if _table_width(headers, cells) > width:
        cells = [[_clip(cell, _CELL_WIDTH // 2) for cell in line] for line in cells]
    kept = list(range(len(headers)))

    def width_of(indices: list[int]) -> int:
        return _table_width(
            [headers[i] for i in indices], [[ln[i] for i in indices] for ln in cells]
        )

    while width_of(kept) > width:
        keys = [i for i in kept if columns[i] not in _FIXED and "/" not in columns[i]]
        tags = [i for i in kept if "/" in columns[i]]
        bests = [i for i in tags if columns[i].endswith(" best")]
        # Right to left: best values, then metrics but the first, then keys but the first.
        droppable = bests or tags[1:] or keys[1:] or keys or tags
        if not droppable:
            break
        kept.remove(droppable[-1])
    return (
        [headers[i] for i in kept],
        [[line[i] for i in kept] for line in cells],
        len(headers) - len(kept),
    )


def render(
    columns: Sequence[str],
    rows: Sequence[dict[str, Any]],
    fmt: str = "table",
    width: int | None = DEFAULT_WIDTH,
) -> str:
    """The table as aligned text, CSV, a Markdown table or JSON (a list of row objects).

    Args:
        columns: Column names, as :func:`table_rows` returns them.
        rows: One mapping per run.
        fmt: ``table``, ``csv``, ``markdown`` or ``json``.
        width: For ``table``: at most this many characters a line (long cells clipped,
            config keys shortened, right-most columns left out, with a note saying how
            many); ``None`` or 0: no limit. The other formats always hold every column.

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
    headers, left_out = list(columns), 0
    if width:
        headers, cells, left_out = _fit(columns, cells, width)
    widths = [max([len(c), *(len(line[i]) for line in cells)]) for i, c in enumerate(headers)]
    out = ["  ".join(c.ljust(w) for c, w in zip(headers, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    for line in cells:
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    if left_out:
        out.append(
            f"({left_out} more column{'s' if left_out > 1 else ''} left out to fit {width} "
            "characters: --width 0 shows them, --format csv or json holds everything)"
        )
    return "\n".join(out)
