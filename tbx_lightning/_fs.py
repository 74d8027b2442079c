"""The one file-system layer: local paths and fsspec URLs, atomic writes, version claiming.

Every file the package writes (events, config.yaml, hparams.yaml, projector assets)
goes through here, so ``memory://``, ``s3://`` and ``file://`` work wherever a local
path does.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
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
    "claim_version",
    "create_exclusive",
    "is_local",
    "join",
    "makedirs",
    "resolve",
    "write_bytes_atomic",
    "write_text_atomic",
]

# The run's records file: patchable records too large to rewrite in one page of the event
# file. It sorts before every timed event file, so TensorBoard (which keeps the first
# record of a tag) reads its records first; it is replaced whole, atomically.
RECORDS_FILE = "events.out.tfevents.0000000000.tbx-records"

# Every version number handed out is recorded here, one empty marker per number, so a
# number is never handed out twice, even after its folder was deleted.
CLAIMS_DIR = ".tbx_claims"

# Per-request limits for remote stores, so one call can never hang for minutes.
REQUEST_TIMEOUT = 10.0
# What claiming a version on a remote store may take in all before it is an error.
CLAIM_TIMEOUT = 30.0

_VERSION_RE = re.compile(r"^version_(\d+)$")
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


def write_bytes_atomic(fs: Any, path: str, data: bytes, *, tmp_prefix: str | None = None) -> None:
    """Writes ``data`` so that readers see either the old file or the new one, never a part.

    Local files are written to a temporary sibling (``.<name>.<random>.tmp``, or
    ``<tmp_prefix>.<random>.tmp``) and renamed over the target; object stores
    replace an object in one PUT, which is atomic by itself.
    """
    if is_local(fs):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        prefix = tmp_prefix if tmp_prefix is not None else f".{os.path.basename(path)}"
        tmp = os.path.join(parent, f"{prefix}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    fs.pipe_file(path, data)


def write_text_atomic(fs: Any, path: str, text: str) -> None:
    """Writes UTF-8 text atomically, see :func:`write_bytes_atomic`."""
    write_bytes_atomic(fs, path, text.encode("utf-8"))


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


def create_exclusive(fs: Any, path: str, data: bytes = b"") -> bool:
    """Creates the file ``path`` holding ``data`` only if nothing is there.

    Returns False when the file already exists (someone else was first). Local files
    are written to a temporary sibling and hard-linked into place, so a reader never
    sees the file without its content. Object stores use a conditional PUT where they
    have one; stores without it fall back to check-then-write, which is safe within
    one process (``memory://``) but can race across hosts.
    """
    if is_local(fs):
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some network file systems): exclusive open
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
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
