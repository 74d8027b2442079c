"""A LoRA fine-tune with Lightning, as long runs combine the features.

``TBXLogger``, ``TrainingMonitor`` (alerts stop the fit before a non-finite update),
``ModelCheckpoint(save_last=True)``, bf16 mixed precision, gradient accumulation and
clipping; the token embeddings go to the projector before and after. Run it, then
resume it for more steps, then open TensorBoard::

    python examples/lora_lightning.py --max-steps 60
    python examples/lora_lightning.py --max-steps 120 --resume
    tensorboard --logdir runs/lora_lightning

``--nan-from 30`` turns the loss NaN from step 30 to show the alert stop: the
checkpoints keep finite weights and the run is marked failed, with the reason.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lora_common import loaders, lora_model, token_table

from tbx_lightning import TBXLogger, TrainingMonitor


class LoRAFinetune(LightningModule):
    def __init__(self, vocab: list[str], lr: float = 2e-3, nan_from: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters({"lr": lr, "lora_rank": 8})
        self.vocab = vocab
        self.model = lora_model(len(vocab))
        self.lr = lr
        self.nan_from = nan_from

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        loss = self.model(input_ids=ids, labels=ids).loss
        if self.nan_from is not None and self.global_step >= self.nan_from:
            loss = loss * math.nan  # a poisoned batch, to show the alert stop
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        (ids,) = batch
        self.log("val/loss", self.model(input_ids=ids, labels=ids).loss)

    def _log_tokens(self) -> None:
        logger = self.logger
        if isinstance(logger, TBXLogger):
            table = token_table(self.model, len(self.vocab))
            logger.log_embedding(
                "token_embeddings", table, metadata=self.vocab, step=self.global_step
            )

    def on_fit_start(self) -> None:
        self._log_tokens()

    def on_fit_end(self) -> None:
        self._log_tokens()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.lr)


def main(argv: Sequence[str] | None = None) -> str:
    """Runs the fine-tune; returns the run directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--nan-from", type=int, default=None)
    parser.add_argument("--resume", action="store_true", help="go on from last.ckpt")
    args = parser.parse_args(argv)
    train, val, vocab = loaders()
    logger = TBXLogger(args.runs, name="lora_lightning")
    trainer = Trainer(
        logger=logger,
        max_steps=args.max_steps,
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        callbacks=[
            ModelCheckpoint(save_last=True, every_n_train_steps=20),
            TrainingMonitor(norm_every_n_steps=5, hist_every_n_steps=20, on_alert="stop"),
        ],
        val_check_interval=20,
        limit_val_batches=4,
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    ckpt = None
    if args.resume:
        found = sorted(Path(args.runs, "lora_lightning").glob("version_*/checkpoints/last.ckpt"))
        ckpt = str(found[-1]) if found else None
    trainer.fit(LoRAFinetune(vocab, nan_from=args.nan_from), train, val, ckpt_path=ckpt)
    print(f"tensorboard --logdir {Path(args.runs, 'lora_lightning')}")
    return logger.log_dir


if __name__ == "__main__":
    main()
