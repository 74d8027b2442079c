"""A live run holds its directory: a second writer is refused, a claimed number never reused.

Real processes: a holder runs in a child process (or a forked child), and TensorBoard's
reader checks that the holder's HParams row and status are what it wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tbx_lightning._fs import claim_version, existing_versions, run_dir
from tbx_lightning._lease import LEASE_FILE
from tbx_lightning._writer import RunWriter
from tbx_lightning.errors import RunInUseError, RunWriterError
from tbx_lightning.hparams import RunHParams
from tests.rows import session

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]

# Opens the run, logs its row and some steps, says READY, waits for a line, finishes.
HOLDER = """
import sys
from tbx_lightning._writer import RunWriter
from tbx_lightning.hparams import RunHParams
run = RunWriter(sys.argv[1], flush_secs=0.2)
hp = RunHParams(run)
hp.log({"lr": 0.1, "owner": "first"})
for step in range(5):
    run.log_scalars({"loss": float(step)}, step)
run.flush()
print("READY", flush=True)
if sys.stdin.readline().strip() == "finish":
    hp.finish("success")
    run.close()
"""


def _start_holder(tmp_path: Path, log_dir: Path) -> subprocess.Popen[str]:
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(log_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
    return proc


def test_second_process_on_one_explicit_version_is_refused(tmp_path: Path) -> None:
    _, log_dir, _ = run_dir(tmp_path, "exp", 3)
    holder = _start_holder(tmp_path, Path(log_dir))
    try:
        with pytest.raises(
            RunInUseError,
            match=rf"'{log_dir}' is in use by another writer: pid {holder.pid} on host .*"
            r"Pick another `version`.*remove '.*\.tbx-lease\.json'",
        ):
            run = RunWriter(log_dir)  # a second process on the same version
            RunHParams(run).finish("failed")  # what used to overwrite the first run's row
    finally:
        assert holder.stdin is not None
        holder.stdin.write("finish\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
    hparams, status = session(Path(log_dir))
    assert hparams == {"lr": 0.1, "owner": "first"}  # the first run's row, not overwritten
    assert status == "STATUS_SUCCESS"
    assert not os.path.exists(os.path.join(log_dir, LEASE_FILE))  # given back at close
    # Once the first run ended, its version can be resumed.
    with RunWriter(log_dir) as run:
        run.log_scalars({"loss": 9.0}, 9)


def test_deleting_the_newest_live_version_never_hands_its_number_out_again(
    tmp_path: Path,
) -> None:
    fs = fsspec.filesystem("file")
    root = str(tmp_path / "exp")
    assert claim_version(fs, root) == 0
    assert claim_version(fs, root) == 1
    run = RunWriter(os.path.join(root, "version_1"), flush_secs=0.2)
    run.log_scalars({"loss": 1.0}, 0)
    run.flush()
    shutil.rmtree(os.path.join(root, "version_1"))  # the newest folder, while its run writes
    assert existing_versions(fs, root) == [0, 1]
    assert claim_version(fs, root) == 2
    shutil.rmtree(root)  # even the whole experiment folder: the claims went with it
    assert claim_version(fs, root) == 0
    with pytest.raises(RunWriterError, match="was removed while the run was writing"):
        run.close()


def test_stale_lease_of_a_killed_process_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    log_dir = tmp_path / "run"
    holder = _start_holder(tmp_path, log_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    lease = log_dir / LEASE_FILE
    assert json.loads(lease.read_text())["pid"] == holder.pid  # left behind by the kill
    with pytest.warns(
        UserWarning, match=rf"taking over the stale lease .* pid {holder.pid} on host"
    ):
        run = RunWriter(log_dir)
    assert json.loads(lease.read_text())["pid"] == os.getpid()
    hp = RunHParams(run)
    hp.log({"lr": 0.2})
    hp.finish("success")
    run.close()
    assert not lease.exists()


def test_reused_pid_is_stale_too(tmp_path: Path) -> None:
    """A lease naming a running pid whose process started at another time is stale."""
    import socket

    info = {
        "pid": 1,  # runs, but is not the process that wrote the lease:
        "host": socket.gethostname(),
        "proc_start": "1",  # its start time differs
        "started": 0,
        "heartbeat": 0,
        "stale_after": 120,
        "token": "someone-else",
    }
    (tmp_path / LEASE_FILE).write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="taking over the stale lease"):
        RunWriter(tmp_path).close()


def test_holder_on_another_host_is_live_until_its_heartbeat_is_old(tmp_path: Path) -> None:
    import time

    lease = tmp_path / LEASE_FILE
    info = {
        "pid": 12345,
        "host": "elsewhere.example",
        "started": time.time(),
        "heartbeat": time.time(),
        "stale_after": 120,
        "token": "remote-holder",
    }
    lease.write_text(json.dumps(info))
    with pytest.raises(RunWriterError, match=r"pid 12345 on host 'elsewhere.example'"):
        RunWriter(tmp_path)
    info["heartbeat"] = time.time() - 121
    lease.write_text(json.dumps(info))
    with pytest.warns(UserWarning, match="taking over the stale lease"):
        RunWriter(tmp_path).close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_opens_a_writer_in_its_parents_run(tmp_path: Path) -> None:
    run = RunWriter(tmp_path, flush_secs=3600)
    run.log_scalars({"parent": 1.0}, 0)
    lease = tmp_path / LEASE_FILE
    token = json.loads(lease.read_text())["token"]
    pid = os.fork()
    if pid == 0:  # the child: a writer of its own in the same run, and leave without atexit
        code = 0
        try:
            with RunWriter(tmp_path, flush_secs=3600) as child:
                child.log_scalars({"child": 2.0}, 0)
            run.log_scalars({"inherited": 3.0}, 0)  # the parent's writer, restarted
            run.close()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert json.loads(lease.read_text())["token"] == token  # the child left the parent's lease
    run.close()
    assert not lease.exists()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["child", "inherited", "parent"]
