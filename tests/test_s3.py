"""Logging to ``s3://`` against a real S3 API on 127.0.0.1 (moto server), and ``memory://``.

What lands in the bucket is read back twice: by TensorBoard's own reader straight from
S3 (its ``S3_ENDPOINT`` setting), and from a local copy downloaded with s3fs.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

from tbx_lightning import _fs
from tbx_lightning._writer import RECORDS_FILE, RunWriter
from tbx_lightning.hparams import MASK, SESSION_END_TAG, SESSION_START_TAG, RunHParams
from tests.rows import split_run_columns
from tests.s3server import CREDENTIALS, S3Server

pytest.importorskip("s3fs")
pytest.importorskip("moto")

SUCCESS = 1


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("moto"))
    saved_env = {k: os.environ.get(k) for k in [*CREDENTIALS, "AWS_ENDPOINT_URL", "S3_ENDPOINT"]}
    saved_conf = fsspec.config.conf.get("s3")
    # The endpoint and credentials reach s3fs the usual ways: fsspec's config and the
    # AWS environment; TensorBoard's reader takes S3_ENDPOINT.
    os.environ.update(CREDENTIALS)
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    os.environ["S3_ENDPOINT"] = server.endpoint
    fsspec.config.conf["s3"] = {"endpoint_url": server.endpoint}
    try:
        yield server
    finally:
        server.stop()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = saved_conf


@pytest.fixture(autouse=True)
def spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Remote runs are written into a local spool first: keep it inside the test's folder."""
    monkeypatch.setenv("TBX_LIGHTNING_SPOOL", str(tmp_path / "spool"))
    return tmp_path / "spool"


@pytest.fixture
def bucket(s3: S3Server) -> str:
    name = f"runs-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(name)
    fs.invalidate_cache()
    return name


def _download(url: str, dest: Path) -> Path:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    fs.get(path.rstrip("/") + "/", str(dest), recursive=True)
    return dest


