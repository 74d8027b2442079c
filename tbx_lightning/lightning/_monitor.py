"""``TrainingMonitor``: the Lightning callback around :class:`tbx_lightning.monitor.ModelMonitor`."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from tbx_lightning.errors import MissingDependencyError

try:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.utilities.data import extract_batch_size
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "tbx_lightning.TrainingMonitor needs Lightning: pip install 'tbx-lightning[lightning]'"
    ) from error

from tbx_lightning.errors import ConfigError, ConfigTypeError, UsageError
from tbx_lightning.monitor import ModelMonitor, MonitorOptions, MonitorSink
from tbx_lightning.monitor._options import resolve_options

__all__ = ["TrainingMonitor"]

_log = logging.getLogger("tbx_lightning.alerts")


class TrainingMonitor(Callback):
    """Weight/gradient histograms, norms, update ratios, learning rates, throughput, alerts.

    Routes Lightning's hooks to :class:`~tbx_lightning.monitor.ModelMonitor` and writes
    into the run of the trainer's ``TBXLogger`` (following it when ``fit(ckpt_path=...)``
    moves it to the checkpoint's run). Statistics of an optimizer step are logged at
    that step's ``trainer.global_step`` (counted before the step), which is the step
    Lightning logs the step's metrics at:

    - ``on_before_optimizer_step`` (gradients accumulated and unscaled, not yet
      clipped): histograms, norms, non-finite counts, the pre-clip norm; with
      ``skip_nonfinite_steps`` (on with ``on_alert="stop"``/``"raise"``) the check for
      NaN/Inf that skips the update before it harms the weights;
    - the optimizer's step post-hook: post-clip total gradient norm, update/weight
      ratios, learning rate, momentum, then the alert checks;
    - ``on_train_batch_end``: the loss for the detectors, samples (and tokens) per
      second, model FLOPs utilisation, peak device memory; with ``on_alert="stop"``, a
      checkpoint (of the last finite weights) and a clean stop once an alert fired.

    The monitor is built when training starts, after Lightning restored a checkpoint
    and the strategy wrapped the model, so FSDP (Lightning's strategy, FSDP2,
    ``ModelParallelStrategy``) is seen and statistics are summed over the shards.
    A LightningModule whose parameters all live in one Hugging Face model (or PEFT
    model) is watched through that model, so layers have the names they have in it
    (``model.layers.0.self_attn.q_proj``), as on the other routes.

    Every rank computes what sharded statistics need and agrees on a stop; only global
    rank 0 writes. An alert that stops (or raises in) the fit marks the run failed with
    the alert as the reason.

    Args:
        options: A :class:`~tbx_lightning.monitor.MonitorOptions` (or a dict of its
            fields); ``None`` for the defaults.
        batch_size_fn: Samples in a batch; default: Lightning's batch-size inference.
        tokens_fn: Tokens in a batch (e.g. ``lambda b: b["attention_mask"].sum()``);
            without it no ``tokens_per_sec`` is logged and ``by_tokens`` has no axis.
        **fields: Any field of :class:`~tbx_lightning.monitor.MonitorOptions` by name
            (``group_depth=3``, ``on_alert="stop"``), applied over ``options``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from tbx_lightning import TBXLogger, TrainingMonitor
        >>> monitor = TrainingMonitor(group_depth=2, hist_every_n_steps=100, on_alert="stop")
        >>> monitor.options.skip_nonfinite_steps_on
        True
        >>> trainer = Trainer(logger=TBXLogger("runs"), callbacks=[monitor])  # doctest: +SKIP
    """

    def __init__(
        self,
        options: MonitorOptions | Mapping[str, Any] | None = None,
        *,
        batch_size_fn: Callable[[Any], int] | None = None,
        tokens_fn: Callable[[Any], Any] | None = None,
        **fields: Any,
    ) -> None:
        super().__init__()
        self.options = resolve_options(options, fields, owner="TrainingMonitor")
        for key, fn in (("batch_size_fn", batch_size_fn), ("tokens_fn", tokens_fn)):
            if fn is not None and not callable(fn):
                raise ConfigTypeError(
                    f"`{key}` of TrainingMonitor must be a callable taking a batch, got "
                    f"{type(fn).__name__}."
                )
        self.batch_size_fn = batch_size_fn
        self.tokens_fn = tokens_fn
        self.monitor: ModelMonitor | None = None
        self.stop_checkpoint: str | None = None
        self._step = 0

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _find_sink(trainer: Trainer) -> MonitorSink | None:
        loggers = [lg for lg in trainer.loggers if hasattr(type(lg), "monitor_sink")]
        if not loggers:
            names = [type(lg).__name__ for lg in trainer.loggers] or ["no logger"]
            raise ConfigError(
                f"TrainingMonitor writes through a TBXLogger, but the trainer has "
                f"{', '.join(names)}: pass Trainer(logger=tbx_lightning.TBXLogger(...)) "
                "(it may be one of several loggers)."
            )
        if trainer.global_rank != 0:
            return None  # computes its share (sharded statistics), writes nothing
        sink: MonitorSink = getattr(loggers[0], "monitor_sink")  # noqa: B009 - Logger type lacks it
        return sink

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            self._find_sink(trainer)  # a missing TBXLogger fails before any training

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Built here, not in setup: the strategy has wrapped the model (FSDP shards it
        # after setup) and a resumed fit has moved the logger to the checkpoint's run.
        sharded = self.options.sharded
        if sharded is None:
            sharded = _strategy_shards(trainer)
        self.monitor = ModelMonitor(
            _watched(pl_module), self._find_sink(trainer), self.options, sharded=sharded
        )
        monitor = self.monitor
        # fp16 mixed precision: the scaler's skipped steps are expected, not alerts.
        monitor.grad_scaler = getattr(trainer.precision_plugin, "scaler", None)
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
        # The optimizer step this batch contributes to: Lightning logs the batch's
        # metrics at this step too.
        self._step = trainer.global_step
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
        # Agreed on every rank by the monitor: a stop never leaves a rank behind.
        if monitor.should_stop and not trainer.should_stop:
            self._stop(trainer)

    def _stop(self, trainer: Trainer) -> None:
        """Saves a checkpoint, then asks the trainer to end the fit after this batch.

        The update that would have made the weights non-finite was skipped
        (``skip_nonfinite_steps``), so this checkpoint, and a ``last.ckpt`` that
        ``ModelCheckpoint`` writes at the stop, hold the last finite weights.
        """
        callback = trainer.checkpoint_callback
        directory = getattr(callback, "dirpath", None) or os.path.join(
            trainer.log_dir or trainer.default_root_dir, "checkpoints"
        )
        path = os.path.join(directory, f"alert-step={trainer.global_step}.ckpt")
        trainer.save_checkpoint(path)
        self.stop_checkpoint = path
        if trainer.global_rank == 0:
            _log.warning("stopping the fit after an alert; checkpoint saved to %s", path)
        trainer.should_stop = True

    def _require(self) -> ModelMonitor:
        if self.monitor is None:
            raise UsageError(
                "TrainingMonitor was not set up: it works in Trainer.fit (its on_train_start "
                "hook builds the monitor)."
            )
        return self.monitor


def _watched(pl_module: LightningModule) -> nn.Module:
    """The module whose parameter names the monitor uses.

    A LightningModule that only holds a Hugging Face model (``self.model =
    AutoModelForCausalLM...``, or a PEFT model) is watched through it, so layer names
    are the model's own, as when the model is given to the monitor directly.
    """
    holders = [
        (name, child)
        for name, child in pl_module.named_children()
        if any(True for _ in child.parameters())
    ]
    if len(holders) != 1 or any(True for _ in pl_module.parameters(recurse=False)):
        return pl_module
    child = holders[0][1]
    is_hf = hasattr(child, "config") and (
        hasattr(child, "base_model_prefix") or type(child).__name__.startswith("Peft")
    )
    return child if is_hf else pl_module


def _strategy_shards(trainer: Trainer) -> bool | None:
    """True for strategies that shard parameters; None (detect) for the others.

    DeepSpeed counts only at ZeRO stage 3: stages 1 and 2 keep every weight on every
    rank, where summing over ranks would count each value once per rank.
    """
    strategy = trainer.strategy
    if trainer.world_size > 1 and (
        any(kind in type(strategy).__name__ for kind in ("FSDP", "ModelParallel"))
        or getattr(strategy, "zero_stage_3", False)
    ):
        return True
    return None


def _batch_size(batch: Any) -> int | None:
    try:
        return int(extract_batch_size(batch))
    except Exception:  # a batch without tensors: no samples/sec rather than a crash
        return None
