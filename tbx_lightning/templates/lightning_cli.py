"""LightningCLI support: the whole CLI config (trainer, model, data) as the run's hyperparameters.

Lightning's ``SaveConfigCallback`` writes ``config.yaml`` but leaves the logger's
HParams table to the model's ``save_hyperparameters``. :class:`TBXSaveConfigCallback`
hands the parsed config to the logger instead, so every ``--trainer.*``, ``--model.*``
and ``--data.*`` value becomes a column keyed by its dot path (``model.lr``,
``trainer.max_epochs``), and the logger writes ``config.yaml`` next to the events.
It works with ``parser_mode="omegaconf"`` (interpolations are resolved first).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback

__all__ = ["TBXSaveConfigCallback", "cli_hparams"]

from tbx_lightning.lightning import cli_hparams


class TBXSaveConfigCallback(SaveConfigCallback):
    """Logs the LightningCLI config through the trainer's logger (``TBXLogger``).

    Pass it as ``LightningCLI(..., save_config_callback=TBXSaveConfigCallback)``. The
    logger then records the config as HParams columns and writes ``config.yaml`` and
    ``hparams.yaml`` itself; Lightning's own copy of ``config.yaml`` is skipped so the
    two never race (``save_to_log_dir=True`` restores it, written first).

    Example:
        >>> from lightning.pytorch.cli import LightningCLI
        >>> # LightningCLI(MyModel, MyData, save_config_callback=TBXSaveConfigCallback,
        >>> #              args=["fit", "--trainer.logger=tbx_lightning.TBXLogger"])
    """

    def __init__(
        self,
        parser: LightningArgumentParser,
        config: Any,
        config_filename: str = "config.yaml",
        overwrite: bool = False,
        multifile: bool = False,
        save_to_log_dir: bool = False,
    ) -> None:
        super().__init__(
            parser,
            config,
            config_filename=config_filename,
            overwrite=overwrite,
            multifile=multifile,
            save_to_log_dir=save_to_log_dir,
        )

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        hparams = cli_hparams(self.parser, self.config)
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams)