def _scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _session(run_dir: Path) -> tuple[dict[str, Any], list[int]]:
    hparams: dict[str, Any] = {}
    statuses = []
    for path in sorted(run_dir.glob("*tfevents*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag not in (SESSION_START_TAG, SESSION_END_TAG):
                    continue
                data = plugin_data_pb2.HParamsPluginData.FromString(
                    value.metadata.plugin_data.content
                )
                if value.tag == SESSION_END_TAG:
                    statuses.append(data.session_end_info.status)
                else:
                    for key, item in data.session_start_info.hparams.items():
                        hparams[key] = getattr(item, item.WhichOneof("kind"))
    return split_run_columns(hparams), statuses


CONFIG = {"model": {"lr": 0.1, "width": 16}, "db": {"password": "hunter2"}, "api_key": "sk-123"}


def test_run_writer_on_s3_scalars_hparams_config(bucket: str, tmp_path: Path) -> None:
    url = f"s3://{bucket}/runs/first"
    with RunWriter(url, flush_secs=0.2) as run:
        assert run.log_dir == url
        hp = RunHParams(run)
        hp.log(CONFIG)
        for step in range(20):
            run.log_scalars({"loss": 1.0 / (step + 1)}, step)
        run.experiment.add_text("note", "on s3", 3)
        hp.finish("success")

    # TensorBoard's own reader, straight from the bucket.
    direct = _scalars(url)
    assert [s for s, _ in direct["loss"]] == list(range(20))

    local = _download(url, tmp_path / "copy")
    assert _scalars(local) == direct
    hparams, statuses = _session(local)
    assert hparams == {"model.lr": 0.1, "model.width": 16.0, "db.password": MASK, "api_key": MASK}
    assert statuses == [SUCCESS]
    config = yaml.safe_load((local / "config.yaml").read_text())
    assert config["db"]["password"] == MASK and config["model"]["lr"] == 0.1
    assert "hunter2" not in "".join(p.read_bytes().decode("latin-1") for p in local.iterdir())


def test_versions_are_claimed_in_the_bucket(bucket: str) -> None:
    claimed = [_fs.run_dir(f"s3://{bucket}/runs", "exp", None)[2] for _ in range(3)]
    assert claimed == [0, 1, 2]


def test_projector_files_land_in_the_bucket(bucket: str, tmp_path: Path) -> None:
    from tbx_lightning.projector import log_embedding

    mat = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    url = f"s3://{bucket}/runs/emb"
    with RunWriter(url, flush_secs=0.2) as run:
        record = log_embedding(
            run, "words", mat, metadata=["a", "b", "c", "d"], label_img=torch.rand(4, 3, 6, 6)
        )
    assert record.tensor_path.startswith(f"s3://{bucket}/")
    local = _download(url, tmp_path / "copy")
    config = (local / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "words:00000000"' in config
    rel = record.tensor_path.split("/runs/emb/", 1)[1]
    assert (local / rel).read_bytes() == mat.numpy().astype("<f4").tobytes()
    meta = record.metadata_path.split("/runs/emb/", 1)[1]  # type: ignore[union-attr]
    assert (local / meta).read_text().splitlines() == [
        "label\tindex",
        "a\t0",
        "b\t1",
        "c\t2",
        "d\t3",
    ]
    sprite = record.sprite_path.split("/runs/emb/", 1)[1]  # type: ignore[union-attr]
    assert (local / sprite).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


LIGHTNING_FIT = """
import sys
import torch
from torch.utils.data import DataLoader, TensorDataset
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from tbx_lightning.lightning import TBXLogger


class Tiny(LightningModule):
    def __init__(self):
        super().__init__()
        self.save_hyperparameters({"lr": 0.05, "token": "secret-token"})
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


trainer = Trainer(
    max_steps=6,
    logger=TBXLogger(sys.argv[1], name="exp", flush_secs=0.2),
    callbacks=[ModelCheckpoint(every_n_train_steps=3, save_top_k=-1)],
    log_every_n_steps=1,
    enable_progress_bar=False,
    enable_model_summary=False,
    accelerator="cpu",
    devices=1,
)
trainer.fit(Tiny(), DataLoader(TensorDataset(torch.randn(12, 4)), batch_size=2))
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_lightning_fit_logs_and_checkpoints_to_s3(bucket: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    script = tmp_path / "fit.py"
    script.write_text(LIGHTNING_FIT)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    done = subprocess.run(
        [sys.executable, str(script), f"s3://{bucket}/runs"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=100,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    found = fs.find(f"{bucket}/runs/exp/version_0")
    names = sorted(p.split("/runs/exp/version_0/", 1)[1] for p in found)
    assert fs.find(f"{bucket}/runs/exp/.tbx_claims") == [f"{bucket}/runs/exp/.tbx_claims/version_0"]
    assert "config.yaml" in names and "hparams.yaml" in names
    assert [n for n in names if n.startswith("checkpoints/")] == [
        "checkpoints/epoch=0-step=3.ckpt",
        "checkpoints/epoch=0-step=6.ckpt",
    ]
    # One event stream, and the run's records (its HParams row and status) beside it.
    assert sum(n.startswith("events.out.tfevents") for n in names) == 1
    assert RECORDS_FILE in names
    local = _download(f"s3://{bucket}/runs/exp/version_0", tmp_path / "copy")
    assert [s for s, _ in _scalars(local)["loss"]] == list(range(6))
    hparams, statuses = _session(local)
    assert hparams == {"lr": 0.05, "token": MASK}
    assert statuses == [SUCCESS]
    state = torch.load(local / "checkpoints" / "epoch=0-step=6.ckpt", weights_only=False)
    assert state["global_step"] == 6


# ----------------------------------------------------------------------- memory://
@pytest.fixture
def memory_root() -> Iterator[str]:
    root = f"memory://tbx-{uuid.uuid4().hex[:8]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _memory_copy(url: str, dest: Path) -> Path:
    fs, path = fsspec.core.url_to_fs(url)
    dest.mkdir(parents=True)
    for name in fs.ls(path, detail=False):
        if fs.isfile(name):
            (dest / name.rsplit("/", 1)[1]).write_bytes(fs.cat_file(name))
    return dest


def test_memory_run_writer_round_trip_with_patched_status(memory_root: str, tmp_path: Path) -> None:
    url = f"{memory_root}/run"
    run = RunWriter(url, flush_secs=60)
    hp = RunHParams(run)
    hp.log({"lr": 0.1})
    run.log_scalars({"loss": 0.5, "acc": 0.25}, 1)
    hp.log({"extra": True})  # grows the hparams in place
    hp.finish("failed")
    run.close()
    local = _memory_copy(url, tmp_path / "copy")
    assert _scalars(local) == {"loss": [(1, 0.5)], "acc": [(1, 0.25)]}
    assert _session(local) == ({"lr": 0.1, "extra": True}, [2])
    assert yaml.safe_load((local / "config.yaml").read_text()) == {"lr": 0.1, "extra": True}


def test_memory_versions_are_distinct(memory_root: str) -> None:
    claimed = [_fs.run_dir(memory_root, "exp", None)[2] for _ in range(4)]
    assert claimed == [0, 1, 2, 3]


def test_memory_tbx_logger(memory_root: str, tmp_path: Path) -> None:
    from tbx_lightning.lightning import TBXLogger

    logger = TBXLogger(memory_root, name="exp", flush_secs=60)
    logger.log_hyperparams({"lr": 0.3, "secret": "x"})
    logger.log_metrics({"loss": 2.0}, 3)
    logger.finalize("success")
    logger.close()
    assert logger.log_dir == f"{memory_root}/exp/version_0"
    local = _memory_copy(logger.log_dir, tmp_path / "copy")
    assert _scalars(local) == {"loss": [(3, 2.0)]}
    assert _session(local) == ({"lr": 0.3, "secret": MASK}, [SUCCESS])
    assert yaml.safe_load((local / "hparams.yaml").read_text()) == {"lr": 0.3, "secret": MASK}


@pytest.mark.parametrize("entry", ["writer", "version"])
def test_missing_bucket_is_an_error_and_never_created(s3: S3Server, entry: str) -> None:
    from tbx_lightning.errors import RunWriterError

    name = f"typo-{uuid.uuid4().hex[:10]}"
    with pytest.raises(RunWriterError, match=rf"The bucket '{name}' .* does not exist.*create it"):
        if entry == "writer":
            RunWriter(f"s3://{name}/runs/x")
        else:
            _fs.run_dir(f"s3://{name}/runs", "exp", None)
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    assert not fs.exists(name)
