"""The contract of Lightning's stock TensorBoardLogger, checked on TBXLogger.

The cases mirror what Lightning's own logger tests hold its TensorBoardLogger to
(default name, versions, log_dir, the hparams file, subclassed name/version,
finalize with any status, no writer left behind after fit), written for this
package and read back through TensorBoard's reader.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tbx_lightning import TBXLogger
from tests.rows import RUN_COLUMNS
from tests.tb import read

REPO = Path(__file__).resolve().parents[1]


class Plain(LightningModule):
    """A module that saves no hyperparameters and has no example input."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)),
        batch_size=4,
    )


def fit(logger: TBXLogger, model: LightningModule | None = None, **kwargs: Any) -> Trainer:
    options: dict[str, Any] = {
        "max_steps": 2,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
        **kwargs,
    }
    trainer = Trainer(logger=logger, **options)
    trainer.fit(model or Plain(), loader())
    return trainer


def status_of(acc: EventAccumulator) -> int:
    content = acc.PluginTagToContent("hparams")["_hparams_/session_end_info"]
    return int(metadata.parse_session_end_info_plugin_data(content).status)


def writer_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("tbx-run-writer:")}


# ----------------------------------------------------------------------------- names, versions
def test_default_experiment_name_is_lightning_logs(tmp_path: Path) -> None:
    logger = TBXLogger(tmp_path)
    assert logger.name == "lightning_logs"
    assert logger.root_dir == os.path.join(str(tmp_path), "lightning_logs")
    trainer = fit(logger)
    expected = os.path.join(str(tmp_path), "lightning_logs", "version_0")
    assert trainer.log_dir == logger.log_dir == expected
    assert [e.step for e in read(expected).Scalars("loss")] == [0, 1]


def test_next_free_version_after_existing_ones(tmp_path: Path) -> None:
    root = tmp_path / "lightning_logs"
    (root / "version_0").mkdir(parents=True)
    (root / "version_1").mkdir()
    (root / "not_a_version").mkdir()
    assert TBXLogger(tmp_path).version == 2


def test_explicit_int_version_is_that_folder(tmp_path: Path) -> None:
    root = tmp_path / "lightning_logs"
    for n in range(3):
        (root / f"version_{n}").mkdir(parents=True)
    logger = TBXLogger(tmp_path, version=1)
    assert logger.version == 1
    logger.log_metrics({"x": 1.0}, step=0)
    logger.finalize("success")
    assert logger.log_dir == str(root / "version_1")
    assert [e.value for e in read(logger.log_dir).Scalars("x")] == [1.0]


def test_string_version_is_the_folder_name(tmp_path: Path) -> None:
    name = "2020-02-05-162402"
    logger = TBXLogger(tmp_path, name="exp", version=name)
    logger.log_hyperparams({"a": 1, "b": 2})
    logger.finalize("success")
    assert logger.version == name
    assert os.listdir(tmp_path / "exp") == [name]
    assert "hparams.yaml" in os.listdir(tmp_path / "exp" / name)


@pytest.mark.parametrize("name", [pytest.param("", id="empty"), pytest.param(None, id="none")])
def test_no_name_puts_versions_into_save_dir(tmp_path: Path, name: str | None) -> None:
    logger = TBXLogger(tmp_path, name=name)
    assert logger.name == ""
    assert logger.root_dir == str(tmp_path)
    logger.log_metrics({"x": 1.0}, step=0)
    logger.finalize("success")
    assert logger.log_dir == str(tmp_path / "version_0")
    assert [n for n in os.listdir(tmp_path) if not n.startswith(".")] == ["version_0"]


def test_sub_dir_is_inside_the_version_folder(tmp_path: Path) -> None:
    logger = TBXLogger(tmp_path, name="n", sub_dir="sub")
    trainer = fit(logger)
    assert logger.log_dir == str(tmp_path / "n" / "version_0" / "sub")
    assert trainer.log_dir == logger.log_dir
    assert [e.step for e in read(logger.log_dir).Scalars("loss")] == [0, 1]


def test_checkpoints_go_into_the_version_folder(tmp_path: Path) -> None:
    logger = TBXLogger(tmp_path)
    trainer = fit(logger, enable_checkpointing=True)
    assert trainer.checkpoint_callback is not None
    assert trainer.checkpoint_callback.dirpath == os.path.join(logger.log_dir, "checkpoints")
    assert os.listdir(os.path.join(logger.log_dir, "checkpoints")) == ["epoch=0-step=2.ckpt"]


