"""A remote run's file system as its writer sees it: remote paths, files in the local spool.

:class:`~tbx_lightning._writer.RunWriter` writes a remote run through this fsspec file
system: paths inside the run are files of the spool (:mod:`tbx_lightning._spool`), which
its uploader sends; paths outside the run go to the remote file system itself.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from tbx_lightning import _fs
from tbx_lightning._spool import makedirs_private, skip_in_listing
from tbx_lightning.errors import RunWriterError

if TYPE_CHECKING:
    from tbx_lightning._spool import Spool

__all__ = ["SpoolFileSystem"]


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
        if not rel:
            return self.spool.local
        parts = _fs.safe_parts(rel)
        if parts is None:
            raise RunWriterError(
                f"{path!r} leads outside the run {self.spool.url}: name files inside the run "
                "directory without '.' or '..' parts."
            )
        return os.path.join(self.spool.local, *parts)

    def _parents(self, local: str) -> None:
        rel = os.path.relpath(os.path.dirname(local), self.spool.local)
        if rel != ".":
            makedirs_private(self.spool.local, rel.split(os.sep))

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
            # A new file of the spool: owner-only, never written through a link.
            self._parents(local)
            flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            flags |= os.O_EXCL if "x" in mode else os.O_APPEND if "a" in mode else os.O_TRUNC
            return os.fdopen(os.open(local, flags, 0o600), mode.replace("x", "w"))
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
        self._parents(local)
        _fs.write_bytes_atomic(self.local_fs, local, value, private=True)

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        local = self._local(path)
        if local is None:
            return self.spool.remote.ls(path, detail=detail, **kwargs)
        entries = [
            e
            for e in self.local_fs.ls(local, detail=True)
            if not skip_in_listing(
                os.path.relpath(e["name"], self.spool.local).replace(os.sep, "/")
            )
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
        rel = os.path.relpath(local, self.spool.local)
        if rel != ".":
            makedirs_private(self.spool.local, rel.split(os.sep))

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
