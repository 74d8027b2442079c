"""RunWriter: one TensorBoard run directory, a fast scalar path and tensorboardX for the rest.

The caller's side of ``log_scalars`` only checks types and appends to a queue;
encoding, CRCs and writes happen on one background thread per run. Events that
tensorboardX's ``SummaryWriter`` produces (images, text, histograms, graphs) go
through the same queue, so a run is one ordered event stream in one file.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import numbers
import os
import posixpath
import socket
import struct
import threading
import time
import warnings
import weakref
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tensorboardX import SummaryWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.writer import FileWriter

from tbx_lightning import _fs
from tbx_lightning._events import ScalarEncoder, frame, padded
from tbx_lightning._lease import Lease
from tbx_lightning._rules import MAX_STEP, MIN_STEP, check_step, check_writer_options
from tbx_lightning._spool import Spool, SpoolFileSystem
from tbx_lightning._summary import RunSummary
from tbx_lightning.errors import LoggedTypeError, LoggedValueError, RunWriterError

__all__ = ["RunWriter", "RunWriterError"]

_SCALARS = 0
_TENSOR_SCALARS = 1
_EVENT = 2
_RECORD = 3
_PATCH = 4
_FLUSH = 5
_RECORDS = 6

_FILE_COUNTER = itertools.count()
_OPEN_WRITERS: weakref.WeakSet[RunWriter] = weakref.WeakSet()


RECORDS_FILE = _fs.RECORDS_FILE
# A write that stays inside one page reaches the page cache whole or not at all when the
# process is killed (the kernel checks for a fatal signal between pages, not inside one).
_PAGE = 4096
_FRAME_OVERHEAD = 16  # length (8), its CRC (4), the data's CRC (4)
_OPEN_WAIT = 5.0  # seconds a remote run's opening waits for the remote to answer


@dataclass(frozen=True)
class RecordHandle:
    """Where a patchable record lives, so it can be rewritten later.

    ``key`` is set for records kept in the run's records file (:data:`RECORDS_FILE`),
    which is replaced whole; records without it are rewritten in place.
    """

    file: str
    offset: int
    length: int
    key: str = ""


class _EventFile:
    """Appends framed records to one events file; local files grow in place."""

    def __init__(self, fs: Any, path: str) -> None:
        self._lfs = fs
        self.path = path
        self.offset = 0
        # Unbuffered: every byte the OS accepted is counted in ``offset``, so a write that
        # fails half-way (full disk) is resumed where it stopped, never written twice.
        self._handle = open(path, "ab", buffering=0) if _fs.is_local(fs) else None  # noqa: SIM115
        self._buffer = bytearray()  # remote: the whole object, uploaded on each flush
        self._dirty = False

    def write(self, data: bytes) -> int:
        """Appends ``data``; returns where it starts. A failure raises :class:`_WriteFailed`."""
        start = self.offset
        if self._handle is not None:
            view = memoryview(data)
            done = 0
            try:
                while done < len(view):
                    done += self._handle.write(view[done:]) or 0
            except OSError as error:
                self.offset += done
                raise _WriteFailed(done) from error
        else:
            self._buffer += data
            self._dirty = True
        self.offset += len(data)
        return start

    def flush(self) -> None:
        if self._handle is not None:
            self._handle.flush()
        elif self._dirty:
            self._lfs.pipe_file(self.path, bytes(self._buffer))
            self._dirty = False

    def patch(self, offset: int, data: bytes) -> None:
        if self._handle is not None:
            self._handle.flush()
            _pwrite(self.path, offset, data)
        else:
            self._buffer[offset : offset + len(data)] = data
            self._dirty = True

    def close(self) -> None:
        self.flush()
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def detach(self) -> None:
        """Drops this file without writing (a forked child's copy of its parent's file)."""
        if self._handle is not None:
            self._handle.close()  # the child's duplicate descriptor; the parent's stays open
            self._handle = None
        self._buffer = bytearray()
        self._dirty = False


class _WriteFailed(Exception):
    """A local write stopped after ``written`` bytes; the cause is ``__cause__``."""

    def __init__(self, written: int) -> None:
        super().__init__(written)
        self.written = written


class _QueueFileWriter(FileWriter):
    """tensorboardX's FileWriter interface, routed into the RunWriter's queue."""

    def __init__(self, run: RunWriter) -> None:  # no super(): it would open a second file
        self._run = run
        self.event_writer = self
        self._default_metadata: dict[str, Any] = {}

    def get_logdir(self) -> str:
        return self._run._writer_logdir()

    # Called by FileWriter.add_event/add_summary/add_graph through ``self.event_writer``.
    def add_event(
        self, event: Event, step: int | None = None, walltime: float | None = None
    ) -> None:
        if event is not None and (step is not None or walltime is not None):
            FileWriter.add_event(self, event, step, walltime)
            return
        if not event.wall_time:
            event.wall_time = self._default_metadata.get("walltime", time.time())
        self._run.has_data = True
        self._run._put((_EVENT, event))

    def flush(self) -> None:
        self._run.flush()

    def close(self) -> None:
        # The SummaryWriter's close ends its part, not the run: the RunWriter owns the file.
        self._run.flush()

    def reopen(self) -> None:
        return None


class _RunSummaryWriter(SummaryWriter):
    """A tensorboardX SummaryWriter whose events land in the RunWriter's event stream."""

    file_writer: FileWriter | None
    all_writers: dict[str, FileWriter] | None

    def __init__(self, run: RunWriter) -> None:
        self._run = run
        super().__init__(logdir=run._writer_logdir(), flush_secs=int(max(1, run.flush_secs)))

    def _get_file_writer(self) -> FileWriter:
        if self.all_writers is None or self.file_writer is None:
            self.file_writer = _QueueFileWriter(self._run)
            self.all_writers = {self._run.log_dir: self.file_writer}
        return self.file_writer


