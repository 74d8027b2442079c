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

A spool may sit in a place other users share, and its folder names are predictable,
so everything in it is treated as untrusted, by ssh's rules for ``~/.ssh``:

- The root must be this user's (or root's) and writable by no one else, or sticky
  (as ``/tmp`` is). A run's folder must be this user's, a real folder and writable by
  no one else; it is kept at mode 0700 and its files at 0600. Anything else is
  refused with a :class:`~tbx_lightning.RunWriterError` that names it.
- Links are never followed: the uploader skips them (with a warning), and files are
  opened with ``O_NOFOLLOW``.
- The manifest (:data:`MANIFEST`) must be this user's and name the run the folder is
  for (the folder's name holds a hash of the URL); its deletions are paths inside the
  run, never the run itself.
- Object names of a resumed run are fetched only where they stay inside the folder.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import os
import re
import shlex
import shutil
import stat
import threading
import time
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from tbx_lightning import _fs
from tbx_lightning._lease import LEASE_FILE, Lease
from tbx_lightning.errors import RunWriterError

__all__ = ["SPOOL_ENV", "Spool", "spool_dir", "spool_root", "upload_spool"]

SPOOL_ENV = "TBX_LIGHTNING_SPOOL"
MANIFEST = ".tbx-spool.json"
# Remote leases are refreshed rarely (each refresh is a request); a holder on another
# host is taken for gone once its heartbeat is this old.
REMOTE_HEARTBEAT_SECS = 60.0
REMOTE_STALE_AFTER = 600.0
_MAX_BACKOFF = 60.0
_MIN_PASS_GAP = 0.5  # seconds between two upload passes that flushes asked for
_MANIFEST_LIMIT = 64 << 20
_HINT = (
    "Use a spool only you can write: unset TBX_LIGHTNING_SPOOL (the default, "
    "~/.cache/tbx_lightning/spool, is private) or point it at a folder of your own with "
    "mode 0700."
)


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


def _prepare(folder: str) -> None:
    """Creates (or checks) the spool root and the run's private folder in it."""
    root = os.path.dirname(folder)
    os.makedirs(root, mode=0o700, exist_ok=True)
    _fs.check_shared_root(root, hint=_HINT)
    _fs.private_dir(folder, hint=_HINT)


def makedirs_private(base: str, parts: list[str]) -> None:
    """Creates the folders ``parts`` under ``base``, each 0700 and none a link."""
    path = base
    for part in parts:
        path = os.path.join(path, part)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise _fs.UnsafeFileError(errno.ENOTDIR, "not a folder", path) from None


def skip_in_listing(rel: str) -> bool:
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
    """What of a spool folder is on the remote: ``relative path -> [size, mtime_ns]``.

    Args:
        folder: The spool folder.
        url: The run's URL; a manifest naming another one is ignored.
        strict: Raise :class:`RunWriterError` for a manifest that is missing, not to be
            trusted or names another URL (``tbx-lightning upload``); else start afresh.
    """

    def __init__(self, folder: str, url: str | None, *, strict: bool = False) -> None:
        self.path = os.path.join(folder, MANIFEST)
        self.folder = folder
        self.files: dict[str, list[int]] = {}
        self.deleted: list[str] = []  # removed through the run's file system: remove remotely
        self.lease_token: str | None = None
        self.problem: str | None = None  # why an existing manifest was not used
        self.skipped: set[str] = set()  # links and other files that are never uploaded
        self._lock = threading.Lock()
        data = self._load(strict)
        named = data.get("url")
        self.url: str = url if url is not None else named if isinstance(named, str) else ""
        if not self.url or named != self.url:
            if strict:
                raise RunWriterError(f"{self.path!r} names no run: it is no manifest of a spool.")
            return
        files = data.get("files")
        if isinstance(files, dict):
            for rel, entry in files.items():
                ok = isinstance(entry, list) and len(entry) == 2
                if ok and _fs.safe_parts(str(rel)) and all(type(v) is int for v in entry):
                    self.files[str(rel)] = list(entry)
        token = data.get("lease_token")
        self.lease_token = token if isinstance(token, str) else None
        deleted = data.get("deleted")
        if isinstance(deleted, list):
            # Paths inside the run only: never the run itself, never a path leading out.
            self.deleted = [rel for rel in deleted if isinstance(rel, str) and _fs.safe_parts(rel)]

    def _load(self, strict: bool) -> dict[str, Any]:
        try:
            raw = _fs.read_bytes(_LOCAL, self.path, limit=_MANIFEST_LIMIT, private=True)
            data = json.loads(raw.decode("utf-8"))
        except FileNotFoundError:
            if strict:
                raise
            return {}
        except (_fs.UnsafeFileError, UnicodeDecodeError, ValueError, RecursionError) as error:
            self.problem = str(getattr(error, "strerror", None) or error)
            if strict:
                raise RunWriterError(
                    f"The spool manifest {self.path!r} is not to be trusted ({self.problem}): "
                    "nothing is uploaded or removed. " + _HINT
                ) from error
            return {}
        return data if isinstance(data, dict) else {}

    def save(self) -> None:
        with self._lock:
            data = {
                "url": self.url,
                "files": self.files,
                "deleted": self.deleted,
                "lease_token": self.lease_token,
            }
            text = json.dumps(data, sort_keys=True)
        _fs.write_text_atomic(_LOCAL, self.path, text, private=True)

    def forget(self, rel: str) -> None:
        """Marks ``rel`` (a file or a folder) removed: the uploader removes it remotely."""
        if not _fs.safe_parts(rel):
            return
        with self._lock:
            for name in [n for n in self.files if n == rel or n.startswith(rel + "/")]:
                del self.files[name]
            if rel not in self.deleted:
                self.deleted.append(rel)

    def remove_deleted(self, remote: Any, remote_path: str) -> None:
        """Removes on the remote what was removed in the spool (an old projector folder)."""
        while self.deleted:
            rel = self.deleted[0]
            parts = _fs.safe_parts(rel)
            if parts:
                target = _fs.join(remote, remote_path, *parts)
                with contextlib.suppress(FileNotFoundError):
                    remote.rm(target, recursive=True)
            with self._lock:
                self.deleted.remove(rel)

    def pending(self) -> list[tuple[str, int]]:
        """``(relative path, size)`` of every file that changed since it was uploaded.

        Only regular files count; links and other entries are never uploaded (and
        listed in :attr:`skipped`). Files and folders that group or others may read
        are made owner-only on the way.
        """
        out = []
        for parent, dirs, names in os.walk(self.folder):
            dirs.sort()
            for name in dirs:
                _tighten(os.path.join(parent, name), 0o700)
            for name in sorted(names):
                full = os.path.join(parent, name)
                rel = os.path.relpath(full, self.folder).replace(os.sep, "/")
                if skip_in_listing(rel):
                    continue
                try:
                    info = os.lstat(full)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                    self.skipped.add(rel)
                    continue
                if info.st_mode & 0o077:
                    _tighten(full, 0o600)
                if self.files.get(rel) != [info.st_size, info.st_mtime_ns]:
                    out.append((rel, info.st_size))
        return out


_LOCAL = LocalFileSystem()


def _tighten(path: str, mode: int) -> None:
    with contextlib.suppress(OSError):
        info = os.lstat(path)
        if not stat.S_ISLNK(info.st_mode) and info.st_uid == os.getuid() and info.st_mode & 0o077:
            os.chmod(path, mode)


def _upload_one(remote: Any, remote_path: str, folder: str, rel: str, manifest: _Manifest) -> None:
    full = os.path.join(folder, *rel.split("/"))
    try:
        fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # replaced or removed meanwhile: the next pass sees what is there now
    except OSError as error:
        if error.errno != errno.ELOOP:
            raise
        manifest.skipped.add(rel)  # a link now: never followed
        return
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            manifest.skipped.add(rel)
            return
        data = _fs.read_fd(fd, info.st_size)
    finally:
        os.close(fd)
    # The size and time from before the read: a change during the read uploads again.
    remote.pipe_file(_fs.join(remote, remote_path, *rel.split("/")), data)
    with manifest._lock:
        manifest.files[rel] = [info.st_size, info.st_mtime_ns]


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
        _prepare(self.local)
        self.flush_secs = float(flush_secs)
        self.notices: collections.deque[str] = collections.deque()
        self.lease = Lease(
            self.remote,
            remote_path,
            url=url,
            heartbeat_secs=REMOTE_HEARTBEAT_SECS,
            stale_after=REMOTE_STALE_AFTER,
            notify=self.notices.append,  # taken on the uploader thread: said on the caller's
        )
        self._manifest = _Manifest(self.local, url)
        self._manifest.save()  # names the run's URL, for upload_spool
        self._told: set[str] = set()  # skipped files already warned about
        self._stopping = False
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
        if self._manifest.problem is not None:
            self.notices.append(
                f"tbx_lightning: ignored the spool manifest {self._manifest.path} "
                f"({self._manifest.problem}): every file of the spool is uploaded again and "
                "nothing is removed remotely."
            )
        self._thread: _UploaderThread | None = None

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
            pending = self._manifest.pending()
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
        if not self._manifest.pending():
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
        child._told = set()
        child._stopping = False
        child._thread = None
        child._start()
        return child

    # ------------------------------------------------------------------ uploader thread
    def _start(self) -> None:
        self._thread = _UploaderThread(self)
        self._thread.start()

    def stop(self, *, wait: bool = True) -> None:
        """Ends the uploader (what is not sent stays in the spool folder); ``wait`` joins it."""
        self._stopping = True
        self._final.set()
        self._wake.set()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

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
        """Copies the run's files on the remote that the spool lacks (a resumed run).

        Object names are untrusted: one that would land outside the spool folder (``..``,
        an absolute path) or on a file of the spool itself is skipped with a warning.
        """
        try:
            found = self.remote.find(self.remote_path, detail=False)
        except FileNotFoundError:
            return
        base = self.remote_path.rstrip("/") + "/"
        refused = []
        for path in found:
            if not path.startswith(base):
                continue
            rel = path[len(base) :]
            parts = _fs.safe_parts(rel)
            if parts is None:
                refused.append(rel)
                continue
            if skip_in_listing(rel):
                continue
            local = os.path.join(self.local, *parts)
            if os.path.lexists(local):
                continue  # the spool's copy is newer: it is uploaded over the remote one
            data = self.remote.cat_file(path)
            makedirs_private(self.local, parts[:-1])
            _fs.write_bytes_atomic(_LOCAL, local, data, private=True)
            info = os.stat(local)
            self._manifest.files[rel] = [info.st_size, info.st_mtime_ns]
        self._manifest.save()
        if refused:
            shown = ", ".join(repr(r[:200]) for r in refused[:3])
            self.notices.append(
                f"tbx_lightning: {len(refused)} object(s) under {self.url} were not fetched into "
                f"the spool: their names lead outside the run ({shown}). Someone who can write "
                "the bucket put them there; remove them."
            )

    def _upload_pass(self) -> int:
        if self._manifest.deleted:
            self._manifest.remove_deleted(self.remote, self.remote_path)
        pending = self._manifest.pending()
        for rel, _ in pending:
            _upload_one(self.remote, self.remote_path, self.local, rel, self._manifest)
        if pending:
            self._manifest.save()
        new = sorted(self._manifest.skipped - self._told)
        if new:
            self._told.update(new)
            self.notices.append(
                f"tbx_lightning: not uploaded from the spool {self.local}: {', '.join(new[:5])} "
                "(links and files that are not this user's regular files are never followed "
                "or sent)."
            )
        return len(pending)

    def _main(self) -> None:
        last_pass = 0.0
        while True:
            final = self._final.is_set()
            if self._stopping:
                self._finished.set()
                return
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
                if self._opened and isinstance(error, FileNotFoundError):
                    gone = self._bucket_gone()
                    if gone is not None:
                        self.error = gone
                        self._finished.set()
                        return
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

    def _bucket_gone(self) -> RunWriterError | None:
        """The error to raise when the run's bucket was deleted while the run was writing."""
        try:
            _fs.makedirs(self.remote, self.remote_path)
        except RunWriterError as error:
            return RunWriterError(
                f"{error} It was there when the run started, so it was deleted meanwhile: "
                f"nothing more is uploaded. The run is kept in the spool folder {self.local}; "
                f"once the bucket exists again, run: {upload_command(self.local)}"
            )
        except Exception:  # the remote does not answer: an outage, retried as such
            return None
        return None

    def _finish(self) -> None:
        if self._owner:
            with contextlib.suppress(Exception):  # a lease left behind is stale once we exit
                self.lease.release()
            if not self._manifest.pending():
                shutil.rmtree(self.local, ignore_errors=True)
        self._finished.set()

    def _note_down(self, error: BaseException) -> None:
        pending = self._manifest.pending()
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


class _UploaderThread(threading.Thread):
    """The uploader of one spool; ``stop()`` ends it, as tensorboardX's writer thread has."""

    def __init__(self, spool: Spool) -> None:
        super().__init__(target=spool._main, name=f"tbx-spool-upload:{spool.url}", daemon=True)
        self._spool = spool

    def stop(self) -> None:
        self._spool.stop()


def upload_spool(path: str | os.PathLike[str], *, remove: bool = True) -> int:
    """Uploads what a spool folder holds that its remote lacks; returns the files sent.

    For a run whose writer could not finish its upload (the remote was unreachable
    when the run ended): the folder is named in the warning the writer gave. The
    remote's endpoint and credentials are taken as for the run itself (environment,
    fsspec config). With ``remove``, the folder is deleted once everything is sent.

    The folder is trusted only when it passes the spool's checks (see the module
    docstring): this user's, writable by no one else, with a manifest of this user's
    that names a remote run whose hash the folder's name holds. Nothing outside that
    run is ever removed.

    Raises:
        RunWriterError: ``path`` is no spool folder or not one to trust, a process
            still writes it, or the upload failed (nothing is removed then; run it again).

    Example:
        >>> from tbx_lightning._spool import upload_spool
        >>> upload_spool("/nonexistent")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        tbx_lightning.errors.RunWriterError: ...
    """
    folder = os.path.abspath(os.fspath(path))
    try:
        os.lstat(folder)
        _fs.private_dir(folder, hint=_HINT, create=False)
        manifest = _Manifest(folder, None, strict=True)
    except (FileNotFoundError, NotADirectoryError) as error:
        raise RunWriterError(
            f"{folder!r} is not a tbx_lightning spool folder (no readable {MANIFEST}): pass "
            "the folder named in the warning the run gave at its end."
        ) from error
    url = manifest.url
    fs, remote_path = _fs.resolve(url)
    if _fs.is_local(fs) or os.path.basename(folder) != os.path.basename(spool_dir(url)):
        raise RunWriterError(
            f"The spool manifest {manifest.path!r} names {url[:300]!r}, which is not the run "
            f"this folder was made for (a spool folder's name ends with a hash of its run's "
            "URL): nothing is uploaded or removed. Pass the folder named in the warning the "
            "run gave at its end, under its own name."
        )
    local_lease = Lease(_LOCAL, folder, url=folder, private=True)
    local_lease.acquire()  # refuses while the run's own writer still runs
    try:
        pending = manifest.pending()
        try:
            manifest.remove_deleted(fs, remote_path)
            for rel, _ in pending:
                _upload_one(fs, remote_path, folder, rel, manifest)
            remote_lease = _fs.join(fs, remote_path, LEASE_FILE)
            if manifest.lease_token and fs.exists(remote_lease):
                info = json.loads(_fs.read_bytes(fs, remote_lease, limit=65536).decode("utf-8"))
                if isinstance(info, dict) and info.get("token") == manifest.lease_token:
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
