"""Shared by the Trainer route's tests: one torch thread, and TrainingArguments for tiny runs.

Imported after ``pytest.importorskip("transformers")``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import TrainingArguments


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tiny models train fastest on one thread, and far faster when other processes share
    the cores; restored after each test. Runs go where the tests say, whatever the
    environment's TENSORBOARD_LOGGING_DIR."""
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def targs(out: Path, **kwargs: Any) -> TrainingArguments:
    """A short CPU training (6 steps of 4 samples, a log every 2) reporting nowhere."""
    options: dict[str, Any] = {
        "max_steps": 6,
        "per_device_train_batch_size": 4,
        "logging_steps": 2,
        "save_strategy": "no",
        "use_cpu": True,
        "disable_tqdm": True,
        "report_to": "none",
        "learning_rate": 1e-2,
        "dataloader_num_workers": 0,
        **kwargs,
    }
    return TrainingArguments(str(out), **options)
