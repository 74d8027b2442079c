"""Model FLOPs utilisation: FLOPs of a step, the device's peak, and the ratio.

``MFU = flops_per_step / (step_time * peak_flops)``: the FLOPs the model needs for one
optimizer step (forward and backward, counted once by PyTorch's FLOP counter or given
by the user) over what the device could do in the measured step time at its dense
peak for the training dtype. Under data parallelism every rank counts its own batch
and uses its own device's peak, so the value is per device.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

__all__ = ["FlopCounter", "peak_flops"]

_log = logging.getLogger(__name__)

# Dense (no sparsity) peak FLOP/s by device-name fragment, per dtype family, from the
# vendors' data sheets. "tf32" is used for float32 when TF32 matmuls are allowed.
_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("A10G", {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12}),
    ("A10", {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12}),
    ("V100", {"fp16": 125e12, "fp32": 15.7e12}),
    ("T4", {"fp16": 65e12, "fp32": 8.1e12}),
    ("RTX 4090", {"bf16": 165e12, "fp16": 165e12, "tf32": 82.6e12, "fp32": 82.6e12}),
    ("MI300X", {"bf16": 1307e12, "fp16": 1307e12, "tf32": 654e12, "fp32": 163e12}),
)


def _dtype_family(dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16:
        return "bf16"
    if dtype == torch.float16:
        return "fp16"
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "fp32"


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The dense peak FLOP/s of ``device`` for ``dtype`` from the table, or ``None``.

    Example:
        >>> peak_flops(torch.device("cpu"), torch.float32) is None
        True
    """
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    family = _dtype_family(dtype)
    for fragment, peaks in _PEAKS:
        if fragment in name:
            return peaks.get(family) or peaks.get("fp16")
    return None


class FlopCounter:
    """Counts the FLOPs of one step with ``torch.utils.flop_counter.FlopCounterMode``.

    ``start()`` before the step's forward, ``stop()`` after its optimizer step; the
    count is then in :attr:`flops`. Failing to count (an op the counter cannot run
    under) leaves ``flops`` at ``None`` and logs why once.
    """

    def __init__(self) -> None:
        self.flops: float | None = None
        self._mode: Any = None

    @property
    def running(self) -> bool:
        """Whether a count is in progress."""
        return self._mode is not None

    def start(self) -> None:
        """Enters the counting mode on this thread."""
        if self._mode is not None:
            return
        try:
            from torch.utils.flop_counter import FlopCounterMode

            mode = FlopCounterMode(display=False)
            mode.__enter__()
        except Exception as error:  # pragma: no cover - depends on the torch build
            _log.info("FLOPs of a step cannot be counted (%s): no vitals/mfu.", error)
            return
        self._mode = mode

    def stop(self) -> float | None:
        """Leaves the counting mode; returns the FLOPs counted (``None`` if none)."""
        mode, self._mode = self._mode, None
        if mode is None:
            return self.flops
        mode.__exit__(None, None, None)
        total = float(mode.get_total_flops())
        self.flops = total if total > 0 else None
        return self.flops
