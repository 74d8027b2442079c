from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata
from tensorboardX import SummaryWriter
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tbx_lightning import TBXLogger
from tests.rows import RUN_COLUMNS, split_run_columns
from tests.tb import read


class Regressor(LightningModule):
    def __init__(self, lr: float = 0.05, width: int = 8, fail_at: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 1))
        self.example_input_array = torch.zeros(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.hparams.fail_at is not None and self.global_step == self.hparams.fail_at:
            raise RuntimeError("boom")
        loss = self._loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test/loss", self._loss(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 4, generator=gen), torch.randn(32, 1, generator=gen))
    return DataLoader(data, batch_size=8)


def trainer(logger: Any, **kwargs: Any) -> Trainer:
    options: dict[str, Any] = {
        "max_epochs": 2,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
    }
    options.update(kwargs)
    return Trainer(logger=logger, **options)


def status_of(acc: EventAccumulator) -> int:
    content = acc.PluginTagToContent("hparams")["_hparams_/session_end_info"]
    return int(metadata.parse_session_end_info_plugin_data(content).status)


def test_fit_then_test_in_one_run(tmp_path: Path) -> None:
    logger = TBXLogger(tmp_path, name="exp")
    model = Regressor()
    tr = trainer(logger)
    tr.fit(model, loader(), loader())
    # The fit released its writer; reading `experiment` reopens the run, which test() uses.
    assert isinstance(logger.experiment, SummaryWriter)
    tr.test(model, loader())
    assert tr.log_dir == logger.log_dir == os.path.join(str(tmp_path), "exp", "version_0")
    ckpts = os.listdir(os.path.join(logger.log_dir, "checkpoints"))
    assert ckpts == ["epoch=1-step=8.ckpt"]
    acc = read(logger.log_dir)
    assert {"train/loss", "val/loss", "test/loss", "trainer/epoch"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(8))
    assert len(acc.Scalars("test/loss")) == 1
    assert status_of(acc) == api_pb2.STATUS_SUCCESS
    events = [f for f in os.listdir(logger.log_dir) if f.startswith("events.out")]
    # fit released its writer (thread and file) when it ended: test() went on in a second
    # event file of the same run, as with Lightning's own TensorBoardLogger.
    assert len(events) == 2
    stored = yaml.safe_load(Path(logger.log_dir, "hparams.yaml").read_text())
    assert stored == {"lr": 0.05, "width": 8, "fail_at": None}
    reloaded = Regressor.load_from_checkpoint(
        os.path.join(logger.log_dir, "checkpoints", ckpts[0]),
        hparams_file=os.path.join(logger.log_dir, "hparams.yaml"),
    )
    assert reloaded.hparams.width == 8


def test_default_logger_writes_under_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    logger = TBXLogger()
    trainer(logger, max_epochs=1).fit(Regressor(), loader())
    # The experiment name defaults to Lightning's `lightning_logs`, as TensorBoardLogger's.
    assert logger.log_dir == os.path.join("runs", "lightning_logs", "version_0")
    assert (tmp_path / "runs" / "lightning_logs" / "version_0" / "config.yaml").exists()


def test_accepts_every_tensorboardlogger_argument(tmp_path: Path) -> None:
    import inspect

    stock = set(inspect.signature(TensorBoardLogger.__init__).parameters) - {"self", "kwargs"}
    ours = set(inspect.signature(TBXLogger.__init__).parameters)
    assert stock <= ours
    logger = TBXLogger(
        save_dir=tmp_path,
        name="n",
        version="custom",
        log_graph=False,
        default_hp_metric=True,
        prefix="pre",
        sub_dir="train",
        flush_secs=1,
        comment="ignored, as in a SummaryWriter given a log directory",
    )
    tr = trainer(logger, max_epochs=1)
    tr.fit(Regressor(), loader())
    assert logger.log_dir == os.path.join(str(tmp_path), "n", "custom", "train")
    assert tr.checkpoint_callback.dirpath == os.path.join(
        str(tmp_path), "n", "custom", "checkpoints"
    )
    acc = read(logger.log_dir)
    assert "pre-train/loss" in acc.Tags()["scalars"]
    assert [e.value for e in acc.Scalars("hp_metric")] == [-1.0]


def test_bad_writer_options_are_named(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['flush_sec'\]"):
        TBXLogger(tmp_path, flush_sec=3)
    with pytest.raises(ValueError, match=r"Expected `flush_secs` > 0, got -1"):
        TBXLogger(tmp_path, flush_secs=-1)


def test_version_is_claimed_when_first_read(tmp_path: Path) -> None:
    first = TBXLogger(tmp_path, name="e")
    second = TBXLogger(tmp_path, name="e")
    assert first.version == 0
    assert second.version == 1  # the first claim is visible before anything is logged
    assert first.version == 0
    assert sorted(n for n in os.listdir(tmp_path / "e") if not n.startswith(".")) == [
        "version_0",
        "version_1",
    ]


def test_omegaconf_hyperparameters_are_dot_path_columns(tmp_path: Path) -> None:
    cfg = OmegaConf.create(
        {"model": {"lr": 0.1, "layers": [32, 32]}, "data": {"root": "${oc.env:HOME}"}}
    )
    logger = TBXLogger(tmp_path)
    logger.log_hyperparams(cfg)
    logger.log_hyperparams({"best": {"epoch": 3}}, metrics={"best/val_loss": 0.25})
    logger.finalize("success")
    acc = read(logger.log_dir)
    start = metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    )
    assert set(start.hparams) - set(RUN_COLUMNS) == {
        "model.lr",
        "model.layers",
        "data.root",
        "best.epoch",
    }
    assert start.hparams["model.layers"].string_value == "[32, 32]"
    assert [e.value for e in acc.Scalars("best/val_loss")] == [0.25]
    assert sorted(p for p in os.listdir(logger.log_dir) if not p.startswith("events")) == [
        "config.yaml",
        "hparams.yaml",
        "summary.json",
    ]


def test_exception_in_fit_marks_run_failed(tmp_path: Path) -> None:
    logger = TBXLogger(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(logger).fit(Regressor(fail_at=3), loader())
    acc = read(logger.log_dir)
    assert status_of(acc) == api_pb2.STATUS_FAILURE
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2]


def test_resume_continues_one_curve_in_the_same_run(tmp_path: Path) -> None:
    ckpt = ModelCheckpoint(every_n_train_steps=4, save_top_k=-1, filename="{step}")
    logger = TBXLogger(tmp_path, name="r")
    trainer(logger, max_epochs=3, callbacks=[ckpt]).fit(Regressor(), loader())
    first_dir = logger.log_dir
    assert [e.step for e in read(first_dir).Scalars("train/loss")] == list(range(12))

    resumed_logger = TBXLogger(tmp_path, name="r")
    resumed = trainer(resumed_logger, max_epochs=4, callbacks=[ModelCheckpoint(save_top_k=0)])
    resumed.fit(
        Regressor(), loader(), ckpt_path=os.path.join(first_dir, "checkpoints", "step=4.ckpt")
    )
    assert resumed_logger.log_dir == first_dir
    assert sorted(n for n in os.listdir(tmp_path / "r") if not n.startswith(".")) == ["version_0"]
    steps = [e.step for e in read(first_dir).Scalars("train/loss")]
    assert Counter(steps) == Counter(range(16)), "one value per step after resuming"
    assert steps == list(range(16))


def test_log_graph_at_fit_start(tmp_path: Path) -> None:
    # The graph of the module's example input, its layers as scopes, written once.
    logger = TBXLogger(tmp_path, log_graph=True)
    trainer(logger, max_epochs=1).fit(Regressor(), loader())
    acc = read(logger.log_dir)
    assert acc.Tags()["graph"] is True
    graph = acc.Graph()
    ops = {node.op for node in graph.node}
    assert "aten::linear" in ops, ops
    scopes = {node.name.split("/")[0] for node in graph.node if node.op == "aten::linear"}
    assert scopes == {"net"}, scopes
    notes = [t for t in acc.Tags()["tensors"] if t.startswith("graph/export")]
    assert len(notes) == 1, notes


def test_pickles_without_its_writer(tmp_path: Path) -> None:
    import pickle

    # A spawned process gets the logger pickled: the same run, no writer of the parent's,
    # and what the parent logged is on disk first; the clone adds to the same run.
    logger = TBXLogger(tmp_path)
    logger.log_metrics({"m": 1.0}, 0)
    clone = pickle.loads(pickle.dumps(logger))
    assert clone.log_dir == logger.log_dir
    assert clone._tbx_run.current_writer is None
    assert [e.step for e in read(logger.log_dir).Scalars("m")] == [0]  # flushed by the pickling
    logger.finalize("success")
    clone.log_metrics({"m": 2.0}, 1)
    clone.finalize("success")
    acc = read(logger.log_dir)
    assert [(e.step, e.value) for e in acc.Scalars("m")] == [(0, 1.0), (1, 2.0)]


def test_hparams_dashboard_over_several_fits(tmp_path: Path, tensorboard) -> None:
    configs = [
        {"lr": 0.05, "width": 8},
        {"lr": 0.01, "width": 16},
    ]
    for cfg in configs:
        trainer(TBXLogger(tmp_path, name="sweep"), max_epochs=1).fit(
            Regressor(**cfg), loader(), loader()
        )
    with pytest.raises(RuntimeError, match="boom"):
        trainer(TBXLogger(tmp_path, name="sweep"), max_epochs=1).fit(Regressor(fail_at=1), loader())

    server = tensorboard(tmp_path / "sweep")
    server.wait_for_runs(3)
    experiment = server.hparams_experiment()
    # fail_at is None in two runs (left out there) and 1 in the third: still a column.
    assert {h["name"] for h in experiment["hparamInfos"]} == {
        "lr",
        "width",
        "fail_at",
        *RUN_COLUMNS,
    }
    assert {"train/loss", "val/loss", "trainer/epoch"} <= {
        m["name"]["tag"] for m in experiment["metricInfos"]
    }
    assert "hp_metric" not in {m["name"]["tag"] for m in experiment["metricInfos"]}
    groups = server.session_groups(slice_size=10)
    rows = {
        g["name"]: (
            split_run_columns(g["hparams"], g["sessions"][0]["status"]),
            g["sessions"][0]["status"],
        )
        for g in groups
    }
    assert rows == {
        "version_0": ({"lr": 0.05, "width": 8.0}, "STATUS_SUCCESS"),
        "version_1": ({"lr": 0.01, "width": 16.0}, "STATUS_SUCCESS"),
        "version_2": ({"lr": 0.05, "width": 8.0, "fail_at": 1.0}, "STATUS_FAILURE"),
    }
    for group in groups[:2]:
        metrics = {m["name"]["tag"]: m for m in group["metricValues"]}
        assert metrics["train/loss"]["trainingStep"] == 3


def test_graph_options_reach_the_exporter(tmp_path: Path) -> None:
    pytest.importorskip("tbx_lightning.graph")
    sizes = {}
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    for name, options in (("full", None), ("shallow", {"max_depth": 1})):
        logger = TBXLogger(tmp_path, name=name, log_graph=True, graph_options=options)
        logger.log_graph(encoder, torch.zeros(2, 3, 8))
        logger.finalize("success")
        graph = read(logger.log_dir).Graph()
        sizes[name] = len(graph.node)
        if options:
            assert all(node.name.count("/") <= 1 for node in graph.node), [
                n.name for n in graph.node
            ]
    assert sizes["shallow"] < sizes["full"]


def test_unusable_example_input_warns_and_training_goes_on(tmp_path: Path) -> None:
    import numpy as np

    model = Regressor()
    model.example_input_array = np.zeros((2, 4))  # not a tensor, tuple or dict
    logger = TBXLogger(tmp_path, log_graph=True)
    with pytest.warns(UserWarning, match="Model graph not logged: .*ndarray"):
        trainer(logger, max_epochs=1).fit(model, loader())
    assert status_of(read(logger.log_dir)) == api_pb2.STATUS_SUCCESS


def test_every_writer_option_is_accepted_through_jsonargparse(tmp_path: Path) -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(TBXLogger, "logger")
    cfg = parser.parse_args([f"--logger.save_dir={tmp_path}", "--logger.segment_bytes=4096"])
    logger = parser.instantiate_classes(cfg).logger
    assert isinstance(logger, TBXLogger) and logger._kwargs["segment_bytes"] == 4096


def test_resume_when_hyperparameters_were_logged_before_fit(tmp_path: Path) -> None:
    def fit(epochs: int, ckpt: str | None = None) -> TBXLogger:
        logger = TBXLogger(tmp_path, name="early")
        logger.log_hyperparams({"lr": 0.05, "note": "logged before fit"})
        trainer(logger, max_epochs=epochs, callbacks=[ModelCheckpoint(save_last=True)]).fit(
            Regressor(), loader(), ckpt_path=ckpt
        )
        logger.close()
        return logger

    first = fit(2)
    fit(3, os.path.join(first.log_dir, "checkpoints", "last.ckpt"))
    assert sorted(n for n in os.listdir(tmp_path / "early") if not n.startswith(".")) == [
        "version_0"
    ]
    acc = read(first.log_dir)
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(12))
    start = metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    )
    assert {"lr", "note", "width"} <= set(start.hparams)
    assert status_of(acc) == api_pb2.STATUS_SUCCESS


