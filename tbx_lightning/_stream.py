"""The storage side of one run: its event files, the bytes waiting for them, its records file.

A :class:`~tbx_lightning.RunWriter` encodes what callers queue into an
:class:`EventStream`, on its writer thread; only that thread calls the stream (and,
once it has ended, a caller that retries a close that failed). Everything here is
local: a remote run is written into its spool folder the same way.

- Events are appended to one event file through an unbuffered descriptor. A write
  the disk takes only part of keeps the part (no record is written twice); the rest
  stays in :attr:`EventStream.pending` and is written first by the next write-out.
  While storage fails, nothing is dropped: callers bound what waits (see
  ``RunWriter``'s ``max_queue_bytes``).
- Records that change while the run goes on (the HParams row, the status, the config
  text) live one per tag in the records file (:data:`RECORDS_FILE`), whose name sorts
  before every event file's and is no ``events.*`` name (a glob for the run's
  event streams does not find it); it is replaced whole, atomically, after each change.
- Each new event file's name sorts after every event file already in the folder, so
  TensorBoard (which reads them in name order) never reads a resumed run's file
  before the first one, whatever the clocks say.
- A folder deleted while the run writes is made again; logging goes on in a new file,
  the records are written again, and the error says so once.
"""

from __future__ import annotations

import os
import re
import struct
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

from tensorboardX.proto.event_pb2 import Event, SessionLog

from tbx_lightning import _fs
from tbx_lightning._events import frame, header, read_records, record_key, records_content
from tbx_lightning._summary import RunSummary
from tbx_lightning.errors import RunWriterError

__all__ = ["RECORDS_FILE", "EventFile", "EventStream", "WriteFailed", "load_records"]

RECORDS_FILE = _fs.RECORDS_FILE
_STAMP = re.compile(r"^events\.out\.tfevents\.(\d+)\.")
_RECORDS_LIMIT = 256 << 20


class WriteFailed(Exception):
    """A write stopped with ``written`` bytes in the file; the cause is ``__cause__``."""

    def __init__(self, written: int) -> None:
        super().__init__(written)
        self.written = written


class EventFile:
    """Appends framed records to one local event file through an unbuffered descriptor."""

    def __init__(self, path: str, *, private: bool) -> None:
        self.path = path
        self.offset = 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        self.fd: int | None = os.open(path, flags, 0o600 if private else 0o666)

    def write(self, data: bytes | bytearray) -> None:
        """Appends ``data``; a failure raises :class:`WriteFailed` with what the file took."""
        assert self.fd is not None
        done = 0
        with memoryview(data) as view:  # released on the way out: the caller may resize data
            try:
                while done < len(view):
                    done += os.write(self.fd, view[done:])
            except OSError as error:
                self.offset += done
                raise WriteFailed(done) from error
        self.offset += done

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class EventStream:
    """One run folder's event files, pending bytes, records file and summary.

    Args:
        folder: The local run folder (or spool folder).
        suffix: The end of each event file's name (host, pid, counter, user suffix).
        private: Files 0600 and a folder made again 0700 (a spool).
        purge_step: Written as a session start at this step (a resumed run's purge).
        segment_bytes: Past this size the event file is closed and a new one begun at
            the next write-out (None: never; object stores re-upload a changed file whole).
        on_write: Called after each write-out (the spool's uploader is told).
    """

    def __init__(
        self,
        folder: str,
        *,
        suffix: str,
        private: bool,
        purge_step: int | None,
        segment_bytes: int | None = None,
        on_write: Callable[[], Any] | None = None,
    ) -> None:
        self.folder = folder
        self.private = private
        self._suffix = suffix
        self._segment_bytes = segment_bytes
        self._on_write = on_write
        self.pending = bytearray()  # encoded bytes not written yet
        self._torn = 0  # leading bytes of ``pending`` that end a record the file began
        self.failing = False
        self.last_failure: BaseException | None = None
        self.error: BaseException | None = None  # not yet reported to a caller
        self.records_path = os.path.join(folder, RECORDS_FILE)
        self.records = load_records(self.records_path)
        if not self.records:  # a run of an earlier release: carry its records on
            self.records = load_records(os.path.join(folder, _fs.LEGACY_RECORDS_FILE))
        self.records_dirty = False
        self._open_file()
        if purge_step is not None:
            start = SessionLog(status=SessionLog.START)
            event = Event(step=int(purge_step), wall_time=time.time(), session_log=start)
            self.file.write(frame(event.SerializeToString()))
        # The per-tag statistics `tbx-lightning hparams` reads instead of the events.
        self.summary = RunSummary(_fs.LOCAL, folder, purge_step=purge_step, private=private)
        self.last_write = time.monotonic()

    def _open_file(self) -> None:
        self.first_file = os.path.join(
            self.folder, event_file_name(_list(self.folder), self._suffix)
        )
        self._segment = 0
        self.file = EventFile(self.first_file, private=self.private)
        self.file.write(header())

    @property
    def finished(self) -> bool:
        """Everything is written and the event file closed."""
        return not self.pending and not self.records_dirty and self.file.fd is None

    def set_record(self, key: str, data: bytes) -> None:
        self.records[key] = data
        self.records_dirty = True

    def fail(self, error: BaseException, *, quiet: bool = False) -> None:
        """Keeps a storage error; ``quiet`` for a periodic retry of a failure already reported."""
        self.last_failure = error
        if not quiet:
            self.error = error
        self.failing = True

    def write_pending(self, *, quiet: bool = False) -> bool:
        """Appends what is pending; False (and the error kept) when storage refused it."""
        if not self.pending:
            return True
        try:
            self.file.write(self.pending)
        except WriteFailed as failed:
            # The pending bytes may now start inside a record: remember how far that goes.
            self._torn = _torn_tail(self.pending, self._torn, failed.written)
            del self.pending[: failed.written]
            self.fail(failed.__cause__ if failed.__cause__ is not None else failed, quiet=quiet)
            return False
        except Exception as error:  # a file object that raises as it is (tests' full disks)
            self.fail(error, quiet=quiet)
            return False
        self.pending = bytearray()
        self._torn = 0
        self.failing = False
        return True

    def write_records(self) -> None:
        """Replaces the records file with the run's records."""
        # The temporary name must not hold "tfevents": readers would take it for a run file.
        _fs.write_bytes_atomic(
            _fs.LOCAL,
            self.records_path,
            records_content(self.records),
            tmp_prefix=".tbx-records",
            private=self.private,
        )
        self.records_dirty = False

    def write_out(self, *, final: bool = False, quiet: bool = False) -> bool:
        """Writes what is pending, the records and the summary; False (error kept) on failure.

        ``final`` closes the event file once everything is written.
        """
        self.last_write = time.monotonic()
        try:
            self.check_folder()
            if not self.write_pending(quiet=quiet):
                return False
            if self.records_dirty:
                self.write_records()
            self.failing = False
            if final:
                self.file.close()
            # Everything added so far is on storage: the summary may say it covers it.
            self.summary.covers(self.file.path, self.file.offset)
            self.summary.save()
            size = self._segment_bytes
            if not final and size is not None and self.file.offset >= size:
                self.file.close()
                self._segment += 1
                path = f"{self.first_file}.seg{self._segment:06d}"
                self.file = EventFile(path, private=self.private)
                self.file.write(header())
            if self._on_write is not None:
                self._on_write()
        except Exception as error:
            self.fail(error, quiet=quiet)
            return False
        return True

    def check_folder(self) -> None:
        """A deleted run folder would swallow writes into an unlinked file: say so instead."""
        if self.file.fd is None or os.path.exists(self.file.path):
            return
        lost = self.file.path
        self.file.close()
        del self.pending[: self._torn]  # the rest of a record whose start went with the file
        self._torn = 0
        if self.private:
            _fs.private_dir(self.folder, hint="Point TBX_LIGHTNING_SPOOL at a folder of yours.")
        else:
            os.makedirs(self.folder, exist_ok=True)
        self._open_file()
        self.records_dirty = bool(self.records)
        self.summary.restart()
        raise RunWriterError(
            f"The run folder {self.folder!r} was removed while the run was writing (its event "
            f"file {os.path.basename(lost)!r} went with it): it was made again and logging goes "
            f"on in {self.file.path!r}. What was written before is lost with the folder; the "
            "run's HParams row and status are written again."
        )

    def error_message(self, error: BaseException | None) -> str:
        """What a caller is told about a storage error, and what to do."""
        if isinstance(error, RunWriterError):
            return str(error)
        return (
            f"Writing events to {self.file.path!r} failed: {type(error).__name__}: {error}. "
            "What was written before is intact and what could not be written is kept; free "
            "space or restore the directory, then call flush() to retry the pending events."
        )


