"""A LoRA fine-tune in an Accelerate loop, with the monitor's alerts and a clean stop.

The same model and data as ``examples/lora_lightning.py``; the loop is the one
docs/monitor.md shows. ``ModelMonitor.after_backward`` returns False when the
gradients (or the loss) hold NaN/Inf on any process: it has cleared the gradients,
so the optimizer step leaves the weights as they are, and ``should_stop`` is set on
every process::

    python examples/lora_accelerate.py --max-steps 60
    accelerate launch --num_processes 2 examples/lora_accelerate.py   # the same, on two processes
    python examples/lora_accelerate.py --nan-from 30                  # the alert stop
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

import torch
from accelerate import Accelerator
from lora_common import loaders, lora_model, token_table

import tbx_lightning  # noqa: F401 - registers Accelerator(log_with="tbx")
from tbx_lightning.monitor import ModelMonitor


def main(argv: Sequence[str] | None = None) -> str:
    """Runs the fine-tune; returns the run directory."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--nan-from", type=int, default=None)
    args = parser.parse_args(argv)
    train, _, vocab = loaders()
    accelerator = Accelerator(log_with="tbx", project_dir=args.runs, mixed_precision="bf16")
    accelerator.init_trackers("lora_accelerate", config={"lr": 2e-3, "lora_rank": 8})
    model = lora_model(len(vocab))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-3)
    model, optimizer, train = accelerator.prepare(model, optimizer, train)
    monitor = ModelMonitor.from_accelerator(
        accelerator, model, norm_every_n_steps=5, hist_every_n_steps=20, on_alert="stop"
    )
    monitor.attach(optimizer)
    tracker = accelerator.get_tracker("tbx") if accelerator.is_main_process else None
    if tracker is not None:
        table = token_table(accelerator.unwrap_model(model), len(vocab))
        tracker.log_embedding("token_embeddings", table, metadata=vocab, step=0)
    step = 0
    while step < args.max_steps and not monitor.should_stop:
        for (ids,) in train:
            loss = model(input_ids=ids, labels=ids).loss
            if args.nan_from is not None and step >= args.nan_from:
                loss = loss * math.nan  # a poisoned batch, to show the alert stop
            accelerator.backward(loss)
            if monitor.after_backward(step, loss=loss):  # False: a non-finite step, skipped
                accelerator.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            if step % 5 == 0:
                accelerator.log({"train": {"loss": loss.item()}}, step=step)
            monitor.log_throughput(step, samples=len(ids), tokens=ids.numel())
            step += 1
            if step >= args.max_steps or monitor.should_stop:  # the same on every process
                break
    monitor.detach()
    log_dir = ""
    if tracker is not None:
        table = token_table(accelerator.unwrap_model(model), len(vocab))
        tracker.log_embedding("token_embeddings", table, metadata=vocab, step=step)
        log_dir = tracker.log_dir
        print(f"tensorboard --logdir {log_dir}")
    accelerator.end_training()  # failed, with the alert as the reason, after an alert stop
    return log_dir


if __name__ == "__main__":
    main()
