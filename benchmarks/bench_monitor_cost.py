"""What the default monitor adds to a training step, side by side with no logger.

Model: a 6-layer MLP of width 2048 (about 25 M parameters), batch 8, Adam, fitted on
the CPU by Lightning for ``--steps`` steps. Four set-ups:

- ``logger=False``: no logger, no callbacks;
- ``TensorBoardLogger``: Lightning's stock logger;
- ``TBXLogger``: this package's logger alone;
- ``TBXLogger + TrainingMonitor()``: the default monitor (histograms every 100 steps,
  scalars and alerts every 10).

Made for a small shared machine, where other processes come and go: the set-ups run in
``--repeat`` rounds, each round every set-up once in a shuffled order, so a burst of
load hits every set-up alike. A fit's figure is its mean wall time per step after
``--warmup`` steps (the mean, not a median of steps, so the monitor's every-tenth-step
work counts). Each set-up's overhead is taken per round, against the ``logger=False``
fit of the same round, and the median over rounds is reported with the range; the
process CPU time per step (all threads) is reported beside the wall time. The load
average before and after says how quiet the machine was.

    python benchmarks/bench_monitor_cost.py [--steps 100] [--repeat 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import random
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
EVERY = 10  # the logger's and the monitor's scalar interval (both defaults)


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
    """Wall and CPU time of the steps after ``warmup``, each step's wall time kept."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0
        self.cpu_start = self.cpu_end = 0.0
        self.steps = 0
        self.last = 0.0
        # wall time per step, by whether the step is a logging/scalar step (every 10th)
        self.interval: list[float] = []
        self.other: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup:
            self.start = self.last = time.perf_counter()
            self.cpu_start = time.process_time()

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        now = time.perf_counter()
        self.end, self.cpu_end = now, time.process_time()
        step = trainer.global_step - 1  # the step that just ended
        if step >= self.warmup:
            (self.interval if step % EVERY == 0 else self.other).append(now - self.last)
        self.last = now
        self.steps = trainer.global_step - self.warmup

    def per_step(self) -> tuple[float, float, float]:
        """Mean wall, mean CPU, and robust wall time per step.

        The robust figure weighs the median every-10th step and the median other step
        by how often each occurs: a burst of load lengthens a few steps and moves the
        mean, not the medians, while the monitor's every-10th-step work still counts.
        """
        steps = max(self.steps, 1)
        robust = (
            statistics.median(self.interval) + (EVERY - 1) * statistics.median(self.other)
        ) / EVERY
        return (self.end - self.start) / steps, (self.cpu_end - self.cpu_start) / steps, robust


class TimedMonitor(TrainingMonitor):
    """``TrainingMonitor()`` that adds up the wall time spent in its own hooks.

    The sum is the monitor's work itself, with no other step in the comparison, so it
    is far less exposed to other processes than a difference of two fits.
    """

    def __init__(self, warmup: int) -> None:
        super().__init__()
        self.warmup = warmup
        self.inside = 0.0

    def _timed(self, trainer: Trainer, hook: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return hook(*args, **kwargs)
        finally:
            if trainer.global_step >= self.warmup:
                self.inside += time.perf_counter() - start

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        monitor = self._require()
        for name in ("after_clip", "after_optimizer_step"):  # called by the optimizer hook
            hook = getattr(monitor, name)
            setattr(monitor, name, lambda *a, _h=hook, **k: self._timed(trainer, _h, *a, **k))

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        self._timed(trainer, super().on_train_batch_start, trainer, *args)

    def on_before_optimizer_step(self, trainer: Trainer, *args: Any) -> None:
        self._timed(trainer, super().on_before_optimizer_step, trainer, *args)

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self._timed(trainer, super().on_train_batch_end, trainer, *args)


def fit_once(setup: str, steps: int, warmup: int, root: str) -> tuple[float, float, float, float]:
    """Mean wall, mean CPU, robust wall, and the monitor's own time, per step."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(steps * BATCH, WIDTH), torch.randn(steps * BATCH, WIDTH))
    clock = StepClock(warmup)
    callbacks: list[Callback] = [clock]
    logger: Any = False
    if setup == "TensorBoardLogger":
        logger = TensorBoardLogger(root, name="stock")
    elif setup.startswith("TBXLogger"):
        logger = TBXLogger(root, name="tbx")
    monitor = None
    if setup.endswith("TrainingMonitor()"):
        monitor = TimedMonitor(warmup)
        callbacks.append(monitor)
    trainer = Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=EVERY,
    )
    trainer.fit(MLP(), DataLoader(data, batch_size=BATCH))
    inside = 0.0 if monitor is None else monitor.inside / max(clock.steps, 1)
    return (*clock.per_step(), inside)


def _ms(values: list[float]) -> str:
    return (
        f"{statistics.median(values) * 1e3:8.2f} [{min(values) * 1e3:.1f}-{max(values) * 1e3:.1f}]"
    )


def _pct(values: list[float]) -> str:
    return f"{statistics.median(values):+6.1f}% [{min(values):+.1f}% to {max(values):+.1f}%]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the round order")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setups = [
        "logger=False",
        "TensorBoardLogger",
        "TBXLogger",
        "TBXLogger + TrainingMonitor()",
    ]
    order = random.Random(args.seed)
    names = ("wall", "robust", "CPU")
    times: dict[str, dict[str, list[float]]] = {n: {s: [] for s in setups} for n in names}
    own: list[float] = []  # the monitor's hooks, per step
    own_share: list[float] = []  # ... over the rest of the same fit's step, in %
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as root:
        for round_ in range(args.repeat):
            shuffled = list(setups)
            order.shuffle(shuffled)
            for setup in shuffled:
                wall, cpu, robust, inside = fit_once(setup, args.steps, args.warmup, root)
                if setup.endswith("TrainingMonitor()"):
                    own.append(inside)
                    own_share.append(100 * inside / max(wall - inside, 1e-9))
                for name, value in zip(names, (wall, robust, cpu), strict=True):
                    times[name][setup].append(value)
                print(
                    f"# round {round_}: {setup}: {wall * 1e3:.2f} ms/step wall (mean), "
                    f"{robust * 1e3:.2f} robust, {cpu * 1e3:.2f} CPU"
                    + (f", {inside * 1e3:.2f} in the monitor" if inside else ""),
                    flush=True,
                )
    load_after = os.getloadavg()[0]
    params = sum(p.numel() for p in MLP().parameters())
    print(
        f"{LAYERS}-layer MLP, width {WIDTH}, {params / 1e6:.1f} M parameters, batch {BATCH}, "
        f"{args.steps} steps, {args.threads} threads, {args.repeat} rounds, "
        f"{os.cpu_count()} CPUs, 1-min load average {load_before:.1f} before, "
        f"{load_after:.1f} after"
    )
    print(
        "median over rounds [min-max]; overheads paired per round with logger=False; "
        "robust = (median 10th step + 9 x median other step) / 10"
    )
    print(
        f"{'set-up':30} {'robust ms/step':>22} " + " ".join(f"{n + ' overhead':>28}" for n in names)
    )
    for setup in setups:
        cells = []
        for name in names:
            base = times[name]["logger=False"]
            over = [100 * (t / b - 1) for t, b in zip(times[name][setup], base, strict=True)]
            cells.append(f"{_pct(over):>28}")
        print(f"{setup:30} {_ms(times['robust'][setup]):>22} " + " ".join(cells))
    print(
        f"time inside the monitor's hooks: {_ms(own)} ms/step, {_pct(own_share)} of the "
        "rest of the same fit's step (the least exposed figure to other processes)"
    )


if __name__ == "__main__":
    main()
