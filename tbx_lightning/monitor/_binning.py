"""The binning engine: moments and fixed-width bin counts of flat tensors, on their device.

One row per tensor group, ``[n, nonfinite, sum, sumsq, min, max, sumsq_all, counts...]``,
so a whole model's histograms reach the host as one small array; sampled rows keep
the documented error bound (see docs/monitor.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from tbx_lightning.errors import LoggedTypeError, LoggedValueError
from tbx_lightning.monitor._sink import MonitorSink

# Elements per chunk of the CPU binning loop: small enough that the scratch buffers
# stay in cache, large enough that per-op overhead does not matter.
_CPU_CHUNK = 1 << 20
# Elements per chunk on accelerators: bounds the size of the temporaries.
_DEVICE_CHUNK = 1 << 24
# Elements per chunk of the fused CPU passes (copy or difference, then norm): the chunk
# is still in cache when its norm reads it, so a tensor is read from memory once.
_FUSED_CHUNK = 1 << 18
# Columns of a moments row.
_N, _NONFINITE, _SUM, _SUMSQ, _MIN, _MAX, _SUMSQ_ALL = range(7)
_ROW = 7


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank holds (DTensor shard, DeepSpeed partition)."""
    to_local = getattr(tensor, "to_local", None)
    if to_local is not None and type(tensor).__name__ == "DTensor":
        return to_local()  # type: ignore[no-any-return]
    ds_tensor = getattr(tensor, "ds_tensor", None)
    if isinstance(ds_tensor, torch.Tensor):
        return ds_tensor
    return tensor


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return _local(tensor).detach().reshape(-1)


def _is_sharded_param(param: torch.Tensor) -> bool:
    return type(param).__name__ == "DTensor" or hasattr(param, "ds_tensor")


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _round_counts(counts: np.ndarray, total: int) -> np.ndarray:
    """Integer counts that sum to ``total``, by largest remainder (for sampled histograms)."""
    mass = counts.sum()
    if total <= 0 or mass <= 0:
        return np.zeros_like(counts)
    scaled = counts * (total / mass)
    out = np.floor(scaled)
    short = int(total - out.sum())
    if short > 0:
        order = np.argsort(-(scaled - out), kind="stable")
        out[order[:short]] += 1
    return out


def _chunk_sumsq(chunk: torch.Tensor) -> float:
    """``sum(chunk ** 2)`` of one CPU chunk.

    float32/float64 use ``dot``: several times faster than ``vector_norm`` on the CPU,
    whose float32 sum of 25 M squares is off by about 0.3%; a chunk's dot is within
    1e-6, and the chunks add up in Python's float64. Half precision accumulates in float32.
    """
    if chunk.dtype in (torch.float32, torch.float64):
        return float(torch.dot(chunk, chunk))
    return float(torch.linalg.vector_norm(chunk, dtype=torch.float32)) ** 2


def sumsq_cpu(x: torch.Tensor) -> float:
    """``sum(x ** 2)`` of a flat CPU tensor, accurate to about 1e-6 (see :func:`_chunk_sumsq`)."""
    step = _FUSED_CHUNK * 4
    return sum(_chunk_sumsq(x[start : start + step]) for start in range(0, x.numel(), step))


def copy_sumsq_cpu(src: torch.Tensor, dst: torch.Tensor) -> float:
    """Copies flat CPU ``src`` into ``dst`` and returns ``sum(src ** 2)`` from the same pass."""
    total = 0.0
    for start in range(0, src.numel(), _FUSED_CHUNK):
        chunk = dst[start : start + _FUSED_CHUNK]
        chunk.copy_(src[start : start + _FUSED_CHUNK])
        total += _chunk_sumsq(chunk)
    return total


