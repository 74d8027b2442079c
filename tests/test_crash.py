"""What survives a crash: SIGKILL, SIGTERM, Ctrl+C, a full disk, a deleted run directory, resume.

The training processes are real child processes killed with real signals; what they
left is read back with TensorBoard's reader and, for the statuses, by a real
TensorBoard server's HParams routes.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

from tbx_lightning._writer import RECORDS_FILE, RunWriter, RunWriterError
from tbx_lightning.hparams import SESSION_END_TAG, RunHParams
from tests.rows import session
from tests.tbserver import TensorBoardServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
# Generous limits: these wait for a line or an exit, and three children share two loaded cores.
CHILD_LIMIT = 300.0

# A RunWriter process that logs forever and says which step was flushed last.
WRITER_CHILD = """
import sys, time
from tbx_lightning._writer import RunWriter
from tbx_lightning.hparams import RunHParams
run = RunWriter(sys.argv[1], flush_secs=0.05)
RunHParams(run).log({"lr": 0.1, "model": {"width": 8}})
step = 0
while True:
    run.log_scalars({"loss": 1.0 / (step + 1), "step_copy": float(step)}, step)
    if step == 300:
        run.flush()
        print("FLUSHED", step, flush=True)
    step += 1
    if step % 50 == 0:
        time.sleep(0.01)
"""

# A tiny Lightning fit; prints each step so the parent knows where it is.
LIGHTNING_CHILD = """
import signal, sys, time
# This child stands in for a user's terminal session: a parent started with SIGINT ignored
# (a background job, nohup, `trap '' INT`) hands that on, and Ctrl+C would never arrive.
signal.signal(signal.SIGINT, signal.default_int_handler)
import torch
from torch.utils.data import DataLoader, TensorDataset
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from tbx_lightning.lightning import TBXLogger

root, mode = sys.argv[1], sys.argv[2]
ckpt = sys.argv[3] if len(sys.argv) > 3 else None
torch.manual_seed(0)


class Tiny(LightningModule):
    def __init__(self):
        super().__init__()
        self.save_hyperparameters({"lr": 0.05, "optim": {"name": "sgd"}})
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("loss", loss, on_step=True, on_epoch=False)
        print("STEP", self.global_step, flush=True)
        if mode != "resume" and self.global_step >= 12:
            time.sleep(0.05)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


data = DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=1)
callbacks = []
if mode in ("kill", "resume"):
    callbacks.append(ModelCheckpoint(every_n_train_steps=5, save_last=True, save_top_k=-1))
trainer = Trainer(
    max_steps=30 if mode == "resume" else 10_000,
    logger=TBXLogger(root, name="exp", flush_secs=0.05),
    callbacks=callbacks,
    log_every_n_steps=1,
    enable_checkpointing=bool(callbacks),
    enable_progress_bar=False,
    enable_model_summary=False,
    accelerator="cpu",
    devices=1,
)
trainer.fit(Tiny(), data, ckpt_path=ckpt)
print("DONE", flush=True)
"""


def _as_background_job() -> None:
    """What a shell gives a background job, ``nohup`` or ``trap '' INT``: SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _spawn(script: Path, *args: str) -> subprocess.Popen[str]:
    """Starts a child as a background job would, whatever shell started the tests."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=script.parent,
        preexec_fn=_as_background_job,
    )


@contextlib.contextmanager
def _busy_core() -> Iterator[None]:
    """Another CPU-bound process beside the children, as on a shared CI machine."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        hog.kill()
        hog.wait()


def _wait_for(proc: subprocess.Popen[str], prefix: str, timeout: float = CHILD_LIMIT) -> list[str]:
    """Reads the child's output until a line starts with ``prefix``; returns the lines read."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"child exited before {prefix!r}:\n" + "".join(lines[-40:]))
        lines.append(line)
        if line.startswith(prefix):
            return lines
    proc.kill()
    raise AssertionError(f"no {prefix!r} line within {timeout} s:\n" + "".join(lines[-40:]))


def _finish(proc: subprocess.Popen[str], timeout: float = CHILD_LIMIT) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"child did not exit in {timeout} s:\n{out[-3000:]}") from None
    return proc.returncode, out


def _steps(run_dir: str | Path, tag: str) -> list[int]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [event.step for event in acc.Scalars(tag)]


def _statuses(run_dir: str | Path) -> list[int]:
    """Every session end status in the run's event files, in file order."""
    statuses = []
    for path in sorted(glob.glob(os.path.join(str(run_dir), "*tfevents*"))):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.tag == SESSION_END_TAG:
                    data = plugin_data_pb2.HParamsPluginData.FromString(
                        value.metadata.plugin_data.content
                    )
                    statuses.append(data.session_end_info.status)
    return statuses


