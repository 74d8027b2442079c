"""How fast training goes: samples and tokens per second, MFU, peak memory, stragglers.

Rates are averages over the wall time between two written values, which stays right
with asynchronous devices. Under ``torch.distributed`` each rank's own step time (the
wait for other ranks at the end of backward left out) is shared with one asynchronous
``all_reduce`` per scalar step, together with the count of non-finite losses each rank
saw, so a straggler or a NaN on one rank alone is found on the rank that writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from tbx_lightning.monitor import _efficiency
from tbx_lightning.monitor._binning import _local
from tbx_lightning.monitor._groups import GroupedParam
from tbx_lightning.monitor._ranks import collective_device

__all__ = ["Pace"]

_log = logging.getLogger("tbx_lightning.monitor")


class Pace:
    """Throughput, MFU and memory of one rank, and the step-time share across ranks.

    Args:
        params: The monitor's parameters (for the device, the dtype and backward hooks).
        flops_per_step: FLOPs of one optimizer step, or ``None`` (count or skip MFU).
        peak_flops: The device's peak FLOP/s, or ``None`` (look it up).
        count_flops: Count the FLOPs of the first batch when ``flops_per_step`` is unset.
        reset_peak_memory: Reset the device's peak counter after each value.
        shares: Whether step times are shared across ranks (alerts on, stragglers on,
            ``torch.distributed`` with more than one rank); called when first needed.
        process_group: The group to share over.
    """

    def __init__(
        self,
        params: list[GroupedParam],
        *,
        flops_per_step: float | None,
        peak_flops: float | None,
        count_flops: bool,
        reset_peak_memory: bool,
        shares: Callable[[], bool],
        process_group: Any = None,
    ) -> None:
        self._params = params
        self.flops_per_step = flops_per_step
        self.peak_flops = peak_flops
        self.count_flops = count_flops
        self.reset_peak_memory = reset_peak_memory
        self._shares = shares
        self.process_group = process_group
        self._flops = _efficiency.FlopCounter()
        self._flops_tried = False
        self._mfu_note = False
        self._start: float | None = None
        self._samples = 0.0
        self._tokens = 0.0
        self._steps = 0
        self._last_step: int | None = None
        self._wait = 0.0
        self._grad_hooks: list[Any] = []
        self._grad_mark: float | None = None
        # Non-finite losses this rank saw since the last share, counted on the device.
        self._bad_losses: torch.Tensor | None = None
        # The share in flight: (step, work handle, tensor [world, 2]).
        self.share: tuple[int, Any, torch.Tensor] | None = None
        self.tokens_seen = 0.0
        self.samples_seen = 0.0

    # ------------------------------------------------------------------ FLOPs
    def start_flop_count(self) -> None:
        """Starts counting the FLOPs of this step (only while no count is known)."""
        if self.flops_per_step is None and self.count_flops and not self._flops.running:
            if self._flops_tried:
                return
            self._flops_tried = True
            self._flops.start()

    def stop_flop_count(self) -> None:
        """Ends the count started by :meth:`start_flop_count`; sets :attr:`flops_per_step`."""
        if self._flops.running:
            self.flops_per_step = self._flops.stop()

    # ------------------------------------------------------------------ devices
    def device(self) -> torch.device:
        """The device of the first parameter (the CPU for a model without any)."""
        for p in self._params:
            return _local(p.param).device
        return torch.device("cpu")

    def mfu(self, step_time: float) -> float | None:
        """Model FLOPs utilisation of a step of ``step_time`` seconds, where known."""
        flops = self.flops_per_step
        if flops is None:
            return None
        peak = self.peak_flops
        if peak is None:
            param = next((p.param for p in self._params if p.param.requires_grad), None)
            dtype = param.dtype if param is not None else torch.float32
            peak = _efficiency.peak_flops(self.device(), dtype)
        if peak is None:
            if not self._mfu_note:
                self._mfu_note = True
                _log.info(
                    "vitals/mfu is not written: the peak FLOP/s of device %s is not known; "
                    "pass peak_flops=... to the monitor.",
                    self.device(),
                )
            return None
        return flops / (step_time * peak)

    def memory(self) -> float | None:
        """Peak device memory in MiB since the last call, where the device reports it."""
        device = self.device()
        backend = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None)}.get(device.type)
        if backend is None or not hasattr(backend, "max_memory_allocated"):
            return None
        peak = backend.max_memory_allocated(device) / 2**20
        if self.reset_peak_memory and hasattr(backend, "reset_peak_memory_stats"):
            backend.reset_peak_memory_stats(device)
        return float(peak)

    # ------------------------------------------------------------------ throughput
    def backward_done(self) -> None:
        """Called when gradients are complete: the time since this rank's last gradient
        was a wait for the other ranks, not its own step time."""
        if self._grad_mark is not None:
            self._wait += time.perf_counter() - self._grad_mark
            self._grad_mark = None

    def count_loss(self, finite: torch.Tensor) -> None:
        """Counts a non-finite loss of this rank (``finite``: a bool tensor), without a sync."""
        if not self._shares():
            return
        bad = (~finite).to(torch.float64) if finite.device.type != "mps" else (~finite).float()
        self._bad_losses = bad if self._bad_losses is None else self._bad_losses + bad

    def throughput(
        self, step: int, samples: float | None, tokens: float | None, due: bool
    ) -> dict[str, float]:
        """Counts a step; on a due step, returns the rates since the last written value."""
        now = time.perf_counter()
        self.samples_seen += samples or 0
        self.tokens_seen += tokens or 0
        if self._start is None:
            self._start = now
            self._last_step = step
            self._watch_backward()
            return {}
        self._samples += samples or 0
        self._tokens += tokens or 0
        self._steps += 1
        if not due or step == self._last_step:
            return {}
        elapsed = now - self._start
        steps = self._steps
        scalars: dict[str, float] = {}
        if elapsed > 0 and steps > 0:
            step_time = elapsed / steps
            if samples is not None:
                scalars["vitals/samples_per_sec"] = self._samples / elapsed
            if tokens is not None:
                scalars["vitals/tokens_per_sec"] = self._tokens / elapsed
            if samples is None and tokens is None:
                scalars["vitals/step_time_ms"] = step_time * 1e3
            mfu = self.mfu(step_time)
            if mfu is not None:
                scalars["vitals/mfu"] = mfu
            self._share_step_time(step, max(elapsed - self._wait, 0.0) / steps)
        self._start, self._samples, self._tokens, self._steps = now, 0.0, 0.0, 0
        self._wait = 0.0
        self._last_step = step
        return scalars

    def _watch_backward(self) -> None:
        """Marks the end of this rank's own backward work, to leave out waits for others.

        Under DDP every rank leaves backward when the slowest one's gradients are reduced,
        so wall-clock step times are equal; the time from the last gradient accumulated
        here to the end of backward is the wait, subtracted from the shared step time.
        """
        if self._grad_hooks or not self._shares():
            return
        for p in self._params:
            if p.param.requires_grad:
                self._grad_hooks.append(p.param.register_post_accumulate_grad_hook(self._mark))

    def _mark(self, param: torch.Tensor) -> None:
        self._grad_mark = time.perf_counter()

    def _share_step_time(self, step: int, step_time: float) -> None:
        """Each rank's step time and non-finite losses into one sum over ranks."""
        if not self._shares():
            return
        dist = torch.distributed
        world = dist.get_world_size(self.process_group)
        device = collective_device(self.process_group, self.device())
        shared = torch.zeros(world, 2, dtype=torch.float64, device=device)
        rank = dist.get_rank(self.process_group)
        shared[rank, 0] = step_time
        if self._bad_losses is not None:
            shared[rank, 1] = self._bad_losses.to(device=device, dtype=torch.float64)
            self._bad_losses = None
        work = dist.all_reduce(shared, group=self.process_group, async_op=True)
        self.share = (step, work, shared)

    def take_share(self) -> tuple[int, Any, torch.Tensor] | None:
        """The share in flight, handed over once (the caller waits on it)."""
        share, self.share = self.share, None
        return share

    def remove_hooks(self) -> None:
        """Removes the backward hooks installed for straggler timing."""
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks.clear()
