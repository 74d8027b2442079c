"""The one file-system layer: local paths and fsspec URLs, atomic writes, version claiming.

Every file the package writes (events, config.yaml, hparams.yaml, projector assets)
goes through here, so ``memory://``, ``s3://`` and ``file://`` work wherever a local
path does.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tbx_lightning.errors import RunWriterError

__all__ = [
    "RECORDS_FILE",
    "claim_version",
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

_VERSION_RE = re.compile(r"^version_(\d+)$")


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


def makedirs(fs: Any, path: str) -> None:
    """Creates ``path`` and its parents; on object stores, checks the bucket and creates nothing.

    Prefixes need no creating on an object store, and a bucket is never created: a
    mistyped or deleted bucket raises :class:`RunWriterError` naming it.
    """
    if _protocols(fs) & _BUCKET_PROTOCOLS:
        bucket = path.strip("/").split("/", 1)[0]
        if not fs.exists(bucket):
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


def existing_versions(fs: Any, root: str) -> list[int]:
    """The ``N`` of every ``version_N`` entry directly under ``root``."""
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []
    versions = []
    for name in names:
        match = _VERSION_RE.match(name)
        if match:
            versions.append(int(match.group(1)))
    return versions


def _try_exclusive_create(fs: Any, path: str) -> bool:
    """Creates ``path`` only if nothing is there; returns False when someone else was first."""
    if is_local(fs):
        try:
            os.mkdir(path)
        except FileExistsError:
            return False
        return True
    marker = posixpath.join(path, ".tbx_version_claim")
    try:
        with fs.open(marker, "xb") as handle:
            handle.write(uuid.uuid4().hex.encode())
        return True
    except FileExistsError:
        return False
    except (ValueError, NotImplementedError, TypeError, OSError):
        # Stores without conditional writes: fall back to check-then-write, which is
        # safe within one process (the case for memory://) but can race across hosts.
        if fs.exists(marker) or fs.exists(path + "/"):
            return False
        fs.pipe_file(marker, uuid.uuid4().hex.encode())
        return True


def claim_version(fs: Any, root: str, *, max_tries: int = 10_000) -> int:
    """Claims the next free ``version_N`` under ``root`` with an exclusive create.

    Listing first only gives a starting guess; the create itself decides, so N
    processes racing in one experiment directory end with N distinct versions.
    """
    makedirs(fs, root)
    versions = existing_versions(fs, root)
    candidate = max(versions) + 1 if versions else 0
    for _ in range(max_tries):
        if _try_exclusive_create(fs, join(fs, root, f"version_{candidate}")):
            return candidate
        candidate += 1
    raise RuntimeError(
        f"Could not claim a free version under {root!r} after {max_tries} tries: "
        "pass an explicit `version` or clean up the experiment directory."
    )


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
