"""Reading runs back (``tbx_lightning.runs``): honest status of killed runs, and alerts.

A run killed with SIGKILL in a child process keeps *running* in its session record
(TensorBoard's own status, read back with its EventAccumulator) and shows as
``stalled`` in ``tbx-lightning hparams`` once its heartbeat is older than the limit.
Alerts come from a real ``tbx-lightning fit alerts_demo`` run (a loss spike and NaN
injected), so the reader is checked against what the training monitor writes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import TENSORS, EventAccumulator

from tbx_lightning import RunWriter, cli, runs
from tbx_lightning.hparams import RunHParams
from tests.demo import fit_alerts_demo
from tests.rows import session

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)

HOLDER = """
import sys, time
from tbx_lightning import RunWriter
from tbx_lightning.hparams import RunHParams
writer = RunWriter(sys.argv[1], flush_secs=0.2)
hp = RunHParams(writer)
hp.log({"lr": float(sys.argv[2])})
writer.log_scalars({"train/loss": 0.5, "val/acc": 0.25}, 1)
writer.flush()
print("ready", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder() -> Iterator[list[subprocess.Popen[str]]]:
    """Starts child processes that open a run, log, and wait; all killed at teardown."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def _hold(procs: list[subprocess.Popen[str]], run: Path, lr: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run), str(lr)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    procs.append(proc)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, object]]:
    assert cli.main([*args, "--format", "json"]) == 0
    return list(json.loads(capsys.readouterr().out))


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


# ---------------------------------------------------------------------- stalled
def test_a_killed_run_shows_stalled_since_its_last_heartbeat(
    tmp_path: Path, holder: list[subprocess.Popen[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    killed = _hold(holder, tmp_path / "version_0", 0.1)
    _hold(holder, tmp_path / "version_1", 0.2)
    rows = _json(capsys, "hparams", str(tmp_path))
    assert [row["status"] for row in rows] == ["running", "running"]
    assert "stalled_since" not in rows[0]

    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    lease = json.loads((tmp_path / "version_0" / ".tbx-lease.json").read_text())
    beat = float(lease["heartbeat"])
    while time.time() <= beat + 0.5:  # the heartbeat only gets older
        time.sleep(0.1)
    rows = _json(capsys, "hparams", str(tmp_path), "--stalled-after", "0.5")
    assert rows[0]["status"] == "stalled"
    assert rows[0]["stalled_since"] == _iso(beat)
    # The live run keeps its heartbeat fresh (every 10 s) and stays running at the default.
    rows = _json(capsys, "hparams", str(tmp_path))
    assert [row["status"] for row in rows] == ["running", "running"]
    assert runs.read_runs(tmp_path, now=beat + 121)[0].status == "stalled"
    # TensorBoard's own HParams status cannot know: the session record still says running.
    _, status = session(tmp_path / "version_0")
    assert status == "STATUS_RUNNING"
    # The table format shows it too.
    assert cli.main(["hparams", str(tmp_path), "--stalled-after", "0.5"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "stalled_since" in table[0].split()
    assert "stalled" in table[2].split() and _iso(beat) in table[2]


def test_a_run_closed_without_a_status_stalls_after_its_last_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with RunWriter(tmp_path / "version_0", flush_secs=3600) as writer:
        RunHParams(writer).log({"lr": 0.1})
        writer.log_scalars({"train/loss": 0.5}, 0)
    assert not (tmp_path / "version_0" / ".tbx-lease.json").exists()
    (record,) = runs.read_runs(tmp_path)
    assert record.status == "running"  # just written: within the limit
    old = time.time() - 3600
    for path in (tmp_path / "version_0").iterdir():
        os.utime(path, (old, old))
    (record,) = runs.read_runs(tmp_path)
    assert record.status == "stalled"
    assert record.stalled_since == pytest.approx(old)
    assert _json(capsys, "hparams", str(tmp_path))[0]["stalled_since"] == _iso(old)


def test_finished_runs_never_stall(tmp_path: Path) -> None:
    with RunWriter(tmp_path / "version_0", flush_secs=3600) as writer:
        hp = RunHParams(writer)
        hp.log({"lr": 0.1})
        hp.finish("success")
    old = time.time() - 3600
    for path in (tmp_path / "version_0").iterdir():
        os.utime(path, (old, old))
    (record,) = runs.read_runs(tmp_path, stalled_after=0)
    assert (record.status, record.stalled_since) == ("success", None)


# ---------------------------------------------------------------------- alerts
@pytest.fixture(scope="module")
def alerts_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tbx-lightning fit alerts_demo`` on a short budget: a loss spike at 14, NaN from 18."""
    work = tmp_path_factory.mktemp("alerts")
    fit_alerts_demo(work)
    return work / "runs" / "alerts_demo"


def _entries(run: Path) -> list[tuple[int, str]]:
    acc = EventAccumulator(str(run), size_guidance={TENSORS: 0})
    acc.Reload()
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(runs.ALERTS_TAG)]


