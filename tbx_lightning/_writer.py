"""RunWriter: one TensorBoard run directory, a fast scalar path and tensorboardX for the rest.

The caller's side of ``log_scalars`` only checks types and appends to a queue;
encoding, CRCs and writes happen on one background thread per run. Events that
tensorboardX's ``SummaryWriter`` produces (images, text, histograms, graphs) go
through the same queue, so a run is one ordered event stream in one file.

Records that change while the run goes on (the HParams row, the status, the config
text) are kept one per tag in the run's records file (:data:`RECORDS_FILE`), which
sorts before every event file (TensorBoard keeps the first record of a tag) and is
replaced whole, atomically, whenever one of them changes.

The edges: a write that fails keeps what it could not write (bounded by
``max_queue_bytes``) until a later write-out, ``flush()`` or ``close()`` succeeds;
a close that fails leaves the writer closed to new data but unfinished, and
``flush()``, ``close()`` or the next writer of the run in this process finishes it.
Code reachable from ``close``/``flush`` takes no non-reentrant lock that a caller's
call may hold, so a signal handler on the caller's thread may call them; a close
that would pull the writer from under an interrupted call of it waits until that
call has queued its data.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import os
import queue
import socket
import threading
import time
import warnings
from collections.abc import Mapping
from typing import Any

from tensorboardX import SummaryWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.writer import FileWriter

from tbx_lightning import _fs
from tbx_lightning._events import (
    ScalarEncoder,
    coerce_values,
    frame,
    record_key,
    stack_tensors,
)
from tbx_lightning._lease import Lease
from tbx_lightning._rules import (
    MAX_STEP,
    MIN_STEP,
    check_names,
    check_step,
    check_writer_options,
)
from tbx_lightning._spool import Spool
from tbx_lightning._spool_fs import SpoolFileSystem
from tbx_lightning._stream import EventStream
from tbx_lightning._summary import RunSummary
from tbx_lightning.errors import RunInUseError, RunWriterError

__all__ = ["RECORDS_FILE", "RunWriter", "RunWriterError"]

RECORDS_FILE = _fs.RECORDS_FILE
_SCALARS, _TENSOR_SCALARS, _EVENT, _RECORD, _FLUSH = range(5)
_FILE_COUNTER = itertools.count()
_LOCAL = _fs.LOCAL
_OPEN_WAIT = 5.0  # seconds a remote run's opening waits for the remote to answer
_WRITE_BATCH_BYTES = 1 << 20  # the writer thread writes at least every MiB it encodes
# Open writers of this process, by the local folder they write (the run or its spool);
# a writer whose close failed stays here until a retry finishes it.
_OPEN: dict[str, RunWriter] = {}
_OPEN_LOCK = threading.RLock()  # re-entrant: a signal handler may close a writer
_FORK_LOCK = threading.Lock()


class _WriterThread(threading.Thread):
    """The writer thread of one run. ``stop()`` closes the run and ends the thread, as
    tensorboardX's writer thread does (Lightning's test fixtures call it on leftovers)."""

    def __init__(self, run: RunWriter, name: str) -> None:
        super().__init__(target=run._loop, name=f"tbx-run-writer:{name}", daemon=True)
        self.writer = run

    def stop(self) -> None:
        self.writer.close()


class _QueueFileWriter(FileWriter):
    """tensorboardX's FileWriter interface, routed into the RunWriter's queue."""

    def __init__(self, run: RunWriter) -> None:  # no super(): it would open a second file
        self._writer = run
        self.event_writer = self
        self._default_metadata: dict[str, Any] = {}

    def get_logdir(self) -> str:
        return self._writer._writer_logdir()

    # Called by FileWriter.add_event/add_summary/add_graph through ``self.event_writer``.
    def add_event(
        self, event: Event, step: int | None = None, walltime: float | None = None
    ) -> None:
        if event is not None and (step is not None or walltime is not None):
            FileWriter.add_event(self, event, step, walltime)
            return
        if not event.wall_time:
            event.wall_time = self._default_metadata.get("walltime", time.time())
        self._writer.has_data = True
        self._writer._put((_EVENT, event))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        # The SummaryWriter's close ends its part, not the run: the RunWriter owns the file.
        self._writer.flush()

    def reopen(self) -> None:
        return None


class _RunSummaryWriter(SummaryWriter):
    """A tensorboardX SummaryWriter whose events land in the RunWriter's event stream."""

    file_writer: FileWriter | None
    all_writers: dict[str, FileWriter] | None

    def __init__(self, run: RunWriter) -> None:
        self._writer = run
        super().__init__(logdir=run._writer_logdir(), flush_secs=int(max(1, run.flush_secs)))

    def _get_file_writer(self) -> FileWriter:
        if self.all_writers is None or self.file_writer is None:
            self.file_writer = _QueueFileWriter(self._writer)
            self.all_writers = {self._writer.log_dir: self.file_writer}
        return self.file_writer


