"""The local spool of a remote run, and the background uploader that sends it.

A :class:`~tbx_lightning.RunWriter` on a remote URL (``s3://``, ``gs://``,
``memory://``, any non-local fsspec URL) writes the run into a local folder exactly as
a local run is written, and a background thread copies new and changed files to the
remote. Training never waits on the network: log calls, ``flush()`` and the status
written at the end only touch local files. An unreachable remote gives one warning
(the URL and what is behind), the uploader retries with exponential backoff and
catches up when the remote answers again. ``close()`` waits a bounded time
(``upload_timeout``) for the upload; whatever is left stays in the spool, and
:func:`upload_spool` sends it later.

Where the spool lives: ``$TBX_LIGHTNING_SPOOL`` if set, else
``$XDG_CACHE_HOME/tbx_lightning/spool`` (``~/.cache/tbx_lightning/spool``), one folder
per run URL. A folder whose upload completed is removed at close.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import threading
import time
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from tbx_lightning import _fs
from tbx_lightning._lease import LEASE_FILE, Lease
from tbx_lightning.errors import RunWriterError

__all__ = ["SPOOL_ENV", "Spool", "SpoolFileSystem", "spool_dir", "spool_root", "upload_spool"]

SPOOL_ENV = "TBX_LIGHTNING_SPOOL"
MANIFEST = ".tbx-spool.json"
# Remote leases are refreshed rarely (each refresh is a request); a holder on another
# host is taken for gone once its heartbeat is this old.
REMOTE_HEARTBEAT_SECS = 60.0
REMOTE_STALE_AFTER = 600.0
_MAX_BACKOFF = 60.0
_MIN_PASS_GAP = 0.5  # seconds between two upload passes that flushes asked for


def spool_root() -> str:
    """The folder that holds the spools: ``$TBX_LIGHTNING_SPOOL`` or the user's cache dir."""
    root = os.environ.get(SPOOL_ENV)
    if root:
        return os.path.abspath(os.path.expanduser(root))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "tbx_lightning", "spool")


