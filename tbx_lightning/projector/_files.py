"""The projector's file side: tensors streamed from the caller's memory, entry folders, cleanup.

Kept apart from :mod:`tbx_lightning.projector` (arguments, metadata, sprites,
the config) so that the rules for memory and for crash safety live in one place:

- A tensor is written in chunks of rows straight from the memory it is in: a
  C-contiguous little-endian float32 CPU tensor or array is handed to the file as
  views of itself, without a copy; any other dtype, layout or device is converted
  one chunk at a time, so at most :data:`CHUNK_BYTES` of converted data exists at
  once.
- Every write of an entry goes to a folder of its own, created for it and named
  ``<step:08d>.<random>``; nothing a reader can reach changes until
  ``projector_config.pbtxt`` is switched to the new folder in one atomic rename
  (one PUT on object stores). A process killed at any moment leaves the config
  naming either the old files or the new ones, never a mix.
"""

from __future__ import annotations

import codecs
import os
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tbx_lightning import _fs

CHUNK_BYTES = 4 << 20
"""Rows are converted and written in chunks of about this many bytes."""

# TensorBoard reads a tensor file as text first and falls back to float32 only on a
# decode error inside its first block (16 MiB); probing a smaller prefix keeps that
# decision right even if the block size shrinks.
UTF8_PROBE_BYTES = 1 << 20

SUBDIR = "projector"
_FOLDER_RE = re.compile(r"^(\d{8,})(?:\.([0-9a-f]{6,32}))?$")
_LITTLE_F32 = np.dtype("<f4")


@dataclass
class MatrixStats:
    """What streaming a matrix found: its shape, format and the rows with NaN or Inf."""

    rows: int
    dim: int
    tensor_format: str
    bad_rows: int


def new_folder_name(step: int) -> str:
    """A folder name no earlier write of ``step`` used: ``<step:08d>.<12 hex digits>``."""
    return f"{step:08d}.{uuid.uuid4().hex[:12]}"


