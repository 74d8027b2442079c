"""The lease a live run holds on its directory, so that a second process is refused.

A :class:`~tbx_lightning.RunWriter` takes the lease when it opens a run directory and
gives it back when it closes. The lease is a small JSON file in the run directory
(:data:`LEASE_FILE`) naming the process that holds it (pid, host, user, start time)
and a heartbeat the holder refreshes while it runs.

A lease file is untrusted input: anyone who can write the directory (a shared bucket)
can plant one. It is honoured only while it can be a live writer of this user:

- the file belongs to this user (local directories; objects have no owner);
- on this host: it names a running process of this user, started when the lease
  says (a reused pid is another process);
- on another host: its heartbeat is younger than its ``stale_after``, which counts
  for at most :data:`MAX_STALE_AFTER` seconds, and is not in the future.

Anything else (a planted lease naming pid 1 or another user's process, a pid no
system has, damaged JSON) is stale: it is taken over with a warning that names it.
A live one refuses the second writer with a :class:`~tbx_lightning.RunInUseError`
naming the directory, the holder and what to do. A forked child shares the leases
its parent held, and a process shares those of its ancestors on the same host (a
spawned DDP rank writes the run its parent opened).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any

from tbx_lightning import _fs
from tbx_lightning.errors import RunInUseError

__all__ = ["LEASE_FILE", "MAX_STALE_AFTER", "Lease"]

LEASE_FILE = ".tbx-lease.json"
MAX_STALE_AFTER = 3600.0
"""The longest a lease's heartbeat counts, whatever the lease says."""
_MAX_PID = 1 << 22  # Linux's highest pid_max
_LEASE_LIMIT = 64 * 1024

# Tokens of the leases this process holds, and (copied over fork) those its parent held.
_HELD: set[str] = set()


def _proc_stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def _proc_start(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot): tells a holder from a reused pid."""
    fields = _proc_stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def _proc_uid(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _pid_running(pid: int, started: str | None) -> bool:
    """True when ``pid`` is a running process of this user that started at ``started``."""
    if not 0 < pid < _MAX_PID:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not a writer of this user's run
    fields = _proc_stat_fields(pid)
    if fields is None:
        return True  # no /proc: all that is known is that it runs
    if fields[0] in ("Z", "X"):
        return False  # exited, not yet reaped by its parent
    if _proc_uid(pid) not in (None, os.getuid()):
        return False
    return started is None or len(fields) <= 19 or fields[19] == started


def _ancestors() -> set[int]:
    """Pids of this process's ancestors (parent, grandparent, ...)."""
    found: set[int] = set()
    pid = os.getppid()
    while pid > 1 and pid not in found:
        found.add(pid)
        fields = _proc_stat_fields(pid)
        if fields is None:
            break
        pid = int(fields[1])
    return found


def _describe(info: dict[str, Any]) -> str:
    started = info.get("started")
    since = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(started)))
        if isinstance(started, int | float) and math.isfinite(started) and 0 <= started < 1e11
        else "an unknown time"
    )
    return (
        f"pid {str(info.get('pid'))[:20]} on host {str(info.get('host'))[:100]!r} (since {since})"
    )


