"""The ``alerts_demo`` template on a short budget, as more than one test module runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# 3 epochs of 8 batches: a loss spike at step 14, NaN losses from step 18.
SPIKE_AT, NAN_FROM = 14, 18


def fit_alerts_demo(work: Path, timeout: float = 240) -> str:
    """Runs ``tbx-lightning fit alerts_demo`` into ``work/runs``; returns its output."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tbx_lightning.cli",
            "fit",
            "alerts_demo",
            f"paths.runs_dir={work / 'runs'}",
            "trainer.max_epochs=3",
            "trainer.limit_train_batches=8",
            "trainer.limit_val_batches=2",
            "trainer.enable_progress_bar=false",
            "data.limit=256",
            f"model.net.inject_spike_at={SPIKE_AT}",
            f"model.net.inject_nan_from={NAN_FROM}",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        cwd=work,
        timeout=timeout,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr
