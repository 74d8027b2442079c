"""What a training run prints while it trains: the same lines for both runners.

On a terminal the run shows a live bar (Lightning's own; a ``tqdm`` bar for the
Accelerate loop). When stdout is a file, a pipe or a CI log, a bar would write
every redraw into it, so both runners print one line per epoch instead, plus one
line inside an epoch when the last line is more than ``every_s`` seconds old::

    epoch 1/10  step 23  val/acc=0.3315  val/loss=2.161  train/acc=0.2086  train/loss=2.262  0.9 s
    epoch 2/10  40%  step 32  train/loss=1.912  31.2 s

The metrics on an epoch line are the epoch-level ones (``val/*``, then the
``train/*_epoch`` means) by their tag names, as the run's closing summary shows them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator, Mapping
from typing import IO, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar
from tqdm.auto import tqdm

from tbx_lightning.templates.metrics import epoch_metrics

__all__ = [
    "LineProgress",
    "LoopProgress",
    "epoch_line",
    "is_terminal",
    "progress_callbacks",
    "quiet_host_messages",
]

_EVERY_S = 30.0
# Lightning's own info lines that say nothing about this run: advertisements and
# "no such hardware" notes. Everything else it logs (warnings, "fit stopped") stays.
_HOST_NOISE = (
    "💡 Tip:",
    "GPU available: False",
    "TPU available: False",
    "HPU available: False",
)


def is_terminal(stream: IO[str] | None = None) -> bool:
    """Whether ``stream`` (default: stdout) is an interactive terminal."""
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


def epoch_line(
    epoch: int,
    max_epochs: int | None,
    step: int,
    metrics: Mapping[str, Any],
    seconds: float,
    fraction: float | None = None,
) -> str:
    """One progress line: epoch (1-based), share of the epoch, step, metrics, elapsed time.

    Example:
        >>> epoch_line(0, 10, 23, {"val/loss": 1.0374, "train/acc": 0.6851}, 0.94)
        'epoch 1/10  step 23  val/loss=1.037  train/acc=0.6851  0.9 s'
    """
    parts = [f"epoch {epoch + 1}/{max_epochs}" if max_epochs else f"epoch {epoch + 1}"]
    if fraction is not None:
        parts.append(f"{100 * fraction:.0f}%")
    parts.append(f"step {step}")
    parts += [f"{key}={value:.4g}" for key, value in metrics.items()]
    parts.append(f"{seconds:.1f} s")
    return "  ".join(parts)


def _step_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The per-step loss for an inside-the-epoch line."""
    value = metrics.get("train/loss")
    return {} if value is None else {"train/loss": float(value)}


class _Lines:
    """When to print: every epoch end, and inside an epoch after ``every_s`` of silence."""

    def __init__(self, every_s: float, stream: IO[str] | None) -> None:
        self.every_s = every_s
        self.stream = stream
        self.started = time.monotonic()
        self.last = self.started

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every_s

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def write(self, line: str) -> None:
        self.last = time.monotonic()
        print(line, file=self.stream or sys.stdout, flush=True)


