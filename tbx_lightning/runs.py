"""Run directories as tools see them: rows, statuses, alerts; and a spool's upload.

What ``tbx-lightning hparams``, ``alerts`` and ``aggregate`` read, for your own
scripts too. Each run directory (one with a TensorBoard events file) becomes a
:class:`RunRecord`:

- **metrics** come from the run's ``summary.json`` (per-tag count, last, min, max,
  kept by the writer) when it covers exactly the run's event files at their current
  sizes, so a table costs O(runs) rather than O(logged points); any other run is read
  with TensorBoard's own ``EventAccumulator``;
- **hyperparameters and status** come from the run's HParams session records, parsed
  with TensorBoard's HParams protos, so a row shows what TensorBoard's HParams
  dashboard shows;
- **stalled**: a run whose session still says *running* but whose writer gave no sign
  of life for :data:`STALLED_AFTER` seconds is reported as ``stalled``. The sign of
  life is the heartbeat that an open writer rewrites in its lease file every 10 s (a
  run with no lease left, whose writer closed without a final status, counts from the
  last change of its event files). TensorBoard itself goes on showing such a run as
  running: its status is the session record, which only a live writer updates.

Runs written by ``tbx-lightning aggregate`` (they hold :data:`AGGREGATE_FILE`) are
bands over other runs, not runs of their own: :func:`read_runs` and
:func:`read_alerts` leave them out.

Example:
    >>> import tempfile
    >>> from tbx_lightning import RunWriter
    >>> from tbx_lightning.hparams import RunHParams
    >>> root = tempfile.mkdtemp()
    >>> with RunWriter(f"{root}/version_0") as writer:
    ...     hp = RunHParams(writer)
    ...     _ = hp.log({"lr": 0.1})
    ...     writer.log_scalars({"val/acc": 0.75}, step=1)
    ...     hp.finish("success")
    >>> (record,) = read_runs(root)
    >>> record.run, record.hparams["lr"], record.status, record.stats["val/acc"].last
    ('version_0', 0.1, 'success', 0.75)
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tbx_lightning import _fs
from tbx_lightning._events import read_records
from tbx_lightning._lease import LEASE_FILE
from tbx_lightning._spool import upload_spool
from tbx_lightning._summary import SummaryData, TagStats, minimizes, read_summary
from tbx_lightning.errors import ConfigError

__all__ = [
    "AGGREGATE_FILE",
    "ALERTS_TAG",
    "STALLED_AFTER",
    "AlertRecord",
    "RunRecord",
    "TagStats",
    "minimizes",
    "read_alerts",
    "read_run_dir",
    "read_runs",
    "upload_spool",
]

STALLED_AFTER = 120.0
"""Seconds without a sign of life after which a *running* run is shown as ``stalled``.

