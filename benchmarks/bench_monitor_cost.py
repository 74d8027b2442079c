"""What the default monitor adds to a training step, side by side with no logger.

Model: a 6-layer MLP of width 2048 (about 25 M parameters), batch 8, Adam, fitted on
the CPU by Lightning for ``--steps`` steps. Four set-ups, one ``Trainer.fit`` each:

- ``logger=False``: no logger, no callbacks;
- ``TensorBoardLogger``: Lightning's stock logger;
- ``TBXLogger``: this package's logger alone;
- ``TBXLogger + TrainingMonitor()``: the default monitor (histograms every 100 steps,
  scalars and alerts every 10).

Lock-step: the four fits run at once, each in its own thread, and take turns one
training step at a time (a baton passed in ``on_train_batch_start``; the order is
shuffled every cycle). A step is timed from its batch start to the next one, so it
holds everything the loop does for it (forward, backward, optimizer, callbacks, the
logger's write) and nothing of the other fits. Step ``k`` of every set-up is measured
within the same fraction of a second, so the load that other tenants of a shared
machine put on memory and CPU, which moves a whole fit's time by tens of percent, hits
all four alike.

Reported per set-up, against ``logger=False`` after ``--warmup`` steps:

- *whole fit*: total time of the measured steps over the baseline's total;
- *per 10 steps*: the same ratio over each window of 10 aligned steps (one scalar step
  of the monitor each), as the median and the 10th-90th percentiles over windows.

The monitor's own time (inside its hooks) is reported beside it: the cost without the
other set-ups in the figure at all.

    python benchmarks/bench_monitor_cost.py [--steps 300] [--threads 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import threading
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
SETUPS = ("logger=False", "TensorBoardLogger", "TBXLogger", "TBXLogger + TrainingMonitor()")


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


class Baton:
    """Lets one fit at a time run a training step; the order is shuffled every cycle."""

    def __init__(self, names: list[str], seed: int) -> None:
        self.rng = random.Random(seed)
        self.active = list(names)
        self.cycle = list(names)
        self.cond = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.cycle[0] == name)

    def done(self, name: str, leaving: bool = False) -> None:
        with self.cond:
            if leaving:
                self.active.remove(name)
            if name in self.cycle:
                self.cycle.remove(name)
            if not self.cycle and self.active:
                self.cycle = self.rng.sample(self.active, len(self.active))
            self.cond.notify_all()


class LockStep(Callback):
    """Times each training step of its fit, running only while it holds the baton."""

    def __init__(self, baton: Baton, name: str) -> None:
        self.baton, self.name = baton, name
        self.times: list[float] = []
        self.start: float | None = None

    def on_train_batch_start(self, trainer: Trainer, *args: Any) -> None:
        if self.start is not None:
            self.times.append(time.perf_counter() - self.start)
            self.baton.done(self.name)
        self.baton.wait(self.name)
        self.start = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.start is not None:
            self.times.append(time.perf_counter() - self.start)
        self.baton.done(self.name, leaving=True)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, error: BaseException
    ) -> None:
        self.baton.done(self.name, leaving=True)


class TimedMonitor(TrainingMonitor):
    """``TrainingMonitor()`` that adds up the wall time spent in its own hooks."""

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


def build(setup: str, baton: Baton, steps: int, warmup: int, root: str) -> dict[str, Any]:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(steps * BATCH, WIDTH), torch.randn(steps * BATCH, WIDTH))
    clock = LockStep(baton, setup)
    callbacks: list[Callback] = [clock]
    logger: Any = False
    if setup == "TensorBoardLogger":
        logger = TensorBoardLogger(root, name="stock")
    elif setup.startswith("TBXLogger"):
        logger = TBXLogger(root, name="tbx" + ("_monitor" if "Monitor" in setup else ""))
    monitor = TimedMonitor(warmup) if setup.endswith("TrainingMonitor()") else None
    if monitor is not None:
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
    return {
        "trainer": trainer,
        "model": MLP(),
        "data": DataLoader(data, batch_size=BATCH),
        "clock": clock,
        "monitor": monitor,
    }


def _pct(values: list[float]) -> str:
    deciles = statistics.quantiles(values, n=10) if len(values) > 1 else values * 9
    return f"{statistics.median(values):+6.1f}% [{deciles[0]:+.1f}% to {deciles[-1]:+.1f}%]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the turn order")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    baton = Baton(list(SETUPS), args.seed)
    load_before = os.getloadavg()[0]
    errors: list[BaseException] = []
    with tempfile.TemporaryDirectory() as root:
        fits = {s: build(s, baton, args.steps, args.warmup, root) for s in SETUPS}

        def run(fit: dict[str, Any]) -> None:
            try:
                fit["trainer"].fit(fit["model"], fit["data"])
            except BaseException as error:  # reported after the join
                errors.append(error)

        threads = [threading.Thread(target=run, args=(fits[s],), name=s) for s in SETUPS]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        took = time.perf_counter() - began
    if errors:
        raise errors[0]
    load_after = os.getloadavg()[0]
    times = {s: fits[s]["clock"].times[args.warmup : args.steps] for s in SETUPS}
    n = min(len(t) for t in times.values())
    base = times["logger=False"][:n]
    params = sum(p.numel() for p in MLP().parameters())
    print(
        f"{LAYERS}-layer MLP, width {WIDTH}, {params / 1e6:.1f} M parameters, batch {BATCH}, "
        f"{args.steps} steps in lock-step ({n} measured after {args.warmup}), "
        f"{args.threads} threads, {os.cpu_count()} CPUs, {took:.0f} s, 1-min load average "
        f"{load_before:.1f} before, {load_after:.1f} after"
    )
    print(
        f"{'set-up':30} {'median ms/step':>15} {'whole fit':>10} "
        f"{'per 10 steps: median [p10 to p90]':>36}"
    )
    for setup in SETUPS:
        mine = times[setup][:n]
        whole = 100 * (sum(mine) / sum(base) - 1)
        windows = [
            100 * (sum(mine[i : i + EVERY]) / sum(base[i : i + EVERY]) - 1)
            for i in range(0, n - EVERY + 1, EVERY)
        ]
        print(
            f"{setup:30} {statistics.median(mine) * 1e3:15.2f} {whole:+9.1f}% {_pct(windows):>36}"
        )
    monitor = fits["TBXLogger + TrainingMonitor()"]["monitor"]
    inside = monitor.inside / n
    rest = sum(times["TBXLogger + TrainingMonitor()"][:n]) / n - inside
    print(
        f"time inside the monitor's hooks: {inside * 1e3:.2f} ms/step, "
        f"{100 * inside / rest:.1f}% of the rest of its step"
    )


if __name__ == "__main__":
    main()
