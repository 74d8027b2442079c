"""The monitor's statistics under every strategy equal the unsharded ones; stops agree.

Two CPU processes (gloo) train the same model on the two halves of each batch under
Lightning's DDP, under Lightning's FSDP strategy (a subclass that wraps on the CPU:
Lightning itself refuses ``strategy="fsdp"`` without a GPU) and under FSDP2
(``ModelParallelStrategy``, ``fully_shard`` in ``configure_model``), with the default
``TrainingMonitor()``: no ``sharded`` flag. A single process on the whole batches is the
reference; every scalar and every histogram's count must match it. Then an Accelerate
loop with two processes: a NaN loss on rank 1 alone, with ``on_alert="stop"`` and
``"raise"``; both ranks must leave the loop at the same step (no rank left waiting in a
collective) and the run must name the rank.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch import accelerate_launch
from tests.rows import session
from tests.tb import read

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

LIGHTNING = """
import sys
import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from tbx_lightning import TBXLogger, TrainingMonitor


class CPUFSDP(FSDPStrategy):
    # Lightning wraps with device_id=None on the CPU, which FSDP rejects there.
    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


class Half(Sampler):
    # Rank r takes samples r, r + world, ...: the ranks' batches of 4 make the
    # reference's batches of 8.
    def __init__(self, n):
        self.n = n

    def __iter__(self):
        dist = torch.distributed
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return iter(range(rank, self.n, world))

    def __len__(self):
        return self.n


class Model(LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_model(self):
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            # FSDP2: each layer, then the whole, sharded over the data-parallel mesh.
            from torch.distributed.fsdp import fully_shard

            for layer in self.net:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


if __name__ == "__main__":
    out, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 8, generator=gen)
    data = TensorDataset(x, x.sum(1, keepdim=True))
    strategy = {
        "single": "auto",
        "ddp": "ddp_fork",
        "fsdp": CPUFSDP(),
        "fsdp2": ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
    }[mode]
    trainer = Trainer(
        accelerator="cpu",
        devices=1 if mode == "single" else 2,
        strategy=strategy,
        max_steps=3,
        use_distributed_sampler=False,
        logger=TBXLogger(out, name=mode, version=0, flush_secs=0.1),
        callbacks=[TrainingMonitor(norm_every_n_steps=1, hist_every_n_steps=1)],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    batch = 8 if mode == "single" else 4
    trainer.fit(Model(), DataLoader(data, batch_size=batch, sampler=Half(len(data))))
"""

ACCELERATE = """
import os, sys
import torch
from torch import nn
from accelerate import Accelerator
import tbx_lightning
from tbx_lightning import TrainingAlertError
from tbx_lightning.monitor import ModelMonitor

out, on_alert = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
accelerator = Accelerator(log_with="tbx", project_dir=out, cpu=True)
accelerator.init_trackers(on_alert)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
model, optimizer = accelerator.prepare(model, optimizer)
monitor = ModelMonitor.from_accelerator(accelerator, model, norm_every_n_steps=4, on_alert=on_alert)
monitor.attach(optimizer)
rank = accelerator.process_index
gen = torch.Generator().manual_seed(rank)
ended = None
try:
    for step in range(40):
        x = torch.randn(4, 8, generator=gen)
        loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        if rank == 1 and step >= 6:
            loss = loss * float("nan")  # this rank's data went bad
        accelerator.backward(loss)
        monitor.after_backward(step, loss=loss)
        optimizer.step()
        optimizer.zero_grad()
        monitor.log_throughput(step, samples=4)
        ended = step
        if monitor.should_stop:
            break
    outcome = "stopped" if monitor.should_stop else "finished"
except TrainingAlertError as error:
    outcome = "raised"
    accelerator.get_tracker("tbx").finish("failed") if accelerator.is_main_process else None
finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
os.write(1, f"RANK {rank} {outcome} AT {ended} FINITE {finite}\\n".encode())
monitor.detach()
accelerator.end_training()
"""


def _run(cmd: list[str], env: dict[str, str], timeout: float = 150) -> str:
    proc = subprocess.Popen(
        cmd,
        cwd=str(ROOT),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # the ranks share its group: kill them together
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(
            f"{cmd[-2:]} did not finish in {timeout} s (a rank left in a collective?):\n"
            + out.decode(errors="replace")[-4000:]
        ) from None
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    return text


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def strategies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("strategies")
    script = root / "fit.py"
    script.write_text(LIGHTNING)
    for mode in ("single", "ddp", "fsdp", "fsdp2"):
        _run([sys.executable, str(script), str(root / "logs"), mode], _env())
    return root / "logs"


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "fsdp2"])
def test_statistics_equal_the_unsharded_ones(strategies: Path, mode: str) -> None:
    reference, sharded = (
        read(strategies / "single/version_0"),
        read(strategies / f"{mode}/version_0"),
    )
    compared = [
        t for t in reference.Tags()["scalars"] if t.startswith(("vitals_layers/", "vitals/grad"))
    ]
    assert len(compared) >= 10
    assert set(sharded.Tags()["scalars"]) >= set(compared)
    for tag in compared:
        want = [(e.step, e.value) for e in reference.Scalars(tag)]
        got = [(e.step, e.value) for e in sharded.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5), tag
    for tag in reference.Tags()["histograms"]:
        want = [e.histogram_value for e in reference.Histograms(tag)]
        got = [e.histogram_value for e in sharded.Histograms(tag)]
        assert [h.num for h in got] == [h.num for h in want], tag  # every element, once
        assert [h.sum_squares for h in got] == pytest.approx(
            [h.sum_squares for h in want], rel=1e-5
        )


@pytest.fixture(scope="module")
def nan_on_one_rank(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Path]]:
    root = tmp_path_factory.mktemp("accelerate")
    script = root / "loop.py"
    script.write_text(ACCELERATE)
    out = {}
    for on_alert in ("stop", "raise"):
        env = {**_env(), "ACCELERATE_USE_CPU": "true", "HF_HOME": str(root / "hf")}
        cmd = accelerate_launch(script, str(root / "runs"), on_alert)
        out[on_alert] = (_run(cmd, env), root / "runs" / on_alert / "version_0")
    return out


@pytest.mark.parametrize("on_alert", ["stop", "raise"])
def test_every_rank_leaves_the_loop_together_with_finite_weights(
    nan_on_one_rank: dict[str, tuple[str, Path]], on_alert: str
) -> None:
    text, run = nan_on_one_rank[on_alert]
    outcome = "stopped" if on_alert == "stop" else "raised"
    # Rank 1's NaN of step 6 reaches both ranks' gradients; both skip that update.
    for rank in (0, 1):
        expected = f"RANK {rank} {outcome} AT {6 if on_alert == 'stop' else 5} FINITE True"
        assert expected in text, text[-3000:]
    acc = read(run)
    table = "".join(
        e.tensor_proto.string_val[0].decode() for e in acc.Tensors("alerts/text_summary")
    )
    assert "| 6 | nonfinite_loss | rank 1 |" in table, table
    assert "| 6 | nonfinite_grads |" in table, table
    assert session(acc)[1] == "STATUS_FAILURE"