def _coerce_scalar(key: str, value: Any) -> float:
    """Python number for one metric value, or a TypeError that names the key."""
    if isinstance(value, bool | np.bool_):
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "biuf":
        return float(value.reshape(()))
    raise LoggedTypeError(
        f"Metric {key!r} has a value of type {type(value).__name__}, which is not a number: "
        "log int, float, bool, a one-element tensor or array; use "
        "`experiment.add_text` for strings and `experiment.add_histogram` for arrays."
    )


class RunWriter:
    """Owns one TensorBoard run directory: fast scalars, hparams records and a SummaryWriter.

    A remote run (any non-local fsspec URL) is written into a local spool folder
    exactly as a local run, and a background thread uploads it with bounded
    per-request timeouts, so no call waits on the network (see ``tbx_lightning._spool``).
    An open run holds a lease on its directory: a second process opening the same
    directory meanwhile gets a :class:`RunWriterError` naming the process that holds it.

    Args:
        log_dir: The run directory, a local path or an fsspec URL (``s3://b/runs/x``).
        flush_secs: Seconds between flushes of the event file to storage.
        max_queue: Pending calls at which ``log_scalars`` blocks until the writer
            thread catches up (data is never dropped).
        max_queue_bytes: The same limit in (estimated) bytes of pending data, so a few
            calls with thousands of keys or large images cannot hold unbounded memory.
        purge_step: When resuming a run, TensorBoard hides events of this run at or
            after this step, so the resumed curve does not zig-zag.
        filename_suffix: Appended to the event file's name.
        segment_bytes: Remote storage only: object stores cannot append, so the open
            event file is uploaded whole each time it changed; past this size it is
            closed and the run goes on in a new file (TensorBoard reads them in name order).
        upload_timeout: Remote storage only: the most seconds :meth:`close` waits for
            the upload of the spool to finish. What is left then stays in the spool
            folder, and a warning names it and the command that uploads it.

    Example:
        >>> import tempfile
        >>> from tbx_lightning import RunWriter
        >>> with RunWriter(tempfile.mkdtemp()) as run:
        ...     run.log_scalars({"loss": 0.5, "acc": 0.9}, step=1)
        ...     run.experiment.add_text("note", "hello", 1)
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        *,
        flush_secs: float = 10.0,
        max_queue: int = 10_000,
        max_queue_bytes: int = 64 * 1024 * 1024,
        segment_bytes: int = 8 * 1024 * 1024,
        purge_step: int | None = None,
        filename_suffix: str = "",
        upload_timeout: float = 60.0,
    ) -> None:
        check_writer_options(
            {
                "flush_secs": flush_secs,
                "max_queue": max_queue,
                "max_queue_bytes": max_queue_bytes,
                "segment_bytes": segment_bytes,
                "purge_step": purge_step,
                "filename_suffix": filename_suffix,
                "upload_timeout": upload_timeout,
            },
            owner="RunWriter",
            where="RunWriter({option}=...)",
        )
        self.upload_timeout = float(upload_timeout)
        remote_fs, remote_path = _fs.resolve(log_dir)
        self.log_dir = _fs.url(remote_fs, remote_path)
        self._spool: Spool | None = None
        # ``fs``/``path`` name the run as others see it (the remote run: what is written
        # through ``fs`` lands in the spool, config.yaml and projector files too);
        # ``_lfs``/``_path`` are where this writer writes (the run or the spool folder).
        self.fs: Any = remote_fs
        self._public_path: str = remote_path
        self._lfs: Any = remote_fs
        self._path: str = remote_path
        if _fs.is_local(remote_fs):
            _fs.makedirs(self._lfs, self._path)
        else:
            self._spool = Spool(remote_fs, remote_path, self.log_dir, flush_secs=flush_secs)
            self._lfs, self._path = _fs.resolve(self._spool.local)
            self.fs = SpoolFileSystem(self._spool)
        # Refuses a second process on this directory (or this spool) before anything is written.
        self._lease = Lease(self._lfs, self._path, url=self.log_dir)
        self._lease.acquire()
        if self._spool is not None:
            try:
                self._spool.open(min(_OPEN_WAIT, max(self.upload_timeout, 0.5)))
            except BaseException:
                self._lease.release()
                self._spool.discard()
                raise
        self.flush_secs = float(flush_secs)
        self.max_queue = int(max_queue)
        self.max_queue_bytes = int(max_queue_bytes)
        self._bytes_in = 0  # estimated bytes queued (callers) and taken (writer thread)
        self._bytes_out = 0
        self._forked = False
        self._filename_suffix = filename_suffix
        # True once scalars or SummaryWriter events were logged (records alone do not count).
        self.has_data = False
        self.segment_bytes = int(segment_bytes)
        self._segment = 0
        self._wake_at = min(256, self.max_queue)
        self._queue: collections.deque[tuple[Any, ...]] = collections.deque()
        self._wake = threading.Event()
        self._room = threading.Event()
        self._lock = threading.Lock()
        self._closed = False
        self._error: BaseException | None = None
        self._failed: list[bytes] = []
        self._encoder = ScalarEncoder()
        self._checked_keys: set[tuple[str, ...]] = set()
        self._experiment: _RunSummaryWriter | None = None
        # The records file's content (key -> serialised event), loaded on first use.
        self._records: dict[str, bytes] | None = None
        self._records_dirty = False
        self._records_lock = threading.Lock()
        self._records_path = _fs.join(self._lfs, self._path, RECORDS_FILE)
        self._moved: set[str] = set()  # keys whose record went from the event file to it
        name = self._file_name()
        self._first_file = _fs.join(self._lfs, self._path, name)
        self._file = _EventFile(self._lfs, self._first_file)
        self._file.write(
            frame(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        )
        if purge_step is not None:
            start = Event(
                step=int(purge_step),
                wall_time=time.time(),
                session_log=SessionLog(status=SessionLog.START),
            )
            self._file.write(frame(start.SerializeToString()))
        self._file.flush()
        # The per-tag statistics `tbx-lightning hparams` reads instead of the events.
        self._summary = RunSummary(self._lfs, self._path, purge_step=purge_step)
        self._last_flush = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, name=f"tbx-run-writer:{name}", daemon=True
        )
        self._thread.start()
        _OPEN_WRITERS.add(self)

    def _file_name(self) -> str:
        return (
            f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
            f".{os.getpid()}.{next(_FILE_COUNTER):06d}{self._filename_suffix}"
        )

    def _restart_after_fork(self) -> None:
        """In a forked child: a thread of its own and a file of its own.

        The child inherits the parent's queue (the parent writes those items itself),
        a dead writer thread and a descriptor that shares the parent's file offset. It
        starts afresh in a new event file of the same run; records the parent wrote
        (the HParams row and status) stay patchable, since the parent flushed them
        before the fork.
        """
        with _FORK_LOCK:
            if not self._forked:
                return
            self._forked = False
            self._queue = collections.deque()
            self._wake, self._room, self._lock = (
                threading.Event(),
                threading.Event(),
                threading.Lock(),
            )
            self._bytes_in = self._bytes_out = 0
            self._error, self._failed = None, []
            self._file.detach()
            name = self._file_name()
            self._first_file = _fs.join(self._lfs, self._path, name)
            self._segment = 0
            self._file = _EventFile(self._lfs, self._first_file)
            self._file.write(
                frame(
                    Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()
                )
            )
            self._summary = RunSummary(self._lfs, self._path)
            self._last_flush = time.monotonic()
            if self._spool is not None:
                # The parent's uploader did not survive the fork; the lease stays the parent's.
                self._spool = self._spool.for_child()
            self._thread = threading.Thread(
                target=self._run, name=f"tbx-run-writer:{name}", daemon=True
            )
            self._thread.start()

    def _writer_logdir(self) -> str:
        """Where tensorboardX's own writers (``add_scalars`` folders) go: the spool if remote."""
        return self._path if self._spool is not None else self.log_dir

    @property
    def spool_dir(self) -> str | None:
        """Remote runs: the local folder the run is written into before it is uploaded."""
        return self._spool.local if self._spool is not None else None

    def _emit_notices(self) -> None:
        """Warns, on the caller's thread, what the uploader found (outage, recovery)."""
        spool = self._spool
        while spool is not None and spool.notices:
            warnings.warn(spool.notices.popleft(), stacklevel=3)

    # ------------------------------------------------------------------ caller side
    @property
    def path(self) -> str:
        """The run directory's path inside :attr:`fs` (no protocol prefix).

        For a remote run, :attr:`fs` maps this path to the spool folder
        (:attr:`spool_dir`): what is written through it is uploaded with the run.
        """
        return self._public_path

    @property
    def event_file(self) -> str:
        """Path of the event file this run writes (for a remote run: in the spool folder)."""
        return self._file.path

    @property
    def experiment(self) -> SummaryWriter:
        """The tensorboardX ``SummaryWriter`` of this run, for everything that is not a scalar."""
        if self._experiment is None:
            self._check_open()
            self._experiment = _RunSummaryWriter(self)
        return self._experiment

    def log_scalars(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queues ``metrics`` at ``step``: one event, one value per key.

        Values may be Python or NumPy numbers, bools, or one-element tensors; all
        tensors of one call reach the host in one transfer. NaN and +/-Inf are
        written as they are.

        Raises:
            TypeError: a value is not a number (the message names its key), or
                ``step`` is not an integer. Nothing of this call is queued then,
                and nothing queued before is affected.
        """
        if self._closed or self._error is not None:
            self._check_open()
        if type(step) is not int or not MIN_STEP <= step <= MAX_STEP:
            step = check_step(step, none_ok=False)
        keys = tuple(metrics)
        values = list(metrics.values())
        tensor_idx: list[int] | None = None
        for value in values:
            kind = type(value)
            if kind is not float and kind is not int:
                tensor_idx = self._coerce_values(keys, values)
                break
        if keys not in self._checked_keys:
            self._check_keys(keys)
        self.has_data = True
        if tensor_idx is None:
            self._put((_SCALARS, step, time.time(), keys, values))
            return
        self._put(
            (
                _TENSOR_SCALARS,
                step,
                time.time(),
                keys,
                values,
                tensor_idx,
                self._stack(keys, values, tensor_idx),
            )
        )

    @staticmethod
    def _coerce_values(keys: tuple[str, ...], values: list[Any]) -> list[int] | None:
        """Converts non-float values in place; returns the positions of tensors, if any."""
        tensor_idx: list[int] | None = None
        for i, value in enumerate(values):
            kind = type(value)
            if kind is float or kind is int:
                continue
            if isinstance(value, torch.Tensor):
                if tensor_idx is None:
                    tensor_idx = []
                tensor_idx.append(i)
                continue
            values[i] = _coerce_scalar(keys[i], value)
        return tensor_idx

    def _check_keys(self, keys: tuple[str, ...]) -> None:
        for key in keys:
            if type(key) is not str or not key:
                self._bad_tag(key)
            try:
                key.encode("utf-8")
            except UnicodeEncodeError as error:  # else the writer thread fails on it later
                raise LoggedValueError(
                    f"Metric name {key!r} cannot be written as UTF-8 (it holds a lone surrogate "
                    "character): pass a valid string."
                ) from error
        if len(self._checked_keys) < 4096:  # remember a few key sets: steady-state calls skip this
            self._checked_keys.add(keys)

    @staticmethod
    def _bad_tag(key: Any) -> None:
        if not isinstance(key, str):
            raise LoggedTypeError(f"Metric names must be str, got {type(key).__name__} {key!r}.")
        raise LoggedValueError("Metric names must not be empty: give the metric a name.")

    @staticmethod
    def _stack(keys: tuple[str, ...], values: list[Any], tensor_idx: list[int]) -> torch.Tensor:
        """One device-to-host transfer for all tensors of a call."""
        parts = []
        for i in tensor_idx:
            tensor = values[i]
            if tensor.numel() != 1:
                raise LoggedTypeError(
                    f"Metric {keys[i]!r} is a tensor of shape {tuple(tensor.shape)}: log one-element "
                    "tensors as scalars, or use `experiment.add_histogram` for the whole tensor."
                )
            if tensor.is_complex():
                raise LoggedTypeError(
                    f"Metric {keys[i]!r} is a complex tensor: log its real or abs value."
                )
            parts.append(tensor.detach().reshape(()).to(torch.float64))
        devices = {p.device for p in parts}
        if len(devices) > 1:
            parts = [p.to(parts[0].device) for p in parts]
        return torch.stack(parts).cpu()

    def _put(self, item: tuple[Any, ...]) -> None:
        if self._forked:
            self._restart_after_fork()
        spool = self._spool
        if spool is not None and (spool.notices or spool.error is not None):
            self._emit_notices()
            self._check_open()
        queue = self._queue
        # Under the lock that close() takes: an item is either queued before the run is
        # marked closed (and the writer thread, which drains after it sees that, writes
        # it) or refused. Never queued after the last drain and lost.
        size_in = _item_bytes(item)
        with self._lock:
            if self._closed:
                self._check_open()
            queue.append(item)
            # Producers on several threads add to it; only the writer thread adds to
            # _bytes_out. Without the lock two increments could lose one.
            self._bytes_in += size_in
        size = len(queue)
        if size >= self._wake_at or self._bytes_in - self._bytes_out >= self.max_queue_bytes:
            self._wake.set()
            if not self._has_room():
                self._wait_for_room()

    def _has_room(self) -> bool:
        return (
            len(self._queue) < self.max_queue
            and self._bytes_in - self._bytes_out < self.max_queue_bytes
        )

    def _wait_for_room(self) -> None:
        # Block the producer rather than drop data when storage is slower than training.
        while not self._has_room() and self._thread.is_alive():
            self._room.clear()
            self._wake.set()
            self._room.wait(0.05)
        self._check_open(allow_closed=True)

    def write_record(self, event: Event, *, reserve: int = 0) -> RecordHandle | None:
        """Queues a prebuilt Event; with ``reserve`` > 0 it can later be replaced by :meth:`patch_record`.

        Returns the record's handle when ``reserve`` is given (after the writer
        thread has placed it), else None.
        """
        self._check_open()
        data = event.SerializeToString()
        if not reserve:
            self._put((_RECORD, frame(data)))
            return None
        size = max(reserve, len(data) + 8)
        if _fs.is_local(self._lfs):
            # Local records are rewritten with one write inside one page; a larger
            # record lives in the records file instead.
            if len(data) + 3 > _PAGE - _FRAME_OVERHEAD:
                key = _record_key(event)
                self._moved.add(key)
                self._put_records(key, data)
                return RecordHandle(self._records_path, 0, 0, key)
            size = min(size, _PAGE - _FRAME_OVERHEAD)
        holder: list[RecordHandle] = []
        done = threading.Event()
        self._put((_RECORD, frame(padded(data, size)), holder, done, size))
        self._wake.set()
        while not done.wait(0.1):
            if not self._thread.is_alive():
                raise RunWriterError(f"the writer thread of {self.log_dir!r} is not running")
        self._check_open(allow_closed=True)
        return holder[0]

    def patch_record(self, handle: RecordHandle, event: Event) -> bool:
        """Replaces a reserved record; a process killed meanwhile leaves the old or the new one.

        A record is rewritten in place when the new event fits its room and the
        rewrite is one write inside one page (or one upload, on object stores);
        otherwise it moves to the run's records file (:data:`RECORDS_FILE`), which
        is replaced whole and read before the run's other event files. Returns True
        (the record is never too large); kept for callers that check it.
        """
        self._check_open()
        data = event.SerializeToString()
        key = handle.key or _record_key(event)
        if not handle.key and key not in self._moved:
            fits = len(data) + 3 <= handle.length
            if fits and (not _fs.is_local(self._lfs) or _in_one_page(handle)):
                self._put((_PATCH, handle, frame(padded(data, handle.length))))
                return True
            self._moved.add(key)
        self._put_records(key, data)
        return True

    def _put_records(self, key: str, data: bytes) -> None:
        self._put((_RECORDS, key, data))

    def flush(self) -> None:
        """Writes everything queued so far to storage before returning."""
        if self._closed:
            return
        if self._forked:
            self._restart_after_fork()
        pending, self._error = self._error, None  # a flush retries what a failed write left pending
        done = threading.Event()
        self._queue.append((_FLUSH, done))
        self._wake.set()
        while not done.wait(0.1):
            if not self._thread.is_alive():
                break
        if self._error is None and isinstance(pending, _REPORT_ONCE):
            self._error = pending  # a retry does not undo these: report them once
        self._emit_notices()
        self._check_open(allow_closed=True)

    def close(self) -> None:
        """Drains the queue, flushes and closes the event file. Safe to call twice."""
        if self._forked:  # a forked child that never logged: nothing of its own to write
            self._closed = True
            _OPEN_WRITERS.discard(self)
            return
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._experiment is not None:
            # tensorboardX keeps writers of its own for add_scalars: close them too.
            self._experiment.close()
        self._wake.set()
        self._thread.join()
        _OPEN_WRITERS.discard(self)
        try:
            if self._spool is not None:
                self._spool.close(self.upload_timeout)
                self._emit_notices()
        finally:
            self._lease.release()
        if self._error is not None:
            error, self._error = self._error, None
            raise RunWriterError(self._error_message(error)) from error
        if self._spool is not None and self._spool.error is not None:
            error, self._spool.error = self._spool.error, None
            raise error

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self, *, allow_closed: bool = False) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RunWriterError(self._error_message(error)) from error
        if self._spool is not None and self._spool.error is not None:
            # The uploader cannot go on (a missing bucket, the run taken by another writer).
            remote_error, self._spool.error = self._spool.error, None
            raise remote_error
        if self._closed and not allow_closed:
            raise RunWriterError(
                f"The run writer for {self.log_dir!r} is closed: nothing more can be logged to it. "
                "Open a new RunWriter (or logger) on the same directory to add to the run."
            )

    def _error_message(self, error: BaseException) -> str:
        return (
            f"Writing events to {self._file.path!r} failed: {type(error).__name__}: {error}. "
            "What was written before is intact; free space or restore the directory, then call "
            "flush() to retry the pending events."
        )

    # ------------------------------------------------------------------ writer thread
    def _run(self) -> None:
        while True:
            if not self._queue:
                timeout = max(0.0, self.flush_secs - (time.monotonic() - self._last_flush))
                self._wake.wait(min(timeout, 0.5))
            self._wake.clear()
            with contextlib.suppress(Exception):  # a late heartbeat is no reason to stop
                self._lease.refresh()
            closing = self._closed
            # A bounded batch: a producer as fast as the encoder must not keep the
            # periodic flush (and the written bytes) waiting forever.
            self._drain(len(self._queue))
            if closing and not self._queue:
                self._write_out(final=True)
                return
            if time.monotonic() - self._last_flush >= self.flush_secs:
                self._write_out()

    def _drain(self, limit: int) -> None:
        queue = self._queue
        encode = self._encoder.encode
        chunks: list[bytes] = []
        pending = 0
        if queue:
            try:  # before writing: events must not go into a file that was deleted meanwhile
                self._check_file_present()
            except Exception as error:
                self._error = error
        for _ in range(limit):
            if not queue:
                break
            item = queue.popleft()
            self._bytes_out += _item_bytes(item)
            kind = item[0]
            try:
                if kind == _SCALARS:
                    chunks.append(encode(item[1], item[2], item[3], item[4]))
                    self._summary.add(item[1], item[2], item[3], item[4])
                elif kind == _TENSOR_SCALARS:
                    values = item[4]
                    for i, value in zip(item[5], item[6].tolist(), strict=True):
                        values[i] = value
                    chunks.append(encode(item[1], item[2], item[3], values))
                    self._summary.add(item[1], item[2], item[3], values)
                elif kind == _EVENT:
                    chunks.append(frame(item[1].SerializeToString()))
                    self._summary.add_event(item[1])
                elif kind == _RECORD:
                    if len(item) == 2:
                        chunks.append(item[1])
                    else:
                        self._write_chunks(chunks)
                        if _fs.is_local(self._lfs):
                            self._align_record(len(item[1]))
                        offset = self._write_chunks([item[1]])
                        item[2].append(RecordHandle(self._file.path, offset, item[4]))
                        item[3].set()
                elif kind == _PATCH:
                    self._write_chunks(chunks)
                    self._patch(item[1], item[2])
                elif kind == _RECORDS:
                    with self._records_lock:
                        self._load_records()[item[1]] = item[2]
                        self._records_dirty = True
                    self._write_records()
                elif kind == _FLUSH:
                    self._write_chunks(chunks)
                    if self._write_out() and not isinstance(self._error, _REPORT_ONCE):
                        # Everything pending is on storage now: a write error that a retry
                        # running meanwhile hit (say, just before space was freed) is
                        # resolved and must not fail this flush.
                        self._error = None
                    item[1].set()
            except Exception as error:  # keep the thread alive; report on the caller's side
                self._error = error
                if kind in (_FLUSH,):
                    item[1].set()
                elif kind == _RECORD and len(item) > 2:
                    item[3].set()
            if chunks and len(chunks) - pending >= 256:
                pending = len(chunks)
                if sum(len(c) for c in chunks) >= _WRITE_BATCH_BYTES:
                    try:
                        self._write_chunks(chunks)
                    except Exception as error:
                        self._error = error
                    pending = 0
            if self._has_room():
                self._room.set()
        try:
            self._write_chunks(chunks)
        except Exception as error:
            self._error = error
        self._room.set()

    def _write_chunks(self, chunks: list[bytes]) -> int:
        """Appends chunks (after any bytes a failed write left); returns where the last starts."""
        if not chunks and not self._failed:
            return self._file.offset
        data = b"".join([*self._failed, *chunks])
        last = len(chunks[-1]) if chunks else 0
        chunks.clear()  # from here on the bytes live in ``data`` or ``self._failed``
        try:
            offset = self._file.write(data)
        except _WriteFailed as failed:
            # What reached the file stays; only the rest is retried, so no record is
            # written twice and the file's offsets stay true.
            self._failed = [data[failed.written :]]
            error = failed.__cause__ if failed.__cause__ is not None else failed
            self._error = error
            raise error from None
        except Exception as error:
            self._failed = [data]
            self._error = error
            raise
        self._failed = []
        return offset + len(data) - last

    def _align_record(self, size: int) -> None:
        """Pads with an empty event so that a record of ``size`` bytes fits in one page."""
        pos = self._file.offset + sum(len(part) for part in self._failed)
        start = pos % _PAGE
        if start + size <= _PAGE:
            return
        gap = _PAGE - start
        if gap < 32:  # the smallest padding event takes 25 bytes
            gap += _PAGE
        filler = Event(wall_time=time.time()).SerializeToString()
        self._write_chunks([frame(padded(filler, gap - _FRAME_OVERHEAD))])

    def _patch(self, handle: RecordHandle, data: bytes) -> None:
        if handle.file == self._file.path:
            self._file.patch(handle.offset, data)
            return
        if not self._lfs.exists(handle.file):
            raise RunWriterError(
                f"cannot update a record in {handle.file!r}: that event file was removed and "
                f"logging goes on in {self._file.path!r}; the record (e.g. the run's HParams "
                "row and status) was lost with the removed file"
            )
        _patch_file(self._lfs, handle.file, handle.offset, data)  # an earlier process's file

    def find_records(self, tags: Collection[str]) -> dict[str, RecordHandle]:
        """The first record of each tag in the run's other event files, in TensorBoard's order.

        A resumed run updates in place the records an earlier process of the run wrote:
        TensorBoard keeps the first record of a tag it reads, so new ones would be ignored.
        """
        found: dict[str, RecordHandle] = {}
        with self._records_lock:
            records = self._load_records()
        for tag in tags:
            if tag in records:
                found[tag] = RecordHandle(self._records_path, 0, 0, tag)
        if len(found) == len(tags):
            return found
        try:
            paths = sorted(self._lfs.ls(self._path, detail=False))
        except FileNotFoundError:
            return found
        for path in paths:
            name = posixpath.basename(path)
            if "tfevents" in name and name != RECORDS_FILE and path != self._file.path:
                _scan_records(self._lfs, path, [t for t in tags if t not in found], found)
            if len(found) == len(tags):
                break
        return found

    def _load_records(self) -> dict[str, bytes]:
        """The records file's content, read once (call with ``_records_lock`` held)."""
        if self._records is None:
            try:
                raw = self._lfs.cat_file(self._records_path)
            except FileNotFoundError:
                raw = b""
            self._records = _parse_records(raw)
        return self._records

    def _write_records(self) -> None:
        """Replaces the records file with the current records (writer thread)."""
        with self._records_lock:
            records = self._load_records()
            header = Event(wall_time=time.time(), file_version="brain.Event:2")
            content = b"".join(
                [frame(header.SerializeToString()), *(frame(d) for d in records.values())]
            )
            self._records_dirty = False
        try:
            # The temporary name must not hold "tfevents": readers would take it for a run file.
            _fs.write_bytes_atomic(
                self._lfs, self._records_path, content, tmp_prefix=".tbx-records"
            )
        except Exception:
            self._records_dirty = True
            raise

    def _write_out(self, *, final: bool = False) -> bool:
        """Writes pending bytes and flushes; False (and ``_error`` set) on failure."""
        try:
            self._check_file_present()
            if self._failed:
                self._write_chunks([])
            if self._records_dirty:
                self._write_records()
            if final:
                self._file.close()
            else:
                self._file.flush()
            if not self._failed:
                # Everything added so far is on storage: the summary may say it covers it.
                self._summary.covers(self._file.path, self._file.offset)
                self._summary.save()
            if not final and self._spool is not None and self._file.offset >= self.segment_bytes:
                self._next_segment()
            self._last_flush = time.monotonic()
            if self._spool is not None:
                self._spool.poke()
        except Exception as error:
            self._error = error
            return False
        return not self._failed

    def _next_segment(self) -> None:
        """Closes the uploaded event file and goes on in a new one whose name sorts after it."""
        self._file.close()
        self._segment += 1
        self._file = _EventFile(self._lfs, f"{self._first_file}.seg{self._segment:06d}")
        self._file.write(
            frame(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        )

    def _check_file_present(self) -> None:
        """A deleted run directory would swallow writes into an unlinked file: say so instead."""
        if not _fs.is_local(self._lfs) or os.path.exists(self._file.path):
            return
        lost_path = self._file.path
        self._file.close()
        _fs.makedirs(self._lfs, self._path)
        # A new name: handles of records in the lost file must not patch the new one.
        self._file = _EventFile(self._lfs, f"{lost_path}.{next(_FILE_COUNTER)}")
        self._file.write(
            frame(Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        )
        raise RunWriterError(
            f"the event file {lost_path!r} was removed while the run was writing (deleted run "
            f"directory?); the directory was recreated and logging goes on in {self._file.path!r}"
        )


def _pwrite(path: str, offset: int, data: bytes) -> None:
    """One ``pwrite`` call: a patch inside one page is never half-done by a kill."""
    fd = os.open(path, os.O_WRONLY)
    try:
        done = os.pwrite(fd, data, offset)
        if done != len(data):
            raise RunWriterError(f"short write to {path!r}: {done} of {len(data)} bytes")
    finally:
        os.close(fd)


def _in_one_page(handle: RecordHandle) -> bool:
    end = handle.offset + handle.length + _FRAME_OVERHEAD - 1
    return handle.offset // _PAGE == end // _PAGE


def _record_key(event: Event) -> str:
    """A record's key in the records file: its summary tag (one record per tag)."""
    for value in event.summary.value:
        return str(value.tag)
    return f"#{event.step}:{event.file_version}"


def _parse_records(raw: bytes) -> dict[str, bytes]:
    """``key -> serialised event`` of a records file (the header and torn tails skipped)."""
    records: dict[str, bytes] = {}
    offset = 0
    while offset + 12 <= len(raw):
        (length,) = struct.unpack("<Q", raw[offset : offset + 8])
        end = offset + 12 + length + 4
        if end > len(raw):
            break
        data = raw[offset + 12 : offset + 12 + length]
        first, offset = offset == 0, end
        if first:
            continue  # the file's header
        records[_record_key(Event.FromString(data))] = data
    return records


def _patch_file(fs: Any, path: str, offset: int, data: bytes) -> None:
    if _fs.is_local(fs):
        _pwrite(path, offset, data)
        return
    content = bytearray(fs.cat_file(path))
    content[offset : offset + len(data)] = data
    fs.pipe_file(path, bytes(content))


def _scan_records(fs: Any, path: str, tags: list[str], found: dict[str, RecordHandle]) -> None:
    """Adds ``tag -> handle`` for the first record of each tag in one event file."""
    wanted = {tag.encode("utf-8"): tag for tag in tags}
    offset = 0
    with fs.open(path, "rb") as handle:
        while wanted:
            header = handle.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            if length > 1 << 28:  # not a record header: a torn or foreign file
                return
            data = handle.read(length + 4)
            if len(data) < length + 4:
                return  # a record cut by a crash ends the file
            body = data[:length]
            for raw, tag in list(wanted.items()):
                if raw in body and any(v.tag == tag for v in Event.FromString(body).summary.value):
                    found[tag] = RecordHandle(path, offset, length)
                    del wanted[raw]
            offset += 12 + length + 4


# Errors a retry cannot undo (a removed run directory, a lost record): reported once even
# when the flush that follows succeeds.
_REPORT_ONCE = (FileNotFoundError, RunWriterError)
_WRITE_BATCH_BYTES = 1 << 20  # the writer thread writes at least every MiB it encodes
_FORK_LOCK = threading.Lock()


def _item_bytes(item: tuple[Any, ...]) -> int:
    """A cheap estimate of the memory a queued item holds."""
    kind = item[0]
    if kind in (_SCALARS, _TENSOR_SCALARS):
        return 200 + 56 * len(item[3])
    if kind == _EVENT:
        return 200 + int(item[1].ByteSize())
    if kind == _RECORD:
        return 200 + len(item[1])
    if kind in (_PATCH, _RECORDS):
        return 200 + len(item[2])
    return 0  # flush markers are not counted on either side


def _flush_before_fork() -> None:
    # The child may patch records the parent wrote (the HParams row): put them on disk.
    for writer in list(_OPEN_WRITERS):
        if not writer._closed and not writer._forked and writer._thread.is_alive():
            try:
                writer.flush()
            except Exception:  # never break the fork; the error stays for the parent's next call
                continue


def _mark_forked_in_child() -> None:
    for writer in list(_OPEN_WRITERS):
        writer._forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_flush_before_fork, after_in_child=_mark_forked_in_child)


def _close_open_writers() -> None:
    for writer in list(_OPEN_WRITERS):
        try:
            writer.close()
        except Exception as error:  # interpreter exit: say it, never raise
            warnings.warn(
                f"tbx_lightning: closing {writer.log_dir!r} at exit failed: {error}", stacklevel=1
            )


atexit.register(_close_open_writers)