def _torn_tail(data: bytearray, first: int, written: int) -> int:
    """How many bytes after ``written`` end the record that ``written`` falls in.

    ``data`` holds whole framed records from ``first`` on (the bytes before it end a
    record an earlier write began).
    """
    pos = first
    while pos < written:
        (length,) = struct.unpack_from("<Q", data, pos)
        pos += 16 + length
    return pos - written


def _list(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def event_file_name(names: Iterable[str], suffix: str) -> str:
    """A new event file's name that sorts after every event file in ``names``.

    TensorBoard reads a run's files in name order; a resumed run on a host whose clock
    is behind would otherwise come first and bring back the steps it purged.
    """
    last = max((n for n in names if _STAMP.match(n) and n != _fs.LEGACY_RECORDS_FILE), default="")
    stamp = int(time.time())
    if last:
        newest = int(_STAMP.match(last).group(1))  # type: ignore[union-attr]
        stamp = max(stamp, newest)
        if f"events.out.tfevents.{stamp:010d}{suffix}" <= last:
            stamp = newest + 1
    return f"events.out.tfevents.{stamp:010d}{suffix}"


def load_records(path: str) -> dict[str, bytes]:
    """``key -> serialised event`` of a records file; damage is skipped with one warning."""
    try:
        raw = _fs.read_bytes(_fs.LOCAL, path, limit=_RECORDS_LIMIT)
    except FileNotFoundError:
        return {}
    except _fs.UnsafeFileError as error:
        warnings.warn(
            f"tbx_lightning: ignored the records file {path!r} ({error.strerror}); the run's "
            "HParams row and status are written anew.",
            stacklevel=5,
        )
        return {}
    records: dict[str, bytes] = {}
    bad = 0
    for index, data in enumerate(read_records(raw, path)):
        try:
            event = Event.FromString(data)
        except Exception:  # a record that is no Event: foreign or damaged
            bad += 1
            continue
        if index:  # the first record is the file's header
            records[record_key(event)] = data
    if bad:
        warnings.warn(
            f"tbx_lightning: skipped {bad} record(s) of {path!r} that are no TensorBoard "
            "events (a damaged or foreign file).",
            stacklevel=5,
        )
    return records
