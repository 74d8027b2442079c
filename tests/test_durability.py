"""A process killed (SIGKILL) at any moment leaves a run every reader can read.

The HParams row and status are rewritten while the run goes on; a kill in the middle
of a rewrite must leave the row old or new, never torn, and every flushed event
readable by TensorBoard's reader and by the ``hparams`` table.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
from tensorboard.plugins.hparams import metadata

from tbx_lightning._writer import RECORDS_FILE, RunWriter
from tbx_lightning.cli import _table
from tbx_lightning.hparams import (
    SESSION_END_TAG,
    SESSION_START_TAG,
    HParamValue,
    session_end_event,
    session_start_event,
)

KILLS = 25


def _row(n: int, keys: int) -> dict[str, HParamValue]:
    return {"n": n, **{f"blob.k{i:04d}": f"{n}-{i}" for i in range(keys)}}


def _rewrite_until_killed(run_dir: str, index: int, keys: int, ready: str, flushed: str) -> None:
    """One process of the run: rewrites the HParams row and status as fast as it can.

    It does what :class:`RunHParams` does on each ``log``/``finish`` (a resumed process
    replaces the run's records), minus the config files, so that most of its time goes
    into the rewrites a kill should hit.
    """
    run = RunWriter(run_dir, flush_secs=3600)
    now = time.time()
    rows = [session_start_event(_row(index * 1000 + v, keys), now) for v in range(4)]
    ends = [session_end_event(s, now) for s in ("failed", "success")]
    log = os.open(flushed, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    step = 0
    while True:
        run.log_scalars({f"p{index}": float(step)}, step)
        run.put_record(rows[step % 4])
        run.put_record(ends[step % 2])
        run.flush()
        os.write(log, f"{step}\n".encode())
        if step == 0:
            Path(ready).touch()
        step += 1


def _check_run(run_dir: Path, flushed: dict[int, int], keys: int) -> None:
    acc = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {f"p{i}" for i in flushed}
    for index, last in flushed.items():
        steps = [e.step for e in acc.Scalars(f"p{index}")]
        # Everything flushed is there, in order, and nothing torn after it.
        assert steps == list(range(len(steps))) and len(steps) > last
    content = acc.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(content[SESSION_START_TAG])
    row = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    n = int(row["n"])
    # The whole row of one rewrite: every value from the same call.
    assert row == {**_row(n, keys), "n": float(n)}
    end = metadata.parse_session_end_info_plugin_data(content[SESSION_END_TAG])
    assert end.status in (1, 2, 3)  # success, failure, running: never unreadable
    (record,) = _table.read_runs(run_dir.parent)
    assert record.hparams.get("n") == n and record.status in ("success", "failure", "running")
    assert record.stats[f"p{max(flushed)}"].count >= flushed[max(flushed)] + 1


def _wait_for(path: Path, proc: multiprocessing.process.BaseProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.is_alive(), f"the writer process exited with {proc.exitcode}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "keys",
    [
        pytest.param(8000, id="large-record"),  # about 200 kB
        pytest.param(8, id="small-record"),  # well under a page
    ],
)
def test_sigkill_during_record_rewrites_leaves_every_reader_a_whole_run(
    tmp_path: Path, keys: int
) -> None:
    ctx = multiprocessing.get_context("fork")
    run_dir = tmp_path / "runs" / "run"
    flushed: dict[int, int] = {}
    rng = random.Random(keys)
    for index in range(KILLS):
        ready, log = tmp_path / f"ready{index}", tmp_path / f"flushed{index}"
        proc = ctx.Process(
            target=_rewrite_until_killed, args=(str(run_dir), index, keys, str(ready), str(log))
        )
        proc.start()
        try:
            _wait_for(ready, proc, timeout=60)
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL
        flushed[index] = int(log.read_text().split()[-1])
        _check_run(run_dir, flushed, keys)
    names = os.listdir(run_dir)
    # Rows of every size live in the records file, replaced whole; no temporary file of
    # a killed rewrite looks like an event file to a reader.
    assert RECORDS_FILE in names
    assert not [n for n in names if n.endswith(".tmp") and "tfevents" in n]