def test_subclass_overriding_name_and_version_moves_the_run(tmp_path: Path) -> None:
    class Custom(TBXLogger):
        @property
        def name(self) -> str:
            return "custom_name"

        @property
        def version(self) -> str:
            return "custom_version"

    logger = Custom(tmp_path)
    trainer = fit(logger)
    expected = tmp_path / "custom_name" / "custom_version"
    assert logger.root_dir == str(tmp_path / "custom_name")
    assert trainer.log_dir == logger.log_dir == str(expected)
    assert os.listdir(tmp_path) == ["custom_name"]
    assert os.listdir(tmp_path / "custom_name") == ["custom_version"]
    assert [e.step for e in read(expected).Scalars("loss")] == [0, 1]


def test_subclass_overriding_version_with_an_int(tmp_path: Path) -> None:
    class Seven(TBXLogger):
        @property
        def version(self) -> int:
            return 7

    logger = Seven(tmp_path, name="e")
    logger.log_metrics({"x": 1.0}, step=0)
    logger.finalize("success")
    assert os.listdir(tmp_path / "e") == ["version_7"]


# ----------------------------------------------------------------------------- hparams file
def test_hparams_yaml_written_at_end_of_fit_without_saved_hyperparameters(tmp_path: Path) -> None:
    logger = TBXLogger(tmp_path)
    trainer = fit(logger)
    hparams_file = Path(trainer.log_dir) / "hparams.yaml"
    assert hparams_file.is_file()
    assert yaml.safe_load(hparams_file.read_text()) == {}
    assert not (tmp_path / "hparams.yaml").exists()
    assert status_of(read(trainer.log_dir)) == api_pb2.STATUS_SUCCESS


def test_hyperparameters_of_many_types_are_logged(tmp_path: Path) -> None:
    logger = TBXLogger(tmp_path)
    logger.log_hyperparams(
        {
            "float": 0.3,
            "int": 1,
            "string": "abc",
            "bool": True,
            "dict": {"a": {"b": "c"}},
            "list": [1, 2, 3],
            "namespace": Namespace(foo=Namespace(bar="buzz")),
            "layer": torch.nn.BatchNorm1d,
            "tensor": torch.empty(2, 2, 2),
            "none": None,
        },
        metrics={"hp/score": 0.5},
    )
    logger.finalize("success")
    acc = read(logger.log_dir)
    start = metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    )
    assert set(start.hparams) - set(RUN_COLUMNS) == {
        "float",
        "int",
        "string",
        "bool",
        "dict.a.b",
        "list",
        "namespace.foo.bar",
        "layer",
        "tensor",
    }
    assert start.hparams["layer"].string_value == "torch.nn.modules.batchnorm.BatchNorm1d"
    assert [e.value for e in acc.Scalars("hp/score")] == [0.5]
    # Lightning's YAML writer keeps the class as a Python tag, as with the stock logger.
    stored = yaml.unsafe_load(Path(logger.log_dir, "hparams.yaml").read_text())
    assert (stored["int"], stored["layer"]) == (1, torch.nn.BatchNorm1d)


# ----------------------------------------------------------------------------- finalize
def test_finalize_before_anything_was_logged_creates_nothing(tmp_path: Path) -> None:
    logger = TBXLogger(tmp_path)
    logger.finalize("any")
    logger.finalize("success")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "status,expected",
    [
        pytest.param("success", api_pb2.STATUS_SUCCESS, id="success"),
        pytest.param("failed", api_pb2.STATUS_FAILURE, id="failed"),
        pytest.param("FINISHED", api_pb2.STATUS_SUCCESS, id="case"),
        pytest.param("any", api_pb2.STATUS_UNKNOWN, id="any"),
        pytest.param("", api_pb2.STATUS_UNKNOWN, id="empty"),
    ],
)
def test_finalize_accepts_any_status(tmp_path: Path, status: str, expected: int) -> None:
    logger = TBXLogger(tmp_path)
    logger.log_metrics({"x": 1.0}, step=3)
    logger.finalize(status)
    acc = read(logger.log_dir)
    assert status_of(acc) == expected
    tag = "run/status/text_summary"
    if expected != api_pb2.STATUS_UNKNOWN:
        assert tag not in acc.Tags()["tensors"]
        return
    # An unknown status is kept as given, at the last step logged.
    texts = [(e.step, e.tensor_proto.string_val) for e in acc.Tensors(tag)]
    assert texts == [(3, [status.encode()])]


