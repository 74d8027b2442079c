"""What TBXCallback adds to a transformers.Trainer step, beside the Trainer's own TensorBoardCallback.

Model: a tiny Llama (hidden 64, 2 layers, LoRA r=4 on q/v, batch 8 of 32 tokens) on
the CPU, ``--steps`` optimizer steps with ``logging_steps=--logging-steps``. Four
set-ups, one ``Trainer.train`` each:

- ``report_to="none"``: no logging callback (the floor);
- ``TensorBoardCallback``: transformers' own ``report_to="tensorboard"``;
- ``TBXCallback(monitor=False)``: this package's logging alone;
- ``TBXCallback()``: logging plus the default monitor (histograms every 100 steps,
  scalars and alerts every 10).

The four trainings of a round run in lock-step: at once, each in its own thread, one
optimizer step at a time in an order shuffled every cycle (the baton passes in
``on_step_begin``), so step ``k`` of every set-up is timed within the same fraction of
a second and a shared machine's passing load hits all four alike. A step is timed from
its ``on_step_begin`` to the next one: forward, backward, optimizer, every callback.

Reported per set-up, median over ``--rounds`` of the mean after ``--warmup`` steps:

- *callback us/step*: time inside the logging callback's own hooks (and, for
  TBXCallback, inside its wrappers of ``training_step`` and ``unscale_gradients``,
  the wrapped calls themselves left out, and inside the monitor's optimizer post-hook):
  the logging overhead, measured directly;
- *us/step* and *overhead us/step*: the whole step, and its difference from the
  floor of the same round (noisier: it also holds the machine's noise).

    python benchmarks/bench_hf.py [--rounds 3] [--steps 300] [--logging-steps 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.integrations import TensorBoardCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _lockstep import Baton  # the same turn-taking as the Lightning benchmarks

from tbx_lightning import TBXCallback
from tbx_lightning.templates.hf_finetune import corpus_text, lora_llama, text_blocks, word_tokenizer

SETUPS = ("report_to=none", "TensorBoardCallback", "TBXCallback(monitor=False)", "TBXCallback()")


class Clock(TrainerCallback):  # type: ignore[misc]
    """Times each optimizer step, running it only while it holds the baton."""

    def __init__(self, baton: Baton, name: str) -> None:
        self.baton, self.name = baton, name
        self.times: list[float] = []
        self.start: float | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.start is not None:
            self.times.append(time.perf_counter() - self.start)
            self.baton.done(self.name)
        self.baton.wait(self.name)
        self.start = time.perf_counter()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.start is not None:
            self.times.append(time.perf_counter() - self.start)
        self.baton.done(self.name, leaving=True)


class HookTime:
    """Seconds spent inside one callback's hooks during training steps."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.lock = threading.Lock()

    def timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - began

        return call

    def watch(self, callback: Any) -> None:
        """Times the per-step hooks (not train begin/end: once per training)."""
        for name in (
            "on_step_begin",
            "on_substep_end",
            "on_pre_optimizer_step",
            "on_optimizer_step",
            "on_step_end",
            "on_log",
            "on_save",
            "on_evaluate",
        ):
            if hasattr(callback, name):
                setattr(callback, name, self.timed(getattr(callback, name)))
        hooks = getattr(callback, "_hooks", None)
        if hooks is not None:  # TBXCallback's wrappers, minus the wrapped calls
            micro = hooks._on_micro_batch

            def on_micro_batch(call: Callable[[], Any], inputs: Any) -> Any:
                inner = [0.0]

                def wrapped() -> Any:
                    began = time.perf_counter()
                    try:
                        return call()
                    finally:
                        inner[0] += time.perf_counter() - began

                began = time.perf_counter()
                try:
                    return micro(wrapped, inputs)
                finally:
                    self.seconds += time.perf_counter() - began - inner[0]

            hooks._on_micro_batch = on_micro_batch
            hooks._on_unscaled = self.timed(hooks._on_unscaled)
            start_monitor = callback._start_monitor

            def timed_monitor(*args: Any, **kwargs: Any) -> None:
                # The optimizer's step post-hook (post-clip norm, update ratio, lr) too.
                start_monitor(*args, **kwargs)
                monitor = callback.monitor
                monitor.after_clip = self.timed(monitor.after_clip)
                monitor.after_optimizer_step = self.timed(monitor.after_optimizer_step)

            callback._start_monitor = timed_monitor