def diff_sumsq_cpu(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> float:
    """``sum((a - b) ** 2)`` of flat CPU tensors, through a cache-sized ``scratch``.

    Neither input is written and no full-size temporary is made: each chunk's
    difference is formed in ``scratch`` (at least ``_FUSED_CHUNK`` long, ``a``'s dtype).
    """
    total = 0.0
    for start in range(0, a.numel(), _FUSED_CHUNK):
        x = a[start : start + _FUSED_CHUNK]
        out = scratch[: x.numel()]
        torch.sub(x, b[start : start + _FUSED_CHUNK], out=out)
        total += _chunk_sumsq(out)
    return total


class _Binner:
    """Moments and fixed-width bin counts of flat tensors, on the tensors' device."""

    def __init__(self, bins: int) -> None:
        self.bins = bins
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None

    def row(self, x: torch.Tensor, full: bool) -> torch.Tensor:
        """Moments of one flat tensor: n, nonfinite, sum, sumsq, min, max of finite values, sumsq."""
        acc = _acc_dtype(x.device)
        n = x.numel()
        if n == 0:
            return torch.tensor([0, 0, 0, 0, math.inf, -math.inf, 0], dtype=acc, device=x.device)
        if x.device.type == "cpu":
            return self.row_cpu(x, full)
        return self.row_device(x, full)

    def row_cpu(self, x: torch.Tensor, full: bool) -> torch.Tensor:
        # On the CPU a value check costs no transfer, so the common all-finite case reads
        # the tensor once and only a tensor with NaN/Inf pays for a mask.
        if not full:
            sumsq_all = sumsq_cpu(x)
            if math.isfinite(sumsq_all):
                nonfinite = 0
            else:
                nonfinite = x.numel() - int(torch.isfinite(x).sum())
                if nonfinite == 0:  # finite values whose squares overflow
                    sumsq_all = float(x.double().square().sum())
            row = [x.numel() - nonfinite, nonfinite, 0.0, 0.0, 0.0, 0.0, sumsq_all]
            return torch.tensor(row, dtype=torch.float64)
        # Norm, minimum, maximum and sum chunk by chunk: each chunk is read from memory
        # once and the other reductions find it in cache.
        sumsq_all, lo, hi, total = 0.0, math.inf, -math.inf, 0.0
        sum_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        for start in range(0, x.numel(), _FUSED_CHUNK * 2):
            chunk = x[start : start + _FUSED_CHUNK * 2]
            sumsq_all += _chunk_sumsq(chunk)
            c_lo, c_hi = torch.aminmax(chunk)
            lo, hi = min(lo, float(c_lo)), max(hi, float(c_hi))
            total += float(chunk.sum(dtype=sum_dtype))
        if math.isfinite(sumsq_all) and math.isfinite(lo) and math.isfinite(hi):
            row = [x.numel(), 0, total, sumsq_all, lo, hi, sumsq_all]
            return torch.tensor(row, dtype=torch.float64)
        finite = x[torch.isfinite(x)]
        nonfinite = x.numel() - finite.numel()
        if finite.numel() == 0:
            return torch.tensor(
                [0, nonfinite, 0, 0, math.inf, -math.inf, sumsq_all], dtype=torch.float64
            )
        fd = finite.double()
        sumsq = float(fd.square().sum())
        if nonfinite == 0:
            sumsq_all = sumsq
        lo, hi = (float(v) for v in torch.aminmax(finite))
        row = [finite.numel(), nonfinite, float(fd.sum()), sumsq, lo, hi, sumsq_all]
        return torch.tensor(row, dtype=torch.float64)

    def row_device(self, x: torch.Tensor, full: bool) -> torch.Tensor:
        # No value may be read on the host here: everything stays a device tensor.
        acc = _acc_dtype(x.device)
        row = torch.zeros(_ROW, dtype=acc, device=x.device)
        row[_MIN] = math.inf
        row[_MAX] = -math.inf
        for c in x.split(_DEVICE_CHUNK):
            c = c.float()
            finite = torch.isfinite(c)
            n_finite = finite.sum()
            row[_N] += n_finite
            row[_NONFINITE] += c.numel() - n_finite
            row[_SUMSQ_ALL] += c.square().sum(dtype=acc)
            if full:
                cz = torch.where(finite, c, 0.0)
                row[_SUM] += cz.sum(dtype=acc)
                row[_SUMSQ] += cz.square().sum(dtype=acc)
                row[_MIN] = torch.minimum(row[_MIN], torch.where(finite, c, math.inf).amin())
                row[_MAX] = torch.maximum(row[_MAX], torch.where(finite, c, -math.inf).amax())
        return row

    def _scratch_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._scratch is None:
            index_dtype = torch.uint8 if self.bins <= 256 else torch.int16
            self._scratch = (
                torch.empty(_CPU_CHUNK, dtype=torch.float32),
                torch.empty(_CPU_CHUNK, dtype=index_dtype),
            )
        return self._scratch

    def bin_cpu(
        self, x: torch.Tensor, lo: float, hi: float, acc: torch.Tensor, dirty: bool
    ) -> None:
        """Adds the bin counts of the finite values of ``x`` to ``acc`` (int64, CPU).

        ``(x - lo) * scale`` is computed in cache-sized chunks into a float buffer,
        clamped to ``[0, bins - 1]``, truncated into a small-int buffer and counted with
        ``bincount``: three light passes over cache-resident data, several times faster
        than ``torch.histc`` on the CPU.
        """
        bins = self.bins
        if x.numel() == 0:
            return
        if x.dtype == torch.float64:
            x = x.float()
        if dirty:  # the group holds NaN/Inf somewhere: bin the finite values only
            x = x[torch.isfinite(x)]
        width = hi - lo
        scale = bins / width if width > 0 else 0.0
        top = bins - 1
        buf, ibuf = self._scratch_buffers()
        for start in range(0, x.numel(), _CPU_CHUNK):
            c = x[start : start + _CPU_CHUNK]
            b = buf[: c.numel()]
            if c.dtype == torch.float32:
                torch.sub(c, lo, out=b)
            else:
                b.copy_(c)
                b.sub_(lo)
            b.mul_(scale).clamp_(0, top)
            u = ibuf[: c.numel()]
            u.copy_(b)
            acc += torch.bincount(u, minlength=bins)

    def bin_device(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """Bin counts of the finite values of ``x`` with device-tensor bounds (no host sync).

        Values are mapped to ``[0, bins)`` with tensor arithmetic, non-finite ones to -1,
        then counted by ``torch.histc`` over the constant range ``[0, bins]``.
        """
        bins = self.bins
        acc = torch.zeros(bins, dtype=_acc_dtype(x.device), device=x.device)
        width = (hi - lo).float()
        scale = torch.where(width > 0, bins / width, torch.zeros_like(width))
        lo32 = lo.float()
        for c in x.split(_DEVICE_CHUNK):
            c = c.float()
            y = ((c - lo32) * scale).clamp_(0, bins - 0.5)
            y = torch.where(torch.isfinite(c), y, -1.0)
            acc += torch.histc(y, bins, 0, bins).to(acc.dtype)
        return acc


def _write_histogram(
    experiment: Any, tag: str, row: np.ndarray, bins: int, step: int, *, sampled: bool
) -> bool:
    """Writes one histogram from a host row ``[moments..., counts...]``; False if empty."""
    n = round(row[_N])
    lo, hi = float(row[_MIN]), float(row[_MAX])
    if n == 0 or not (math.isfinite(lo) and math.isfinite(hi)):
        return False  # no finite value: the nonfinite scalar says so
    counts = row[_ROW : _ROW + bins]
    counts = _round_counts(counts, n) if sampled else np.rint(counts)
    edges = lo + (hi - lo) * (np.arange(1, bins + 1) / bins)
    edges[-1] = hi
    experiment.add_histogram_raw(
        tag,
        min=lo,
        max=hi,
        num=n,
        sum=float(row[_SUM]),
        sum_squares=float(row[_SUMSQ]),
        bucket_limits=edges.tolist(),
        bucket_counts=counts.tolist(),
        global_step=step,
    )
    return True


def log_histograms(
    sink: MonitorSink,
    values: Mapping[str, torch.Tensor | np.ndarray],
    step: int,
    *,
    bins: int = 64,
) -> None:
    """Writes one histogram per tensor, binned on the tensor's device.

    Each tensor is binned exactly into ``bins`` equal bins between its minimum and
    maximum finite value; NaN/Inf are left out of the bins (and out of ``num``). All
    results reach the host in one transfer per device, never the tensors themselves.

    Args:
        sink: A ``RunWriter`` (or anything with ``experiment``).
        values: Tag -> tensor or array (any shape, real numbers).
        step: The global step.
        bins: Bins per histogram, 2 to 1024.

    Raises:
        TypeError: a value is not a real tensor/array (the message names its key).
        ValueError: a value is empty, or ``bins`` is out of range.

    Example:
        >>> import tempfile, torch
        >>> from tbx_lightning import RunWriter
        >>> with RunWriter(tempfile.mkdtemp()) as run:
        ...     log_histograms(run, {"acts/layer1": torch.randn(1000)}, step=0)
    """
    if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= 1024:
        raise LoggedValueError(f"Expected `bins` to be an int in [2, 1024], got {bins!r}.")
    flats: dict[str, torch.Tensor] = {}
    for key, value in values.items():
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in "biuf":
                raise LoggedTypeError(
                    f"Histogram {key!r} is an array of dtype {value.dtype}: log real numbers."
                )
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise LoggedTypeError(
                f"Histogram {key!r} has type {type(value).__name__}: log a tensor or array."
            )
        if value.is_complex():
            raise LoggedTypeError(
                f"Histogram {key!r} is a complex tensor: log its real part or abs."
            )
        if value.numel() == 0:
            raise LoggedValueError(f"Histogram {key!r} is empty: log a tensor with values.")
        flat = _flat(value)
        if not flat.is_floating_point():
            flat = flat.float()
        flats[key] = flat
    binner = _Binner(bins)
    rows: list[torch.Tensor] = []
    for flat in flats.values():
        row = binner.row(flat, full=True)
        if flat.device.type == "cpu":
            lo, hi = float(row[_MIN]), float(row[_MAX])
            counts = torch.zeros(bins, dtype=torch.int64)
            if math.isfinite(lo) and math.isfinite(hi):
                binner.bin_cpu(flat, lo, hi, counts, bool(row[_NONFINITE] > 0))
            rows.append(torch.cat([row, counts.to(row.dtype)]))
        else:
            counts_d = binner.bin_device(flat, row[_MIN], row[_MAX])
            rows.append(torch.cat([row, counts_d.to(row.dtype)]))
    host: list[np.ndarray] = [np.empty(0)] * len(rows)
    by_device: dict[torch.device, list[int]] = {}
    for i, row in enumerate(rows):
        by_device.setdefault(row.device, []).append(i)
    for members in by_device.values():
        block = torch.stack([rows[i] for i in members]).cpu().double().numpy()
        for j, i in enumerate(members):
            host[i] = block[j]
    experiment = sink.experiment
    for key, row_np in zip(flats, host, strict=True):
        _write_histogram(experiment, key, row_np, bins, step, sampled=False)
