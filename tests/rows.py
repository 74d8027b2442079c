"""HParams rows as tests read them: the config's own columns, the run's columns checked apart.

Every finished run's row also holds ``run.status`` and ``run.duration_s`` (see
tbx_lightning.hparams). Tests about config keys compare the config columns exactly;
:func:`session` checks the run columns against the session's end status on the way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from tbx_lightning.hparams import DURATION_COLUMN, STATUS_COLUMN

RUN_COLUMNS = (STATUS_COLUMN, DURATION_COLUMN)
# The label ``run.status`` shows for each session status a run can end with.
_LABELS = {"STATUS_SUCCESS": {"success"}}  # a failure keeps the word it was given


def split_run_columns(row: dict[str, Any], status: str | None = None) -> dict[str, Any]:
    """``row`` without the run columns, after checking them (against ``status`` if given)."""
    config = {k: v for k, v in row.items() if k not in RUN_COLUMNS}
    run = {k: row[k] for k in RUN_COLUMNS if k in row}
    if status == "STATUS_RUNNING":
        assert not run, f"a running session has no run columns yet: {run}"
    if run:
        assert set(run) == set(RUN_COLUMNS), run
        assert isinstance(run[DURATION_COLUMN], float) and run[DURATION_COLUMN] >= 0, run
        assert isinstance(run[STATUS_COLUMN], str) and run[STATUS_COLUMN], run
        if status in _LABELS:
            assert run[STATUS_COLUMN] in _LABELS[status], (run, status)
    return config


def session(source: Path | str | EventAccumulator) -> tuple[dict[str, Any], str]:
    """The run's config columns and session status, from its hparams plugin records."""
    if isinstance(source, EventAccumulator):
        acc = source
    else:
        acc = EventAccumulator(str(source))
        acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]
    ).session_start_info
    end = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_end_info"]
    ).session_end_info
    row = {key: getattr(value, value.WhichOneof("kind")) for key, value in start.hparams.items()}
    status = api_pb2.Status.Name(end.status)
    return split_run_columns(row, status), status
