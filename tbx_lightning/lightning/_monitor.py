"""``TrainingMonitor``: the Lightning callback around :class:`tbx_lightning.monitor.ModelMonitor`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from tbx_lightning.errors import MissingDependencyError

try:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities.data import extract_batch_size
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "tbx_lightning.TrainingMonitor needs Lightning: pip install 'tbx-lightning[lightning]'"
    ) from error

from tbx_lightning.errors import ConfigError, UsageError
from tbx_lightning.monitor import AlertRules, ModelMonitor, MonitorSink

__all__ = ["TrainingMonitor"]

_log = logging.getLogger("tbx_lightning.alerts")


class TrainingMonitor(Callback):
    """Weight/gradient histograms, norms, update ratios, learning rates, throughput, memory.

    Routes Lightning's hooks to :class:`~tbx_lightning.monitor.ModelMonitor` and writes
    into the run of the trainer's ``TBXLogger``. Statistics of an optimizer step are
    logged at that step's ``trainer.global_step`` (counted before the step):

    - ``on_before_optimizer_step`` (gradients accumulated and unscaled, not yet
      clipped): histograms, norms, non-finite counts, frozen fractions, pre-clip norm;
    - the optimizer's step post-hook: post-clip total gradient norm, update/weight
      ratios, learning rate, momentum;
    - ``on_train_batch_end``: the loss for the alert detectors, samples (and tokens)
      per second, model FLOPs utilisation, peak device memory; with ``on_alert="stop"``,
      a checkpoint and a clean stop once an alert fired.

    Alerts are on by default (see :class:`~tbx_lightning.monitor.AlertRules`): they are
    written under the text tag ``alerts`` with the scalar ``alerts/count`` and logged
    once per kind and layer on the ``tbx_lightning.alerts`` logger. The FLOPs of a step
    are counted on the first training batch unless ``flops_per_step`` is given.

    Every rank computes (sharded statistics need all ranks in the ``all_reduce``);
    only global rank 0 writes. See :class:`~tbx_lightning.monitor.ModelMonitor` for the
    options, the tags and the sampled mode's error bound.

    Args:
        group_depth: Module-tree depth of the parameter groups.
        group_fn: Maps a parameter name to its group; overrides ``group_depth``.
        hist_every_n_steps: Histogram period in optimizer steps; 0 turns them off.
        norm_every_n_steps: Period of the scalar statistics; 0 turns them off.
        bins: Histogram bins, 2 to 1024.
        sample: ``None`` for exact histograms, or elements sampled per group.
        ratio_sample: Positions per group the update ratio compares; ``None`` for an
            exact ratio (a copy of every trainable weight on scalar steps).
        log_weights: Log weight histograms and norms.
        log_grads: Log gradient histograms and norms.
        log_update_ratio: Log the update/weight ratio.
        sharded: Whether parameters are sharded; ``None`` detects it.
        reset_peak_memory: Make each ``peak_memory_mb`` the peak of its window.
        batch_size_fn: Samples in a batch; default: Lightning's batch-size inference.
        tokens_fn: Tokens in a batch (e.g. ``lambda b: b["attention_mask"].sum()``);
            without it no ``tokens_per_sec`` is logged.
        seed: Seed of the sampling generator.
        trainable_only: Statistics of trainable parameters only; ``None`` turns it on
            when most elements are frozen (adapters, a frozen backbone).
        alerts: ``True`` (default rules), ``False``, or an ``AlertRules``.
        on_alert: ``"warn"`` (log only), ``"stop"`` (save a checkpoint and stop the
            fit cleanly), ``"raise"`` (raise ``TrainingAlertError``) or a callable
            receiving each :class:`~tbx_lightning.monitor.Alert`.
        flops_per_step: FLOPs of one optimizer step; ``None`` counts them once.
        peak_flops: The device's peak FLOP/s; ``None`` looks it up by device name.
        count_flops: Count the FLOPs of the first batch when ``flops_per_step`` is unset.
        stragglers: Under DDP/FSDP, share each rank's step time and alert on a rank that
            is consistently slower than the others.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from tbx_lightning import TBXLogger, TrainingMonitor
        >>> trainer = Trainer(
        ...     logger=TBXLogger("runs"),
        ...     callbacks=[TrainingMonitor(group_depth=2, hist_every_n_steps=100)],
        ... )  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        group_depth: int = 2,
        group_fn: Callable[[str], str] | None = None,
        hist_every_n_steps: int = 100,
        norm_every_n_steps: int = 10,
        bins: int = 64,
        sample: int | None = None,
        ratio_sample: int | None = 65536,
        log_weights: bool = True,
        log_grads: bool = True,
        log_update_ratio: bool = True,
        sharded: bool | None = None,
        reset_peak_memory: bool = True,
        batch_size_fn: Callable[[Any], int] | None = None,
        tokens_fn: Callable[[Any], Any] | None = None,
        seed: int = 0,
        trainable_only: bool | None = None,
        alerts: bool | AlertRules = True,
        on_alert: Any = "warn",
        flops_per_step: float | None = None,
        peak_flops: float | None = None,
        count_flops: bool = True,
        stragglers: bool = True,
    ) -> None:
        super().__init__()
        self._options: dict[str, Any] = {
            "group_depth": group_depth,
            "group_fn": group_fn,
            "hist_every_n_steps": hist_every_n_steps,
            "norm_every_n_steps": norm_every_n_steps,
            "bins": bins,
            "sample": sample,
            "ratio_sample": ratio_sample,
            "log_weights": log_weights,
            "log_grads": log_grads,
            "log_update_ratio": log_update_ratio,
            "sharded": sharded,
            "reset_peak_memory": reset_peak_memory,
            "seed": seed,
            "trainable_only": trainable_only,
            "alerts": alerts,
            "on_alert": on_alert,
            "flops_per_step": flops_per_step,
            "peak_flops": peak_flops,
            "count_flops": count_flops,
            "stragglers": stragglers,
        }
        # Validate now, on a throwaway module, so a bad option fails at construction.
        ModelMonitor(torch.nn.Linear(1, 1), None, **{**self._options, "sharded": False})
        self.batch_size_fn = batch_size_fn
        self.tokens_fn = tokens_fn
        self.monitor: ModelMonitor | None = None
        self.stop_checkpoint: str | None = None
        self._step = 0

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _find_sink(trainer: Trainer) -> MonitorSink | None:
        loggers = [lg for lg in trainer.loggers if hasattr(type(lg), "run_writer")]
        if not loggers:
            names = [type(lg).__name__ for lg in trainer.loggers] or ["no logger"]
            raise ConfigError(
                f"TrainingMonitor writes through a TBXLogger, but the trainer has "
                f"{', '.join(names)}: pass Trainer(logger=tbx_lightning.TBXLogger(...)) "
                "(it may be one of several loggers)."
            )
        if trainer.global_rank != 0:
            return None  # computes its share (sharded statistics), writes nothing
        sink: MonitorSink = getattr(loggers[0], "run_writer")  # noqa: B009 - Logger type lacks it
        return sink

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        sink = self._find_sink(trainer)
        self.monitor = ModelMonitor(pl_module, sink, **self._options)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        monitor = self._require()
        # Without clipping the post-clip norm equals the pre-clip one: do not measure it.
        monitor.measure_post_clip = bool(trainer.gradient_clip_val)
        several = len(trainer.optimizers) > 1
        for i, optimizer in enumerate(trainer.optimizers):
            monitor.attach(optimizer, name=f"optimizer_{i}" if several else None)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.monitor is not None and stage == "fit":
            self.monitor.stop_flop_count()
            self.monitor.detach()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        if self.monitor is not None:
            self.monitor.stop_flop_count()  # never leave the counting mode pushed

    # ------------------------------------------------------------------ hooks
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._require().start_flop_count()

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Any
    ) -> None:
        self._step = trainer.global_step
        self._require().after_backward(self._step)

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        monitor = self._require()
        samples = self.batch_size_fn(batch) if self.batch_size_fn else _batch_size(batch)
        tokens = None
        if self.tokens_fn is not None:
            value = self.tokens_fn(batch)
            tokens = float(value.item() if isinstance(value, torch.Tensor) else value)
        monitor.stop_flop_count()
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor | float):
            monitor.observe_loss(self._step, loss)
        monitor.log_throughput(self._step, samples=samples, tokens=tokens)
        monitor.log_memory(self._step)
        stop = monitor.should_stop
        if trainer.world_size > 1:
            # Alerts fire on rank 0, at the flush of a scalar step. Only then, and only
            # when an alert can stop the fit, do the ranks agree on it: one collective
            # per scalar step (per micro-batch of it under gradient accumulation) rather
            # than per batch. Every rank sees the same options and global step.
            can_stop = self._options["on_alert"] == "stop" and self._options["alerts"] is not False
            stop = (
                trainer.strategy.reduce_boolean_decision(stop, all=False)
                if can_stop and monitor.is_norm_step(self._step)
                else False
            )
        if stop and not trainer.should_stop:
            self._stop(trainer)

    def _stop(self, trainer: Trainer) -> None:
        """Saves a checkpoint, then asks the trainer to end the fit after this batch."""
        callback = trainer.checkpoint_callback
        directory = getattr(callback, "dirpath", None) or os.path.join(
            trainer.log_dir or trainer.default_root_dir, "checkpoints"
        )
        path = os.path.join(directory, f"alert-step={trainer.global_step}.ckpt")
        trainer.save_checkpoint(path)
        self.stop_checkpoint = path
        _log.warning("stopping the fit after an alert; checkpoint saved to %s", path)
        trainer.should_stop = True

    def _require(self) -> ModelMonitor:
        if self.monitor is None:
            raise UsageError(
                "TrainingMonitor was not set up: it works in Trainer.fit (its setup hook "
                "builds the monitor)."
            )
        return self.monitor


def _batch_size(batch: Any) -> int | None:
    try:
        return int(extract_batch_size(batch))
    except Exception:  # a batch without tensors: no samples/sec rather than a crash
        return None
