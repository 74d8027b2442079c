"""The file-system layer: local paths and fsspec URLs, atomic writes, safe reads, versions.

Files that are written whole (config.yaml, summary.json, the records file, leases,
the spool's manifest, the projector config) are written here, atomically, and read
back here as untrusted input (:func:`read_bytes`: no link followed, sizes capped,
ownership checked where it matters), so ``memory://``, ``s3://`` and ``file://``
work wherever a local path does. Three kinds of write do not go through here, each
for a reason:

- Event files are appended by their writer thread (``_writer._EventFile``) through a
  descriptor of its own, unbuffered, so that a failed write resumes exactly where the
  disk stopped it. They are always local: a remote run is written into its spool.
- Projector tensors are streamed from the caller's memory in chunks
  (``projector._files``), in new files of a new folder, never rewritten.
- Lightning's ``hparams.yaml`` is written by Lightning's own ``save_hparams_to_yaml``.

Modes: local run folders and their files follow the user's umask, as every other
TensorBoard writer does (a run folder is often read by a teammate's TensorBoard).
A spool (see ``_spool``) is private: :func:`private_dir` gives folders 0700 and
``private=True`` writes give files 0600, whatever the umask.
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import re
import stat
import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tbx_lightning.errors import RunWriterError

__all__ = [
    "CLAIMS_DIR",
    "RECORDS_FILE",
    "bounded",
    "call_with_deadline",
    "check_shared_root",
    "claim_version",
    "create_exclusive",
    "is_local",
    "join",
    "makedirs",
    "private_dir",
    "read_bytes",
    "read_fd",
    "resolve",
    "safe_parts",
    "write_bytes_atomic",
    "write_text_atomic",
]

# The run's records file: the records that are replaced while the run goes on (the HParams
# row, the status, the config text), one per tag. TensorBoard reads every file whose name
# holds "tfevents", in name order; "events-" sorts before every event file ("events.out.")
# so its records are read first (TensorBoard keeps the first record of a tag), and a glob
# for the run's event streams ("events.*") does not find it. It is replaced whole,
# atomically.
RECORDS_FILE = "events-tbx-records.tfevents"
# Its name in runs of earlier releases, read when a resumed run has no RECORDS_FILE.
LEGACY_RECORDS_FILE = "events.out.tfevents.0000000000.tbx-records"

# Every version number handed out is recorded here, one empty marker per number, so a
# number is never handed out twice, even after its folder was deleted.
CLAIMS_DIR = ".tbx_claims"

# Per-request limits for remote stores, so one call can never hang for minutes.
REQUEST_TIMEOUT = 10.0
# What claiming a version on a remote store may take in all before it is an error.
CLAIM_TIMEOUT = 30.0

_VERSION_RE = re.compile(r"^version_(\d+)$")
LOCAL = LocalFileSystem()
_T = TypeVar("_T")


def resolve(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """Returns ``(filesystem, path_inside_it)`` for a local path or an fsspec URL.

    Local paths have ``~`` and ``$VARS`` expanded and are made absolute, so that a
    later ``chdir`` cannot move a run.
    """
    text = os.fspath(path)
    if "://" not in text:
        text = os.path.expandvars(os.path.expanduser(text))
        return fsspec.filesystem("file"), os.path.abspath(text)
    fs, inner = fsspec.core.url_to_fs(text)
    if is_local(fs):
        inner = os.path.abspath(inner)
    return fs, inner


def is_local(fs: Any) -> bool:
    """True for the local file system, where renames and exclusive creates are atomic."""
    return isinstance(fs, LocalFileSystem)


def join(fs: Any, base: str, *parts: str) -> str:
    """Joins path parts with the separator the file system uses."""
    if is_local(fs):
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def url(fs: Any, path: str) -> str:
    """The path as a user would pass it back in: a plain path or a URL with its protocol."""
    if is_local(fs):
        return path
    return str(fs.unstrip_protocol(path))


# Object stores whose first path part is a bucket: their ``makedirs`` would create it.
_BUCKET_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az", "adl", "oss", "cos"}


def _protocols(fs: Any) -> set[str]:
    protocol = getattr(fs, "protocol", ())
    return {protocol} if isinstance(protocol, str) else set(protocol)


def _bucket_exists(fs: Any, bucket: str) -> bool:
    """Whether ``bucket`` exists; an unreachable store raises instead of answering False."""
    call_s3 = getattr(fs, "call_s3", None)
    if call_s3 is None:
        return bool(fs.exists(bucket))
    # s3fs's ``exists`` says False for any failure, a timeout too: ask S3 itself.
    try:
        call_s3("head_bucket", Bucket=bucket)
    except (FileNotFoundError, PermissionError):
        return False
    return True


def makedirs(fs: Any, path: str) -> None:
    """Creates ``path`` and its parents; on object stores, checks the bucket and creates nothing.

    Prefixes need no creating on an object store, and a bucket is never created: a
    mistyped or deleted bucket raises :class:`RunWriterError` naming it.
    """
    if _protocols(fs) & _BUCKET_PROTOCOLS:
        bucket = path.strip("/").split("/", 1)[0]
        if not _bucket_exists(fs, bucket):
            where = f"{sorted(_protocols(fs) & _BUCKET_PROTOCOLS)[0]}://{bucket}"
            raise RunWriterError(
                f"The bucket {bucket!r} of {url(fs, path)!r} does not exist (or these "
                f"credentials cannot see it): create it first (e.g. `aws s3 mb {where}`) or "
                "fix the name. tbx_lightning creates folders inside a bucket, never buckets."
            )
        return
    fs.makedirs(path, exist_ok=True)


def write_bytes_atomic(
    fs: Any, path: str, data: bytes, *, tmp_prefix: str | None = None, private: bool = False
) -> None:
    """Writes ``data`` so that readers see either the old file or the new one, never a part.

    Local files are written to a new temporary sibling (``.<name>.<random>.tmp``, or
    ``<tmp_prefix>.<random>.tmp``; created exclusively, no link followed) and renamed
    over the target, which replaces a link there rather than writing through it;
    ``private`` gives the file mode 0600. Object stores replace an object in one PUT,
    which is atomic by itself.
    """
    if is_local(fs):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        prefix = tmp_prefix if tmp_prefix is not None else f".{os.path.basename(path)}"
        tmp = os.path.join(parent, f"{prefix}.{uuid.uuid4().hex}.tmp")
        try:
            _write_new(tmp, data, private)
            os.replace(tmp, path)
        finally:
            if os.path.lexists(tmp):
                os.remove(tmp)
        return
    fs.pipe_file(path, data)


_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)


def _write_new(path: str, data: bytes, private: bool) -> None:
    fd = os.open(path, _NEW_FLAGS | getattr(os, "O_CLOEXEC", 0), 0o600 if private else 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def write_text_atomic(fs: Any, path: str, text: str, *, private: bool = False) -> None:
    """Writes UTF-8 text atomically, see :func:`write_bytes_atomic`."""
    write_bytes_atomic(fs, path, text.encode("utf-8"), private=private)


class UnsafeFileError(OSError):
    """A file that is not what its reader may trust: a link, not a regular file, too large,
    or (where ownership is checked) owned by another user or writable by others."""


def read_bytes(
    fs: Any, path: str, *, limit: int, owned: bool = False, private: bool = False
) -> bytes:
    """The content of a file a run directory or a spool holds, read as untrusted.

    Locally the file is opened without following a link and must be a regular file of
    at most ``limit`` bytes; with ``owned`` it must also belong to this user, and with
    ``private`` besides be writable by nobody else (a file of a spool, written 0600). Remote objects are read and their size checked.

    Raises:
        FileNotFoundError: there is no such file.
        UnsafeFileError: the file fails a check above (the message says which).
    """
    if not is_local(fs):
        data = fs.cat_file(path)
        if len(data) > limit:
            raise UnsafeFileError(errno.EFBIG, f"larger than {limit} bytes", path)
        return bytes(data)
    try:
        fd = os.open(path, _READ_FLAGS | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EMLINK):
            raise UnsafeFileError(error.errno, "a symbolic link, not followed", path) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError(errno.EINVAL, "not a regular file", path)
        if owned or private:
            _check_owner(info, path, private)
        if info.st_size > limit:
            raise UnsafeFileError(errno.EFBIG, f"larger than {limit} bytes", path)
        data = read_fd(fd, limit + 1)
        if len(data) > limit:
            raise UnsafeFileError(errno.EFBIG, f"larger than {limit} bytes", path)
        return data
    finally:
        os.close(fd)


def read_fd(fd: int, most: int) -> bytes:
    """Up to ``most`` bytes from an open descriptor, read in chunks of at most 1 MiB."""
    parts = []
    left = most
    while left > 0:
        part = os.read(fd, min(left, 1 << 20))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _check_owner(info: os.stat_result, path: str, private: bool) -> None:
    if info.st_uid != os.getuid():
        raise UnsafeFileError(errno.EPERM, f"owned by uid {info.st_uid}, not by this user", path)
    if private and info.st_mode & 0o022:
        raise UnsafeFileError(errno.EPERM, "writable by group or others", path)


def private_dir(path: str, *, hint: str, create: bool = True) -> None:
    """Makes ``path`` an owner-only folder (0700), or checks that the one there is safe.

    ssh's rules for ``~/.ssh``: the folder must be a real folder (not a link), belong
    to this user and be writable by nobody else. With ``create``, a missing folder is
    made and one of this user's with group or other permission bits is made 0700;
    without, the folder is only checked.

    Raises:
        RunWriterError: the folder is a link, not a folder, belongs to another user or
            is writable by group or others; the message names it and ends with ``hint``.
    """
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        else:
            os.chmod(path, 0o700)  # whatever the umask
            return
    info = os.lstat(path)
    problem = None
    if stat.S_ISLNK(info.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "is not a folder"
    elif info.st_uid != os.getuid():
        problem = f"belongs to another user (uid {info.st_uid})"
    elif info.st_mode & 0o022:
        problem = f"is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    if problem is not None:
        raise RunWriterError(
            f"The spool folder {path!r} {problem}: another user could read or replace what "
            f"is written there, so it is not used. {hint}"
        )
    if create and info.st_mode & 0o077:
        os.chmod(path, 0o700)


def check_shared_root(path: str, *, hint: str) -> None:
    """Checks the folder that holds the spools: this user's (or root's) and writable by no
    one else, or shared with the sticky bit (as ``/tmp`` is), where nobody can rename or
    remove a folder of another user.

    Raises:
        RunWriterError: the folder fails that; the message names it and ends with ``hint``.
    """
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise RunWriterError(f"The spool root {path!r} is not a folder. {hint}")
    if info.st_mode & stat.S_ISVTX:
        return
    if info.st_uid not in (os.getuid(), 0) or info.st_mode & 0o022:
        raise RunWriterError(
            f"The spool root {path!r} (uid {info.st_uid}, mode "
            f"{stat.S_IMODE(info.st_mode):o}) can be changed by another user, who could "
            f"replace the folders written there. {hint}"
        )


def safe_parts(rel: str) -> list[str] | None:
    """The parts of a relative ``/``-separated path that stays inside its folder, else None.

    Refused: empty paths and parts, ``.``, ``..``, absolute paths, backslashes and NUL,
    so the parts joined under a folder can never name anything outside it.
    """
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel:
        return None
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    return parts


def _version_numbers(fs: Any, folder: str) -> list[int]:
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return []
    versions = []
    for name in names:
        match = _VERSION_RE.match(name)
        if match:
            versions.append(int(match.group(1)))
    return versions


def existing_versions(fs: Any, root: str) -> list[int]:
    """The ``N`` of every ``version_N`` folder under ``root`` and of every number claimed there.

    Claimed numbers (see :func:`claim_version`) count even when their folder was
    deleted, so the newest number is never handed out again.
    """
    found = set(_version_numbers(fs, root))
    found.update(_version_numbers(fs, join(fs, root, CLAIMS_DIR)))
    return sorted(found)


def create_exclusive(fs: Any, path: str, data: bytes = b"", *, private: bool = False) -> bool:
    """Creates the file ``path`` holding ``data`` only if nothing is there.

    Returns False when the file already exists (someone else was first). Local files
    are written to a temporary sibling and hard-linked into place, so a reader never
    sees the file without its content. Object stores use a conditional PUT where they
    have one; stores without it fall back to check-then-write, which is safe within
    one process (``memory://``) but can race across hosts. ``private`` gives a local
    file mode 0600.
    """
    if is_local(fs):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        _write_new(tmp, data, private)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some network file systems): exclusive open
            try:
                _write_new(path, data, private)
            except FileExistsError:
                return False
        finally:
            os.remove(tmp)
        return True
    try:
        with fs.open(path, "xb") as handle:
            handle.write(data)
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError, TypeError):
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True


def _try_claim(fs: Any, root: str, candidate: int) -> bool:
    """Claims ``version_<candidate>``: its claim marker first, then its folder."""
    folder = join(fs, root, f"version_{candidate}")
    marker = join(fs, root, CLAIMS_DIR, f"version_{candidate}")
    if is_local(fs):
        if os.path.exists(folder) or not create_exclusive(fs, marker, uuid.uuid4().hex.encode()):
            return False
        try:
            os.mkdir(folder)
        except FileExistsError:
            return False  # made by hand meanwhile: the number stays claimed, try the next
        return True
    if fs.exists(folder + "/"):
        return False
    if not create_exclusive(fs, marker, uuid.uuid4().hex.encode()):
        return False
    # Object stores have no empty folders: an object makes the claimed folder visible.
    fs.pipe_file(join(fs, folder, ".tbx_version_claim"), uuid.uuid4().hex.encode())
    return True


def claim_version(
    fs: Any, root: str, *, max_tries: int = 10_000, timeout: float = CLAIM_TIMEOUT
) -> int:
    """Claims the next free ``version_N`` under ``root`` with an exclusive create.

    Each number is recorded in ``root/.tbx_claims/version_N`` with an exclusive create
    before its folder is made: N processes racing in one experiment directory end
    with N distinct versions, and a number whose folder was deleted (even that of a
    run still writing) is never handed out again. On a remote store the whole claim
    takes at most ``timeout`` seconds, with per-request timeouts, and an unreachable
    store is a :class:`RunWriterError` rather than a hang.
    """
    if not is_local(fs):
        remote = bounded(fs)
        return call_with_deadline(
            lambda: _claim(remote, root, max_tries),
            timeout,
            f"claiming a version under {url(fs, root)!r}",
        )
    return _claim(fs, root, max_tries)


def _claim(fs: Any, root: str, max_tries: int) -> int:
    makedirs(fs, root)
    versions = existing_versions(fs, root)
    candidate = max(versions) + 1 if versions else 0
    for _ in range(max_tries):
        if _try_claim(fs, root, candidate):
            return candidate
        candidate += 1
    raise RunWriterError(
        f"Could not claim a free version under {url(fs, root)!r} after {max_tries} tries: "
        "pass an explicit `version` or clean up the experiment directory."
    )


def bounded(fs: Any, timeout: float | None = None) -> Any:
    """The same remote file system with per-request timeouts and few retries, where it has them.

    s3fs defaults to 5 retries of requests that may each wait minutes on an endpoint
    that accepts connections but never answers; this instance waits at most
    ``timeout`` seconds (default :data:`REQUEST_TIMEOUT`) for a connection and for
    each read, and retries once. Other
    file systems are returned as they are (calls to them are bounded by
    :func:`call_with_deadline` where it matters).
    """
    if is_local(fs) or not _protocols(fs) & {"s3", "s3a"}:
        return fs
    if timeout is None:
        timeout = REQUEST_TIMEOUT
    options = dict(getattr(fs, "storage_options", {}))
    config = dict(options.get("config_kwargs") or {})
    config.update(
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"total_max_attempts": 1, "mode": "standard"},
    )
    options["config_kwargs"] = config
    options["skip_instance_cache"] = True
    quick = type(fs)(**options)
    quick.retries = 2  # s3fs's own retry loop around each call (1 = no retry)
    # Some requests wait past the read timeout (a PUT to an endpoint that never answers
    # does): fsspec's blocking wrappers take an overall ``timeout`` and cancel the call.
    deadline = 3 * timeout + 1
    for name in _BOUNDED_METHODS:
        method = getattr(quick, name, None)
        if method is not None:
            setattr(quick, name, functools.partial(method, timeout=deadline))
    return quick


# The blocking methods of an fsspec async file system that the package calls remotely
# (``call_s3`` is what s3fs's file objects use to upload).
_BOUNDED_METHODS = (
    "call_s3",
    "cat_file",
    "exists",
    "find",
    "info",
    "ls",
    "pipe_file",
    "rm",
    "rm_file",
)


def call_with_deadline(func: Callable[[], _T], timeout: float, what: str) -> _T:
    """Runs ``func`` on a helper thread and waits at most ``timeout`` seconds for it.

    Raises:
        RunWriterError: ``func`` did not return in time (it is left to finish on its
            own); the message names ``what`` was being done.
    """
    result: list[Any] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            result.append(func())
        except BaseException as error:  # handed to the caller below
            failure.append(error)

    thread = threading.Thread(target=target, name="tbx-remote-call", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise RunWriterError(
            f"No answer from the storage within {timeout:g} s while {what}: check the "
            "endpoint URL, the network and the credentials, then try again."
        )
    if failure:
        raise failure[0]
    return result[0]


def run_dir(
    save_dir: str | os.PathLike[str],
    name: str | None,
    version: int | str | None,
    sub_dir: str | os.PathLike[str] | None = None,
) -> tuple[Any, str, int | str]:
    """Resolves (and, for ``version=None``, claims) ``save_dir/name/version_N[/sub_dir]``.

    Returns ``(filesystem, log_dir, version)``. An explicit int version maps to
    ``version_N``; a string version is used as the folder name as given.
    """
    fs, base = resolve(save_dir)
    root = join(fs, base, name) if name else base
    if version is None:
        version = claim_version(fs, root)
    folder = version if isinstance(version, str) else f"version_{version}"
    log_dir = join(fs, root, folder)
    if sub_dir:
        log_dir = join(fs, log_dir, os.fspath(sub_dir))
    makedirs(fs, log_dir)
    return fs, log_dir, version
