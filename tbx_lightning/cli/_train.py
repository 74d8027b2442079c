"""Training one composed config: ``tbx-lightning fit`` and every run of a sweep.

Both commands train through :func:`train` (the config's ``runner`` picks Lightning's
Trainer or the Accelerate loop), record a run that broke before training with
:func:`record_failed`, and describe a result with the same words.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from omegaconf import DictConfig, OmegaConf

from tbx_lightning.cli._compose import compose_config, split_positional
from tbx_lightning.templates.metrics import epoch_metrics
from tbx_lightning.templates.runner import (
    RunResult,
    build_loggers,
    hyperparameters,
)
from tbx_lightning.templates.runner import run as run_lightning

__all__ = ["fit", "metric_text", "record_failed", "tensorboard_line", "train"]


def train(cfg: DictConfig) -> RunResult:
    """Trains ``cfg`` with the runner it names (``runner: lightning``, ``accelerate`` or ``hf``).

    Raises:
        ConfigError: A part of the config cannot be built; nothing has been written.
    """
    if cfg.get("runner", "lightning") == "accelerate":
        # The Accelerate loop (and accelerate) loads only for a config that asks for it.
        from tbx_lightning.templates.accelerate_loop import run as run_accelerate

        return run_accelerate(cfg)
    if cfg.get("runner", "lightning") == "hf":
        # The Hugging Face Trainer (and transformers) loads only for a config that asks for it.
        from tbx_lightning.templates.hf_finetune import run as run_hf

        return run_hf(cfg)
    return run_lightning(cfg)


def record_failed(cfg: DictConfig, error: BaseException) -> None:
    """Writes the config and a failed status for a run that broke before training."""
    try:
        loggers = build_loggers(cfg)
        for logger in loggers:
            logger.log_hyperparams(hyperparameters(cfg))
            logger.finalize("failed")
            if hasattr(logger, "close"):
                logger.close()
    except Exception as nested:  # the run already failed; say so and keep sweeping
        print(f"  (could not record the failed run: {nested})", file=sys.stderr)


def tensorboard_line(logdir: str) -> str:
    """The command that opens ``logdir`` in TensorBoard."""
    return f"tensorboard --logdir {shlex.quote(logdir)}"


def metric_text(metrics: dict[str, float], limit: int = 6) -> str:
    """The epoch-level metrics under their own tag names (``val/acc``, ``train/acc``)."""
    return "  ".join(f"{k}={v:.4g}" for k, v in epoch_metrics(metrics, limit).items())


def _summary(result: RunResult) -> str:
    lines = [
        f"Run {result.status} in {result.seconds:.1f} s",
        f"  run directory: {result.log_dir}",
        f"  config:        {os.path.join(result.log_dir, 'config.yaml')}",
    ]
    if result.checkpoint:
        lines.append(f"  checkpoint:    {result.checkpoint}")
    if result.metrics:
        lines.append(f"  metrics:       {metric_text(result.metrics)}")
    if result.error is not None:
        lines.append(f"  error:         {type(result.error).__name__}: {result.error}")
    lines += ["View it in TensorBoard:", f"  {tensorboard_line(result.experiment_dir)}"]
    return "\n".join(lines)


def fit(args: argparse.Namespace) -> int:
    """``tbx-lightning fit``: compose, train, print what the run left."""
    experiment, overrides = split_positional(args.args)
    cfg = compose_config(experiment, overrides, args.config_dir)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return 0
    result = train(cfg)
    print(_summary(result), flush=True)
    return 0 if result.status == "success" else 1
