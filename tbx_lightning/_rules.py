"""The rules every route shares for steps and writer options, written once.

:class:`~tbx_lightning.RunWriter`, :class:`~tbx_lightning.run.Run` (and through it both
integrations) and the projector check steps and writer options here, so a value is
accepted or refused the same way, with the same words, whichever way it came in.
This module imports nothing of the package but its errors: the writer imports it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from tbx_lightning.errors import ConfigError, ConfigTypeError, LoggedTypeError, LoggedValueError

__all__ = ["MAX_STEP", "MIN_STEP", "WRITER_OPTIONS", "check_step", "check_writer_options"]

MIN_STEP, MAX_STEP = -(2**63), 2**63 - 1
"""An event's step is a signed 64-bit integer."""

WRITER_OPTIONS: frozenset[str] = frozenset(
    {
        "flush_secs",
        "max_queue",
        "max_queue_bytes",
        "segment_bytes",
        "purge_step",
        "filename_suffix",
        "upload_timeout",
    }
)
"""The keyword options of ``RunWriter`` (a test checks this against its signature)."""

_POSITIVE_INTS = ("max_queue", "max_queue_bytes", "segment_bytes")
_SECONDS = {
    # option -> (lowest value allowed, whether that value itself is allowed, what it does)
    "flush_secs": (0.0, False, "seconds between flushes"),
    "upload_timeout": (0.0, True, "seconds close() waits for a remote run's upload"),
}


def check_step(
    step: Any, *, name: str = "step", minimum: int = MIN_STEP, none_ok: bool = True
) -> int:
    """The step as an int: ints, NumPy integers and one-element integer tensors pass.

    Args:
        step: The value given.
        name: The argument's name, for the messages.
        minimum: The lowest step allowed (the projector's folders need ``0``).
        none_ok: Whether the caller takes ``None`` (the next step), for the message.

    Raises:
        LoggedTypeError: any other type (``1.5``, ``"7"``, ``True``, a float tensor).
        LoggedValueError: an int below ``minimum`` or beyond int64.

    Example:
        >>> check_step(torch.tensor(7))
        7
    """
    value = step
    if (
        isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point()
    ) or (isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iu"):
        value = value.item()
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise LoggedTypeError(
            f"`{name}` must be an int{' or None' if none_ok else ''}, got {type(step).__name__} "
            f"{step!r}: pass a whole "
            f"number, e.g. {name}=trainer.global_step."
        )
    value = int(value)
    if value < minimum:
        raise LoggedValueError(
            f"`{name}` must be >= {minimum}, got {value}: pass the training step it belongs "
            f"to, e.g. {name}=trainer.global_step."
        )
    if value > MAX_STEP:
        raise LoggedValueError(f"`{name}` must fit in a signed 64-bit integer, got {value}.")
    return value


def check_writer_options(
    options: Mapping[str, Any], *, owner: str, where: str = "{option}"
) -> dict[str, Any]:
    """Checks writer options before anything is opened; returns them as a dict.

    Args:
        options: Option name -> value, as the user passed them.
        owner: Who takes the options, for the messages (``"TBXLogger"``).
        where: Where the user sets them, with ``{option}`` for the name
            (``"logger.{option} in the config"``).

    Raises:
        ConfigTypeError: an unknown option name, or a value of the wrong type.
        ConfigError: a value out of range (``flush_secs`` <= 0, ``max_queue`` < 1).
    """
    unknown = sorted(set(options) - WRITER_OPTIONS)
    if unknown:
        raise ConfigTypeError(
            f"{owner} got unexpected keyword argument(s) {unknown}: writer options are "
            f"{sorted(WRITER_OPTIONS)}."
        )
    out = dict(options)
    for name, (low, inclusive, meaning) in _SECONDS.items():
        if name not in out:
            continue
        value = out[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigTypeError(
                f"`{name}` must be a number of seconds ({meaning}), got "
                f"{type(value).__name__} {value!r}: set {where.format(option=name)}."
            )
        seconds = float(value)
        ok = seconds >= low if inclusive else seconds > low
        if not ok or not math.isfinite(seconds):
            bound = f">= {low:g}" if inclusive else f"> {low:g}"
            raise ConfigError(
                f"Expected `{name}` {bound}, got {value!r} ({meaning}): set "
                f"{where.format(option=name)} to a finite number of seconds."
            )
    for name in _POSITIVE_INTS:
        if name not in out:
            continue
        value = out[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigTypeError(
                f"`{name}` must be an int, got {type(value).__name__} {value!r}: set "
                f"{where.format(option=name)}."
            )
        if int(value) < 1:
            raise ConfigError(
                f"Expected `{name}` >= 1, got {value!r}: set {where.format(option=name)}."
            )
    if out.get("purge_step") is not None:
        out["purge_step"] = check_step(out["purge_step"], name="purge_step")
    if "filename_suffix" in out and not isinstance(out["filename_suffix"], str):
        raise ConfigTypeError(
            f"`filename_suffix` must be a str, got {type(out['filename_suffix']).__name__}."
        )
    return out
