"""A Lightning callback that holds every run of a sweep at the start of training until all are there.

Runs that the launcher really starts at once all pass it; runs started one after
another never do (the first waits for the others until it times out and fails).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


class Barrier(pl.Callback):
    def __init__(self, directory: str, parties: int, timeout: float = 300.0) -> None:
        self.directory = Path(directory)
        self.parties = parties
        self.timeout = timeout

    def on_train_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"{os.getpid()}-{uuid.uuid4().hex}").touch()
        deadline = time.monotonic() + self.timeout
        while len(list(self.directory.iterdir())) < self.parties:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(list(self.directory.iterdir()))} runs arrived")
            time.sleep(0.05)
