"""A signal handler that finishes the run in the middle of one of its own calls.

Lightning's SLURM requeue handler (``_slurm_sigusr_handler_fn``) calls
``logger.finalize("finished")`` from a SIGUSR1 handler, which Python runs on the main
thread between two bytecodes of whatever it was doing: here, a logging loop, so the
signal lands inside the package's own calls. Real processes and real signals; a
deadlock shows as a child that does not finish in time, a crash as its exit code.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.rows import session

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
TRIALS = 40

LOGGER_LOOP = """
import os, random, signal, sys, threading
from tbx_lightning import TBXLogger

root, trials = sys.argv[1], int(sys.argv[2])
random.seed(0)
state = {}


def requeue(signum, frame):  # what Lightning's SLURM handler does with its loggers
    state["logger"].finalize("finished")
    state["fired"] += 1


signal.signal(signal.SIGUSR1, requeue)
for trial in range(trials):
    logger = TBXLogger(root, name="t", version=trial, flush_secs=0.05)
    state.update(logger=logger, fired=0)
    logger.log_hyperparams({"trial": trial})
    threading.Timer(random.uniform(0.0, 0.03), os.kill, (os.getpid(), signal.SIGUSR1)).start()
    step = after = 0
    while after < 20:  # logging goes on after the handler, as training does until requeued
        logger.log_metrics({"loss": float(step), "acc": 0.5}, step)
        if step % 7 == 3:
            logger.log_hyperparams({"trial": trial, "step": step})
        if step % 11 == 5:
            logger.experiment.add_text("note", "text", step)
        step += 1
        after += state["fired"] > 0
    logger.finalize("success")
    print("TRIAL", trial, step, flush=True)
print("DONE", flush=True)
"""


def _run_child(tmp_path: Path, script: str, *args: str) -> str:
    path = tmp_path / "child.py"
    path.write_text(script)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        done = subprocess.run(
            [sys.executable, str(path), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=240,
        )
    except subprocess.TimeoutExpired as error:  # the deadlock this test exists to catch
        raise AssertionError(f"the child hung:\n{error.stdout}\n{error.stderr}") from error
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def test_finalize_from_a_signal_handler_during_logging_is_safe(tmp_path: Path) -> None:
    out = _run_child(tmp_path, LOGGER_LOOP, str(tmp_path / "logs"), str(TRIALS))
    assert "DONE" in out
    trials = [line.split() for line in out.splitlines() if line.startswith("TRIAL")]
    assert len(trials) == TRIALS
    for _, trial, steps in trials:
        run_dir = tmp_path / "logs" / "t" / f"version_{trial}"
        acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
        acc.Reload()
        # Every step logged is there once, before and after the handler finished the run.
        assert [e.step for e in acc.Scalars("loss")] == list(range(int(steps)))
        config, status = session(acc)
        assert status == "STATUS_SUCCESS" and config["trial"] == int(trial)


WRITER_LOOP = """
import os, random, signal, sys, threading
from tbx_lightning import RunWriter, RunWriterError

root, trials = sys.argv[1], int(sys.argv[2])
random.seed(1)
state = {}


def close(signum, frame):
    state["run"].close()


signal.signal(signal.SIGUSR1, close)
for trial in range(trials):
    run = RunWriter(os.path.join(root, str(trial)), flush_secs=0.05, max_queue=64)
    state["run"] = run
    threading.Timer(random.uniform(0.0, 0.03), os.kill, (os.getpid(), signal.SIGUSR1)).start()
    landed = []
    step = 0
    while True:
        try:
            if step % 5 == 4:
                run.experiment.add_text("note", "text", step)
            run.log_scalars({"loss": float(step)}, step)
        except RunWriterError as error:
            assert "is closed" in str(error), error
            break
        landed.append(step)
        step += 1
    run.close()
    print("TRIAL", trial, " ".join(map(str, landed)), flush=True)
print("DONE", flush=True)
"""


def test_close_from_a_signal_handler_during_a_log_call_loses_nothing(tmp_path: Path) -> None:
    out = _run_child(tmp_path, WRITER_LOOP, str(tmp_path / "runs"), str(TRIALS))
    assert "DONE" in out
    trials = [line.split() for line in out.splitlines() if line.startswith("TRIAL")]
    assert len(trials) == TRIALS
    for _, trial, *landed in trials:
        acc = EventAccumulator(str(tmp_path / "runs" / trial), size_guidance={"scalars": 0})
        acc.Reload()
        # Exactly the calls that returned normally were written, the interrupted one too.
        assert [e.step for e in acc.Scalars("loss")] == [int(s) for s in landed]