def spool_dir(url: str) -> str:
    """The spool folder of the run at ``url``: a readable name and a hash of the URL."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url).strip("_")[-80:]
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    return os.path.join(spool_root(), f"{slug}-{digest}")


def _skip(rel: str) -> bool:
    """Files of the spool itself, never uploaded: its manifest, its lease, temporary files."""
    name = rel.rsplit("/", 1)[-1]
    return rel in (MANIFEST, LEASE_FILE) or name.endswith(".tmp")


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]
    return f"{count} B"


def upload_command(path: str) -> str:
    """The shell command that uploads what is left in the spool folder ``path``."""
    return f"tbx-lightning upload {shlex.quote(path)}"


class _Manifest:
    """What of a spool folder is on the remote: ``relative path -> [size, mtime_ns]``."""

    def __init__(self, folder: str, url: str) -> None:
        self.path = os.path.join(folder, MANIFEST)
        self.url = url
        self.files: dict[str, list[int]] = {}
        self.deleted: list[str] = []  # removed through the run's file system: remove remotely
        self.lease_token: str | None = None
        self._lock = threading.Lock()
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            data = {}
        if isinstance(data, dict) and data.get("url") == url:
            files = data.get("files")
            if isinstance(files, dict):
                self.files = {str(k): list(v) for k, v in files.items()}
            token = data.get("lease_token")
            self.lease_token = token if isinstance(token, str) else None
            deleted = data.get("deleted")
            if isinstance(deleted, list):
                self.deleted = [str(rel) for rel in deleted]

    def save(self) -> None:
        with self._lock:
            data = {
                "url": self.url,
                "files": self.files,
                "deleted": self.deleted,
                "lease_token": self.lease_token,
            }
            text = json.dumps(data, sort_keys=True)
        _fs.write_text_atomic(_fs.resolve(self.path)[0], self.path, text)

    def forget(self, rel: str) -> None:
        """Marks ``rel`` (a file or a folder) removed: the uploader removes it remotely."""
        with self._lock:
            for name in [n for n in self.files if n == rel or n.startswith(rel + "/")]:
                del self.files[name]
            if rel not in self.deleted:
                self.deleted.append(rel)

    def remove_deleted(self, remote: Any, remote_path: str) -> None:
        """Removes on the remote what was removed in the spool (an old projector folder)."""
        while self.deleted:
            rel = self.deleted[0]
            target = _fs.join(remote, remote_path, *rel.split("/"))
            with contextlib.suppress(FileNotFoundError):
                remote.rm(target, recursive=True)
            with self._lock:
                self.deleted.remove(rel)

    def pending(self, folder: str) -> list[tuple[str, int]]:
        """``(relative path, size)`` of every file that changed since it was uploaded."""
        out = []
        for parent, dirs, names in os.walk(folder):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(parent, name)
                rel = os.path.relpath(full, folder).replace(os.sep, "/")
                if _skip(rel):
                    continue
                try:
                    stat = os.stat(full)
                except FileNotFoundError:
                    continue
                if self.files.get(rel) != [stat.st_size, stat.st_mtime_ns]:
                    out.append((rel, stat.st_size))
        return out


def _upload_one(remote: Any, remote_path: str, folder: str, rel: str, manifest: _Manifest) -> None:
    full = os.path.join(folder, *rel.split("/"))
    try:
        stat = os.stat(full)
        with open(full, "rb") as handle:
            data = handle.read(stat.st_size)
    except FileNotFoundError:
        return  # replaced or removed meanwhile: the next pass sees what is there now
    # The size and time from before the read: a change during the read uploads again.
    remote.pipe_file(_fs.join(remote, remote_path, *rel.split("/")), data)
    with manifest._lock:
        manifest.files[rel] = [stat.st_size, stat.st_mtime_ns]


class Spool:
    """The spool folder of one remote run and its uploader thread.

    Args:
        fs: The remote file system (see ``_fs.resolve``).
        remote_path: The run directory inside ``fs``.
        url: The run's URL, for messages and the spool folder's name.
        flush_secs: How often the uploader looks for changes when nothing asks it to.
        request_timeout: Per-request connect and read timeout for the remote
            (default: ``_fs.REQUEST_TIMEOUT``, 10 s).
    """

    def __init__(
        self,
        fs: Any,
        remote_path: str,
        url: str,
        *,
        flush_secs: float = 10.0,
        request_timeout: float | None = None,
    ) -> None:
        self.url = url
        timeout = _fs.REQUEST_TIMEOUT if request_timeout is None else request_timeout
        self.remote = _fs.bounded(fs, timeout)
        self.remote_path = remote_path
        self.local = spool_dir(url)
        os.makedirs(self.local, exist_ok=True)
        self.flush_secs = float(flush_secs)
        self.lease = Lease(
            self.remote,
            remote_path,
            url=url,
            heartbeat_secs=REMOTE_HEARTBEAT_SECS,
            stale_after=REMOTE_STALE_AFTER,
        )
        self._manifest = _Manifest(self.local, url)
        self._manifest.save()  # names the run's URL, for upload_spool
        self._owner = True  # False in a forked child: the parent holds the lease and the folder
        self._opened = False
        self._answered = threading.Event()  # the remote answered the first check (or failed)
        self._ready = threading.Event()  # opened: checked, leased, earlier files fetched
        self._final = threading.Event()
        self._finished = threading.Event()
        self._wake = threading.Event()
        self._down = False
        self._failures = 0
        self._last_error: BaseException | None = None
        self._sent_since_down = 0
        self.error: BaseException | None = None  # fatal: the caller's next call raises it
        self.notices: collections.deque[str] = collections.deque()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ caller side
    def open(self, wait: float) -> None:
        """Starts the uploader and waits up to ``wait`` seconds for the remote to answer.

        A remote that answers is checked (the bucket exists, no other live writer holds
        the run) and the run's earlier files are fetched into the spool (a resumed run
        updates them in place); a remote that does not answer in time is warned about,
        and the uploader does all that once it answers.

        Raises:
            RunWriterError: the bucket does not exist, or another live process holds
                the run (see :class:`~tbx_lightning._lease.Lease`).
        """
        self._start()
        answered = self._answered.wait(wait)
        if answered:
            while not self._ready.wait(0.05):  # fetching earlier files: it makes progress
                if self.error is not None or self._down or not self._thread_alive():
                    break
        if self.error is not None:
            error, self.error = self.error, None
            self._final.set()
            self._wake.set()
            raise error
        if not answered and not self._down:
            self._down = True
            self._note_down(TimeoutError(f"no answer within {wait:g} s"))

    def forget(self, rel: str) -> None:
        """``rel`` was removed from the spool: remove it from the remote too."""
        self._manifest.forget(rel)
        self.poke()

    def poke(self) -> None:
        """Asks the uploader for a pass soon (after a flush); never waits."""
        if not self._down:
            self._wake.set()

    def close(self, timeout: float) -> bool:
        """Uploads what is left, waiting at most ``timeout`` seconds; True when all is sent.

        Past the timeout, warns once with the spool folder and the command that
        finishes the upload; the uploader goes on trying while the process lives.
        """
        self._final.set()
        self._wake.set()
        done = self._finished.wait(timeout) if self._thread_alive() else self._finished.is_set()
        if not done:
            pending = self._manifest.pending(self.local)
            cause = self._last_error
            reason = f" (last error: {type(cause).__name__}: {cause})" if cause else ""
            self.notices.append(
                f"tbx_lightning: {len(pending)} file(s) ({_size(sum(s for _, s in pending))}) of "
                f"{self.url} were not uploaded within upload_timeout={timeout:g} s{reason}. "
                f"Nothing is lost: they are kept in {self.local}. Upload them when the storage "
                f"answers with: {upload_command(self.local)}"
            )
        return done

    def discard(self) -> None:
        """Removes the spool folder of a run that could not be opened, if it holds no data."""
        if not self._manifest.pending(self.local):
            shutil.rmtree(self.local, ignore_errors=True)

    def for_child(self) -> Spool:
        """The spool of a forked child: same folder, a thread of its own, no lease."""
        child = Spool.__new__(Spool)
        child.__dict__.update(self.__dict__)
        child._owner = False
        child._opened = True
        for name in ("_answered", "_ready", "_final", "_finished", "_wake"):
            setattr(child, name, threading.Event())
        child._answered.set()
        child._ready.set()
        child.notices = collections.deque()
        child.error = None
        child._manifest = _Manifest(self.local, self.url)
        child._thread = None
        child._start()
        return child

    # ------------------------------------------------------------------ uploader thread
    def _start(self) -> None:
        self._thread = threading.Thread(
            target=self._main, name=f"tbx-spool-upload:{self.url}", daemon=True
        )
        self._thread.start()

    def _thread_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _open_remote(self) -> None:
        _fs.makedirs(self.remote, self.remote_path)  # a missing bucket is an error
        self._answered.set()
        self.lease.acquire()
        if self.lease.held:
            self._manifest.lease_token = self.lease.token
        self._fetch_earlier_files()
        self._opened = True
        self._ready.set()

    def _fetch_earlier_files(self) -> None:
        """Copies the run's files on the remote that the spool lacks (a resumed run)."""
        try:
            found = self.remote.find(self.remote_path, detail=False)
        except FileNotFoundError:
            return
        base = self.remote_path.rstrip("/") + "/"
        for path in found:
            if not path.startswith(base):
                continue
            rel = path[len(base) :]
            if not rel or _skip(rel):
                continue
            local = os.path.join(self.local, *rel.split("/"))
            if os.path.exists(local):
                continue  # the spool's copy is newer: it is uploaded over the remote one
            data = self.remote.cat_file(path)
            _fs.write_bytes_atomic(_fs.resolve(local)[0], local, data)
            stat = os.stat(local)
            self._manifest.files[rel] = [stat.st_size, stat.st_mtime_ns]
        self._manifest.save()

    def _upload_pass(self) -> int:
        if self._manifest.deleted:
            self._manifest.remove_deleted(self.remote, self.remote_path)
        pending = self._manifest.pending(self.local)
        for rel, _ in pending:
            _upload_one(self.remote, self.remote_path, self.local, rel, self._manifest)
        if pending:
            self._manifest.save()
        return len(pending)

    def _main(self) -> None:
        last_pass = 0.0
        while True:
            final = self._final.is_set()
            try:
                if not self._opened:
                    self._open_remote()
                self.lease.refresh()
                gap = time.monotonic() - last_pass
                if not final and gap < _MIN_PASS_GAP:
                    time.sleep(_MIN_PASS_GAP - gap)
                sent = self._upload_pass()
                last_pass = time.monotonic()
                self._sent_since_down += sent
                if self._down:
                    self._down = False
                    self.notices.append(
                        f"tbx_lightning: {self.url} answers again; the spool caught up "
                        f"({self._sent_since_down} file(s) uploaded since the outage)."
                    )
                self._failures = 0
                if final:
                    self._finish()
                    return
            except RunWriterError as error:  # a missing bucket, a run held by another writer
                self.error = error
                self._answered.set()
                self._finished.set()
                return
            except Exception as error:  # the remote is down or slow: retry with backoff
                self._answered.set()
                self._last_error = error
                self._failures += 1
                if not self._down:
                    self._down = True
                    self._sent_since_down = 0
                    self._note_down(error)
                delay = min(_MAX_BACKOFF, 0.5 * 2 ** (self._failures - 1))
                self._wake.clear()
                if self._final.is_set() and not final:
                    continue  # close() came meanwhile: try once more right away
                self._wake.wait(delay)
                continue
            self._wake.wait(self.flush_secs)
            self._wake.clear()

    def _finish(self) -> None:
        if self._owner:
            with contextlib.suppress(Exception):  # a lease left behind is stale once we exit
                self.lease.release()
            if not self._manifest.pending(self.local):
                shutil.rmtree(self.local, ignore_errors=True)
        self._finished.set()

    def _note_down(self, error: BaseException) -> None:
        pending = self._manifest.pending(self.local)
        behind = (
            f" ({len(pending)} file(s), {_size(sum(s for _, s in pending))} not uploaded yet)"
            if pending
            else ""
        )
        self.notices.append(
            f"tbx_lightning: cannot reach {self.url} ({type(error).__name__}: {error}). Training "
            f"goes on and the run is kept in the local spool {self.local}{behind}; the upload "
            "is retried with backoff and catches up when the storage answers again."
        )


