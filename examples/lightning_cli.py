"""LightningCLI with TBXLogger: the whole CLI config becomes the run's HParams row.

Run (from the repository root)::

    python examples/lightning_cli.py fit --trainer.logger=tbx_lightning.TBXLogger \\
        --trainer.logger.save_dir=runs --trainer.logger.name=lightning_cli \\
        --model.lr=0.003 --trainer.max_epochs=3

or with a YAML file (``class_path`` form, OmegaConf interpolation allowed)::

    # cli.yaml
    trainer:
      max_epochs: 3
      logger:
        class_path: tbx_lightning.TBXLogger
        init_args: {save_dir: runs, name: lightning_cli, log_graph: true}
    model:
      channels: 16
      embed_dim: ${model.channels}   # parser_mode="omegaconf" resolves this
    data:
      batch_size: 64

    python examples/lightning_cli.py fit --config cli.yaml

Columns in TensorBoard's HParams tab: ``trainer.max_epochs``, ``model.lr``,
``model.embed_dim``, ``data.batch_size``, ... (every key of the CLI config).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LightningCLI

from tbx_lightning.templates.digits import DigitsCNN, DigitsDataModule, accuracy


class DigitsModel(pl.LightningModule):
    """A LightningCLI-friendly digits classifier: plain typed arguments only."""

    def __init__(self, channels: int = 16, embed_dim: int = 64, lr: float = 3e-3) -> None:
        super().__init__()
        self.net = DigitsCNN(channels=channels, embed_dim=embed_dim)
        self.lr = lr
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = torch.nn.functional.cross_entropy(self(images), labels)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("val/loss", torch.nn.functional.cross_entropy(logits, labels))
        self.log("val/acc", accuracy(logits, labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def main(args: Sequence[str] | None = None) -> LightningCLI:
    """Builds and runs the CLI; ``args`` replaces ``sys.argv[1:]`` (for tests)."""
    return LightningCLI(
        DigitsModel,
        DigitsDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        args=list(args) if args is not None else None,
    )


if __name__ == "__main__":
    main()