RUNNING, SUCCESS, FAILURE = 3, 1, 2  # tensorboard.plugins.hparams.api_pb2.Status


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Runs the signal scenarios side by side once; tests inspect what they left."""
    base = tmp_path_factory.mktemp("crash")
    logs = base / "logs"
    writer_script = base / "writer_child.py"
    writer_script.write_text(WRITER_CHILD)
    lightning_script = base / "lightning_child.py"
    lightning_script.write_text(LIGHTNING_CHILD)

    with _busy_core():
        killed = _spawn(writer_script, str(logs / "sigkill"))
        term = _spawn(lightning_script, str(logs / "sigterm"), "term")
        intr = _spawn(lightning_script, str(logs / "sigint"), "int")
        procs = [killed, term, intr]
        try:
            result: dict[str, Any] = {"logs": logs}
            _wait_for(killed, "FLUSHED")
            time.sleep(0.2)  # keep logging (and flushing) for a moment, then die mid-write
            killed.send_signal(signal.SIGKILL)
            result["sigkill"] = _finish(killed)

            for name, proc, sig in (
                ("sigterm", term, signal.SIGTERM),
                ("sigint", intr, signal.SIGINT),
            ):
                lines = _wait_for(proc, "STEP 15")
                proc.send_signal(sig)
                code, out = _finish(proc)
                steps = [
                    int(line.split()[1])
                    for line in (*lines, *out.splitlines(True))
                    if "STEP" in line
                ]
                result[name] = (code, out, steps)
            yield result
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def test_sigkill_leaves_events_up_to_the_last_flush(crashed: dict[str, Any]) -> None:
    code, _ = crashed["sigkill"]
    assert code == -signal.SIGKILL
    steps = _steps(crashed["logs"] / "sigkill", "loss")
    # Everything flushed before the kill is there, in order, without holes; a record
    # cut in half by the kill ends the stream cleanly.
    assert steps[:301] == list(range(301))
    assert steps == list(range(len(steps)))
    assert _statuses(crashed["logs"] / "sigkill") == [RUNNING]


def _lightning_run(logs: Path, name: str) -> Path:
    (run_dir,) = glob.glob(str(logs / name / "exp" / "version_*"))
    return Path(run_dir)


@pytest.mark.parametrize("name", ["sigterm", "sigint"])
def test_sigterm_and_ctrl_c_flush_and_mark_the_run_failed(
    crashed: dict[str, Any], name: str
) -> None:
    code, out, printed = crashed[name]
    assert code != 0 or name == "sigterm", out[-2000:]
    assert "DONE" not in out
    run_dir = _lightning_run(crashed["logs"], name)
    steps = _steps(run_dir, "loss")
    # Every step that finished before the signal was logged and flushed.
    assert steps == list(range(len(steps)))
    assert len(steps) >= max(printed)
    assert _statuses(run_dir) == [FAILURE]
    assert (run_dir / "config.yaml").read_text().startswith("lr: 0.05")


def test_tensorboard_shows_killed_run_running_and_interrupted_runs_failed(
    crashed: dict[str, Any],
) -> None:
    server = TensorBoardServer(crashed["logs"])
    try:
        server.wait_for_runs(3)
        groups = server.session_groups(col_params=[{"hparam": "lr"}], slice_size=10)
    finally:
        server.stop()
    status = {group["name"].split("/")[0]: group["sessions"][0]["status"] for group in groups}
    assert status == {
        "sigkill": "STATUS_RUNNING",
        "sigterm": "STATUS_FAILURE",
        "sigint": "STATUS_FAILURE",
    }


def test_resume_after_kill_continues_one_curve(tmp_path: Path) -> None:
    script = tmp_path / "lightning_child.py"
    script.write_text(LIGHTNING_CHILD)
    logs = tmp_path / "logs"
    first = _spawn(script, str(logs), "kill")
    try:
        _wait_for(first, "STEP 14")
        run_dir = logs / "exp" / "version_0"
        last = run_dir / "checkpoints" / "last.ckpt"
        assert last.exists()
        first.send_signal(signal.SIGKILL)
        _finish(first)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    killed_steps = _steps(run_dir, "loss")
    assert killed_steps[-1] >= 10

    second = _spawn(script, str(logs), "resume", str(last))
    code, out = _finish(second)
    assert code == 0 and "DONE" in out, out[-3000:]

    # One run directory, one curve: TensorBoard hides the killed process's steps after
    # the checkpoint (purge), the resumed process continues from there.
    assert sorted(n for n in os.listdir(logs / "exp") if not n.startswith(".")) == ["version_0"]
    steps = _steps(run_dir, "loss")
    assert steps == sorted(set(steps))
    assert steps[0] == 0 and steps[-1] == 29
    assert len(steps) == 30
    server = TensorBoardServer(logs)
    try:
        server.wait_for_runs(1)
        body = server.post_json(
            "/data/plugin/hparams/session_groups",
            {
                "experimentName": "",
                "allowedStatuses": ["STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
                "colParams": [{"hparam": "lr"}],
                "startIndex": 0,
                "sliceSize": 10,
            },
        )
    finally:
        server.stop()
    (group,) = body["sessionGroups"]
    assert [s["status"] for s in group["sessions"]] == ["STATUS_SUCCESS"]


# ------------------------------------------------------------------ storage failures
def _mount_tiny_tmpfs(path: Path) -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


@pytest.fixture
def tiny_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Any]]:
    """A 64 KiB file system (real tmpfs when mounting is allowed, else a simulated one).

    Yields the directory and a function that frees space on it.
    """
    mount = tmp_path / "disk"
    if _mount_tiny_tmpfs(mount):
        filler = mount / "filler"
        filler.write_bytes(b"x" * 40_000)
        try:
            yield mount, filler.unlink
        finally:
            subprocess.run(
                ["umount", "-l", str(mount)], check=False
            )  # lazy: also when a file stays open
        return
    # Simulation: writes beyond a byte budget fail with ENOSPC, like a full disk.
    import errno

    from tbx_lightning import _stream

    state = {"budget": 24_000, "used": 0}
    original = _stream.EventFile.write

    def write(self: Any, data: bytes) -> int:
        if state["used"] + len(data) > state["budget"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        state["used"] += len(data)
        return original(self, data)

    monkeypatch.setattr(_stream.EventFile, "write", write)
    mount.mkdir()
    yield mount, lambda: state.update(budget=10**9)


@pytest.mark.parametrize(
    "flush_every",
    [
        pytest.param(50, id="small-batches"),
        # One large write that the disk takes only part of: the rest must be retried
        # without writing the accepted part twice.
        pytest.param(None, id="one-large-batch"),
    ],
)
def test_full_disk_raises_one_clear_error_and_loses_nothing(
    tiny_disk: tuple[Path, Any], flush_every: int | None
) -> None:
    disk, free_space = tiny_disk
    run = RunWriter(disk / "run", flush_secs=100)
    hp = RunHParams(run)
    hp.log({"lr": 0.1})
    logged = []
    with pytest.raises(RunWriterError, match=r"No space left on device.*call flush\(\) to retry"):
        for step in range(5_000):
            run.log_scalars({"loss": float(step), "a/longer/tag/for/bytes": 1.0}, step)
            logged.append(step)
            # Without flush_every: one flush of ~40 KB, more than the disk has free.
            every = flush_every if flush_every is not None else 601
            if step % every == 600 % every:
                run.flush()
    # What reached the disk before is readable as it is.
    before = _steps(disk / "run", "loss")
    assert before == list(range(len(before)))
    assert len(before) > 0
    free_space()
    run.flush()  # retries what could not be written
    run.log_scalars({"loss": -1.0}, 99_999)
    hp.finish("success")
    run.close()
    steps = _steps(disk / "run", "loss")
    assert steps == [*logged, 99_999]
    assert _statuses(disk / "run") == [SUCCESS]


def test_vanished_log_directory_raises_one_clear_error_and_logging_goes_on(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    run = RunWriter(run_dir, flush_secs=100)
    hp = RunHParams(run)
    hp.log({"lr": 0.1})
    run.log_scalars({"loss": 0.0}, 0)
    run.flush()
    shutil.rmtree(run_dir)
    for step in range(1, 11):
        run.log_scalars({"loss": float(step)}, step)
    with pytest.raises(
        RunWriterError,
        match=rf"The run folder '{run_dir}' was removed while the run was writing.*made again",
    ):
        run.flush()
    run.flush()  # one error, not one per call
    for step in range(11, 21):
        run.log_scalars({"loss": float(step)}, step)
    # The HParams row and status live in the records file, which went with the folder:
    # the writer wrote them again into the recreated folder, and the status goes on.
    hp.finish("success")
    run.close()
    # The recreated directory holds the new event file, the records and the run's summary.
    names = sorted(name for name in os.listdir(run_dir) if "tfevents" in name)
    assert names == [RECORDS_FILE, os.path.basename(run.event_file)]
    # Nothing logged after the directory vanished is lost, nothing is corrupted.
    assert _steps(run_dir, "loss") == list(range(1, 21))
    assert _statuses(run_dir) == [SUCCESS]
    assert session(run_dir)[0] == {"lr": 0.1}
