"""Alerts under real DDP: two CPU processes (gloo), Lightning's ``ddp_fork``.

Under DDP the ranks meet in the gradient all-reduce of every step, so a slow rank makes
the others wait and every rank's wall-clock step time is the same. The tests check that
the monitor still names the rank that does the extra work, and that ``on_alert="stop"``
(an alert that only rank 0 sees) stops every rank at the same step.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tbx_lightning.monitor import AlertRules
from tbx_lightning.monitor._alerts import AlertEngine
from tests.rows import session
from tests.tb import alert_text, read

ROOT = Path(__file__).resolve().parents[1]

# Both fits run in one interpreter; each forks its two ranks (no second start-up).
# Every step sleeps BASE seconds on both ranks (so the CPU's noise is small next to
# the step, even beside other busy processes on a 2-core machine) and EXTRA more on
# rank 1 in the "slow" fit.
SCRIPT = """
import os, sys, time

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from tbx_lightning import TBXLogger, TrainingMonitor

BASE, EXTRA = 0.05, 0.075


class Model(LightningModule):
    def __init__(self, slow, nan_from=None):
        super().__init__()
        self.slow = slow
        self.nan_from = nan_from
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        time.sleep(BASE + (EXTRA if self.slow and self.global_rank == 1 else 0.0))
        loss = self.net(batch[0]).pow(2).mean()
        if self.nan_from is not None and self.global_step >= self.nan_from:
            loss = loss * float("nan")
        return loss

    def on_train_end(self):
        # One write call: print() writes the text and its newline separately, and two
        # ranks' lines on the shared pipe could run into each other.
        os.write(1, f"RANK {self.global_rank} ENDED AT STEP {self.global_step}\\n".encode())
        self.trainer.strategy.barrier()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    data = TensorDataset(torch.randn(2 * 4 * 65, 8))
    for name in ("slow", "even", "stop"):
        trainer = Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp_fork",
            max_steps=65,  # six checks (steps 10..60) for a patience of 3
            logger=TBXLogger(out, name=name, version=0, flush_secs=0.1),
            callbacks=[TrainingMonitor(on_alert="stop" if name == "stop" else "warn")],
            enable_progress_bar=False,
            enable_checkpointing=False,
            enable_model_summary=False,
        )
        model = Model(name == "slow", nan_from=24 if name == "stop" else None)
        trainer.fit(model, DataLoader(data, batch_size=4))
        print("FIT DONE", name, flush=True)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("straggler")
    script = root / "straggler_ddp.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(root / "logs")],
        cwd=str(ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the forked ranks share its group: kill them together
    )
    try:
        out, _ = proc.communicate(timeout=100)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(
            f"the DDP fits did not finish in 100 s:\n{out.decode(errors='replace')[-4000:]}"
        ) from None
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert text.count("FIT DONE") == 3, text[-4000:]
    (root / "logs" / "stdout.txt").write_text(text)
    return root / "logs"


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_consistently_slower_rank_is_named(runs: Path) -> None:
    acc = read(runs / "slow" / "version_0")
    text = alert_text(acc)
    assert "| straggler | rank 1 |" in text, text
    assert "rank 0" not in text, text
    assert "rank 1 takes" in text
    counts = [e.value for e in acc.Scalars("vitals/alerts")]
    assert counts and counts[-1] >= 1.0


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_equal_speed_ranks_raise_no_straggler(runs: Path) -> None:
    acc = read(runs / "even" / "version_0")
    assert "straggler" not in alert_text(acc)
    assert "vitals/alerts" not in acc.Tags()["scalars"], alert_text(acc)
    # The monitor ran: its scalars are there.
    assert "vitals/samples_per_sec" in acc.Tags()["scalars"]


def test_two_ranks_compare_with_the_other_rank() -> None:
    # A median over both ranks would hold the slow rank itself: 0.15 s against a median
    # of 0.125 s never crosses 1.25x, though rank 1 is 50% slower than rank 0.
    checks = AlertEngine(AlertRules(patience=2), "warn", None, None)
    for step in range(2):
        checks.check_step_times(step, [0.10, 0.15])
    (alert,) = checks.alerts
    assert (alert.kind, alert.where, alert.step) == ("straggler", "rank 1", 1)
    assert alert.threshold == pytest.approx(0.125)
    assert "median 100.0 ms of the other 1 ranks" in alert.message
    checks.check_step_times(2, [0.10, 0.12])  # within 1.25x: the streak ends
    assert checks.counts == {("straggler", "rank 1"): 1}


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_stop_on_alert_stops_every_rank_at_the_same_step(runs: Path) -> None:
    # The loss turns NaN at step 24. Both ranks find the NaN gradients before that
    # optimizer step (the flags of both ranks are summed), skip it and end the fit after
    # it: no rank waits in a collective the other left, and the weights stay finite.
    text = (runs / "stdout.txt").read_text().split("FIT DONE even")[1]
    ends = sorted(re.findall(r"RANK (\d) ENDED AT STEP (\d+)", text))
    assert ends == [("0", "25"), ("1", "25")], text[-3000:]
    acc = read(runs / "stop" / "version_0")
    assert "| 24 | nonfinite_grads |" in alert_text(acc)
    checkpoints = list((runs / "stop" / "version_0" / "checkpoints").glob("alert-step=*.ckpt"))
    assert [p.name for p in checkpoints] == ["alert-step=25.ckpt"]
    state = torch.load(checkpoints[0], weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())
    _, status = session(runs / "stop" / "version_0")
    assert status == "STATUS_FAILURE"
