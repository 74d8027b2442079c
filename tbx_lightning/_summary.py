"""A run's scalar summary: last, min, max and count per tag, kept beside its event files.

The HParams table needs a handful of numbers per tag, not every logged point, so
each run keeps ``summary.json``: the statistics of every scalar tag, the time range
of its scalars, and the event files (and their sizes) the statistics cover. The
writer feeds it from its background thread and saves it after each successful
flush, atomically. A reader trusts a summary only while the run's event files are
exactly the ones it covers, at the sizes it covers; anything else (a run killed
between flushes, a resumed run, a run from an older version) is read from its
events instead.

Values are kept as the caller passed them and rounded to float32, the precision
of a scalar event, when saved: rounding is monotonic, so the min and max of the
rounded values are the rounded min and max.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tbx_lightning import _fs
from tbx_lightning.errors import LoggedValueError

__all__ = ["SUMMARY_FILE", "RunSummary", "SummaryData", "TagStats", "minimizes", "read_summary"]

SUMMARY_FILE = "summary.json"
FORMAT = 1

_log = logging.getLogger(__name__)
_MIN_WORDS = ("loss", "perplexity", "ppl", "error", "err", "mse", "mae", "rmse", "nll")
# Doubles at or beyond this magnitude become +/-inf as float32 (round half to even
# at FLT_MAX + half an ulp), which is how the scalar encoder writes them.
_F32_LIMIT = 2.0**128 - 2.0**103
_PACK_F = struct.Struct("<f")


def minimizes(metric: str) -> bool:
    """Whether lower is better for a metric, judged by its name (loss, perplexity, error...)."""
    words = metric.lower().replace("-", "_").replace("/", "_").split("_")
    return any(word in _MIN_WORDS for word in words)


def _f32(value: float) -> float:
    try:
        return float(_PACK_F.unpack(_PACK_F.pack(value))[0])
    except (OverflowError, struct.error):
        return math.inf if value > 0 else -math.inf


def _dump_number(value: float | None) -> float | str | None:
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _load_number(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        return float(value)  # "nan", "inf", "-inf"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LoggedValueError(f"not a number: {value!r}")
    return float(value)


def _number_or_nan(value: Any) -> float:
    number = _load_number(value)
    return math.nan if number is None else number


@dataclass(frozen=True)
class TagStats:
    """What the table shows of one scalar tag, as float32 values like the event file holds.

    Attributes:
        count: Points logged (NaN and infinities included).
        last: The last value logged (in event-file order).
        min: The lowest finite value, None when no value was finite.
        max: The highest finite value, None when no value was finite.
    """

    count: int
    last: float
    min: float | None
    max: float | None

    def best(self, metric: str) -> float | None:
        """The lowest value for loss-like names (see :func:`minimizes`), else the highest."""
        return self.min if minimizes(metric) else self.max

    @classmethod
    def of(cls, values: Sequence[float]) -> TagStats:
        """Statistics of a series read back from events (already float32 values)."""
        finite = [v for v in values if math.isfinite(v)]
        return cls(
            count=len(values),
            last=values[-1],
            min=min(finite) if finite else None,
            max=max(finite) if finite else None,
        )


@dataclass(frozen=True)
class SummaryData:
    """A saved summary as read back: see :func:`read_summary`.

    Attributes:
        files: ``(event file name, size in bytes)`` it covers, in the order they were written.
        tags: Statistics per scalar tag.
        first_time: Wall time of the first scalar, None without scalars.
        last_time: Wall time of the last scalar, None without scalars.
        status: What the writer last recorded (``running`` until ``finish``).
    """

    files: tuple[tuple[str, int], ...]
    tags: dict[str, TagStats]
    first_time: float | None
    last_time: float | None
    status: str


class RunSummary:
    """Maintains ``summary.json`` of one run: per-tag last/min/max/count and covered files.

    ``add`` and ``covers`` are called by the writer's background thread as it writes,
    ``save`` after each successful flush; all three from that one thread. ``add`` only
    updates dicts; ``save`` writes the file atomically and never raises.

    A summary left by an earlier process of the same run directory (a resumed run) is
    carried on, with the files it covered, unless ``purge_step`` is given: TensorBoard
    then drops the earlier points from that step on, which per-tag statistics cannot
    undo, so the earlier files are left uncovered and readers use the events.

    Args:
        fs: The run's fsspec file system (see ``_fs.resolve``).
        run_path: The run directory inside ``fs``.
        purge_step: The writer's ``purge_step``, if any.
        private: Save the file with mode 0600 (a spool folder).

    Example:
        >>> import tempfile
        >>> from tbx_lightning import _fs
        >>> fs, path = _fs.resolve(tempfile.mkdtemp())
        >>> summary = RunSummary(fs, path)
        >>> summary.add(0, 100.0, ("train/loss",), [0.5])
        >>> summary.add(1, 101.0, ("train/loss",), [0.25])
        >>> summary.covers(_fs.join(fs, path, "events.out.tfevents.1"), 120)
        >>> summary.save()
        True
        >>> read_summary(fs, path).tags["train/loss"]
        TagStats(count=2, last=0.25, min=0.25, max=0.5)
    """

    def __init__(
        self, fs: Any, run_path: str, *, purge_step: int | None = None, private: bool = False
    ) -> None:
        self.fs = fs
        self.private = private
        self.run_path = run_path
        self.path = _fs.join(fs, run_path, SUMMARY_FILE)
        # tag -> [count, last, min, max]; min/max stay +inf/-inf until a finite value arrives.
        self._tags: dict[str, list[Any]] = {}
        self._files: dict[str, int] = {}
        self._first_time: float | None = None
        self._last_time: float | None = None
        self.status = "running"
        self._dirty = True
        self._failed = False
        if purge_step is None:
            self._carry_on()

    def restart(self) -> None:
        """Forgets every file and statistic (the run folder was removed): only what is
        logged from now on is covered; the status stays."""
        self._tags.clear()
        self._files.clear()
        self._first_time = self._last_time = None
        self._dirty = True

    def _carry_on(self) -> None:
        try:
            earlier = read_summary(self.fs, self.run_path)
        except Exception:  # an unreadable summary is as good as none
            earlier = None
        if earlier is None:
            return
        self._files = dict(earlier.files)
        for tag, stats in earlier.tags.items():
            low = math.inf if stats.min is None else stats.min
            high = -math.inf if stats.max is None else stats.max
            self._tags[tag] = [stats.count, stats.last, low, high]
        self._first_time, self._last_time = earlier.first_time, earlier.last_time

    @property
    def tag_count(self) -> int:
        """How many scalar tags the run has (a new tag changes it); cheap, any thread."""
        return len(self._tags)

    def tag_names(self) -> list[str]:
        """The run's scalar tags, in the order they first appeared; safe from any thread."""
        while True:
            try:
                return list(self._tags)
            except RuntimeError:  # the writer thread added a tag meanwhile
                continue

    def add(
        self, step: int, wall_time: float, keys: Sequence[str], values: Sequence[float]
    ) -> None:
        """Records one scalar event: one value per key, as written at ``step``."""
        tags = self._tags
        limit = _F32_LIMIT
        for key, value in zip(keys, values, strict=False):  # equal lengths by contract
            entry = tags.get(key)
            if entry is None:
                entry = tags[key] = [0, value, math.inf, -math.inf]
            entry[0] += 1
            entry[1] = value
            if -limit < value < limit:  # finite as float32 (NaN fails both comparisons)
                if value < entry[2]:
                    entry[2] = value
                if value > entry[3]:
                    entry[3] = value
        if self._first_time is None:
            self._first_time = wall_time
        if self._last_time is None or wall_time > self._last_time:
            self._last_time = wall_time
        self._dirty = True

    def add_event(self, event: Any) -> None:
        """Records the ``simple_value`` scalars of an ``Event`` proto written another way.

        TensorBoard reads only ``simple_value`` summaries as scalars, so only those count.
        """
        keys = []
        values = []
        for value in event.summary.value:
            if value.WhichOneof("value") == "simple_value":
                keys.append(value.tag)
                values.append(value.simple_value)
        if keys:
            self.add(event.step, event.wall_time, keys, values)

    def covers(self, event_file: str, size: int) -> None:
        """Says that the statistics now hold everything in the first ``size`` bytes of ``event_file``."""
        name = posixpath.basename(event_file.replace("\\", "/"))
        if self._files.get(name) != size:
            self._files[name] = size
            self._dirty = True

    def finish(self, status: str) -> None:
        """Records the run's final status (``success``, ``failed``, ...) for the next ``save``."""
        self.status = status
        self._dirty = True

    def to_json(self) -> dict[str, Any]:
        """The summary as saved: JSON-safe (non-finite numbers as ``"nan"``, ``"inf"``)."""
        tags = {}
        for tag, (count, last, low, high) in self._tags.items():
            tags[tag] = {
                "count": count,
                "last": _dump_number(_f32(last)),
                "min": _dump_number(None if low == math.inf else _f32(low)),
                "max": _dump_number(None if high == -math.inf else _f32(high)),
            }
        return {
            "format": FORMAT,
            "status": self.status,
            "first_time": self._first_time,
            "last_time": self._last_time,
            "saved": time.time(),
            "files": [[name, size] for name, size in self._files.items()],
            "tags": tags,
        }

    def save(self) -> bool:
        """Writes ``summary.json`` atomically if anything changed; False (and a warning) on failure.

        Never raises: a summary that cannot be written only makes readers use the events.
        """
        if not self._dirty:
            return True
        try:
            text = json.dumps(self.to_json(), separators=(",", ":"))
            _fs.write_text_atomic(self.fs, self.path, text, private=self.private)
        except Exception as error:
            if not self._failed:  # once per failing streak, not once per flush
                _log.warning(
                    "Could not write %s (%s: %s); `tbx-lightning hparams` reads this run's "
                    "event files instead.",
                    self.path,
                    type(error).__name__,
                    error,
                )
            self._failed = True
            return False
        self._failed = False
        self._dirty = False
        return True