An open writer rewrites its heartbeat every 10 s; 120 s is also how old a heartbeat
must be before a writer on another host may take the run directory over.
"""

AGGREGATE_FILE = "tbx-aggregate.json"
"""The file that marks a run written by ``tbx-lightning aggregate`` (what it aggregates)."""

ALERTS_TAG = "alerts/text_summary"
"""The Text entry the training monitor writes its alerts under (tag ``alerts``)."""

# TensorBoard's HParams plugin: its data version and session record tags. The plugin's
# protos are read directly; its ``metadata`` module would import TensorBoard's
# TensorFlow stub, which costs more than reading a thousand summaries.
_PLUGIN_NAME = "hparams"
_PLUGIN_DATA_VERSION = 0
_START_TAG = "_hparams_/session_start_info"
_END_TAG = "_hparams_/session_end_info"
_SESSION_MARK = b"_hparams_/session_"


@dataclass
class RunRecord:
    """One run as the HParams dashboard sees it, plus what its directory says of its writer.

    Attributes:
        run: The run's directory relative to the directory that was read.
        path: The run's directory, absolute.
        hparams: Its hyperparameters by dot path (from the session start record).
        status: ``success``, ``failure``, ``running``, ``stalled`` or ``unknown``.
        start_time: Session start, seconds since the epoch (None without HParams).
        end_time: Session end; for a run still running (or killed), its last scalar's time.
        stats: Per scalar tag: count, last, min and max (float32 values, as stored).
        source: ``summary`` when the metrics came from the run's summary, else ``events``.
        stalled_since: For a ``stalled`` run, its last sign of life (seconds since the epoch).

    Example:
        >>> record = RunRecord("version_0", start_time=100.0, end_time=160.5)
        >>> record.duration, record.status
        (60.5, 'unknown')
    """

    run: str
    path: str = ""
    hparams: dict[str, Any] = field(default_factory=dict)
    status: str = "unknown"
    start_time: float | None = None
    end_time: float | None = None
    stats: dict[str, TagStats] = field(default_factory=dict)
    source: str = "events"
    stalled_since: float | None = None

    @property
    def duration(self) -> float | None:
        """Seconds from session start to end (or to the last scalar while running)."""
        if self.start_time is None or self.end_time is None:
            return None
        return max(0.0, self.end_time - self.start_time)


@dataclass(frozen=True)
class AlertRecord:
    """One alert of the training monitor, as a run stored it.

    Attributes:
        run: The run's directory relative to the directory that was read.
        step: The optimizer step the alert belongs to.
        kind: ``loss_spike``, ``nonfinite_loss``, ``grad_explosion``, ...
        where: The layer, param group or rank; ``model`` for the whole model.
        value: The value that fired the detector (NaN or infinite for non-finite ones).
        threshold: The limit it crossed.
        message: The monitor's sentence saying what happened and what to check.
        wall_time: When the run wrote it, seconds since the epoch.

    Example:
        >>> AlertRecord("version_0", 14, "loss_spike", "model", 9.5, 2.1, "loss 9.5 ...", 0.0).kind
        'loss_spike'
    """

    run: str
    step: int
    kind: str
    where: str
    value: float
    threshold: float
    message: str
    wall_time: float


# ---------------------------------------------------------------------------- session records
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
    # tensorboard (an optional dependency) loads when a run is read, not for upload_spool.
    from tensorboard.plugins.hparams import plugin_data_pb2

    data = plugin_data_pb2.HParamsPluginData.FromString(content)
    if data.version != _PLUGIN_DATA_VERSION or not data.HasField(which):
        raise ConfigError(
            f"An HParams record holds no {which} of plugin data version "
            f"{_PLUGIN_DATA_VERSION} (found version {data.version}): was the run written "
            "by a newer TensorBoard?"
        )
    return getattr(data, which)


def _apply_session(
    record: RunRecord, start: bytes | None, end: bytes | None, last_wall: float | None
) -> None:
    """Fills hparams, status and times from the session records' plugin contents."""
    # tensorboard (an optional dependency) loads when a run is read, not for upload_spool.
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


def _session_contents(path: str, names: Sequence[str]) -> tuple[bytes | None, bytes | None]:
    """The first session start and end records of a run, as TensorBoard keeps them.

    Both are written once, near the start of the run's first event file (or in its
    records file, which sorts first), so the scan usually stops after a few records.
    """
    # tensorboard (an optional dependency) loads when a run is read, not for upload_spool.
    from tensorboard.compat.proto import event_pb2

    wanted = (_START_TAG, _END_TAG)
    found: dict[str, bytes] = {}
    for name in names:
        try:
            handle = open(os.path.join(path, name), "rb")  # noqa: SIM115 (closed below)
        except OSError:
            continue
        with handle:
            for data in read_records(handle, os.path.join(path, name)):
                if _SESSION_MARK not in data:
                    continue
                try:
                    event = event_pb2.Event.FromString(data)
                except Exception:  # a record that does not parse: TensorBoard skips it too
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


# ---------------------------------------------------------------------------- one run
def _event_files(path: str) -> list[str]:
    """The names of a run directory's event files, in the order TensorBoard reads them."""
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return sorted(name for name in names if "tfevents" in name)


def _run_dirs(root: str, *, aggregates: bool = False) -> list[str]:
    dirs = []
    for current, subdirs, files in os.walk(root):
        if not aggregates and AGGREGATE_FILE in files:
            subdirs[:] = []
            continue
        subdirs.sort()
        if any("tfevents" in name for name in files):
            dirs.append(current)
    return sorted(dirs)