class RunWriter:
    """Owns one TensorBoard run directory: fast scalars, the run's records and a SummaryWriter.

    A remote run (any non-local fsspec URL) is written into a local spool folder
    exactly as a local run, and a background thread uploads it with bounded
    per-request timeouts, so no call waits on the network (see ``tbx_lightning._spool``).
    An open run holds a lease on its directory: a second process opening the same
    directory meanwhile gets a :class:`RunInUseError` naming the process that holds it,
    and so does a second writer of the same directory in this process.

    Args:
        log_dir: The run directory, a local path or an fsspec URL (``s3://b/runs/x``).
        flush_secs: Seconds between flushes of the event file to storage.
        max_queue: Pending calls at which ``log_scalars`` blocks until the writer
            thread catches up (data is never dropped).
        max_queue_bytes: The same limit in (estimated) bytes of pending data, so a few
            calls with thousands of keys or large images cannot hold unbounded memory.
            Bytes a failing storage could not take count too: once they fill it, a log
            call raises :class:`RunWriterError` and queues nothing.
        segment_bytes: Remote storage only: object stores cannot append, so the open
            event file is uploaded whole each time it changed; past this size it is
            closed and the run goes on in a new file (TensorBoard reads them in name order).
        purge_step: When resuming a run, TensorBoard hides events of this run at or
            after this step, so the resumed curve does not zig-zag.
        filename_suffix: Appended to the event file's name.
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
        self.flush_secs = float(flush_secs)
        self.max_queue = int(max_queue)
        self.max_queue_bytes = int(max_queue_bytes)
        self.segment_bytes = int(segment_bytes)
        self._filename_suffix = filename_suffix
        remote_fs, remote_path = _fs.resolve(log_dir)
        self.log_dir = _fs.url(remote_fs, remote_path)
        # ``fs``/``path`` name the run as others see it (for a remote run, what is written
        # through ``fs`` lands in the spool); ``_path`` is the local folder this writer writes.
        self.fs: Any = remote_fs
        self._public_path: str = remote_path
        self._spool: Spool | None = None
        if _fs.is_local(remote_fs):
            self._path = remote_path
            _local_call(lambda: _fs.makedirs(remote_fs, remote_path), remote_path)
        else:
            self._spool = Spool(remote_fs, remote_path, self.log_dir, flush_secs=flush_secs)
            self._path = self._spool.local
            self.fs = SpoolFileSystem(self._spool)
        self._pid = os.getpid()
        self._forked = False
        self._closed = False
        self._done = False  # closed and everything written
        self._close_later = False
        self._lock = threading.RLock()
        self._key = os.path.realpath(self._path)
        _claim(self)
        # Refuses a second process on this directory (or this spool) before anything is written.
        self._lease = Lease(_LOCAL, self._path, url=self.log_dir, private=self._spool is not None)
        try:
            _local_call(self._lease.acquire, self._path)
            if self._spool is not None:
                self._spool.open(min(_OPEN_WAIT, max(self.upload_timeout, 0.5)))
            self._start(purge_step)
        except BaseException:
            _unclaim(self)
            self._lease.release()
            if self._spool is not None:
                self._spool.stop(wait=False)
                self._spool.discard()
            raise

    def _start(self, purge_step: int | None) -> None:
        self._bytes_in = 0  # estimated bytes queued (callers) and taken (writer thread)
        self._bytes_out = 0
        # True once scalars or SummaryWriter events were logged (records alone do not count).
        self.has_data = False
        self._wake_at = min(256, self.max_queue)
        self._queue: collections.deque[tuple[Any, ...]] = collections.deque()
        # Reentrant queues, not Events: waking the thread must never wait on a lock that
        # an interrupted call on this thread holds (a signal handler may flush or close).
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._room: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._encoder = ScalarEncoder()
        self._experiment: _RunSummaryWriter | None = None
        spool = self._spool
        self._stream = EventStream(
            self._path,
            suffix=f".{socket.gethostname()}.{os.getpid()}.{next(_FILE_COUNTER):06d}"
            + self._filename_suffix,
            private=spool is not None,
            purge_step=purge_step,
            segment_bytes=self.segment_bytes if spool is not None else None,
            on_write=spool.poke if spool is not None else None,
        )
        self._thread = _WriterThread(self, os.path.basename(self._stream.file.path))
        self._thread.start()

    @property
    def _summary(self) -> RunSummary:
        """The run's summary, kept by the writer thread (its tag count is read by callers)."""
        return self._stream.summary

    def _restart_after_fork(self) -> None:
        """In a forked child: a thread, a queue and an event file of its own, in the same run.

        The parent writes what its queue held; records it had queued are carried into
        the child's copy of the records, so the child's next records file keeps them.
        """
        with _FORK_LOCK:
            if not self._forked:
                return
            self._forked = False
            records = self._stream.records
            for item in self._queue:
                if item[0] == _RECORD and item[1] is not None:
                    records[item[1]] = item[2]
            dirty = self._stream.records_dirty or bool(records)
            has_data, experiment = self.has_data, self._experiment
            self._stream.file.close()  # the child's copy; the parent's descriptor stays open
            self._pid = os.getpid()
            self._lock = threading.RLock()
            if self._spool is not None:
                # The parent's uploader did not survive the fork; the lease stays the parent's.
                self._spool = self._spool.for_child()
                self.fs = SpoolFileSystem(self._spool)
            self._start(None)
            self._stream.records, self._stream.records_dirty = records, dirty
            self.has_data, self._experiment = has_data, experiment
            with _OPEN_LOCK:
                _OPEN[self._key] = self

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
        return self._stream.file.path

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
            RunWriterError: a storage error happened since the last call (raised once;
                what could not be written is kept), or storage keeps failing and
                ``max_queue_bytes`` of data wait for it. Nothing of this call is queued.
        """
        if self._closed or self._stream.error is not None:
            self._check_open()
        if type(step) is not int or not MIN_STEP <= step <= MAX_STEP:
            step = check_step(step, none_ok=False)
        keys = tuple(metrics)
        values = list(metrics.values())
        tensor_idx: list[int] | None = None
        for value in values:
            kind = type(value)
            if kind is not float and kind is not int:
                tensor_idx = coerce_values(keys, values)
                break
        check_names(keys)
        self.has_data = True
        if tensor_idx is None:
            self._put((_SCALARS, step, time.time(), keys, values))
            return
        stacked = self._stack(keys, values, tensor_idx)
        self._put((_TENSOR_SCALARS, step, time.time(), keys, values, tensor_idx, stacked))

    _stack = staticmethod(stack_tensors)  # one device-to-host transfer for a call's tensors

    def write_record(self, event: Event) -> None:
        """Queues a prebuilt Event into the event stream, after what was queued before."""
        self._check_open()
        self._put((_RECORD, None, event.SerializeToString()))

    def put_record(self, event: Event) -> None:
        """Sets the run's record of the event's tag (one per tag) in the records file.

        The records file is replaced whole and atomically each time a record changes,
        so a process killed at any moment leaves the old record or the new one. Records
        an earlier process of the run left there are kept until replaced.
        """
        self._check_open()
        self._put((_RECORD, record_key(event), event.SerializeToString()))

    def _put(self, item: tuple[Any, ...]) -> None:
        if self._forked:
            self._restart_after_fork()
        spool = self._spool
        if spool is not None and (spool.notices or spool.error is not None):
            self._emit_notices()
            self._check_open()
        size = _item_bytes(item)
        # Under the lock that close() takes: an item is either queued before the run is
        # marked closed (and the writer thread, which drains after it sees that, writes
        # it) or refused. Never queued after the last drain and lost.
        with self._lock:
            if self._closed:
                self._check_open()
            if self._stream.failing and not self._has_room():
                raise RunWriterError(self._full_message())
            self._queue.append(item)
            self._bytes_in += size
        if self._close_later and not self._lock._is_owned():  # type: ignore[attr-defined]
            self._close_later = False  # a signal handler's close, done now that this is queued
            self.close()
            return
        if len(self._queue) >= self._wake_at or not self._has_room():
            self._wake.put(None)
            if not self._has_room():
                self._wait_for_room()

    def _has_room(self) -> bool:
        held = self._bytes_in - self._bytes_out + len(self._stream.pending)
        return len(self._queue) < self.max_queue and held < self.max_queue_bytes

    def _wait_for_room(self) -> None:
        # Block the producer rather than drop data when storage is slower than training;
        # while storage fails, return (this call's data is kept) and let the next call raise.
        while not self._has_room() and not self._stream.failing and self._thread.is_alive():
            self._wake.put(None)
            with contextlib.suppress(queue.Empty):
                self._room.get(timeout=0.05)

    def flush(self) -> None:
        """Writes everything queued so far to storage before returning.

        After a close that failed, retries it (see :meth:`close`).
        """
        if self._closed:
            retry = not (self._done or self._forked or self._thread.is_alive())
            if retry and not self._lock._is_owned():  # type: ignore[attr-defined]
                self.close()
            return
        if self._forked:
            self._restart_after_fork()
        stream = self._stream
        pending, stream.error = stream.error, None  # a flush retries what a failed write left
        done = threading.Event()
        # Not under the close lock: a marker that misses the last drain ends the wait below
        # when the writer thread ends.
        self._queue.append((_FLUSH, done))
        self._wake.put(None)
        while not done.wait(0.1):
            if not self._thread.is_alive():
                break
        if stream.error is None and isinstance(pending, _REPORT_ONCE):
            stream.error = pending  # a retry does not undo these: report them once
        self._emit_notices()
        self._check_open(allow_closed=True)

    def close(self) -> None:
        """Drains the queue, writes everything and closes the event file. Safe to call twice.

        Raises:
            RunWriterError: storage failed. The writer then takes no new data but keeps
                what it could not write: once the cause is fixed, ``close()`` or
                ``flush()`` again (or the next writer of this run in this process)
                writes it, final status included.
        """
        if self._forked or self._pid != os.getpid():
            self._closed = self._done = True  # a forked child's copy: the parent's to write
            return
        if self._lock._is_owned():  # type: ignore[attr-defined]
            # A signal handler that interrupted a call of this writer on this thread:
            # write what is queued now, close once that call has queued its data.
            if not self._closed:
                self.flush()
                self._close_later = True
            return
        with self._lock:
            if self._done:
                return
            first = not self._closed
            self._closed = True
            if not first:  # a retry: the writer thread has ended, write here
                self._stream.write_out(final=True)
        if first:
            if self._experiment is not None:
                # tensorboardX keeps writers of its own for add_scalars: close them too.
                self._experiment.close()
            self._wake.put(None)
            self._thread.join()
        stream = self._stream
        if not stream.finished:
            error, stream.error = stream.error or stream.last_failure, None
            raise RunWriterError(
                stream.error_message(error)
                + " The run is not closed: what is pending stays in memory until close() or "
                "flush() succeeds."
            ) from error
        self._done = True
        _unclaim(self)
        try:
            if self._spool is not None:
                self._spool.close(self.upload_timeout)
                self._emit_notices()
        finally:
            self._lease.release()
        self._check_open(allow_closed=True)

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self, *, allow_closed: bool = False) -> None:
        stream = self._stream
        if stream.error is not None:
            error, stream.error = stream.error, None
            if isinstance(error, RunWriterError):
                raise error
            raise RunWriterError(stream.error_message(error)) from error
        if self._spool is not None and self._spool.error is not None:
            # The uploader cannot go on (a missing bucket, the run taken by another writer).
            remote_error, self._spool.error = self._spool.error, None
            raise remote_error
        if self._closed and not allow_closed:
            raise RunWriterError(
                f"The run writer for {self.log_dir!r} is closed: nothing more can be logged to it. "
                "Open a new RunWriter (or logger) on the same directory to add to the run."
            )

    def _full_message(self) -> str:
        stream = self._stream
        error = stream.last_failure
        held = self._bytes_in - self._bytes_out + len(stream.pending)
        return (
            f"Writing events to {stream.file.path!r} keeps failing ({type(error).__name__}: "
            f"{error}) and {held} bytes wait for it, the most max_queue_bytes="
            f"{self.max_queue_bytes} allows: the values of this call were not queued. Free "
            "space or restore the directory, then call flush(); everything queued before is "
            "written then."
        )

    # ------------------------------------------------------------------ writer thread
    def _loop(self) -> None:
        stream = self._stream
        while True:
            if not self._queue:
                wait = self.flush_secs - (time.monotonic() - stream.last_write)
                with contextlib.suppress(queue.Empty):
                    self._wake.get(timeout=min(max(wait, 0.0), 0.5))
            with contextlib.suppress(queue.Empty):
                while True:
                    self._wake.get_nowait()
            with contextlib.suppress(Exception):  # a late heartbeat is no reason to stop
                self._lease.refresh()
            closing = self._closed
            # A bounded batch: a producer as fast as the encoder must not keep the
            # periodic flush (and the written bytes) waiting forever.
            self._drain(len(self._queue))
            if closing and not self._queue:
                stream.write_out(final=True)
                return
            if time.monotonic() - stream.last_write >= self.flush_secs:
                stream.write_out(quiet=stream.failing)
            if self._room.qsize() < 4 and self._has_room():
                self._room.put(None)

    def _drain(self, limit: int) -> None:
        queue_, encode, stream = self._queue, self._encoder.encode, self._stream
        summary = stream.summary
        if queue_:
            try:  # before writing: events must not go into a file that was deleted meanwhile
                stream.check_folder()
            except Exception as error:
                stream.error = error
        for _ in range(limit):
            if not queue_:
                break
            item = queue_.popleft()
            kind = item[0]
            try:
                if kind == _SCALARS:
                    stream.pending += encode(item[1], item[2], item[3], item[4])
                    summary.add(item[1], item[2], item[3], item[4])
                elif kind == _TENSOR_SCALARS:
                    values = item[4]
                    for i, value in zip(item[5], item[6].tolist(), strict=True):
                        values[i] = value
                    stream.pending += encode(item[1], item[2], item[3], values)
                    summary.add(item[1], item[2], item[3], values)
                elif kind == _EVENT:
                    stream.pending += frame(item[1].SerializeToString())
                    summary.add_event(item[1])
                elif kind == _RECORD and item[1] is None:
                    stream.pending += frame(item[2])
                elif kind == _RECORD:
                    stream.set_record(item[1], item[2])
                elif kind == _FLUSH:
                    if stream.write_out() and not isinstance(stream.error, _REPORT_ONCE):
                        # Everything pending is on storage now: a write error that a retry
                        # running meanwhile hit (say, just before space was freed) is
                        # resolved and must not fail this flush.
                        stream.error = None
                    item[1].set()
            except Exception as error:  # keep the thread alive; report on the caller's side
                stream.error = error
                if kind == _FLUSH:
                    item[1].set()
            finally:
                self._bytes_out += _item_bytes(item)
            if len(stream.pending) >= _WRITE_BATCH_BYTES and not stream.failing:
                stream.write_pending()
        if not stream.failing:
            stream.write_pending()
            if stream.records_dirty:
                try:
                    stream.write_records()
                except Exception as error:
                    stream.fail(error)


def _local_call(func: Any, path: str) -> Any:
    """``func()``, a local file-system error as a RunWriterError naming ``path``."""
    try:
        return func()
    except OSError as error:
        raise RunWriterError(
            f"Cannot open the run folder {path!r}: {type(error).__name__}: {error}. Free space, "
            "fix its permissions or pick another folder."
        ) from error


def _claim(writer: RunWriter) -> None:
    """Registers ``writer`` as this process's writer of its folder.

    A writer of the folder whose close failed is finished first (it raises if it still
    cannot be); a live one refuses the new writer: two writers of one run in one
    process would mix their HParams rows and statuses.
    """
    while True:
        with _OPEN_LOCK:
            other = _OPEN.get(writer._key)
            if other is None or other._pid != os.getpid() or other._done:
                _OPEN[writer._key] = writer
                return
        if not other._closed:
            raise RunInUseError(
                f"The run directory {writer.log_dir!r} is already open in this process (another "
                "TBXLogger, TBXTracker or RunWriter on the same version): two writers would mix "
                "their HParams rows and statuses. Close that one first (finalize or close), or "
                "give this one another version."
            )
        other.close()  # its close failed earlier: write what it kept, then go on


def _unclaim(writer: RunWriter) -> None:
    with _OPEN_LOCK:
        if _OPEN.get(writer._key) is writer:
            del _OPEN[writer._key]


# Errors a retry cannot undo (a removed run directory): reported once even when the
# flush that follows succeeds.
_REPORT_ONCE = (FileNotFoundError, RunWriterError)


def _item_bytes(item: tuple[Any, ...]) -> int:
    """A cheap estimate of the memory a queued item holds."""
    kind = item[0]
    if kind in (_SCALARS, _TENSOR_SCALARS):
        return 200 + 56 * len(item[3])
    if kind == _EVENT:
        return 200 + int(item[1].ByteSize())
    if kind == _RECORD:
        return 200 + len(item[2])
    return 0  # flush markers are not counted on either side


def _records_before_fork() -> None:
    """Writes the records file of every writer that has records queued, before a fork.

    A forked child that updates the run's records (the HParams row) replaces the file
    with its copy of them; the parent's own queued update must not land after it.
    """
    for writer in list(_OPEN.values()):
        if writer._pid != os.getpid() or writer._closed or not writer._thread.is_alive():
            continue
        queued = any(item[0] == _RECORD and item[1] is not None for item in writer._queue)
        if queued or writer._stream.records_dirty:
            try:
                writer.flush()
            except Exception as error:  # never break the fork; report it on the next call
                writer._stream.error = writer._stream.error or error


def _mark_forked_in_child() -> None:
    for writer in list(_OPEN.values()):
        writer._forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_records_before_fork, after_in_child=_mark_forked_in_child)


def _close_open_writers() -> None:
    for writer in list(_OPEN.values()):
        if writer._pid != os.getpid() or writer._forked:
            continue
        try:
            writer.close()
        except Exception as error:  # interpreter exit: say it, never raise
            warnings.warn(
                f"tbx_lightning: closing {writer.log_dir!r} at exit failed: {error}", stacklevel=1
            )


atexit.register(_close_open_writers)