_SUMMARY_LIMIT = 256 << 20


def read_summary(fs: Any, run_path: str) -> SummaryData | None:
    """The run's saved summary, or None when there is none or it cannot be used.

    Whether it is current is for the caller to judge from ``files``. A file that is
    not a summary this package wrote (a link, damaged or foreign JSON, JSON nested
    deeper than the parser goes) is skipped with one logged warning naming it; the
    caller then reads the run's events.
    """
    path = _fs.join(fs, run_path, SUMMARY_FILE)
    try:
        raw = json.loads(_fs.read_bytes(fs, path, limit=_SUMMARY_LIMIT))
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        why = getattr(error, "strerror", None) or type(error).__name__
        _log.warning("Ignored %s (%s): the run is read from its event files.", path, why)
        return None
    try:
        if raw.get("format") != FORMAT:
            return None
        files = tuple((str(name), int(size)) for name, size in raw["files"])
        tags = {
            str(tag): TagStats(
                count=int(entry["count"]),
                last=_number_or_nan(entry["last"]),
                min=_load_number(entry["min"]),
                max=_load_number(entry["max"]),
            )
            for tag, entry in raw["tags"].items()
        }
        first = raw.get("first_time")
        last = raw.get("last_time")
        return SummaryData(
            files=files,
            tags=tags,
            first_time=None if first is None else float(first),
            last_time=None if last is None else float(last),
            status=str(raw.get("status", "running")),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
