"""A run whose writer keeps its RunSummary, for the summary-versus-events table tests.

The writer's background thread gives every scalar event it encodes to
``RunSummary.add`` and follows every successful flush with ``covers(event file, bytes
written)`` and ``save()``.

Run as a script: ``summary_run.py ROOT LR STEPS finish|hang READY_FILE`` logs STEPS
steps into a new version under ROOT, flushing every 50 steps; ``finish`` ends the run
with the success status, ``hang`` logs more points after the last flush, writes
READY_FILE once they are on disk beyond what the summary covers, and goes on logging
until it is killed.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

from tbx_lightning import _fs
from tbx_lightning._summary import RunSummary, read_summary
from tbx_lightning._writer import RunWriter
from tbx_lightning.hparams import RunHParams


def wired_writer(log_dir: str, **kwargs: Any) -> tuple[RunWriter, RunSummary]:
    """A RunWriter and the RunSummary its writer thread keeps."""
    run = RunWriter(log_dir, **kwargs)
    return run, run._summary


def metrics(step: int, lr: float) -> dict[str, float]:
    return {
        "train/loss": 1.0 / (1.0 + lr * step),
        "val/acc": (step % 37) / 37.0,
        "val/loss": math.nan if step % 25 == 0 else 2.0 - step * 1e-3,
        "big": 1e39 if step == 3 else float(step),
    }


def main(root: str, lr: float, steps: int, mode: str, ready: str) -> None:
    _, log_dir, _ = _fs.run_dir(root, "sweep", None)
    run, _summary = wired_writer(log_dir, flush_secs=3600)
    hp = RunHParams(run)
    hp.log({"model": {"lr": lr}, "seed": 0})
    for step in range(steps):
        run.log_scalars(metrics(step, lr), step)
        if step % 50 == 49:
            run.flush()
    run.flush()
    if mode == "finish":
        hp.finish("success")
        run.close()
        return
    fs, path = _fs.resolve(log_dir)
    step = steps
    while True:  # until the points past the last flush are on disk, then until killed
        run.log_scalars(metrics(step, lr), step)
        step += 1
        time.sleep(0.01)
        saved = read_summary(fs, path)
        covered = dict(saved.files) if saved is not None else {}
        on_disk = os.path.getsize(run.event_file)
        if on_disk > covered.get(os.path.basename(run.event_file), 0) and not os.path.exists(ready):
            with open(ready, "w", encoding="utf-8") as handle:
                handle.write(str(os.getpid()))


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