def folder_step(name: str) -> int | None:
    """The step of an entry folder name (``00000007`` or ``00000007.<hex>``), else None."""
    match = _FOLDER_RE.match(name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------- reading rows
def check_matrix(mat: Any) -> Any:
    """Rejects matrices that hold no real numbers; returns a tensor or an ndarray."""
    from tbx_lightning.errors import LoggedTypeError

    if isinstance(mat, torch.Tensor):
        if mat.is_complex():
            raise LoggedTypeError(
                "`mat` is a complex tensor: pass its real part, abs() or view_as_real()."
            )
        return mat.detach()
    array = np.asarray(mat)
    if array.dtype.kind not in "biuf":
        raise LoggedTypeError(
            f"`mat` must hold real numbers, got an array of dtype {array.dtype}: convert it "
            "to float first."
        )
    return array


def _zero_copy_array(source: Any) -> np.ndarray | None:
    """The source as a little-endian float32 C-contiguous ndarray sharing its memory, or None."""
    if isinstance(source, torch.Tensor):
        if (
            source.device.type != "cpu"
            or source.dtype != torch.float32
            or source.is_conj()
            or source.is_neg()
            or not source.is_contiguous()
            or source.layout != torch.strided
        ):
            return None
        array = source.numpy()
    else:
        array = source
    if array.dtype != _LITTLE_F32 or not array.flags.c_contiguous:
        return None
    return array  # type: ignore[no-any-return]


def float32_chunks(
    source: Any, index: np.ndarray | None, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[np.ndarray]:
    """The rows (or the sampled rows) as little-endian float32 blocks, in order.

    Blocks are views of ``source`` where it already is C-contiguous float32 on the
    CPU. Otherwise every block is converted into one buffer of about
    ``chunk_bytes``, allocated once and reused, so the caller must be done with a
    block before asking for the next.
    """
    dim = int(source.shape[1])
    rows_per_chunk = max(1, chunk_bytes // max(1, dim * 4))
    whole = _zero_copy_array(source) if index is None else None
    count = int(source.shape[0]) if index is None else len(index)
    buffer = None if whole is not None else np.empty((min(rows_per_chunk, count), dim), _LITTLE_F32)
    for start in range(0, count, rows_per_chunk):
        stop = min(count, start + rows_per_chunk)
        if whole is not None:
            yield whole[start:stop]
        elif buffer is not None:
            out = buffer[: stop - start]
            _convert_into(out, source, index, start, stop)
            yield out


def _convert_into(
    out: np.ndarray, source: Any, index: np.ndarray | None, start: int, stop: int
) -> None:
    """Rows ``start:stop`` (of the sample, with ``index``) as float32 in ``out``."""
    if isinstance(source, torch.Tensor):
        if index is None:
            piece = source[start:stop]
        else:
            piece = source.index_select(0, torch.from_numpy(index[start:stop]).to(source.device))
        if piece.is_conj():
            piece = piece.resolve_conj()
        if piece.is_neg():
            piece = piece.resolve_neg()
        # One copy: device to host and dtype conversion straight into the buffer.
        torch.from_numpy(out).copy_(piece)
        return
    rows = source[start:stop] if index is None else source[index[start:stop]]
    np.copyto(out, rows, casting="unsafe")


class Background:
    """Runs ``fn(*args)`` on a helper thread; :meth:`result` joins it and returns or raises."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._work, args=(fn, args), name="tbx-projector-files", daemon=True
        )
        self._thread.start()

    def _work(self, fn: Any, args: tuple[Any, ...]) -> None:
        try:
            self._value = fn(*args)
        except BaseException as error:  # handed to the caller by result()
            self._error = error

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def _count_bad_rows(block: np.ndarray) -> int:
    # A float32 sum is one fast pass; NaN and Inf propagate into it. A sum that
    # overflows from finite values is caught by the exact check that follows, made in
    # blocks of rows so that its mask stays small next to a large matrix.
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(block.sum()):
            return 0
    rows = max(1, CHUNK_BYTES // max(1, block.shape[1] * 4))
    return sum(
        int((~np.isfinite(block[i : i + rows]).all(axis=1)).sum())
        for i in range(0, block.shape[0], rows)
    )


def _valid_utf8(prefix: memoryview, final: bool) -> bool:
    # In small pieces: float data fails within its first bytes, so only those are read.
    decoder = codecs.getincrementaldecoder("utf-8")()
    step = 4096
    try:
        for start in range(0, len(prefix), step):
            last = final and start + step >= len(prefix)
            decoder.decode(bytes(prefix[start : start + step]), final=last)
        if final and not len(prefix):
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _tsv_rows(block: np.ndarray) -> bytes:
    # Nine significant digits identify every float32 exactly.
    lines = ["\t".join(f"{v:.9g}" for v in row) for row in block.tolist()]
    return ("\n".join(lines) + "\n").encode("ascii")


# ---------------------------------------------------------------------- writing files
def _open_new(fs: Any, path: str) -> Any:
    if _fs.is_local(fs):
        # Unbuffered: each block goes from the caller's memory to the kernel in one call.
        return open(path, "xb", buffering=0)
    return fs.open(path, "wb")


def write_matrix(
    fs: Any, folder: str, source: Any, index: np.ndarray | None, beside: Any = None
) -> tuple[str, MatrixStats, Any]:
    """Streams the matrix into ``folder`` as ``tensors.bin`` (or ``tensors.tsv``).

    The first block decides the format: TensorBoard parses a tensor file as TSV
    text when its first bytes decode as UTF-8, so such a matrix (all zeros, small
    integers) is written as exact TSV text instead of raw float32.

    A helper thread works while the kernel copies the matrix (the write releases the
    GIL): it checks a matrix written from its own memory for NaN/Inf (numpy's sum
    releases the GIL too), then calls ``beside()``, the caller's other work, whose
    result (or error) comes back once the matrix is written. One helper, so that with
    the writing thread no more than two threads compete for two cores.

    Returns:
        The path written, what was found on the way, and what ``beside()`` returned.
    """
    total = int(source.shape[0]) if index is None else len(index)
    dim = int(source.shape[1])
    chunks = float32_chunks(source, index)
    first = next(chunks)
    final = total * dim * 4 <= UTF8_PROBE_BYTES
    as_text = _valid_utf8(first.data.cast("B")[:UTF8_PROBE_BYTES], final)
    block: np.ndarray | None = first
    del first
    name = "tensors.tsv" if as_text else "tensors.bin"
    path = _fs.join(fs, folder, name)
    bad_rows = 0
    whole = None if as_text or index is not None else _zero_copy_array(source)

    def helper_work() -> tuple[int | None, Any]:
        bad = None if whole is None else _count_bad_rows(whole)
        return bad, (None if beside is None else beside())

    helper = Background(helper_work) if whole is not None or beside is not None else None
    if whole is not None and _fs.is_local(fs):
        # Unbuffered local file: one write call hands the kernel the whole matrix. (A
        # remote file buffers what it is given, so there blocks keep memory bounded.)
        block, chunks = whole, iter(())
    try:
        with _open_new(fs, path) as handle:
            while block is not None:
                if as_text:
                    handle.write(_tsv_rows(block))
                else:
                    _write_all(handle, block.data.cast("B"))
                if whole is None:
                    bad_rows += _count_bad_rows(block)  # after the write: block in cache
                block = None  # dropped before the next one is made: one block at a time
                block = next(chunks, None)
    finally:
        if helper is not None:
            helper.wait()  # also when the write failed
    result = None
    if helper is not None:
        bad, result = helper.result()
        if bad is not None:
            bad_rows = bad
    stats = MatrixStats(total, dim, "tsv" if as_text else "float32", bad_rows)
    return path, stats, result


def _write_all(handle: Any, view: memoryview) -> None:
    while view:  # an unbuffered write may take fewer bytes than offered
        written = handle.write(view)
        if written is None or written >= len(view):
            return
        view = view[written:]


def write_new(fs: Any, path: str, data: bytes) -> None:
    """Writes a file that no reader knows of yet (its folder is new): no rename needed."""
    with _open_new(fs, path) as handle:
        _write_all(handle, memoryview(data))


def make_folder(fs: Any, folder: str) -> None:
    """Creates an entry folder (and its parents)."""
    if _fs.is_local(fs):
        os.makedirs(folder, exist_ok=False)
    else:
        _fs.makedirs(fs, folder)


def remove_folder(fs: Any, folder: str) -> None:
    """Deletes an entry folder and what it holds; a missing folder is fine."""
    try:
        if _fs.is_local(fs):
            import shutil

            shutil.rmtree(folder)
        else:
            fs.rm(folder, recursive=True)
    except FileNotFoundError:
        pass


def list_folders(fs: Any, parent: str) -> list[str]:
    """Names directly under ``parent``; empty when it does not exist."""
    try:
        if _fs.is_local(fs):
            return os.listdir(parent)
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(parent, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
