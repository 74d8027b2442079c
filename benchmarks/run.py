"""Scalar logging cost and whole-fit overhead, side by side with the stock integrations.

Run: ``python benchmarks/run.py`` (add ``--quick`` for a short smoke run). Every
writer is measured in this one process run, on the same machine, so the ratios
compare like with like. Two figures per writer:

- caller: microseconds per scalar spent inside the logging call on the training
  thread (calls of 10 scalars);
- end to end: microseconds per scalar from the first call until ``close()`` has
  put everything on disk.

The fit table trains a tiny model that logs 10 metrics every step with
``logger=False``, ``CSVLogger``, Lightning's ``TensorBoardLogger`` and ``TBXLogger``,
the four fits in lock-step (``benchmarks/_lockstep.py``: one training step at a time,
turns shuffled, so a shared machine's load hits all alike), and reports the overhead
per step over ``logger=False`` as the median of the rounds.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _lockstep import lockstep_clocks, run_fits

warnings.filterwarnings("ignore")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

METRICS = 10


def _metrics(step: int) -> dict[str, float]:
    return {f"metric_{i}": 0.001 * step + i for i in range(METRICS)}


def _time_writer(
    make: Callable[[str], Any],
    log: Callable[[Any, dict[str, float], int], None],
    close: Callable[[Any], None],
    calls: int,
) -> tuple[float, float]:
    """Returns (caller us/scalar, end-to-end us/scalar)."""
    directory = tempfile.mkdtemp(prefix="tbx-bench-")
    try:
        writer = make(directory)
        payloads = [_metrics(step) for step in range(calls)]
        gc.collect()
        gc.disable()
        start = time.perf_counter()
        for step, payload in enumerate(payloads):
            log(writer, payload, step)
        logged = time.perf_counter()
        close(writer)
        done = time.perf_counter()
        gc.enable()
        scalars = calls * METRICS
        return (logged - start) / scalars * 1e6, (done - start) / scalars * 1e6
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _started(tracker: Any) -> Any:
    tracker.start()  # Accelerate trackers open their writer lazily
    return tracker


def scalar_table(calls: int, repeats: int) -> list[tuple[str, float, float]]:
    from accelerate import PartialState
    from accelerate.tracking import TensorBoardTracker
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboardX import SummaryWriter as TBXSummaryWriter
    from torch.utils.tensorboard import SummaryWriter as TorchSummaryWriter

    from tbx_lightning import RunWriter, TBXLogger

    PartialState()

    def per_tag(writer: Any, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            writer.add_scalar(key, value, step)

    floor: list[Any] = []
    cases: list[tuple[str, Callable[[str], Any], Callable[..., None], Callable[[Any], None]]] = [
        (
            "list.append (floor)",
            lambda d: floor,
            lambda w, m, s: w.append((s, m)),
            lambda w: w.clear(),
        ),
        (
            "tbx_lightning RunWriter",
            RunWriter,
            lambda w, m, s: w.log_scalars(m, s),
            lambda w: w.close(),
        ),
        (
            "tbx_lightning TBXLogger",
            lambda d: TBXLogger(d),
            lambda w, m, s: w.log_metrics(m, s),
            lambda w: w.close(),
        ),
        ("tensorboardX SummaryWriter", TBXSummaryWriter, per_tag, lambda w: w.close()),
        ("torch.utils.tensorboard", TorchSummaryWriter, per_tag, lambda w: w.close()),
        (
            "Lightning TensorBoardLogger",
            lambda d: TensorBoardLogger(d),
            lambda w, m, s: w.log_metrics(m, s),
            lambda w: w.finalize("success"),
        ),
        (
            "Accelerate TensorBoardTracker",
            lambda d: _started(TensorBoardTracker("bench", d)),
            lambda w, m, s: w.log(m, step=s),
            lambda w: w.finish(),
        ),
    ]
    rows = []
    for name, make, log, close in cases:
        best = min(
            (_time_writer(make, log, close, calls) for _ in range(repeats)), key=lambda r: r[0]
        )
        rows.append((name, best[0], best[1]))
    return rows


def fit_table(steps: int, repeats: int) -> list[tuple[str, float]]:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from tbx_lightning import TBXLogger

    class Tiny(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(8, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = nn.functional.mse_loss(self.layer(x), y)
            for i in range(METRICS):
                self.log(f"metric_{i}", loss + i)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = DataLoader(
        TensorDataset(torch.randn(steps * 4, 8), torch.randn(steps * 4, 1)), batch_size=4
    )

    cases: list[tuple[str, Callable[[str], Any]]] = [
        ("logger=False", lambda d: False),
        ("CSVLogger", lambda d: CSVLogger(d)),
        ("Lightning TensorBoardLogger", lambda d: TensorBoardLogger(d)),
        ("tbx_lightning TBXLogger", lambda d: TBXLogger(d)),
    ]
    names = [name for name, _ in cases]
    warmup = min(20, steps // 5)
    per_step: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):  # fresh fits each round: memory placement differs
        clocks = lockstep_clocks(names, seed=round_)
        directory = tempfile.mkdtemp(prefix="tbx-fit-")
        try:
            fits = {}
            for name, make in cases:
                trainer = Trainer(
                    logger=make(os.path.join(directory, name.replace(" ", "_"))),
                    max_epochs=1,
                    log_every_n_steps=1,
                    enable_checkpointing=False,
                    enable_progress_bar=False,
                    enable_model_summary=False,
                    accelerator="cpu",
                    callbacks=[clocks[name]],
                )
                fits[name] = (trainer, Tiny(), data)
            run_fits(fits)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        for name in names:
            measured = clocks[name].times[warmup:]
            per_step[name].append(sum(measured) / len(measured) * 1e6)
    return [(name, statistics.median(values)) for name, values in per_step.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short run for a smoke check")
    args = parser.parse_args()
    calls, repeats, steps = (2_000, 1, 100) if args.quick else (20_000, 3, 400)
    torch.set_num_threads(1)
    print(
        f"date {date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"torch {torch.__version__}; {calls} calls x {METRICS} scalars, best of {repeats}\n")
    rows = scalar_table(calls, repeats)
    lightning_caller = next(r[1] for r in rows if r[0] == "Lightning TensorBoardLogger")
    tbx_e2e = next(r[2] for r in rows if r[0] == "tensorboardX SummaryWriter")
    print(
        "| writer | caller us/scalar | end-to-end us/scalar "
        "| caller speed-up vs Lightning TensorBoardLogger | end-to-end speed-up vs tensorboardX |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, caller, e2e in rows:
        print(
            f"| {name} | {caller:.2f} | {e2e:.2f} | {lightning_caller / caller:.1f}x "
            f"| {tbx_e2e / e2e:.1f}x |"
        )
    fit = fit_table(steps, repeats)
    base = fit[0][1]
    stock = next(v for n, v in fit if n == "Lightning TensorBoardLogger") - base
    print(
        f"\nWhole fit: {steps} steps, {METRICS} metrics per step, the four fits in lock-step "
        f"(benchmarks/_lockstep.py), mean step time after the first {min(20, steps // 5)}, "
        f"median of {repeats} rounds\n"
    )
    print("| logger | us/step | overhead us/step | overhead vs TensorBoardLogger |")
    print("|---|---:|---:|---:|")
    for name, value in fit:
        overhead = value - base
        share = f"{overhead / stock:.2f}" if name != "logger=False" else "-"
        print(f"| {name} | {value:.0f} | {overhead:.0f} | {share} |")


if __name__ == "__main__":
    main()
