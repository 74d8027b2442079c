"""Builds what a composed config describes and trains it with Lightning's Trainer.

Order matters for the promise that a bad config writes nothing: data, model,
callbacks and trainer are built first; the logger (which creates the run directory)
comes last, then receives the whole config as its hyperparameters.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tbx_lightning.errors import ConfigError
from tbx_lightning.templates import progress

__all__ = [
    "CONFIG_KEY",
    "RunResult",
    "absolute",
    "build_callbacks",
    "build_loggers",
    "cpu_threads",
    "experiment_dir_of",
    "hyperparameters",
    "instantiate_node",
    "run",
]

CONFIG_KEY = "tbx_lightning_config"


@dataclass
class RunResult:
    """What one training run left behind.

    Attributes:
        log_dir: The run directory (events, config.yaml, hparams.yaml, checkpoints).
        experiment_dir: Its parent, the directory to point TensorBoard at.
        status: ``success``, ``failed`` or ``aborted``.
        seconds: Wall-clock duration of the run.
        metrics: The last value of each epoch-level metric.
        checkpoint: The last checkpoint written, if any.
        error: The exception that ended a failed run.
    """

    log_dir: str
    experiment_dir: str
    status: str
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: str | None = None
    error: BaseException | None = None


def instantiate_node(cfg: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` of ``cfg.<key>``; failures become a :class:`ConfigError`."""
    node = OmegaConf.select(cfg, key)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__ or error
        message = str(error).split("\nfull_key:")[0]
        raise ConfigError(f"Cannot build `{key}` from the config: {message}") from cause
    except (TypeError, ValueError) as error:
        raise ConfigError(f"Cannot build `{key}` from the config: {error}") from error


def build_callbacks(cfg: DictConfig) -> list[Any]:
    """One callback per entry of ``cfg.callbacks`` that has a ``_target_``."""
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if isinstance(node, DictConfig) and "_target_" in node:
            callbacks.append(instantiate_node(cfg, f"callbacks.{name}"))
    return callbacks


def build_loggers(cfg: DictConfig) -> list[Any]:
    """One logger per entry of ``cfg.logger`` that has a ``_target_``."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if isinstance(node, DictConfig) and "_target_" in node:
            loggers.append(instantiate_node(cfg, f"logger.{name}"))
    return loggers


def absolute(path: str) -> str:
    """A local path made absolute (so printed commands work from anywhere); URLs unchanged."""
    return path if "://" in path else os.path.abspath(path)


def experiment_dir_of(cfg: DictConfig) -> str:
    """Where the config's first logger puts its runs: ``save_dir/name``, absolute."""
    for node in (cfg.get("logger") or {}).values():
        if isinstance(node, DictConfig) and "save_dir" in node:
            return os.path.abspath(os.path.join(str(node.save_dir), str(node.get("name") or "")))
    return os.path.abspath(str(cfg.paths.runs_dir))


def hyperparameters(cfg: DictConfig) -> DictConfig:
    """The resolved config, as the run's HParams row and config.yaml."""
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if not isinstance(resolved, DictConfig):
        raise ConfigError("The config's top level must be a mapping.")
    return resolved


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return out


@contextlib.contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """Sets torch's intra-op thread count for a block, then restores it (``None``: no change)."""
    if count is None:
        yield
        return
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"Expected num_threads to be null or an int >= 1, got {count!r}.")
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(cfg: DictConfig) -> RunResult:
    """Trains the composed config with Lightning; a training error gives a failed result.

    Raises:
        ConfigError: A part of the config cannot be built; nothing has been written.
    """
    with cpu_threads(cfg.get("num_threads")):
        return _run(cfg)


def _run(cfg: DictConfig) -> RunResult:
    container = OmegaConf.to_container(cfg, resolve=True)

    class _ConfigInCheckpoint(pl.Callback):
        """Stores the composed config in every checkpoint, so it rebuilds its own network."""

        def on_save_checkpoint(
            self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
        ) -> None:
            checkpoint[CONFIG_KEY] = container

    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = instantiate_node(cfg, "data")
    model = instantiate_node(cfg, "model")
    callbacks = [*build_callbacks(cfg), _ConfigInCheckpoint()]
    # Progress as lines when stdout is redirected; Lightning's no-GPU notes and tips dropped.
    callbacks += progress.progress_callbacks(cfg.trainer, callbacks)
    with progress.quiet_host_messages():
        trainer = instantiate_node(cfg, "trainer", callbacks=callbacks, logger=False)
    loggers = build_loggers(cfg)
    if not loggers:
        raise ConfigError("The config has no logger: add `- logger: tbx` to the defaults.")
    trainer.loggers = loggers
    logger = loggers[0]
    logger.log_hyperparams(hyperparameters(cfg))

    started = time.time()
    error: BaseException | None = None
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except Exception as exc:  # recorded as a failed run; the caller decides what to do
        error = exc
    status = "failed" if error is not None else ("aborted" if trainer.interrupted else "success")
    if error is not None or trainer.interrupted:
        for each in loggers:
            each.finalize(status)
    for each in loggers:
        if hasattr(each, "close"):
            each.close()
    checkpoint = None
    for callback in trainer.checkpoint_callbacks:
        checkpoint = getattr(callback, "last_model_path", None) or getattr(
            callback, "best_model_path", None
        )
    log_dir = absolute(str(logger.log_dir))
    experiment_dir = absolute(str(logger.root_dir)) if hasattr(logger, "root_dir") else log_dir
    return RunResult(
        log_dir=log_dir,
        experiment_dir=experiment_dir,
        status=status,
        seconds=time.time() - started,
        metrics=_numbers(trainer.callback_metrics),
        checkpoint=absolute(checkpoint) if checkpoint else None,
        error=error,
    )