def test_logging_after_close_keeps_earlier_hyperparameters(tmp_path: Path) -> None:
    logger = TBXLogger(tmp_path)
    logger.log_hyperparams({"model": {"depth": 2, "lr": 0.1}})
    logger.close()
    logger.log_hyperparams({"best": {"acc": 0.9}})
    logger.finalize("success")
    logger.close()
    stored = yaml.safe_load(Path(logger.log_dir, "config.yaml").read_text())
    assert stored == {"model": {"depth": 2, "lr": 0.1}, "best": {"acc": 0.9}}
    start = metadata.parse_session_start_info_plugin_data(
        read(logger.log_dir).PluginTagToContent("hparams")["_hparams_/session_start_info"]
    )
    assert set(start.hparams) - set(RUN_COLUMNS) == {"model.depth", "model.lr", "best.acc"}


def test_home_and_variables_in_save_dir_are_expanded_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TBX_EXP", "exp1")
    monkeypatch.chdir(tmp_path)
    first = TBXLogger("~/runs/$TBX_EXP", name="x")
    second = TBXLogger("~/runs/$TBX_EXP", name="x")
    assert first.log_dir == str(tmp_path / "home" / "runs" / "exp1" / "x" / "version_0")
    assert second.log_dir.endswith("version_1")
    assert not (tmp_path / "~").exists()


