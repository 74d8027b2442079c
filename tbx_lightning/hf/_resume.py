"""The run a checkpoint belongs to, kept in the checkpoint folder.

Each checkpoint the Trainer saves gets a small ``tbx_run.json`` beside its
``trainer_state.json``: the run's version and the step the checkpoint was taken at.
``trainer.train(resume_from_checkpoint=...)`` reads it back and reopens that version,
with a purge step one past the checkpoint's step, so TensorBoard shows one curve: what
the interrupted process logged after the checkpoint is hidden, the resumed process's
steps take its place.

A file rather than transformers' ``ExportableState`` in ``trainer_state.json``: with
``restore_callback_states_from_checkpoint=True`` the Trainer rebuilds every exportable
callback from its saved arguments and drops the instance the user configured. The
file goes and comes with its checkpoint folder (rotation, copies, uploads).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["RUN_FILE", "RunRecord", "read_record", "write_record"]

RUN_FILE = "tbx_run.json"


@dataclass(frozen=True)
class RunRecord:
    """Where a checkpoint's run lives.

    Attributes:
        version: The run folder's version (``N`` of ``version_N``, or the folder name).
        step: The global step the checkpoint was saved at.
        log_dir: The run directory when the checkpoint was saved (for messages).
    """

    version: int | str
    step: int
    log_dir: str


def write_record(checkpoint_dir: str, record: RunRecord) -> str | None:
    """Writes ``tbx_run.json`` into ``checkpoint_dir``; returns its path (None: no such folder)."""
    if not os.path.isdir(checkpoint_dir):
        return None
    path = os.path.join(checkpoint_dir, RUN_FILE)
    text = json.dumps(
        {"version": record.version, "step": record.step, "log_dir": record.log_dir}, indent=1
    )
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)
    return path


def read_record(checkpoint_dir: str | None) -> RunRecord | None:
    """The record in ``checkpoint_dir``, or None when there is none or it is not one of ours.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> _ = write_record(folder, RunRecord(version=3, step=40, log_dir="runs/version_3"))
        >>> read_record(folder)
        RunRecord(version=3, step=40, log_dir='runs/version_3')
    """
    if not checkpoint_dir:
        return None
    try:
        with open(os.path.join(checkpoint_dir, RUN_FILE), encoding="utf-8") as handle:
            data: Any = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    version, step = data.get("version"), data.get("step")
    if isinstance(version, bool) or not isinstance(version, int | str):
        return None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return None
    if isinstance(version, str) and (not version or os.sep in version or version in (".", "..")):
        return None  # a folder name only: a record never points outside the runs folder
    return RunRecord(version=version, step=step, log_dir=str(data.get("log_dir", "")))
