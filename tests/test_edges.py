"""Nothing lost at the edges: storage that fails at the end of a run, or for a long time.

Storage failures are real ones: a child process lowers its own file-size limit
(``RLIMIT_FSIZE``, with ``SIGXFSZ`` ignored), so every write past it fails with
``EFBIG`` as on a full disk, and raises the limit again to free the space. What the
child left is read back with TensorBoard's reader.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tbx_lightning import RunInUseError, RunWriter, TBXLogger
from tests.rows import session
from tests.tb import read

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[1]

# A Lightning logger whose disk fills in the run's last seconds: 300 steps are flushed,
# the last 100 and the final status meet a full disk, and then the space is freed.
FULL_AT_THE_END = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
from tbx_lightning import RunWriterError, TBXLogger

root, recover = sys.argv[1], sys.argv[2]
logger = TBXLogger(root, name="exp", version=0, flush_secs=3600)
logger.log_hyperparams({"lr": 0.1})
for step in range(300):
    logger.log_metrics({"loss": float(step)}, step)
logger.flush()
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))  # the disk is full
for step in range(300, 400):
    logger.log_metrics({"loss": float(step)}, step)
if recover == "hparams":
    try:
        logger.log_hyperparams({"late": 1})
    except Exception as error:
        print("HPARAMS", type(error).__name__, error, flush=True)
    raise SystemExit(0)
try:
    logger.finalize("success")
except RunWriterError as error:
    print("FINALIZE", type(error).__name__, error, flush=True)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space is freed
if recover == "flush":
    logger.flush()
else:
    logger.finalize("success")
print("DONE", flush=True)
"""


def _child(tmp_path: Path, script: str, *args: str, timeout: float = 150) -> str:
    path = tmp_path / "child.py"
    path.write_text(script)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, str(path), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=timeout,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


@pytest.mark.parametrize("recover", ["flush", "finalize"])
def test_a_disk_full_at_the_end_loses_nothing_once_space_is_freed(
    tmp_path: Path, recover: str
) -> None:
    out = _child(tmp_path, FULL_AT_THE_END, str(tmp_path / "logs"), recover)
    assert "DONE" in out, out
    assert "FINALIZE RunWriterError" in out and "call flush() to retry" in out, out
    run_dir = tmp_path / "logs" / "exp" / "version_0"
    acc = read(run_dir)
    assert [e.step for e in acc.Scalars("loss")] == list(range(400))
    config, status = session(acc)
    assert status == "STATUS_SUCCESS"
    assert config == {"lr": 0.1}


def test_log_hyperparams_on_a_full_disk_raises_a_run_writer_error(tmp_path: Path) -> None:
    out = _child(tmp_path, FULL_AT_THE_END, str(tmp_path / "logs"), "hparams")
    # It names the file and what to do, and the refused call changed nothing.
    assert "HPARAMS RunWriterError Writing " in out and "config.yaml" in out, out
    assert "Free space" in out, out
    run_dir = tmp_path / "logs" / "exp" / "version_0"
    assert "late" not in (run_dir / "config.yaml").read_text()


# A loop that catches every error and keeps logging while writes fail for good.
KEEPS_LOGGING = """
import json, os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from tbx_lightning import RunWriter, RunWriterError

def rss():
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

run = RunWriter(sys.argv[1], flush_secs=0.05, max_queue_bytes=1 << 20)
run.log_scalars({"warm": 0.0}, 0)
run.flush()
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(run.event_file), hard))
keys = {f"layer{i}/grad_norm": 0.5 for i in range(50)}
landed, refused, not_queued = [], 0, 0
start = rss()
for step in range(1, 30_001):
    try:
        run.log_scalars(keys, step)
        landed.append(step)
    except RunWriterError as error:
        refused += 1
        not_queued += "were not queued" in str(error)
grown = rss() - start
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
run.flush()
run.close()
print(json.dumps({"grown": grown, "landed": landed, "refused": refused,
                  "not_queued": not_queued}))
"""


def test_memory_stays_bounded_while_writes_keep_failing(tmp_path: Path) -> None:
    out = _child(tmp_path, KEEPS_LOGGING, str(tmp_path / "run"))
    report = json.loads(out.strip().splitlines()[-1])
    # 30,000 calls of 50 keys are about 45 MB of events; 1 MiB of them may wait.
    assert report["grown"] < 48 * 1024 * 1024, report["grown"]
    # One error reports the failure; past the budget each call says it queued nothing.
    assert report["refused"] > 0 and report["not_queued"] >= report["refused"] - 1
    # Never dropped silently: exactly the calls that returned normally are written.
    steps = [e.step for e in read(tmp_path / "run").Scalars("layer7/grad_norm")]
    assert steps == report["landed"]
    assert len(steps) + report["refused"] == 30_000


