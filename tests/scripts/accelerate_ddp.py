"""Runs a short loop with ``log_with="tbx"`` on several CPU processes.

Started by tests/test_accelerate.py in two ways:

    accelerate launch --num_processes 2 --cpu tests/scripts/accelerate_ddp.py OUT
    python tests/scripts/accelerate_ddp.py OUT --debug-launcher

Each process writes ``OUT/done_<rank>.txt`` when it gets past ``end_training``, so
the test can tell that no process blocked; only the main process writes a run.
"""

from __future__ import annotations

import os
import sys

import tbx_lightning  # noqa: F401  (registers "tbx" before accelerate is imported)


def train(out: str) -> None:
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(log_with="tbx", project_dir=os.path.join(out, "runs"))
    config = {"model": {"lr": 0.01, "layers": [4, 2]}, "seed": None}
    accelerator.init_trackers("ddp", config=config)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model, optimizer = accelerator.prepare(model, optimizer)
    torch.manual_seed(accelerator.process_index)
    for step in range(5):
        x = torch.randn(8, 4)
        loss = model(x).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        # Every process calls log; only the main one writes.
        accelerator.log(
            {"loss": loss.detach(), "rank": float(accelerator.process_index)}, step=step
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    rank = accelerator.process_index
    with open(os.path.join(out, f"done_{rank}.txt"), "w") as handle:
        handle.write(str(accelerator.num_processes))
    # Leaving with the gloo group alive can abort a process at interpreter exit
    # ("terminate called without an active exception"); close it as Accelerate advises.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def main() -> None:
    out = sys.argv[1]
    if "--debug-launcher" in sys.argv:
        from accelerate import debug_launcher

        debug_launcher(train, args=(out,), num_processes=2)
    else:
        train(out)


if __name__ == "__main__":
    main()