def test_finalize_releases_the_writer_and_a_later_call_reopens_the_run(tmp_path: Path) -> None:
    before = writer_threads()
    logger = TBXLogger(tmp_path)
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"x": 1.0}, step=0)
    assert len(writer_threads() - before) == 1
    logger.finalize("success")
    assert writer_threads() - before == set()
    logger.log_metrics({"x": 2.0}, step=1)  # e.g. trainer.test() after fit
    logger.finalize("success")
    assert writer_threads() - before == set()
    events = sorted(p for p in os.listdir(logger.log_dir) if p.startswith("events.out"))
    assert len(events) == 2
    acc = read(logger.log_dir)
    assert [(e.step, e.value) for e in acc.Scalars("x")] == [(0, 1.0), (1, 2.0)]
    start = metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    )
    assert set(start.hparams) - set(RUN_COLUMNS) == {
        "lr"
    }  # one HParams row, found again on reopening
    assert status_of(acc) == api_pb2.STATUS_SUCCESS


# ----------------------------------------------------------------------------- threads, files
def test_no_writer_thread_is_left_after_each_fit(tmp_path: Path) -> None:
    before = writer_threads()
    for n in range(3):
        logger = TBXLogger(tmp_path, name="sweep")
        fit(logger)
        assert writer_threads() - before == set(), f"fit {n} left its writer thread"
    assert sorted(n for n in os.listdir(tmp_path / "sweep") if not n.startswith(".")) == [
        "version_0",
        "version_1",
        "version_2",
    ]


def test_two_hundred_fits_under_a_low_open_file_limit(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import logging, resource, sys, threading, warnings
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        warnings.simplefilter("ignore")
        import torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset
        from lightning.pytorch import LightningModule, Trainer
        from tbx_lightning import TBXLogger

        class M(LightningModule):
            def __init__(self):
                super().__init__()
                self.net = nn.Linear(2, 1)

            def training_step(self, batch, batch_idx):
                loss = self.net(batch[0]).pow(2).mean()
                self.log("loss", loss)
                return loss

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        data = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=4)
        for _ in range(200):
            Trainer(
                logger=TBXLogger(sys.argv[1]), max_steps=1, log_every_n_steps=1,
                enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, accelerator="cpu",
            ).fit(M(), data)
        alive = [t for t in threading.enumerate() if t.name.startswith("tbx-run-writer:")]
        print("writer threads", len(alive))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "writer threads 0"
    names = [n for n in os.listdir(tmp_path / "lightning_logs") if not n.startswith(".")]
    runs = sorted(names, key=lambda v: int(v.split("_")[1]))
    assert runs == [f"version_{n}" for n in range(200)]
    last = read(tmp_path / "lightning_logs" / "version_199")
    assert [e.step for e in last.Scalars("loss")] == [0]
    assert status_of(last) == api_pb2.STATUS_SUCCESS


# ----------------------------------------------------------------------------- graph warning
def test_missing_example_input_warns_with_the_stock_prefix(tmp_path: Path) -> None:
    logger = TBXLogger(tmp_path, log_graph=True)
    with pytest.warns(
        UserWarning,
        match=r"^Could not log computational graph to TensorBoard: `example_input_array` of "
        r"Plain is not set",
    ):
        fit(logger)
    acc = read(logger.log_dir)
    assert acc.Tags()["graph"] is False
    assert status_of(acc) == api_pb2.STATUS_SUCCESS


def test_accelerate_has_the_tracker_registry_the_registration_uses() -> None:
    # `log_with="tbx"` rests on register_tracker_class (accelerate 1.15, the declared floor).
    import accelerate.tracking as tracking

    from tbx_lightning.accelerate import TBXTracker

    assert callable(tracking.register_tracker_class)
    assert tracking.LOGGER_TYPE_TO_CLASS["tbx"] is TBXTracker