# ----------------------------------------------------------------------------- the Trainer lookup
def test_trainer_lookup_contract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fails loudly when a Lightning release changes what the Trainer lookup relies on."""
    import importlib
    import inspect

    import tbx_lightning.lightning._logger as integration
    from tbx_lightning import RunStateCallback
    from tbx_lightning.lightning._trainer import SETUP_HOOK, find_trainer

    module_name, function_name = SETUP_HOOK.rsplit(".", 1)
    hook = getattr(importlib.import_module(module_name), function_name)
    assert "trainer" in inspect.signature(hook).parameters
    assert "logger.experiment" in inspect.getsource(hook)
    found: list[Any] = []

    def recording(limit: int = 40) -> Any:
        # One frame deeper than the logger's own call: look one further.
        result = find_trainer(limit + 1)
        found.append(result)
        return result

    monkeypatch.setattr(integration, "find_trainer", recording)
    logger = TBXLogger(tmp_path)
    tr = trainer(logger, max_epochs=1)
    tr.fit(Regressor(), loader())
    assert found and found[0] is tr, "the Trainer was not found from Lightning's setup hook"
    assert [type(cb) for cb in tr.callbacks].count(RunStateCallback) == 1


def test_explicit_callback_instead_of_the_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tbx_lightning.lightning._logger as integration

    def no_lookup(limit: int = 40) -> Any:
        raise AssertionError("find_trainer=False must not look up the stack")

    monkeypatch.setattr(integration, "find_trainer", no_lookup)
    ckpt = ModelCheckpoint(every_n_train_steps=4, save_top_k=-1, filename="{step}")
    logger = TBXLogger(tmp_path, name="r", find_trainer=False)
    trainer(logger, max_epochs=2, callbacks=[ckpt, logger.callback()]).fit(Regressor(), loader())
    first_dir = logger.log_dir

    resumed = TBXLogger(tmp_path, name="r", find_trainer=False)
    trainer(resumed, max_epochs=3, callbacks=[resumed.callback()]).fit(
        Regressor(), loader(), ckpt_path=os.path.join(first_dir, "checkpoints", "step=4.ckpt")
    )
    assert resumed.log_dir == first_dir
    assert sorted(n for n in os.listdir(tmp_path / "r") if not n.startswith(".")) == ["version_0"]
    assert [e.step for e in read(first_dir).Scalars("train/loss")] == list(range(12))


# ----------------------------------------------------------------------------- checkpoint secrets
class WithSecrets(LightningModule):
    def __init__(
        self, api_token: str = "tok-123", db: dict[str, str] | None = None, lr: float = 0.05
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(4, 1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss


@pytest.mark.parametrize("masked", [False, True], ids=["default", "opt-in"])
def test_checkpoint_hyperparameters_masked_on_request(tmp_path: Path, masked: bool) -> None:
    logger = TBXLogger(tmp_path, mask_checkpoint_secrets=masked)
    model = WithSecrets(db={"password": "pw-456", "host": "h"})
    trainer(logger, max_epochs=1).fit(model, loader())
    (ckpt,) = os.listdir(os.path.join(logger.log_dir, "checkpoints"))
    path = os.path.join(logger.log_dir, "checkpoints", ckpt)
    stored = torch.load(path, weights_only=False)["hyper_parameters"]
    expected_token, expected_pw = ("********", "********") if masked else ("tok-123", "pw-456")
    assert stored["api_token"] == expected_token
    assert stored["db"] == {"password": expected_pw, "host": "h"}
    assert stored["lr"] == 0.05
    assert model.hparams.api_token == "tok-123", "the live module keeps its values"
    # hparams.yaml (the run's copy) is masked either way.
    assert "tok-123" not in Path(logger.log_dir, "hparams.yaml").read_text()
    reloaded = WithSecrets.load_from_checkpoint(path)
    assert reloaded.hparams.api_token == expected_token