def _from_events(path: str, root: str) -> RunRecord:
    """One run read with TensorBoard's own ``EventAccumulator``."""
    # TensorBoard's reader (a quarter of a second to import) loads only for runs without a
    # current summary.
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        TENSORS,
        EventAccumulator,
    )

    accumulator = EventAccumulator(path, size_guidance={SCALARS: 0, TENSORS: 0})
    accumulator.Reload()
    record = RunRecord(run=os.path.relpath(path, root), path=path, source="events")
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
    _apply_session(record, content.get(_START_TAG), content.get(_END_TAG), last_wall)
    return record


def _current_summary(path: str, names: Sequence[str]) -> SummaryData | None:
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


def _heartbeat(path: str) -> float | None:
    """The last heartbeat in the run's lease file; None without a readable one."""
    try:
        with open(os.path.join(path, LEASE_FILE), "rb") as handle:
            info = json.loads(handle.read(65536).decode("utf-8"))
        beat = float(info["heartbeat"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return None
    return beat if math.isfinite(beat) else None


def _last_write(path: str, names: Sequence[str]) -> float | None:
    times = []
    for name in names:
        try:
            times.append(os.path.getmtime(os.path.join(path, name)))
        except OSError:
            continue
    return max(times) if times else None


def _check_stalled(record: RunRecord, names: Sequence[str], now: float, limit: float) -> None:
    """Turns a ``running`` record into ``stalled`` when its writer gave no sign of life."""
    if record.status != "running":
        return
    alive = _heartbeat(record.path)
    if alive is None:
        alive = _last_write(record.path, names)
    if alive is not None and now - alive > limit:
        record.status = "stalled"
        record.stalled_since = alive


def read_run_dir(
    path: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    *,
    summaries: bool = True,
    stalled_after: float = STALLED_AFTER,
    now: float | None = None,
) -> RunRecord:
    """One run directory as a :class:`RunRecord`: from its summary when current, else its events.

    Args:
        path: The run directory (the one holding its events files).
        root: What :attr:`RunRecord.run` is relative to (default: the run's parent).
        summaries: Use the run's summary when it is current (False: read its events).
        stalled_after: Seconds without a sign of life after which a running run is
            ``stalled``; see :data:`STALLED_AFTER`.
        now: The time to judge that against (default: now).

    Raises:
        ConfigError: An HParams record of a data version this TensorBoard cannot read.
    """
    path = os.path.abspath(os.fspath(path))
    base = os.path.dirname(path) if root is None else os.path.abspath(os.fspath(root))
    names = _event_files(path)
    summary = _current_summary(path, names) if summaries else None
    if summary is None:
        record = _from_events(path, base)
    else:
        record = RunRecord(
            run=os.path.relpath(path, base), path=path, stats=dict(summary.tags), source="summary"
        )
        start, end = _session_contents(path, names)
        _apply_session(record, start, end, summary.last_time)
    _check_stalled(record, names, time.time() if now is None else now, stalled_after)
    return record


def read_runs(
    runs_dir: str | os.PathLike[str],
    *,
    summaries: bool = True,
    stalled_after: float = STALLED_AFTER,
    now: float | None = None,
) -> list[RunRecord]:
    """Every run (directory with an events file) under ``runs_dir``, in path order.

    Aggregate runs (``tbx-lightning aggregate``) and directories without
    hyperparameters or scalars are left out.

    Args:
        runs_dir: A run directory or a directory of runs.
        summaries: Use runs' current summaries (False: read every run's events).
        stalled_after: See :func:`read_run_dir`.
        now: See :func:`read_run_dir`.

    Raises:
        ConfigError: ``runs_dir`` does not exist or holds no events file.
    """
    root = _root(runs_dir)
    moment = time.time() if now is None else now
    records = [
        read_run_dir(path, root, summaries=summaries, stalled_after=stalled_after, now=moment)
        for path in _dirs_or_error(root, runs_dir)
    ]
    return [r for r in records if r.hparams or r.stats]


def _root(runs_dir: str | os.PathLike[str]) -> str:
    root = os.path.abspath(os.fspath(runs_dir))
    if not os.path.isdir(root):
        raise ConfigError(f"RUNS_DIR {str(runs_dir)!r} is not a directory.")
    return root


def _dirs_or_error(root: str, given: str | os.PathLike[str]) -> list[str]:
    dirs = _run_dirs(root)
    if not dirs:
        raise ConfigError(
            f"No TensorBoard events files under {str(given)!r}: point RUNS_DIR at a "
            "directory that `tbx-lightning fit` or `sweep` wrote (e.g. runs/quickstart)."
        )
    return dirs


# ---------------------------------------------------------------------------- alerts
_ROW = re.compile(
    r"^\|\s*(-?\d+)\s*\|\s*([^|]*?)\s*\|\s*([^|]*?)\s*\|\s*([^|]*?)\s*\|\s*([^|]*?)\s*\|$"
)


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _parse_alerts_markdown(text: str) -> list[tuple[int, str, str, float, float, str]]:
    """``(step, kind, where, value, threshold, message)`` of each alert in one alerts entry.

    The monitor writes a markdown table (``| step | alert | where | value | threshold |``)
    followed by one bullet message per row, in the same order.

    Example:
        >>> _parse_alerts_markdown(
        ...     "| step | alert | where | value | threshold |\\n|---|---|---|---|---|\\n"
        ...     "| 14 | loss_spike | model | 9.5 | 2.1 |\\n\\n- loss 9.5 at step 14 is high"
        ... )
        [(14, 'loss_spike', 'model', 9.5, 2.1, 'loss 9.5 at step 14 is high')]
    """
    rows = []
    messages = []
    for line in text.splitlines():
        line = line.strip()
        match = _ROW.match(line)
        if match and match.group(2) != "alert":
            step, kind, where, value, threshold = match.groups()
            rows.append((int(step), kind, where, _number(value), _number(threshold)))
        elif line.startswith("- "):
            messages.append(line[2:].strip())
    return [(*row, messages[i] if i < len(messages) else "") for i, row in enumerate(rows)]


def read_alerts(runs_dir: str | os.PathLike[str]) -> list[AlertRecord]:
    """Every alert of every run under ``runs_dir``, newest first.

    Alerts are read from the runs' ``alerts`` Text entries (TensorBoard lists them as
    ``alerts/text_summary``) with TensorBoard's own reader; the training monitor
    writes one entry per step at which new alerts fired. Newest first means by the
    second the entry was written, then by step, both descending (the monitor writes
    the alerts of several steps within one interval).

    Args:
        runs_dir: A run directory or a directory of runs; aggregate runs are left out.

    Raises:
        ConfigError: ``runs_dir`` does not exist or holds no events file.
    """
    # TensorBoard's reader (optional, like every tensorboard import here): the alerts are
    # Text entries, which no summary keeps.
    from tensorboard.backend.event_processing.event_accumulator import (
        AUDIO,
        COMPRESSED_HISTOGRAMS,
        HISTOGRAMS,
        IMAGES,
        SCALARS,
        TENSORS,
        EventAccumulator,
    )

    root = _root(runs_dir)
    found: list[tuple[int, int, int, AlertRecord]] = []
    guidance = {SCALARS: 1, HISTOGRAMS: 1, COMPRESSED_HISTOGRAMS: 1, IMAGES: 1, AUDIO: 1}
    for path in _dirs_or_error(root, runs_dir):
        accumulator = EventAccumulator(path, size_guidance={**guidance, TENSORS: 0})
        accumulator.Reload()
        if ALERTS_TAG not in accumulator.Tags().get("tensors", []):
            continue
        run = os.path.relpath(path, root)
        for entry in accumulator.Tensors(ALERTS_TAG):
            values = entry.tensor_proto.string_val
            text = b"\n".join(values).decode("utf-8", "replace")
            for index, (step, kind, where, value, threshold, message) in enumerate(
                _parse_alerts_markdown(text)
            ):
                alert = AlertRecord(
                    run, step, kind, where, value, threshold, message, entry.wall_time
                )
                found.append((int(entry.wall_time), step, index, alert))
    found.sort(key=lambda item: (item[0], item[1], item[2], item[3].run), reverse=True)
    return [item[3] for item in found]
