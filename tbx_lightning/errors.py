"""Every error tbx_lightning raises, under one base class.

Catch :class:`TBXError` for anything the package raises on purpose. Each subclass
also derives from the built-in exception that fits it (``ValueError`` for bad
values, ``TypeError`` for wrong types, ``RuntimeError`` for failures at run time),
so ``except ValueError`` written against the stock loggers keeps working.

Example:
    >>> from tbx_lightning import HParamsError, TBXError
    >>> issubclass(HParamsError, TBXError) and issubclass(HParamsError, ValueError)
    True
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tbx_lightning.monitor._alerts import Alert

__all__ = [
    "BuildError",
    "ConfigError",
    "ConfigTypeError",
    "GraphExportError",
    "HParamsError",
    "LoggedTypeError",
    "LoggedValueError",
    "MissingDependencyError",
    "RunInUseError",
    "RunNotStartedError",
    "RunWriterError",
    "TBXError",
    "TableError",
    "TrainingAlertError",
    "UsageError",
]


class TBXError(Exception):
    """Base class of every error raised by tbx_lightning."""


class RunWriterError(TBXError, RuntimeError):
    """Writing a run failed (full disk, vanished directory, lost credentials).

    Raised on the caller's next call after the background thread hit the error;
    the events that could not be written are kept in memory and retried on the
    next flush, so fixing the cause and calling ``flush()`` loses nothing.
    """


class HParamsError(TBXError, ValueError):
    """A config cannot become hyperparameters; the message names the key path."""


class GraphExportError(TBXError, RuntimeError):
    """No capture method produced a graph of the model.

    The message names the model class, each method tried with its one-line
    error, and what to do about it.

    Attributes:
        model_class: Qualified class name of the model.
        attempts: ``(method, one-line error)`` for each method tried.

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


class ConfigError(TBXError, ValueError):
    """A config, override or option is not valid; the message says which and what is valid."""


class BuildError(TBXError, ValueError):
    """A composed config could not be turned into objects (wrong argument, bad value)."""


class TableError(TBXError, ValueError):
    """The runs directory or an option of the ``hparams`` command is not usable."""


class ConfigTypeError(TBXError, TypeError):
    """An option has the wrong type, or an unknown option name was passed (a typo)."""


class LoggedValueError(TBXError, ValueError):
    """A logged name, value or step cannot be written as given.

    Raised for an empty name, two values that land on one tag
    (``{"val": {"acc": 1}, "val/acc": 2}``), a step outside int64 or an image
    whose shape does not fit its layout. The message names the key; nothing of
    the call is written.
    """


class LoggedTypeError(TBXError, TypeError):
    """A logged name, value or step has a type that cannot be written.

    Raised for a value that is neither a number, a one-element tensor or array,
    a string nor a dict of these, and for a step that is not an int (``1.5``,
    ``"7"``, ``True``). The message names the key or the step.
    """


class RunNotStartedError(TBXError, RuntimeError):
    """A tracker was used before its run was started (``init_trackers`` or ``start()``)."""


class TrainingAlertError(TBXError, RuntimeError):
    """Raised by a monitor with ``on_alert="raise"`` when an alert fires.

    Attributes:
        alert: The alert that stopped training.
    """

    def __init__(self, alert: Alert) -> None:
        super().__init__(alert.message)
        self.alert = alert


class UsageError(TBXError, RuntimeError):
    """A feature was called where it cannot work yet or at all (not set up, no such module).

    The message says what is missing and how to provide it, e.g. a callback used
    outside ``Trainer.fit`` or ``sharded=True`` without a process group.
    """


class MissingDependencyError(TBXError, ImportError):
    """An optional dependency is not installed; the message gives the ``pip install`` line."""


class RunInUseError(RunWriterError):
    """Another live process holds the run directory (its lease file names the pid and host).

    Raised instead of letting two writers merge one run's HParams row and status: pick
    another ``version``, wait for that run to end, or remove the lease file named in the
    message if that process is gone.
    """