def build(
    setup: str, clock: Clock, args: argparse.Namespace, root: str, data: Any, vocab: int
) -> tuple[Trainer, HookTime]:
    torch.manual_seed(0)
    model = lora_llama(vocab, hidden_size=64, intermediate_size=172)
    targs = TrainingArguments(
        os.path.join(root, setup.replace("=", "-").replace("(", "").replace(")", "")),
        max_steps=args.steps,
        per_device_train_batch_size=8,
        logging_steps=args.logging_steps,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
        learning_rate=1e-3,
        dataloader_num_workers=0,
    )
    hooks = HookTime()
    callbacks: list[Any] = [clock]
    if setup == "TensorBoardCallback":
        tb = TensorBoardCallback()
        tb.logging_dir = os.path.join(root, "tensorboard")
        callbacks.append(tb)
        hooks.watch(tb)
    elif setup.startswith("TBXCallback"):
        tbx = TBXCallback(os.path.join(root, "tbx"), monitor=setup == "TBXCallback()")
        callbacks.append(tbx)
        hooks.watch(tbx)
    trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=callbacks)
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    return trainer, hooks


def train_round(
    args: argparse.Namespace, seed: int, data: Any, vocab: int
) -> dict[str, tuple[list[float], float]]:
    baton = Baton(list(SETUPS), seed)
    with tempfile.TemporaryDirectory() as root:
        built = {s: build(s, Clock(baton, s), args, root, data, vocab) for s in SETUPS}
        clocks = {
            s: next(c for c in t.callback_handler.callbacks if isinstance(c, Clock))
            for s, (t, _) in built.items()
        }
        errors: list[BaseException] = []

        def train(trainer: Trainer) -> None:
            try:
                trainer.train()
            except BaseException as error:  # re-raised after the join
                errors.append(error)

        threads = [threading.Thread(target=train, args=(t,)) for t, _ in built.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return {s: (clocks[s].times, built[s][1].seconds) for s in SETUPS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--logging-steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    text = corpus_text()
    tokenizer = word_tokenizer(text, 512)
    data = text_blocks(tokenizer, text, 32)
    step_us: dict[str, list[float]] = {s: [] for s in SETUPS}
    hook_us: dict[str, list[float]] = {s: [] for s in SETUPS}
    for seed in range(args.rounds):
        result = train_round(args, seed, data, len(tokenizer))
        for setup, (times, hooks) in result.items():
            measured = times[args.warmup :]
            step_us[setup].append(1e6 * statistics.fmean(measured))
            hook_us[setup].append(1e6 * hooks / len(times))
    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"{args.rounds} rounds x {args.steps} steps, logging_steps={args.logging_steps}, "
        f"torch threads {args.threads}"
    )
    print("| set-up | callback us/step | vs TensorBoardCallback | us/step | overhead us/step |")
    print("|---|---:|---:|---:|---:|")
    floor = statistics.median(step_us["report_to=none"])
    stock = statistics.median(hook_us["TensorBoardCallback"])
    for setup in SETUPS:
        hooks = statistics.median(hook_us[setup])
        step = statistics.median(step_us[setup])
        ratio = "-" if setup == "report_to=none" else f"{hooks / stock:.2f}"
        overhead = [s - f for s, f in zip(step_us[setup], step_us["report_to=none"], strict=True)]
        print(
            f"| {setup} | {hooks:.1f} | {ratio} | {step:.0f} | "
            f"{statistics.median(overhead):+.0f} [{min(overhead):+.0f} to {max(overhead):+.0f}] |"
        )
    print(f"floor: {floor:.0f} us/step")


if __name__ == "__main__":
    main()
