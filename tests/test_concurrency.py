"""Runs that start at the same time: racing processes, two loggers in one process, DDP."""

from __future__ import annotations

import glob
import multiprocessing
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tbx_lightning import _fs
from tbx_lightning._writer import RECORDS_FILE, RunWriter

ROOT = Path(__file__).resolve().parents[1]


def _scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _claim_and_log(root: str, index: int, barrier: Any) -> None:
    barrier.wait(timeout=30)  # all eight claim at the same moment
    _, log_dir, _ = _fs.run_dir(root, "exp", None)
    with RunWriter(log_dir, flush_secs=0.1) as run:
        run.log_scalars({"who": float(index)}, step=index)


@pytest.mark.timeout(90)
def test_eight_processes_get_eight_distinct_versions(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(8)
    procs = [ctx.Process(target=_claim_and_log, args=(str(tmp_path), i, barrier)) for i in range(8)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    assert [proc.exitcode for proc in procs] == [0] * 8
    runs = sorted(n for n in os.listdir(tmp_path / "exp") if not n.startswith("."))
    assert runs == [f"version_{i}" for i in range(8)]
    # Each run holds exactly the one value its process logged: no two processes shared one.
    seen = []
    for run in runs:
        (events,) = glob.glob(str(tmp_path / "exp" / run / "*tfevents*"))
        assert events
        values = _scalars(tmp_path / "exp" / run)["who"]
        assert len(values) == 1 and values[0][0] == int(values[0][1])
        seen.append(values[0][0])
    assert sorted(seen) == list(range(8))


@pytest.mark.timeout(60)
def test_two_loggers_in_one_process_write_two_runs_without_mixing(tmp_path: Path) -> None:
    from tbx_lightning.lightning import TBXLogger

    first = TBXLogger(tmp_path, name="exp", flush_secs=0.05)
    second = TBXLogger(tmp_path, name="exp", flush_secs=0.05)
    first.log_hyperparams({"who": "first", "lr": 0.1})
    second.log_hyperparams({"who": "second", "lr": 0.2})
    for step in range(50):
        first.log_metrics({"loss": 1.0 + step}, step)
        second.log_metrics({"loss": -1.0 - step, "only_second": 0.5}, step)
    first.finalize("success")
    second.finalize("failed")
    first.close()
    second.close()
    assert (first.version, second.version) == (0, 1)
    one, two = _scalars(first.log_dir), _scalars(second.log_dir)
    assert one == {"loss": [(s, 1.0 + s) for s in range(50)]}
    assert two == {
        "loss": [(s, -1.0 - s) for s in range(50)],
        "only_second": [(s, 0.5) for s in range(50)],
    }
    assert "who: first" in Path(first.log_dir, "config.yaml").read_text()
    assert "who: second" in Path(second.log_dir, "config.yaml").read_text()


DDP_SCRIPT = """
import os, sys
import torch
from torch.utils.data import DataLoader, TensorDataset
from lightning.pytorch import LightningModule, Trainer
from tbx_lightning.lightning import TBXLogger


class Tiny(LightningModule):
    def __init__(self):
        super().__init__()
        self.save_hyperparameters({"lr": 0.05, "world": 2})
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("loss", loss, sync_dist=True)
        self.log("rank", float(self.global_rank), reduce_fx="max", sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def on_train_end(self):
        # Each rank says it finished while the process group still runs; the barrier
        # keeps rank 0 from ending (and taking its launched rank with it) before rank 1
        # has printed, however busy the machine is.
        # One write call: the ranks share the pipe, and print() writes the text and its
        # newline separately, so two ranks' lines could run into each other.
        os.write(1, f"RANK {self.global_rank} LOG_DIR {self.trainer.log_dir}\\n".encode())
        self.trainer.strategy.barrier("printed")


if __name__ == "__main__":
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 4)), batch_size=2)
    trainer = Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_steps=6,
        logger=TBXLogger(sys.argv[1], name="ddp", flush_secs=0.1),
        log_every_n_steps=1,
        enable_checkpointing=True,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Tiny(), data)
"""


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_lightning_ddp_two_cpu_processes_write_one_run_from_rank_zero(tmp_path: Path) -> None:
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    logs = tmp_path / "logs"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    try:
        done = subprocess.run(
            [sys.executable, str(script), str(logs)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=120,
        )
    except subprocess.TimeoutExpired as error:  # the hang this test exists to catch
        raise AssertionError(f"DDP fit did not finish in 120 s:\n{error.stdout}") from error
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    # Both ranks finished and agree on one log dir.
    ranks = re.findall(r"RANK (\d) LOG_DIR (\S+)", done.stdout)
    assert sorted(rank for rank, _ in ranks) == ["0", "1"], done.stdout[-3000:]
    assert len({log_dir for _, log_dir in ranks}) == 1
    assert sorted(n for n in os.listdir(logs / "ddp") if not n.startswith(".")) == ["version_0"]
    run_dir = logs / "ddp" / "version_0"
    # Written by rank 0 only: one event file, one records file, one config.
    assert len(glob.glob(str(run_dir / "events.out.tfevents*"))) == 1
    assert (run_dir / RECORDS_FILE).is_file()
    files = sorted(p.name for p in run_dir.iterdir() if p.is_file())
    assert [name for name in files if "tfevents" not in name] == [
        "config.yaml",
        "hparams.yaml",
        "summary.json",
    ]
    scalars = _scalars(run_dir)
    assert [s for s, _ in scalars["loss"]] == list(range(6))
    assert {v for _, v in scalars["rank"]} == {1.0}  # synced across both ranks
    assert (run_dir / "checkpoints").is_dir()
    assert "world: 2" in (run_dir / "config.yaml").read_text()
