"""The rules every route shares for logged values, steps and writer options, written once.

:class:`~tbx_lightning.RunWriter`, :class:`~tbx_lightning.run.Run` (and through it every
integration) and the projector check names, values, steps and writer options here, so
a value is accepted or refused the same way, with the same words, whichever way it came
in. This module imports nothing of the package but its errors, and not torch: the
event framing (read by the ``hparams`` table, which starts without torch) imports it; a
tensor is recognised by the torch module that made it.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from tbx_lightning.errors import ConfigError, ConfigTypeError, LoggedTypeError, LoggedValueError

__all__ = [
    "MAX_STEP",
    "MIN_STEP",
    "WRITER_OPTIONS",
    "as_number",
    "check_name",
    "check_names",
    "check_step",
    "check_utf8",
    "check_writer_options",
    "flatten_values",
    "is_scalar",
    "is_tensor",
]

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
        >>> check_step(np.int64(7))
        7
    """
    value = step
    if (is_tensor(value) and value.numel() == 1 and not value.is_floating_point()) or (
        isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "iu"
    ):
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


def is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor (without importing torch: whoever made one did)."""
    torch_ = sys.modules.get("torch")
    return torch_ is not None and isinstance(value, torch_.Tensor)


# ---------------------------------------------------------------------- values
def is_scalar(key: str, value: Any) -> bool:
    """True for values that become one scalar point; LoggedTypeError for tensors that cannot.

    Example:
        >>> is_scalar("lr", 3e-4), is_scalar("note", "hi")
        (True, False)
    """
    if is_tensor(value):
        if value.numel() != 1:
            raise LoggedTypeError(
                f"Value {key!r} is a tensor of shape {tuple(value.shape)}: log one-element tensors "
                "as scalars, or the whole tensor with `log_histograms({key: tensor})`."
            )
        if value.is_complex():
            raise LoggedTypeError(
                f"Value {key!r} is a complex tensor: log its real part or abs value."
            )
        return True
    if isinstance(value, bool | np.bool_ | numbers.Real):
        return True
    return isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "biuf"


def flatten_values(
    values: Mapping[Any, Any], *, prefix: str = ""
) -> tuple[dict[str, Any], dict[str, str]]:
    """Splits logged values into scalars and texts, nested dicts as ``a/b/c`` tags.

    Args:
        values: Name -> number, one-element tensor or array, str, or a dict of these.
        prefix: Put before every tag, joined with ``/`` (``""`` for none).

    Returns:
        ``(scalars, texts)``, each tag -> value.

    Raises:
        LoggedTypeError: a name that is not a str, or a value of another type; the
            message names the tag.
        LoggedValueError: an empty name, or two values landing on one tag.

    Example:
        >>> flatten_values({"val": {"acc": 0.5, "loss": {"ce": 1.0}}, "note": "hi"})
        ({'val/acc': 0.5, 'val/loss/ce': 1.0}, {'note': 'hi'})
    """
    if not isinstance(values, Mapping):
        raise LoggedTypeError(
            f"Logged values must be a dict of name -> value, got {type(values).__name__}: "
            "wrap the value in a dict, e.g. {'loss': value}."
        )
    if not prefix:
        # The training loop's usual call, a flat dict of Python numbers under names seen
        # before, skips the per-key checks: nothing nested can clash, the names passed.
        keys = tuple(values)
        if keys in _CHECKED and all(type(v) is float or type(v) is int for v in values.values()):
            return dict(values), {}
    scalars: dict[str, Any] = {}
    texts: dict[str, str] = {}
    _flatten_into(values, prefix, scalars, texts, set())
    if not prefix and not texts and len(scalars) == len(values):
        _remember(tuple(values))
    return scalars, texts


# Names of flat calls already checked (str, non-empty, valid UTF-8), bounded in size:
# one memo for every route and for RunWriter's own calls.
_CHECKED: set[tuple[Any, ...]] = set()
_MAX_CHECKED = 4096


def _remember(keys: tuple[Any, ...]) -> None:
    if len(_CHECKED) >= _MAX_CHECKED:
        _CHECKED.clear()
    _CHECKED.add(keys)


def check_names(keys: tuple[Any, ...]) -> None:
    """The names of one flat call, checked as :func:`check_name` does; remembered.

    Example:
        >>> check_names(("train/loss", "lr"))
        >>> check_names(("train/loss", ""))
        Traceback (most recent call last):
        ...
        tbx_lightning.errors.LoggedValueError: Logged names must not be empty: give the value a name.
    """
    if keys in _CHECKED:
        return
    for key in keys:
        check_name(key)
        check_utf8(key, key, "name")
    _remember(keys)


def _flatten_into(
    values: Mapping[Any, Any],
    prefix: str,
    scalars: dict[str, Any],
    texts: dict[str, str],
    seen: set[int],
) -> None:
    if id(values) in seen:
        raise LoggedValueError(
            f"Logged dict {prefix!r} contains itself: log a copy without the cycle."
        )
    seen = seen | {id(values)}
    for key, value in values.items():
        check_name(key, under=prefix)
        tag = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            _flatten_into(value, tag, scalars, texts, seen)
            continue
        if tag in scalars or tag in texts:
            raise LoggedValueError(
                f"Value {tag!r} is given twice in one call (a key containing '/' clashes with a "
                "nested dict): rename one of them."
            )
        check_utf8(tag, tag, "name")
        if isinstance(value, str):
            check_utf8(tag, value, "text")
            texts[tag] = value
        elif is_scalar(tag, value):
            scalars[tag] = value
        else:
            raise LoggedTypeError(_not_a_value(tag, value))


def check_utf8(tag: str, text: str, what: str = "name") -> None:
    """A LoggedValueError naming ``tag`` when ``text`` (its name or its text) is not valid UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise LoggedValueError(
            f"The {what} of value {tag!r} cannot be written as UTF-8 (it holds a lone surrogate "
            "character, as os.fsdecode or sys.argv can produce): pass a valid string, e.g. "
            "text.encode('utf-8', 'replace').decode()."
        ) from error


def check_name(key: Any, *, under: str = "") -> None:
    """A name of a logged value: a non-empty str that can be written as UTF-8.

    Args:
        key: The name given.
        under: The nested dict's tag it sits under, for the message.
    """
    if not isinstance(key, str):
        raise LoggedTypeError(
            f"Logged names must be str, got {type(key).__name__} {key!r}"
            + (f" under {under!r}" if under else "")
            + ": convert the key with str()."
        )
    if not key:
        raise LoggedValueError(
            "Logged names must not be empty"
            + (f" (an empty key under {under!r})" if under else "")
            + ": give the value a name."
        )


def as_number(key: str, value: Any) -> float:
    """A scalar that is not a tensor as a Python float; LoggedTypeError naming ``key`` otherwise.

    Example:
        >>> as_number("acc", True), as_number("loss", np.float32(0.5))
        (1.0, 0.5)
    """
    if isinstance(value, bool | np.bool_ | numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "biuf":
        return float(value.reshape(()))
    raise LoggedTypeError(_not_a_value(key, value))


def _not_a_value(tag: str, value: Any) -> str:
    return (
        f"Value {tag!r} has type {type(value).__name__}, which cannot be logged as a "
        "value: log numbers (int, float, bool, one-element tensors or arrays), str (as "
        "text) or dicts of these (as 'a/b' tags); use `log_images`, `log_histograms` or "
        "`log_embedding` for images, tensors and embeddings."
    )
