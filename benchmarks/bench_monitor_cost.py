"""What the default monitor adds to a training step, side by side with no logger.

Model: a 6-layer MLP of width 2048 (about 25 M parameters), batch 8, Adam, fitted on
the CPU by Lightning for ``--steps`` steps. Four set-ups run interleaved, ``--repeat``
times each, and the median time per step (after ``--warmup`` steps) is reported:

- ``logger=False``: no logger, no callbacks;
- ``TensorBoardLogger``: Lightning's stock logger;
- ``TBXLogger``: this package's logger alone;
- ``TBXLogger + TrainingMonitor()``: the default monitor (histograms every 100 steps,
  scalars and alerts every 10).

The overhead is the monitor run's step time over the ``logger=False`` one.

    python benchmarks/bench_monitor_cost.py [--steps 100] [--repeat 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tbx_lightning import TBXLogger, TrainingMonitor

WIDTH, LAYERS, BATCH = 2048, 6, 8


class MLP(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(LAYERS):
            layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


class StepClock(Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = 0.0
        self.end = 0.0
        self.steps = 0

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self.end = time.perf_counter()
        self.steps = trainer.global_step - self.warmup

    def per_step(self) -> float:
        return (self.end - self.start) / max(self.steps, 1)


def fit_once(setup: str, steps: int, warmup: int, root: str) -> float:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(steps * BATCH, WIDTH), torch.randn(steps * BATCH, WIDTH))
    clock = StepClock(warmup)
    callbacks: list[Callback] = [clock]
    logger: Any = False
    if setup == "TensorBoardLogger":
        logger = TensorBoardLogger(root, name="stock")
    elif setup.startswith("TBXLogger"):
        logger = TBXLogger(root, name="tbx")
    if setup.endswith("TrainingMonitor()"):
        callbacks.append(TrainingMonitor())
    trainer = Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=10,
    )
    trainer.fit(MLP(), DataLoader(data, batch_size=BATCH))
    return clock.per_step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setups = [
        "logger=False",
        "TensorBoardLogger",
        "TBXLogger",
        "TBXLogger + TrainingMonitor()",
    ]
    times: dict[str, list[float]] = {s: [] for s in setups}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(args.repeat):
            for setup in setups:  # interleaved, so load changes hit every set-up alike
                times[setup].append(fit_once(setup, args.steps, args.warmup, root))
                print(f"# {setup}: {times[setup][-1] * 1e3:.2f} ms/step", flush=True)
    params = sum(p.numel() for p in MLP().parameters())
    print(
        f"{LAYERS}-layer MLP, width {WIDTH}, {params / 1e6:.1f} M parameters, batch {BATCH}, "
        f"{args.steps} steps, {args.threads} threads, median of {args.repeat}"
    )
    base = statistics.median(times["logger=False"])
    print(f"{'set-up':32} {'ms/step':>9} {'vs logger=False':>16}")
    for setup in setups:
        t = statistics.median(times[setup])
        print(f"{setup:32} {t * 1e3:9.2f} {100 * (t / base - 1):+15.1f}%")


if __name__ == "__main__":
    main()
