"""Every error tbx_lightning raises, under one base class, grouped by what the caller does.

Catch :class:`TBXError` for anything the package raises on purpose. Below it, one
class per thing a caller can do about it::

    TBXError
    ├── ConfigError            fix a config key, option or argument (ValueError)
    │   ├── ConfigTypeError        ... of the wrong type, or misspelled (TypeError)
    │   └── HParamsError           ... that cannot become hyperparameters
    ├── LoggedDataError        fix what you log
    │   ├── LoggedValueError       a name, value or step that cannot be written (ValueError)
    │   └── LoggedTypeError        ... of a type that cannot be written (TypeError)
    ├── UsageError             call it where it can work (RuntimeError)
    │   └── RunNotStartedError     a tracker used before its run started
    ├── RunWriterError         storage failed: free space, fix access, retry (RuntimeError)
    │   └── RunInUseError          another live process writes the run
    ├── GraphExportError       the model's graph could not be captured (RuntimeError)
    ├── TrainingAlertError     training went wrong: an alert with on_alert="raise"
    └── MissingDependencyError install an extra (ImportError)

Each class also derives from the built-in exception that fits it, so ``except
ValueError`` written against the stock loggers keeps working.

Example:
    >>> from tbx_lightning import ConfigError, HParamsError, TBXError
    >>> issubclass(HParamsError, ConfigError) and issubclass(HParamsError, ValueError)
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tbx_lightning.monitor._alerts import Alert

__all__ = [
    "ConfigError",
    "ConfigTypeError",
    "GraphExportError",
    "HParamsError",
    "LoggedDataError",
    "LoggedTypeError",
    "LoggedValueError",
    "MissingDependencyError",
    "RunInUseError",
    "RunNotStartedError",
    "RunWriterError",
    "TBXError",
    "TrainingAlertError",
    "UsageError",
]


class TBXError(Exception):
    """Base class of every error raised by tbx_lightning."""


# ---------------------------------------------------------------------- fix the config
class ConfigError(TBXError, ValueError):
    """A config key, override, option or argument is not valid.

    The message names it, says what is valid, and where it is set (the template's
    YAML key, the keyword argument). The ``tbx-lightning`` command prints it and
    exits with status 2.
    """


class ConfigTypeError(ConfigError, TypeError):
    """An option has the wrong type, or an unknown option name was passed (a typo)."""


class HParamsError(ConfigError):
    """A config cannot become hyperparameters; the message names the key path."""


# ---------------------------------------------------------------------- fix the data
class LoggedDataError(TBXError):
    """Something logged cannot be written as given; nothing of the call is written."""


class LoggedValueError(LoggedDataError, ValueError):
    """A logged name, value or step cannot be written as given.

    Raised for an empty name, two values that land on one tag
    (``{"val": {"acc": 1}, "val/acc": 2}``), a step outside int64 or an image
    whose shape does not fit its layout. The message names the key; nothing of
    the call is written.
    """


class LoggedTypeError(LoggedDataError, TypeError):
    """A logged name, value or step has a type that cannot be written.

    Raised for a value that is neither a number, a one-element tensor or array,
    a string nor a dict of these, and for a step that is not an int (``1.5``,
    ``"7"``, ``True``). The message names the key or the step.
    """


# ---------------------------------------------------------------------- fix the call
class UsageError(TBXError, RuntimeError):
    """A feature was called where it cannot work yet or at all (not set up, no such module).

    The message says what is missing and how to provide it, e.g. a callback used
    outside ``Trainer.fit`` or ``sharded=True`` without a process group.
    """


class RunNotStartedError(UsageError):
    """A tracker was used before its run was started (``init_trackers`` or ``start()``)."""


# ---------------------------------------------------------------------- storage
class RunWriterError(TBXError, RuntimeError):
    """Writing a run failed (full disk, vanished directory, lost credentials).

    Raised on the caller's next call after the background thread hit the error;
    the message names the path and what to do. What could not be written is kept
    and written by a later ``flush()``/``close()`` once the cause is fixed.
    """


class RunInUseError(RunWriterError):
    """Another live process holds the run directory (its lease file names the pid and host).

    Raised instead of letting two writers merge one run's HParams row and status: pick
    another ``version``, wait for that run to end, or remove the lease file named in the
    message if that process is gone.
    """


# ---------------------------------------------------------------------- features
class GraphExportError(TBXError, RuntimeError):
    """No capture method produced a graph of the model.

    The message names the model class, each method tried with its one-line
    error, and what to do about it.

    Args:
        model_class: Qualified class name of the model.
        attempts: ``(method, one-line error)`` for each method tried.
        hint: What to do about it, the message's last line.

    Example:
        >>> import torch
        >>> from tbx_lightning.graph import export_graph
        >>> class Gate(torch.nn.Module):
        ...     def forward(self, x):
        ...         return x if x.sum() > 0 else -x
        >>> try:
        ...     export_graph(Gate(), torch.ones(2), methods=("torch.export",))
        ... except GraphExportError as err:
        ...     print(err.attempts[0][0])
        torch.export
    """

    def __init__(self, model_class: str, attempts: tuple[tuple[str, str], ...], hint: str) -> None:
        lines = [f"Could not export a graph of {model_class}; every method failed:"]
        lines += [f"  - {method}: {error}" for method, error in attempts]
        lines.append(hint)
        super().__init__("\n".join(lines))
        self.model_class = model_class
        self.attempts = attempts


class TrainingAlertError(TBXError, RuntimeError):
    """Raised by a monitor with ``on_alert="raise"`` when an alert fires, on every rank.

    Args:
        alert: The alert that stopped training (kept as ``.alert``).
    """

    def __init__(self, alert: Alert) -> None:
        super().__init__(alert.message)
        self.alert = alert


# ---------------------------------------------------------------------- environment
class MissingDependencyError(TBXError, ImportError):
    """An optional dependency is not installed; the message gives the ``pip install`` line."""