def test_a_refused_call_says_why_and_queues_nothing(tmp_path: Path) -> None:
    run = RunWriter(tmp_path, flush_secs=3600, max_queue_bytes=4096)
    failing = {"on": True}
    real = run._stream.file.write

    def write(data: Any) -> None:
        if failing["on"]:
            raise OSError(28, "No space left on device")
        real(data)

    run._stream.file.write = write  # type: ignore[method-assign]
    landed, errors = [], []
    for step in range(200):
        try:
            run.log_scalars({"loss": float(step), "acc": 0.5}, step)
            landed.append(step)
        except Exception as error:
            errors.append(error)
        time.sleep(0.001)
    held = run._bytes_in - run._bytes_out + len(run._stream.pending)
    assert held <= 4096 + 400  # the budget, and one call of one producer over it
    assert errors and all(type(e).__name__ == "RunWriterError" for e in errors)
    assert any("were not queued" in str(e) and "max_queue_bytes=4096" in str(e) for e in errors)
    failing["on"] = False
    run.flush()
    run.close()
    assert [e.step for e in read(tmp_path).Scalars("loss")] == landed


# ------------------------------------------------------------------ naming and sharing
def test_a_resumed_run_sorts_after_the_first_when_its_clock_is_behind(tmp_path: Path) -> None:
    with RunWriter(tmp_path) as run:
        for step in range(100):
            run.log_scalars({"loss": float(step)}, step)
    (first,) = [p for p in tmp_path.iterdir() if p.name.startswith("events.out.tfevents.1")]
    ahead = int(time.time()) + 10**6  # the first process's clock was 11 days ahead
    first.rename(tmp_path / first.name.replace(first.name.split(".")[3], str(ahead), 1))
    with RunWriter(tmp_path, purge_step=50) as run:
        for step in range(50, 100):
            run.log_scalars({"loss": 1000.0 + step}, step)
        second = Path(run.event_file).name
    names = sorted(p.name for p in tmp_path.iterdir() if "tfevents" in p.name)
    assert names[-1] == second
    loss = [(e.step, e.value) for e in read(tmp_path).Scalars("loss")]
    # One curve: the purged steps are hidden, never shown again after the resumed ones.
    assert loss == [(s, float(s)) for s in range(50)] + [(s, 1000.0 + s) for s in range(50, 100)]


def test_two_loggers_of_one_explicit_version_in_one_process_do_not_mix(tmp_path: Path) -> None:
    first = TBXLogger(tmp_path, name="exp", version=3, flush_secs=0.05)
    second = TBXLogger(tmp_path, name="exp", version=3, flush_secs=0.05)
    first.log_hyperparams({"who": "first"})
    with pytest.raises(
        RunInUseError, match=r"'.*version_3' is already open in this process .*Close that one"
    ):
        second.log_hyperparams({"who": "second"})
    first.log_metrics({"loss": 1.0}, 0)
    first.finalize("success")
    # Once the first is done, the second resumes the run: its row replaces the first's.
    second.log_hyperparams({"who": "second"})
    second.log_metrics({"loss": 2.0}, 1)
    second.finalize("failed")
    run_dir = Path(first.log_dir)
    config, status = session(run_dir)
    assert config == {"who": "second"} and status == "STATUS_FAILURE"
    assert [(e.step, e.value) for e in read(run_dir).Scalars("loss")] == [(0, 1.0), (1, 2.0)]


def test_a_second_run_writer_of_one_folder_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    first = RunWriter(tmp_path)
    with pytest.raises(RunInUseError, match="already open in this process"):
        RunWriter(tmp_path / "." / "")
    first.log_scalars({"loss": 1.0}, 0)
    first.close()
    with RunWriter(tmp_path) as second:
        second.log_scalars({"loss": 2.0}, 1)
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("events.out")]) == 2
    assert [(e.step, e.value) for e in read(tmp_path).Scalars("loss")] == [(0, 1.0), (1, 2.0)]


# ------------------------------------------------------------------ Lightning's fixtures
@pytest.mark.parametrize("where", ["local", "memory"])
def test_leftover_writer_threads_stop_as_tensorboardx_threads_do(
    tmp_path: Path, where: str
) -> None:
    """What Lightning's test fixtures (and conftests copied from them) do after each test."""
    before = set(threading.enumerate())
    save_dir = str(tmp_path) if where == "local" else f"memory://stop-{os.getpid()}-{id(tmp_path)}"
    logger = TBXLogger(save_dir, name="exp", flush_secs=60)
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"loss": 1.0}, 0)  # never finalized: the test "forgot" to
    left = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert left
    for thread in left:  # Lightning's thread_police_duuu_daa_duuu_daa, line by line
        stop = getattr(thread, "stop", None) or getattr(thread, "exit", None)
        assert thread.daemon and callable(stop), f"Test left zombie thread: {thread}"
        stop()
        assert not thread.is_alive()
    if where == "local":
        assert [e.step for e in read(Path(logger.log_dir)).Scalars("loss")] == [0]
