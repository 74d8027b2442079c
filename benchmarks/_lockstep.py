"""Lightning fits in lock-step: side-by-side step times that a shared machine cannot skew.

On a shared VM the speed of memory and CPU moves by tens of percent from one second to
the next, so fits run one after another differ by more than the few percent a logger
or monitor costs. Here every fit runs at once in its own thread and they take turns,
one training step at a time: a baton is passed in ``on_train_batch_start``, in an
order shuffled every cycle. A step is timed from its batch start to the next one, so it
holds everything the loop does for it (forward, backward, optimizer, callbacks, the
logger's write, the next batch) and nothing of the other fits; step ``k`` of every fit
is measured within the same fraction of a second.

    clocks = lockstep_clocks(["a", "b"], seed=0)
    trainer_a = Trainer(callbacks=[clocks["a"], ...], ...)
    ...
    run_fits({"a": (trainer_a, model_a, data_a), "b": (trainer_b, model_b, data_b)})
    clocks["a"].times  # seconds per step, step 0 first
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class Baton:
    """Lets one fit at a time run a training step; the order is shuffled every cycle."""

    def __init__(self, names: Sequence[str], seed: int) -> None:
        self.rng = random.Random(seed)
        self.active = list(names)
        self.cycle = list(names)
        self.cond = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.cycle[0] == name)

    def done(self, name: str, leaving: bool = False) -> None:
        with self.cond:
            if leaving and name in self.active:
                self.active.remove(name)
            if name in self.cycle:
                self.cycle.remove(name)
            if not self.cycle and self.active:
                self.cycle = self.rng.sample(self.active, len(self.active))
            self.cond.notify_all()


class LockStep(Callback):
    """Times each training step of its fit, running it only while it holds the baton."""

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
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self.baton.done(self.name, leaving=True)


def lockstep_clocks(names: Sequence[str], seed: int = 0) -> dict[str, LockStep]:
    """One :class:`LockStep` callback per fit, all sharing one baton."""
    baton = Baton(names, seed)
    return {name: LockStep(baton, name) for name in names}


def run_fits(fits: Mapping[str, tuple[Trainer, LightningModule, Any]]) -> float:
    """Runs ``trainer.fit(model, data)`` of every fit at once; returns the wall seconds."""
    errors: list[BaseException] = []

    def fit(trainer: Trainer, model: LightningModule, data: Any) -> None:
        try:
            trainer.fit(model, data)
        except BaseException as error:  # re-raised after the join
            errors.append(error)

    threads = [threading.Thread(target=fit, args=args, name=name) for name, args in fits.items()]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - began


def overheads(
    times: Sequence[float], base: Sequence[float], window: int
) -> tuple[float, list[float]]:
    """Percent over ``base``: for the whole run, and per window of aligned steps."""
    n = min(len(times), len(base))
    whole = 100 * (sum(times[:n]) / sum(base[:n]) - 1)
    windows = [
        100 * (sum(times[i : i + window]) / sum(base[i : i + window]) - 1)
        for i in range(0, n - window + 1, window)
    ]
    return whole, windows


def spread(values: Sequence[float]) -> str:
    """``median [p10 to p90]`` of percentages."""
    deciles = statistics.quantiles(values, n=10) if len(values) > 1 else list(values) * 9
    return f"{statistics.median(values):+6.1f}% [{deciles[0]:+.1f}% to {deciles[-1]:+.1f}%]"