def test_alerts_lists_what_the_monitor_wrote(
    alerts_demo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    found = _json(capsys, "alerts", str(alerts_demo))
    assert list(found[0]) == [
        "time",
        "run",
        "step",
        "kind",
        "where",
        "value",
        "threshold",
        "message",
    ]
    # Every row of every entry the monitor wrote, each with its bullet message.
    entries = _entries(alerts_demo / "version_0")
    rows = sum(text.count("\n| ") for _, text in entries)
    assert len(found) == rows == sum(text.count("\n- ") for _, text in entries)
    assert len(entries) >= 2  # the spike, then the non-finite values, at their steps
    spike = next(a for a in found if a["kind"] == "loss_spike")
    assert spike["step"] == 14 and spike["where"] == "model" and spike["run"] == "version_0"
    assert isinstance(spike["value"], float) and spike["value"] > spike["threshold"]
    assert str(spike["message"]).startswith("loss ") and "step 14" in str(spike["message"])
    nan = next(a for a in found if a["kind"] == "nonfinite_loss")
    assert (nan["step"], nan["value"], nan["threshold"]) == (18, "nan", "inf")
    # Newest first: by the second an entry was written, then by step.
    keys = [(a["time"], a["step"]) for a in found]
    assert keys == sorted(keys, reverse=True)
    assert found[-1]["kind"] == "loss_spike"


def test_alerts_of_a_whole_sweep_newest_first(
    alerts_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    sweep = tmp_path / "sweep"
    shutil.copytree(alerts_demo / "version_0", sweep / "version_0")
    # A later run whose monitor wrote the same first entry again, a second or more later.
    step, text = _entries(alerts_demo / "version_0")[0]
    time.sleep(1.1)
    with RunWriter(sweep / "version_1", flush_secs=3600) as writer:
        writer.experiment.add_text("alerts", text, step)
    found = _json(capsys, "alerts", str(sweep))
    first = [a for a in found if a["run"] == "version_1"]
    assert found[: len(first)] == first and first
    assert {a["run"] for a in found} == {"version_0", "version_1"}
    assert len(_json(capsys, "alerts", str(sweep), "--limit", "2")) == 2

    assert cli.main(["alerts", str(sweep), "--width", "100"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == [
        "time",
        "run",
        "step",
        "kind",
        "where",
        "value",
        "threshold",
        "message",
    ]
    # Messages are clipped to what the line has left, at least 24 characters.
    before_message = table[0].index("message")
    assert all(len(line) <= max(100, before_message + 24) for line in table)
    assert cli.main(["alerts", str(sweep), "--width", "0"]) == 0
    assert str(found[0]["message"]) in capsys.readouterr().out


def test_no_alerts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with RunWriter(tmp_path / "version_0", flush_secs=3600) as writer:
        writer.log_scalars({"train/loss": 1.0}, 0)
    assert cli.main(["alerts", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"No alerts in {tmp_path}."
    assert _json(capsys, "alerts", str(tmp_path)) == []
    assert cli.main(["alerts", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
