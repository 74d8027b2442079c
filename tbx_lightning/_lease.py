"""The lease a live run holds on its directory, so that a second writer is refused.

A :class:`~tbx_lightning.RunWriter` takes the lease when it opens a run directory and
gives it back when it closes. The lease is a small JSON file in the run directory
(:data:`LEASE_FILE`) naming the process that holds it (pid, host, start time) and a
heartbeat the holder refreshes while it runs. A lease is stale when its process is gone
(same host: the pid is not running, or is another process now) or, for a holder on
another host, when its heartbeat is older than the bound the holder wrote into it.

A stale lease is taken over with a warning; a live one refuses the second writer with
a :class:`~tbx_lightning.RunInUseError` naming the directory, the holder and what to do.
A process shares the leases it holds and those it inherited from its parent over
``fork`` (a forked child writes its own event file in the same run), and the leases of
its ancestors on the same host.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
import warnings
from typing import Any

from tbx_lightning import _fs
from tbx_lightning.errors import RunInUseError

__all__ = ["LEASE_FILE", "Lease"]

LEASE_FILE = ".tbx-lease.json"

# Tokens of the leases this process holds, and (copied over fork) those its parent held.
_HELD: set[str] = set()


def _proc_start(pid: int) -> str | None:
    """The start time of ``pid`` (Linux clock ticks since boot), or None where unknown.

    It tells a running holder from a later process that got the same pid.
    """
    fields = _proc_stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def _proc_state_and_parent(pid: int) -> tuple[str, int] | None:
    fields = _proc_stat_fields(pid)
    return None if fields is None else (fields[0], int(fields[1]))


def _proc_stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


def _pid_running(pid: int, started: str | None) -> bool:
    """True when ``pid`` runs on this host and is the process that wrote the lease."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    state = _proc_state_and_parent(pid)
    if state is not None and state[0] in ("Z", "X"):
        return False  # exited, not yet reaped by its parent
    if started is not None:
        now = _proc_start(pid)
        if now is not None and now != started:
            return False  # the pid was reused
    return True


def _ancestors() -> set[int]:
    """Pids of this process's ancestors (parent, grandparent, ...)."""
    found: set[int] = set()
    pid = os.getppid()
    while pid > 1 and pid not in found:
        found.add(pid)
        state = _proc_state_and_parent(pid)
        if state is None:
            break
        pid = state[1]
    return found


def _describe(info: dict[str, Any]) -> str:
    started = info.get("started")
    since = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(started)))
        if isinstance(started, int | float)
        else "an unknown time"
    )
    return f"pid {info.get('pid')} on host {info.get('host')!r} (since {since})"


class Lease:
    """The lease of one run directory, see the module docstring.

    Args:
        fs: The file system of the directory (see ``_fs.resolve``).
        run_path: The run directory inside ``fs``.
        url: The directory as the user gave it, for messages.
        heartbeat_secs: How often :meth:`refresh` rewrites the heartbeat.
        stale_after: Age of the heartbeat past which a holder on another host
            counts as gone; written into the lease for other processes to read.

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
    ) -> None:
        self.fs = fs
        self.path = _fs.join(fs, run_path, LEASE_FILE)
        self.url = url
        self.heartbeat_secs = float(heartbeat_secs)
        self.stale_after = float(stale_after)
        self.token = uuid.uuid4().hex
        self._pid = os.getpid()
        self._started = time.time()
        self._owner = False  # True once this object wrote the lease (it refreshes and releases)
        self._last_beat = 0.0
        self._lost = False

    # ------------------------------------------------------------------ the lease file
    def _content(self) -> bytes:
        now = time.time()
        info = {
            "pid": self._pid,
            "host": socket.gethostname(),
            "proc_start": _proc_start(self._pid),
            "started": self._started,
            "heartbeat": now,
            "stale_after": self.stale_after,
            "token": self.token,
        }
        return json.dumps(info).encode("utf-8")

    def _read(self) -> dict[str, Any] | None:
        """The lease file's content, None when there is none, {} when it is unreadable."""
        try:
            raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            info = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    def _live(self, info: dict[str, Any]) -> bool:
        """True while the process that holds ``info`` may still write the run."""
        try:
            pid = int(info["pid"])
            host = str(info["host"])
            heartbeat = float(info["heartbeat"])
            stale_after = float(info.get("stale_after", self.stale_after))
        except (KeyError, TypeError, ValueError):
            return False
        if host == socket.gethostname():
            started = info.get("proc_start")
            return _pid_running(pid, started if isinstance(started, str) else None)
        return time.time() - heartbeat < stale_after

    def _shared(self, info: dict[str, Any]) -> bool:
        """True for a lease of this process, of its parent before a fork, or of an ancestor."""
        if info.get("token") in _HELD:
            return True
        if info.get("host") != socket.gethostname():
            return False
        try:
            pid = int(info["pid"])
        except (KeyError, TypeError, ValueError):
            return False
        return pid == os.getpid() or pid in _ancestors()

    # ------------------------------------------------------------------ public
    def acquire(self) -> None:
        """Takes the lease, shares one of this process (or its ancestors), or refuses.

        Raises:
            RunInUseError: another live process holds the run directory.
        """
        for _ in range(3):
            if _fs.create_exclusive(self.fs, self.path, self._content()):
                self._took()
                return
            info = self._read()
            if info is None:
                continue  # released meanwhile: try again
            if info == {}:
                time.sleep(0.05)  # a lease being written (stores without atomic create)
                info = self._read() or {}
            if info and self._shared(info):
                return  # this process's own run (another writer, or a fork): no lease of ours
            if info and self._live(info):
                raise RunInUseError(
                    f"The run directory {self.url!r} is in use by another writer: "
                    f"{_describe(info)}. Two processes writing one run would merge their "
                    "HParams rows and statuses. Pick another `version` (or leave it None "
                    "to get a new one), or wait for that run to end; if that process is "
                    f"gone, remove {_fs.url(self.fs, self.path)!r} and try again."
                )
            warnings.warn(
                f"tbx_lightning: taking over the stale lease of {self.url!r} left by "
                f"{_describe(info) if info else 'an unreadable lease file'}, a process that "
                "no longer runs; this process now writes the run.",
                stacklevel=4,
            )
            _fs.write_bytes_atomic(self.fs, self.path, self._content(), tmp_prefix=".tbx-lease")
            now = self._read() or {}
            if now.get("token") == self.token:
                self._took()
                return
        raise RunInUseError(
            f"Could not take the lease of {self.url!r}: other processes keep replacing "
            f"{_fs.url(self.fs, self.path)!r}. Pick another `version` for this run."
        )

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
        _fs.write_bytes_atomic(self.fs, self.path, self._content(), tmp_prefix=".tbx-lease")

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