class LineProgress(ProgressBar):
    """Lightning progress as plain lines (see the module docstring), for redirected output.

    Args:
        every_s: Print a line inside an epoch when the last line is older than this.
        stream: Where to write (default: stdout at the time of writing).

    Example:
        >>> bar = LineProgress()
        >>> # Trainer(callbacks=[bar]) prints one line per epoch
    """

    def __init__(self, every_s: float = _EVERY_S, stream: IO[str] | None = None) -> None:
        super().__init__()
        self._enabled = True
        self._lines = _Lines(every_s, stream)

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._lines = _Lines(self._lines.every_s, self._lines.stream)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._enabled or not self._lines.due():
            return
        total = self.total_train_batches
        fraction = (batch_idx + 1) / total if isinstance(total, int) and total > 0 else None
        self._lines.write(
            epoch_line(
                trainer.current_epoch,
                trainer.max_epochs,
                trainer.global_step,
                _step_metrics(trainer.callback_metrics),
                self._lines.elapsed(),
                fraction,
            )
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return
        self._lines.write(
            epoch_line(
                trainer.current_epoch,
                trainer.max_epochs,
                trainer.global_step,
                epoch_metrics(trainer.callback_metrics),
                self._lines.elapsed(),
            )
        )


class LoopProgress:
    """Progress of the Accelerate loop: a ``tqdm`` bar on a terminal, else lines.

    Args:
        max_epochs: Epochs the loop runs.
        batches: Training batches per epoch, if known.
        enabled: ``False`` prints nothing (``trainer.enable_progress_bar=false``).
        live: Draw a live bar; default: when stdout is a terminal.
        every_s: As for :class:`LineProgress`.
        stream: Where to write (default: stdout at the time of writing).

    Example:
        >>> progress = LoopProgress(max_epochs=1, batches=2, live=False)
        >>> progress.epoch_end(0, 2, {"val/loss": 0.5})  # doctest: +ELLIPSIS
        epoch 1/1  step 2  val/loss=0.5  ... s
        >>> progress.close()
    """

    def __init__(
        self,
        max_epochs: int,
        batches: int | None,
        *,
        enabled: bool = True,
        live: bool | None = None,
        every_s: float = _EVERY_S,
        stream: IO[str] | None = None,
    ) -> None:
        self.max_epochs = max_epochs
        self.batches = batches
        self.enabled = enabled
        self.live = is_terminal(stream) if live is None else live
        self._lines = _Lines(every_s, stream)
        self._bar: Any = None

    def _open_bar(self, epoch: int) -> Any:
        return tqdm(
            total=self.batches,
            desc=f"Epoch {epoch + 1}/{self.max_epochs}",
            file=self._lines.stream or sys.stdout,
            dynamic_ncols=True,
            leave=True,
        )

    def batch_end(self, epoch: int, index: int, step: int, metrics: Mapping[str, Any]) -> None:
        """After training batch ``index`` (0-based) of ``epoch``; ``step`` batches done so far."""
        if not self.enabled:
            return
        if self.live:
            if self._bar is None:
                self._bar = self._open_bar(epoch)
            self._bar.set_postfix(_step_metrics(metrics), refresh=False)
            self._bar.update(1)
            return
        if self._lines.due():
            fraction = (index + 1) / self.batches if self.batches else None
            metrics_now = _step_metrics(metrics)
            line = epoch_line(
                epoch, self.max_epochs, step, metrics_now, self._lines.elapsed(), fraction
            )
            self._lines.write(line)

    def epoch_end(self, epoch: int, step: int, metrics: Mapping[str, Any]) -> None:
        """After ``epoch``'s validation, with the epoch-level metrics logged so far."""
        if not self.enabled:
            return
        shown = epoch_metrics(metrics)
        if self.live:
            if self._bar is None:
                self._bar = self._open_bar(epoch)
            self._bar.set_postfix(shown, refresh=True)
            self._bar.close()
            self._bar = None
            return
        self._lines.write(epoch_line(epoch, self.max_epochs, step, shown, self._lines.elapsed()))

    def close(self) -> None:
        """Closes a bar left open by an epoch that did not finish."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class _DropHostNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(_HOST_NOISE)


_HOST_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


@contextlib.contextmanager
def quiet_host_messages() -> Iterator[None]:
    """Drops Lightning's advertisements and "no GPU/TPU/HPU" notes for the block.

    Warnings and every other message Lightning logs still reach the terminal.
    """
    drop = _DropHostNoise()
    loggers = [logging.getLogger(name) for name in _HOST_LOGGERS]
    for each in loggers:
        each.addFilter(drop)
    try:
        yield
    finally:
        for each in loggers:
            each.removeFilter(drop)


def progress_callbacks(trainer_cfg: Mapping[str, Any], callbacks: list[Any]) -> list[Any]:
    """``[LineProgress()]`` for a Trainer whose bar would write into redirected output.

    Nothing when stdout is a terminal (Lightning's live bar stays), when the trainer
    config turns progress off, or when the callbacks already hold a progress bar.
    """
    if not trainer_cfg.get("enable_progress_bar", True) or is_terminal():
        return []
    if any(isinstance(callback, ProgressBar) for callback in callbacks):
        return []
    return [LineProgress()]