class Lease:
    """The lease of one run directory, see the module docstring.

    Args:
        fs: The file system of the directory (see ``_fs.resolve``).
        run_path: The run directory inside ``fs``.
        url: The directory as the user gave it, for messages.
        heartbeat_secs: How often :meth:`refresh` rewrites the heartbeat.
        stale_after: Age of the heartbeat past which a holder on another host
            counts as gone; written into the lease for other processes to read.
        private: Write the lease file with mode 0600 (a spool folder).
        notify: Where the warning about a stale lease goes (default: ``warnings.warn``),
            for a lease taken on a background thread.

    Example:
        >>> import tempfile
        >>> from tbx_lightning import _fs
        >>> fs, path = _fs.resolve(tempfile.mkdtemp())
        >>> lease = Lease(fs, path, url=path)
        >>> lease.acquire()
        >>> lease.release()
    """

    def __init__(
        self,
        fs: Any,
        run_path: str,
        *,
        url: str,
        heartbeat_secs: float = 10.0,
        stale_after: float = 120.0,
        private: bool = False,
        notify: Callable[[str], Any] | None = None,
    ) -> None:
        self.fs = fs
        self._notify = notify
        self.path = _fs.join(fs, run_path, LEASE_FILE)
        self.url = url
        self.heartbeat_secs = float(heartbeat_secs)
        self.stale_after = float(stale_after)
        self.private = private
        self.token = uuid.uuid4().hex
        self._pid = os.getpid()
        self._started = time.time()
        self._owner = False  # True once this object wrote the lease (it refreshes and releases)
        self._last_beat = 0.0
        self._lost = False

    # ------------------------------------------------------------------ the lease file
    def _content(self) -> bytes:
        info = {
            "pid": self._pid,
            "host": socket.gethostname(),
            "uid": os.getuid(),
            "proc_start": _proc_start(self._pid),
            "started": self._started,
            "heartbeat": time.time(),
            "stale_after": self.stale_after,
            "token": self.token,
        }
        return json.dumps(info).encode("utf-8")

    def _read(self) -> dict[str, Any] | None:
        """The lease file's content: None when there is none, {} when it is not to be trusted."""
        try:
            raw = _fs.read_bytes(
                self.fs, self.path, limit=_LEASE_LIMIT, owned=_fs.is_local(self.fs)
            )
        except FileNotFoundError:
            return None
        except _fs.UnsafeFileError as error:
            return {"untrusted": error.strerror}
        try:
            info = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return {}
        return info if isinstance(info, dict) else {}

    def _live(self, info: dict[str, Any]) -> bool:
        """True while the process that holds ``info`` may still write the run."""
        try:
            pid = int(info["pid"])
            host = str(info["host"])
            heartbeat = float(info["heartbeat"])
            stale_after = min(float(info.get("stale_after", self.stale_after)), MAX_STALE_AFTER)
        except (KeyError, TypeError, ValueError, OverflowError):
            return False
        if "untrusted" in info or not (math.isfinite(heartbeat) and stale_after > 0):
            return False
        if host == socket.gethostname():
            if info.get("uid", os.getuid()) != os.getuid():
                return False
            started = info.get("proc_start")
            return _pid_running(pid, started if isinstance(started, str) else None)
        age = time.time() - heartbeat
        return -60.0 < age < stale_after

    def _shared(self, info: dict[str, Any]) -> bool:
        """True for a lease of this process's parent before a fork, or of an ancestor."""
        if "untrusted" in info or info.get("host") != socket.gethostname():
            return False
        try:
            pid = int(info["pid"])
        except (KeyError, TypeError, ValueError, OverflowError):
            return False
        if pid == os.getpid():
            return False
        return info.get("token") in _HELD or pid in _ancestors()

    # ------------------------------------------------------------------ public
    def acquire(self) -> None:
        """Takes the lease, shares one of this process's parent or ancestors, or refuses.

        Raises:
            RunInUseError: another live process (or this one, elsewhere) holds the run.
        """
        for _ in range(3):
            if _fs.create_exclusive(self.fs, self.path, self._content(), private=self.private):
                self._took()
                return
            info = self._read()
            if info is None:
                continue  # released meanwhile: try again
            if info == {}:
                time.sleep(0.05)  # a lease being written (stores without atomic create)
                info = self._read() or {}
            if info and self._shared(info):
                return  # the run of a parent or ancestor: no lease of ours
            if info.get("token") in _HELD and info.get("pid") == os.getpid():
                raise RunInUseError(
                    f"The run directory {self.url!r} is in use by a writer of this process: "
                    "close it first (finalize the logger, or close its RunWriter)."
                )
            if info and self._live(info):
                raise RunInUseError(
                    f"The run directory {self.url!r} is in use by another writer: "
                    f"{_describe(info)}. Two processes writing one run would merge their "
                    "HParams rows and statuses. Pick another `version` (or leave it None "
                    "to get a new one), or wait for that run to end; if that process is "
                    f"gone, remove {_fs.url(self.fs, self.path)!r} and try again."
                )
            message = (
                f"tbx_lightning: taking over the stale lease of {self.url!r} "
                f"({_fs.url(self.fs, self.path)}) left by {self._who(info)}; this process "
                "now writes the run."
            )
            if self._notify is not None:
                self._notify(message)
            else:
                warnings.warn(message, stacklevel=4)
            _fs.write_bytes_atomic(
                self.fs, self.path, self._content(), tmp_prefix=".tbx-lease", private=self.private
            )
            now = self._read() or {}
            if now.get("token") == self.token:
                self._took()
                return
        raise RunInUseError(
            f"Could not take the lease of {self.url!r}: other processes keep replacing "
            f"{_fs.url(self.fs, self.path)!r}. Pick another `version` for this run."
        )

    @staticmethod
    def _who(info: dict[str, Any]) -> str:
        if "untrusted" in info:
            return f"a lease file that is not to be trusted ({info['untrusted']})"
        if not info:
            return "an unreadable lease file"
        return f"{_describe(info)}, which is no running writer of this user"

    def _took(self) -> None:
        self._owner = True
        self._last_beat = time.monotonic()
        _HELD.add(self.token)

    @property
    def held(self) -> bool:
        """True when this process wrote the lease (not a forked child, not a shared lease)."""
        return self._owner and os.getpid() == self._pid and not self._lost

    def refresh(self, *, force: bool = False) -> None:
        """Rewrites the heartbeat when ``heartbeat_secs`` have passed (or ``force``)."""
        if not self.held:
            return
        if not force and time.monotonic() - self._last_beat < self.heartbeat_secs:
            return
        self._last_beat = time.monotonic()
        info = self._read()
        if info is not None and info.get("token") != self.token:
            self._lost = True
            warnings.warn(
                f"tbx_lightning: the lease of {self.url!r} was taken over by "
                f"{_describe(info) if info else 'another process'} (this process's heartbeat "
                "was late): two processes may now write this run.",
                stacklevel=2,
            )
            return
        _fs.write_bytes_atomic(
            self.fs, self.path, self._content(), tmp_prefix=".tbx-lease", private=self.private
        )

    def release(self) -> None:
        """Removes the lease if this process holds it; a forked child leaves its parent's."""
        if not self.held:
            return
        self._owner = False
        _HELD.discard(self.token)
        info = self._read()
        if info is not None and info.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)
