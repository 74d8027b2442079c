"""What the default monitor adds to a training step, side by side with no logger.

Model: a 6-layer MLP of width 2048 (about 25 M parameters), batch 8, Adam, fitted on
the CPU by Lightning for ``--steps`` steps. Four set-ups, one ``Trainer.fit`` each:

- ``logger=False``: no logger, no callbacks;
- ``TensorBoardLogger``: Lightning's stock logger;
- ``TBXLogger``: this package's logger alone;
- ``TBXLogger + TrainingMonitor()``: the default monitor (histograms every 100 steps,
  scalars and alerts every 10);
- ``TBXLogger + TrainingMonitor(on_alert="stop")``: the same, and every optimizer step
  checked for NaN/Inf before it runs (``skip_nonfinite_steps``: one small
  device-to-host read per step).

The fits of a round run in lock-step (``benchmarks/_lockstep.py``): at once,
each in its own thread, one training step at a time in an order shuffled every cycle,
so step ``k`` of every set-up is timed within the same second and a shared machine's
passing load hits all of them alike. Each round builds fresh models: where a fit's
tensors land in memory makes the same fit up to 10% faster or slower for its whole
life, so one round cannot tell a few percent; the median over ``--rounds`` can.

Reported per set-up, against the same round's ``logger=False`` after ``--warmup``
steps: the overhead of the whole fit (total time of the measured steps over the
baseline's), as the median over rounds with its range, and the median and 10th-90th
percentiles over all rounds' windows of 10 aligned steps (one scalar step of the
monitor each). The time inside the monitor's own hooks is reported beside it: a cost
with no other fit in the figure at all.

    python benchmarks/bench_monitor_cost.py [--rounds 5] [--steps 110] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tbx_lightning import TBXLogger, TrainingMonitor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _lockstep import LockStep, lockstep_clocks, overheads, run_fits, spread

WIDTH, LAYERS, BATCH = 2048, 6, 8
EVERY = 10  # the logger's and the monitor's scalar interval (both defaults)
STOP = 'TBXLogger + TrainingMonitor(on_alert="stop")'
SETUPS = (
    "logger=False",
    "TensorBoardLogger",
    "TBXLogger",
    "TBXLogger + TrainingMonitor()",
    STOP,
)
MONITORED = SETUPS[3:]


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


class TimedMonitor(TrainingMonitor):
    """``TrainingMonitor()`` that adds up the wall time spent in its own hooks."""

    def __init__(self, warmup: int, **fields: Any) -> None:
        super().__init__(**fields)
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


def build(setup: str, clock: LockStep, steps: int, warmup: int, root: str) -> dict[str, Any]:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(steps * BATCH, WIDTH), torch.randn(steps * BATCH, WIDTH))
    callbacks: list[Callback] = [clock]
    logger: Any = False
    if setup == "TensorBoardLogger":
        logger = TensorBoardLogger(root, name="stock")
    elif setup.startswith("TBXLogger"):
        logger = TBXLogger(root, name="tbx" + ("_monitor" if "Monitor" in setup else ""))
    monitor = None
    if setup in MONITORED:
        monitor = TimedMonitor(warmup, **({"on_alert": "stop"} if setup == STOP else {}))
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


def fit_round(
    args: argparse.Namespace, seed: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """One lock-step round: per set-up the measured step times; each monitor's own time."""
    clocks = lockstep_clocks(SETUPS, seed)
    with tempfile.TemporaryDirectory() as root:
        fits = {s: build(s, clocks[s], args.steps, args.warmup, root) for s in SETUPS}
        run_fits({s: (f["trainer"], f["model"], f["data"]) for s, f in fits.items()})
    times = {s: clocks[s].times[args.warmup : args.steps] for s in SETUPS}
    n = min(len(t) for t in times.values())
    own = {s: fits[s]["monitor"].inside / n for s in MONITORED}
    return {s: t[:n] for s, t in times.items()}, own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=110)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the turn order")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    whole: dict[str, list[float]] = {s: [] for s in SETUPS}
    windows: dict[str, list[float]] = {s: [] for s in SETUPS}
    medians: dict[str, list[float]] = {s: [] for s in SETUPS}
    inside: dict[str, list[float]] = {s: [] for s in MONITORED}
    share: dict[str, list[float]] = {s: [] for s in MONITORED}
    for round_ in range(args.rounds):
        times, own = fit_round(args, args.seed + round_)
        for setup in SETUPS:
            total, per_window = overheads(times[setup], times["logger=False"], EVERY)
            whole[setup].append(total)
            windows[setup].extend(per_window)
            medians[setup].append(statistics.median(times[setup]) * 1e3)
        for setup in MONITORED:
            monitored = times[setup]
            inside[setup].append(own[setup])
            share[setup].append(100 * own[setup] / (sum(monitored) / len(monitored) - own[setup]))
        print(
            f"# round {round_}: "
            + ", ".join(f"{s} {whole[s][-1]:+.1f}%" for s in SETUPS[1:])
            + "; ms/step in the monitors' hooks: "
            + ", ".join(f"{own[s] * 1e3:.2f}" for s in MONITORED),
            flush=True,
        )
    took = time.perf_counter() - began
    load_after = os.getloadavg()[0]
    params = sum(p.numel() for p in MLP().parameters())
    n = len(next(iter(times.values())))
    print(
        f"{LAYERS}-layer MLP, width {WIDTH}, {params / 1e6:.1f} M parameters, batch {BATCH}; "
        f"{args.rounds} rounds of {args.steps} steps in lock-step ({n} measured after "
        f"{args.warmup}); {args.threads} threads, {os.cpu_count()} CPUs, {took:.0f} s, "
        f"1-min load average {load_before:.1f} before, {load_after:.1f} after"
    )
    print(
        f"{'set-up':30} {'ms/step':>8} {'whole fit: median [range]':>30} "
        f"{'per 10 steps: median [p10 to p90]':>36}"
    )
    for setup in SETUPS:
        rounds = (
            f"{statistics.median(whole[setup]):+6.1f}% "
            f"[{min(whole[setup]):+.1f}% to {max(whole[setup]):+.1f}%]"
        )
        print(
            f"{setup:30} {statistics.median(medians[setup]):8.2f} {rounds:>30} "
            f"{spread(windows[setup]):>36}"
        )
    for setup in MONITORED:
        ins, sha = inside[setup], share[setup]
        print(
            f"time inside the hooks of {setup}: {statistics.median(ins) * 1e3:.2f} ms/step "
            f"[{min(ins) * 1e3:.2f}-{max(ins) * 1e3:.2f}], {statistics.median(sha):.1f}% "
            f"[{min(sha):.1f}-{max(sha):.1f}%] of the rest of its step"
        )


if __name__ == "__main__":
    main()