def upload_spool(path: str | os.PathLike[str], *, remove: bool = True) -> int:
    """Uploads what a spool folder holds that its remote lacks; returns the files sent.

    For a run whose writer could not finish its upload (the remote was unreachable
    when the run ended): the folder is named in the warning the writer gave. The
    remote's endpoint and credentials are taken as for the run itself (environment,
    fsspec config). With ``remove``, the folder is deleted once everything is sent.

    Raises:
        RunWriterError: ``path`` is no spool folder, a process still writes it, or
            the upload failed (nothing is removed then; run it again).

    Example:
        >>> from tbx_lightning._spool import upload_spool
        >>> upload_spool("/nonexistent")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        tbx_lightning.errors.RunWriterError: ...
    """
    folder = os.path.abspath(os.fspath(path))
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as handle:
            url = json.load(handle)["url"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise RunWriterError(
            f"{folder!r} is not a tbx_lightning spool folder (no readable {MANIFEST}): pass "
            "the folder named in the warning the run gave at its end."
        ) from error
    local_fs, _ = _fs.resolve(folder)
    local_lease = Lease(local_fs, folder, url=folder)
    local_lease.acquire()  # refuses while the run's own writer still runs
    try:
        fs, remote_path = _fs.resolve(url)
        manifest = _Manifest(folder, url)
        pending = manifest.pending(folder)
        try:
            manifest.remove_deleted(fs, remote_path)
            for rel, _ in pending:
                _upload_one(fs, remote_path, folder, rel, manifest)
            remote_lease = _fs.join(fs, remote_path, LEASE_FILE)
            if manifest.lease_token and fs.exists(remote_lease):
                info = json.loads(fs.cat_file(remote_lease).decode("utf-8"))
                if info.get("token") == manifest.lease_token:
                    fs.rm_file(remote_lease)  # the lease the run's writer could not give back
        except Exception as error:
            manifest.save()
            raise RunWriterError(
                f"Uploading the spool {folder!r} to {url} failed: {type(error).__name__}: "
                f"{error}. What was sent is recorded; fix the cause and run it again."
            ) from error
        manifest.save()
    finally:
        local_lease.release()
    if remove:
        shutil.rmtree(folder, ignore_errors=True)
    return len(pending)


class SpoolFileSystem(AbstractFileSystem):  # type: ignore[misc]
    """A remote run's file system as its writer's users see it: remote paths, local files.

    Paths inside the run directory are files in the spool folder (the uploader sends
    them, and removes remotely what is removed here); :meth:`unstrip_protocol` gives
    the remote URL, so messages and records name where the run lives. Paths outside
    the run go to the remote file system itself.
    """

    protocol = ("tbxspool",)
    cachable = False
    root_marker = ""

    def __init__(self, spool: Spool) -> None:
        super().__init__()
        self.spool = spool
        self.local_fs = LocalFileSystem()
        self._base = spool.remote_path.rstrip("/")

    # ------------------------------------------------------------------ paths
    def _rel(self, path: Any) -> str | None:
        """``path`` relative to the run directory, or None for a path outside it."""
        text = self.spool.remote._strip_protocol(os.fspath(path)).rstrip("/")
        if text == self._base:
            return ""
        if text.startswith(self._base + "/"):
            return text[len(self._base) + 1 :]
        return None

    def _local(self, path: Any) -> str | None:
        rel = self._rel(path)
        if rel is None:
            return None
        return os.path.join(self.spool.local, *rel.split("/")) if rel else self.spool.local

    def _public(self, local: str) -> str:
        rel = os.path.relpath(local, self.spool.local).replace(os.sep, "/")
        return self._base if rel == "." else f"{self._base}/{rel}"

    def unstrip_protocol(self, name: str) -> str:
        return str(self.spool.remote.unstrip_protocol(name))

    # ------------------------------------------------------------------ operations
    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        local = self._local(path)
        if local is None:
            return self.spool.remote.open(path, mode, **kwargs)
        if any(flag in mode for flag in "wax"):
            os.makedirs(os.path.dirname(local), exist_ok=True)
        return self.local_fs._open(local, mode, **kwargs)

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kw: Any
    ) -> Any:
        local = self._local(path)
        if local is None:
            return self.spool.remote.cat_file(path, start=start, end=end, **kw)
        return self.local_fs.cat_file(local, start=start, end=end)

    def pipe_file(self, path: str, value: bytes, mode: str = "overwrite", **kw: Any) -> None:
        local = self._local(path)
        if local is None:
            self.spool.remote.pipe_file(path, value, **kw)
            return
        _fs.write_bytes_atomic(self.local_fs, local, value)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        local = self._local(path)
        if local is None:
            return self.spool.remote.ls(path, detail=detail, **kwargs)
        entries = [
            e
            for e in self.local_fs.ls(local, detail=True)
            if not _skip(os.path.relpath(e["name"], self.spool.local).replace(os.sep, "/"))
        ]
        if not detail:
            return [self._public(e["name"]) for e in entries]
        return [{**e, "name": self._public(e["name"])} for e in entries]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        local = self._local(path)
        if local is None:
            return dict(self.spool.remote.info(path, **kwargs))
        return {**self.local_fs.info(local), "name": self._public(local)}

    def exists(self, path: str, **kwargs: Any) -> bool:
        local = self._local(path)
        if local is None:
            return bool(self.spool.remote.exists(path, **kwargs))
        return os.path.exists(local)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        local = self._local(path)
        if local is None:
            self.spool.remote.makedirs(path, exist_ok=exist_ok)
            return
        os.makedirs(local, exist_ok=exist_ok)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.makedirs(path, exist_ok=True)

    def rm_file(self, path: str) -> None:
        self.rm(path)

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        for one in [path] if isinstance(path, str) else list(path):
            rel, local = self._rel(one), self._local(one)
            if rel is None or local is None:
                self.spool.remote.rm(one, recursive=recursive, maxdepth=maxdepth)
                continue
            self.local_fs.rm(local, recursive=recursive)  # a missing path: FileNotFoundError
            if rel:
                self.spool.forget(rel)
