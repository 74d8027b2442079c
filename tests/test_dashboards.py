"""What a user sees first in TensorBoard: HParams defaults, the config text, Custom Scalars.

Runs are written into ``tmp_path`` through :class:`tbx_lightning.run.Run` (what both
integrations route to) and read back by TensorBoard's own plugin backends, in process:
the HParams handlers that the dashboard calls, the Text plugin and the Custom
Scalars plugin. The columns the HParams dashboard shows without a click are
computed as its frontend does (TensorBoard 2.x ``tf-hparams-query-pane``): the
hyperparameters in the backend's order (those that differ across runs first, then by
name), stably sorted by ``differs``, the first five; the metrics in the backend's
order (by tag), the first five.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from omegaconf import OmegaConf
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.context import RequestContext
from tensorboard.plugins import base_plugin
from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin
from tensorboard.plugins.hparams import (
    api_pb2,
    backend_context,
    get_experiment,
    list_session_groups,
)
from tensorboard.plugins.scalar.scalars_plugin import ScalarsPlugin
from tensorboard.plugins.text.text_plugin import TextPlugin

from tbx_lightning import RunWriter
from tbx_lightning.errors import ConfigTypeError
from tbx_lightning.hparams import (
    CONFIG_TEXT_TAG,
    DEFAULT_HPARAMS_EXCLUDE,
    MASK,
    RunHParams,
    check_hparams_exclude,
    table_columns,
)
from tbx_lightning.run import Run

pytestmark = pytest.mark.timeout(60)

SHOWN = 5  # columns of each kind the HParams dashboard shows before a click
ROOT = Path(__file__).resolve().parents[1]
# The templates' own exclusions, as their logger config passes them (configs/logger/tbx.yaml).
TEMPLATE_EXCLUDE: list[str] = list(
    OmegaConf.load(ROOT / "configs" / "logger" / "tbx.yaml").tbx.hparams_exclude
)

# A composed template config as the CLI logs it (configs/train.yaml and its groups).
TEMPLATE: dict[str, Any] = {
    "task_name": "quickstart",
    "runner": "lightning",
    "seed": 42,
    "num_threads": 1,
    "ckpt_path": None,
    "tags": ["digits", "cnn"],
    "paths": {"root_dir": "/work", "runs_dir": "/work/runs", "data_dir": "/work/data"},
    "data": {
        "_target_": "tbx_lightning.templates.digits.DigitsDataModule",
        "batch_size": 64,
        "val_fraction": 0.2,
        "num_workers": 0,
        "pin_memory": False,
    },
    "model": {
        "_target_": "tbx_lightning.templates.digits.DigitsClassifier",
        "optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.003},
        "net": {"_target_": "tbx_lightning.templates.digits.DigitsCNN", "embed_dim": 64},
    },
    "callbacks": {
        "embedding_projector": {
            "_target_": "tbx_lightning.EmbeddingProjector",
            "dataloader": "val",
            "every_n_epochs": 1,
        },
        "model_checkpoint": {"_target_": "lightning.pytorch.callbacks.ModelCheckpoint"},
    },
    "logger": {"tbx": {"_target_": "tbx_lightning.TBXLogger", "save_dir": "/work/runs"}},
    "trainer": {
        "_target_": "lightning.pytorch.Trainer",
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 10,
        "precision": "32-true",
        "limit_train_batches": 1.0,
        "limit_val_batches": 1.0,
        "log_every_n_steps": 5,
        "enable_progress_bar": True,
        "default_root_dir": "/work/runs",
    },
}
PLUMBING = (
    "_target_",
    "_partial_",
    "callbacks.",
    "paths.",
    "logger.",
    "trainer.limit_",
    "trainer.enable_",
    "num_workers",
    "runner",
)


def _swept(lr: float, embed_dim: int) -> dict[str, Any]:
    config = json.loads(json.dumps(TEMPLATE))
    config["model"]["optimizer"]["lr"] = lr
    config["model"]["net"]["embed_dim"] = embed_dim
    return config


class Dashboards:
    """TensorBoard's plugin backends over one logdir, in process."""

    def __init__(self, logdir: Path) -> None:
        multiplexer = plugin_event_multiplexer.EventMultiplexer()
        multiplexer.AddRunsFromDirectory(str(logdir))
        multiplexer.Reload()
        provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
        self.tb_context = base_plugin.TBContext(
            logdir=str(logdir),
            multiplexer=multiplexer,
            data_provider=provider,
            plugin_name_to_instance={},
        )
        self.hparams = backend_context.Context(self.tb_context)
        self.ctx = RequestContext()

    def experiment(self) -> api_pb2.Experiment:
        request = api_pb2.GetExperimentRequest(experiment_name="", hparams_limit=1000)
        return get_experiment.Handler(self.ctx, self.hparams, "", request).run()

    def sessions(self) -> dict[str, dict[str, Any]]:
        """Run name -> its row: hparams, metric values by tag, status."""
        experiment = self.experiment()
        request = api_pb2.ListSessionGroupsRequest(
            experiment_name="",
            allowed_statuses=[
                api_pb2.STATUS_UNKNOWN,
                api_pb2.STATUS_SUCCESS,
                api_pb2.STATUS_FAILURE,
                api_pb2.STATUS_RUNNING,
            ],
            col_params=[
                api_pb2.ColParams(hparam=info.name, include_in_result=True)
                for info in experiment.hparam_infos
            ]
            + [
                api_pb2.ColParams(metric=info.name, include_in_result=True)
                for info in experiment.metric_infos
            ],
            start_index=0,
            slice_size=100,
        )
        response = list_session_groups.Handler(self.ctx, self.hparams, "", request).run()
        rows = {}
        for group in response.session_groups:
            (session,) = group.sessions
            rows[session.name] = {
                "hparams": json_format.MessageToDict(group)["hparams"],
                "metrics": {m.name.tag: m.value for m in session.metric_values},
                "status": api_pb2.Status.Name(session.status),
            }
        return rows

    def shown_columns(self) -> tuple[list[str], list[str]]:
        """The hyperparameters and metrics the dashboard shows before a click."""
        experiment = self.experiment()
        hparams = sorted(experiment.hparam_infos, key=lambda info: not info.differs)
        metrics = list(experiment.metric_infos)
        return [h.name for h in hparams[:SHOWN]], [m.name.tag for m in metrics[:SHOWN]]

    def layout(self) -> dict[str, Any]:
        plugin = CustomScalarsPlugin(self.tb_context)
        layout = plugin.layout_impl(self.ctx, "")
        return dict(json.loads(layout) if isinstance(layout, str) else layout)

    def text_html(self, run: str, tag: str) -> list[str]:
        plugin = TextPlugin(self.tb_context)
        return [entry["text"] for entry in plugin.text_impl(self.ctx, run, tag, "", True)]


def _write_run(
    root: Path,
    name: str,
    config: dict[str, Any],
    status: str,
    acc: float,
    seconds: float = 0.0,
    **options: Any,
) -> None:
    """A run of a template config, logged as the templates' logger logs it (their exclusions)."""
    options.setdefault("hparams_exclude", TEMPLATE_EXCLUDE)
    run = Run(lambda: str(root / name), writer_options={"flush_secs": 0.2}, **options)
    run.log_hyperparams(config)
    for epoch in range(3):
        run.log({"train/loss": 1.0 / (epoch + 1), "epoch": epoch}, step=epoch * 10)
        run.log({"val/loss": 0.9 / (epoch + 1), "val/acc": acc}, step=epoch * 10 + 9)
    time.sleep(seconds)  # runs of a real sweep take different times; these take ms apart
    run.finish(status)
    run.release()


@pytest.fixture
def sweep(tmp_path: Path) -> Dashboards:
    grid = [(0.01, 32, "success"), (0.003, 64, "success"), (0.001, 32, "failed")]
    for i, (lr, dim, status) in enumerate(grid):
        _write_run(
            tmp_path, f"version_{i}", _swept(lr, dim), status, acc=0.5 + i / 10, seconds=0.05 * i
        )
    return Dashboards(tmp_path)


# ---------------------------------------------------------------------- HParams table
def test_sweep_shows_swept_keys_status_duration_and_own_metrics(sweep: Dashboards) -> None:
    hparams, metrics = sweep.shown_columns()
    assert hparams[:4] == [
        "model.net.embed_dim",
        "model.optimizer.lr",
        "run.duration_s",
        "run.status",
    ]
    assert metrics == ["epoch", "train/loss", "val/acc", "val/loss"]

    names = [info.name for info in sweep.experiment().hparam_infos]
    assert not [name for name in names if any(part in name for part in PLUMBING)]
    assert {"seed", "tags", "data.batch_size", "trainer.max_epochs", "trainer.precision"} <= set(
        names
    )

    rows = sweep.sessions()
    assert {name: row["status"] for name, row in rows.items()} == {
        "version_0": "STATUS_SUCCESS",
        "version_1": "STATUS_SUCCESS",
        "version_2": "STATUS_FAILURE",
    }
    assert rows["version_2"]["hparams"]["run.status"] == "failed"
    assert rows["version_0"]["hparams"]["run.status"] == "success"
    assert 0 <= rows["version_0"]["hparams"]["run.duration_s"] < 30
    assert rows["version_1"]["metrics"]["val/acc"] == pytest.approx(0.6)


def test_excluded_keys_stay_in_config_yaml_and_text(tmp_path: Path) -> None:
    _write_run(tmp_path, "run", _swept(0.01, 32), "success", acc=0.5)
    stored = (tmp_path / "run" / "config.yaml").read_text()
    assert "callbacks:" in stored and "_target_: torch.optim.Adam" in stored
    (html,) = Dashboards(tmp_path).text_html("run", f"{CONFIG_TEXT_TAG}/text_summary")
    assert "embedding_projector" in html and "torch.optim.Adam" in html


def test_empty_exclude_brings_every_key_back(tmp_path: Path) -> None:
    _write_run(tmp_path, "run", _swept(0.01, 32), "success", acc=0.5, hparams_exclude=[])
    names = {info.name for info in Dashboards(tmp_path).experiment().hparam_infos}
    assert {"model._target_", "callbacks.embedding_projector.dataloader", "paths.runs_dir"} <= names
    assert "trainer.limit_train_batches" in names


def test_own_patterns_replace_the_default(tmp_path: Path) -> None:
    _write_run(
        tmp_path, "run", _swept(0.01, 32), "success", acc=0.5, hparams_exclude=["data.*", "run.*"]
    )
    names = {info.name for info in Dashboards(tmp_path).experiment().hparam_infos}
    assert not [n for n in names if n.startswith(("data.", "run."))]
    assert "model._target_" in names


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, DEFAULT_HPARAMS_EXCLUDE, id="default"),
        pytest.param([], (), id="every-key"),
        pytest.param("data.*", ("data.*",), id="one-pattern"),
        pytest.param(("a", "b.*"), ("a", "b.*"), id="tuple"),
    ],
)
def test_exclude_values(value: Any, expected: tuple[str, ...]) -> None:
    assert check_hparams_exclude(value) == expected


@pytest.mark.parametrize("value", [pytest.param(3, id="int"), pytest.param(["a", 1], id="item")])
def test_bad_exclude_names_the_option(value: Any) -> None:
    with pytest.raises(ConfigTypeError, match=r"`hparams_exclude` must .*TBXTracker"):
        Run(lambda: "unused", hparams_exclude=value, owner="TBXTracker")


def test_template_patterns_match_template_plumbing_only() -> None:
    flat = {
        "model._target_": "m",
        "model.optimizer._partial_": True,
        "callbacks.x.every_n_epochs": 1,
        "trainer.limit_val_batches": 1.0,
        "trainer.max_epochs": 3,
        "data.num_workers": 2,
        "data.batch_size": 8,
        "model.lr": 0.1,
        "hydra.run.dir": ".",
    }
    assert table_columns(flat, TEMPLATE_EXCLUDE) == {
        "trainer.max_epochs": 3,
        "data.batch_size": 8,
        "model.lr": 0.1,
    }


def test_core_default_leaves_out_only_what_hydra_instantiate_reads() -> None:
    flat = {
        "_target_": "m.Module",
        "model._target_": "m",
        "model.optimizer._partial_": True,
        "model.net._recursive_": False,
        "data._convert_": "all",
        "model._args_": "[1]",
        "callbacks.x.every_n_epochs": 1,
        "trainer.limit_val_batches": 1.0,
        "trainer.devices": 1,
        "data.num_workers": 2,
        "runner": "lightning",
        "task_name": "quickstart",
        "paths.runs_dir": "runs",
        "hydra.run.dir": ".",
        "model.target": "kept",
    }
    kept = {k: v for k, v in flat.items() if not k.split(".")[-1].startswith("_")}
    assert table_columns(flat) == kept
    # The templates keep their own policy in their logger config, not in the core.
    assert set(DEFAULT_HPARAMS_EXCLUDE) < set(TEMPLATE_EXCLUDE)
    assert not {"runner", "task_name", "num_threads", "ckpt_path", "trainer.devices"} & set(
        DEFAULT_HPARAMS_EXCLUDE
    )


def test_plain_writer_user_gets_status_and_duration_too(tmp_path: Path) -> None:
    with RunWriter(tmp_path / "run", flush_secs=0.2) as writer:
        hp = RunHParams(writer)
        hp.log({"lr": 0.1})
        writer.log_scalars({"train/loss": 0.5, "val/acc": 0.7}, step=1)
        hp.finish("aborted")
    rows = Dashboards(tmp_path).sessions()
    assert rows["run"]["hparams"]["run.status"] == "aborted"
    assert rows["run"]["status"] == "STATUS_FAILURE"
    assert rows["run"]["metrics"] == {"train/loss": 0.5, "val/acc": pytest.approx(0.7)}


def test_unknown_status_shows_as_given(tmp_path: Path) -> None:
    run = Run(lambda: str(tmp_path / "run"), writer_options={"flush_secs": 0.2})
    run.log_hyperparams({"lr": 0.1})
    assert run.finish("Preempted") == "unknown"
    run.release()
    row = Dashboards(tmp_path).sessions()["run"]
    assert (row["status"], row["hparams"]["run.status"]) == ("STATUS_UNKNOWN", "Preempted")


# ---------------------------------------------------------------------- config text
def test_config_text_is_one_masked_yaml_block_updated_in_place(tmp_path: Path) -> None:
    run = Run(lambda: str(tmp_path / "run"), writer_options={"flush_secs": 0.2})
    run.log_hyperparams({"model": {"lr": 0.1}, "note": "token abcd-1234-efgh"})
    run.log({"train/loss": 1.0}, step=0)
    run.log_hyperparams({"api": {"token": "abcd-1234-efgh"}, "model": {"width": 8}})
    run.finish("success")
    run.release()

    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"tensors": 0})
    acc.Reload()
    (entry,) = acc.Tensors(f"{CONFIG_TEXT_TAG}/text_summary")  # written once, rewritten in place
    text = entry.tensor_proto.string_val[0].decode()
    assert text.startswith("```yaml\n") and text.endswith("\n```")
    assert "abcd-1234-efgh" not in text
    assert f"note: token {MASK}" in text and "width: 8" in text

    (html,) = Dashboards(tmp_path).text_html("run", f"{CONFIG_TEXT_TAG}/text_summary")
    assert "<pre><code" in html and "width: 8" in html


def test_config_text_of_a_resumed_run_is_updated_not_repeated(tmp_path: Path) -> None:
    for lr in (0.1, 0.2):
        run = Run(lambda: str(tmp_path / "run"), writer_options={"flush_secs": 0.2})
        run.log_hyperparams({"lr": lr})
        run.finish("success")
        run.release()
    (html,) = Dashboards(tmp_path).text_html("run", f"{CONFIG_TEXT_TAG}/text_summary")
    assert "lr: 0.2" in html


# ---------------------------------------------------------------------- custom scalars
def _charts(layout: dict[str, Any]) -> list[tuple[str, list[str]]]:
    return [
        (category["title"], [chart["title"] for chart in category["chart"]])
        for category in layout["category"]
    ]


def test_layout_puts_train_and_val_of_each_metric_on_one_chart(tmp_path: Path) -> None:
    run = Run(lambda: str(tmp_path / "run"), writer_options={"flush_secs": 0.2})
    run.log({"train/f1": 0.1, "train/acc": 0.2, "train/loss_step": 1.0, "epoch": 0}, step=0)
    run.writer.log_scalars({"vitals_layers/grad_norm/fc": 1.0, "vitals/lr/group_0": 0.1}, step=0)
    run.log({"val/loss": 0.9, "val/acc": 0.3, "val/f1": 0.2, "train/loss_epoch": 0.8}, step=1)
    run.finish("success")
    run.release()
    dashboards = Dashboards(tmp_path)
    layout = dashboards.layout()
    assert _charts(layout) == [
        ("metrics", ["loss", "acc", "f1"]),
        ("vitals", ["vitals/lr", "vitals_layers/grad_norm"]),
    ]
    (pattern,) = layout["category"][0]["chart"][0]["multiline"]["tag"]
    # The dashboard asks the plugin for each chart's tags by its regex, run by run.
    plugin = CustomScalarsPlugin(dashboards.tb_context)
    plugin._plugin_name_to_instance = {"scalars": ScalarsPlugin(dashboards.tb_context)}
    found = plugin.scalars_impl(dashboards.ctx, "run", pattern, "")
    assert sorted(found["tag_to_events"]) == ["train/loss_epoch", "train/loss_step", "val/loss"]


def test_layout_is_rebuilt_only_when_a_new_tag_changes_it(tmp_path: Path) -> None:
    run = Run(lambda: str(tmp_path / "run"), writer_options={"flush_secs": 0.2})
    for step in range(50):
        run.log({"train/loss": 1.0 / (step + 1)}, step=step)
        if step % 10 == 0:
            run.flush()  # the writer thread has counted every tag so far
    run.log({"val/acc": 0.5}, step=50)
    run.flush()
    for step in range(51, 60):
        run.log({"train/loss": 0.1, "val/acc": 0.5}, step=step)
    run.finish("success")
    run.release()
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"tensors": 0})
    acc.Reload()
    steps = [event.step for event in acc.Tensors("custom_scalars__config__")]
    assert steps == [0, 50]  # train/loss once counted, then val/acc; never again
    assert _charts(Dashboards(tmp_path).layout()) == [("metrics", ["loss", "acc"])]


def test_layouts_of_a_sweep_merge_into_one_chart_per_metric(sweep: Dashboards) -> None:
    assert _charts(sweep.layout()) == [("metrics", ["loss", "acc"])]


# ---------------------------------------------------------------------- a plain Lightning user
def test_plain_lightning_user_sees_own_hparams_metrics_and_charts(tmp_path: Path) -> None:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from tbx_lightning import TBXLogger

    class Module(pl.LightningModule):
        def __init__(self, lr: float = 0.1, width: int = 4) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = torch.nn.Linear(2, width)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = self.net(batch[0]).pow(2).mean()
            self.log("train/loss", loss)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self.log("val/acc", self.net(batch[0]).mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    data = DataLoader(TensorDataset(torch.ones(8, 2)), batch_size=4)
    logger = TBXLogger(tmp_path, name="", flush_secs=0.2)
    trainer = pl.Trainer(
        logger=logger,
        max_epochs=1,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Module(), data, data)

    dashboards = Dashboards(tmp_path)
    hparams, metrics = dashboards.shown_columns()
    assert set(hparams) == {"lr", "width", "run.duration_s", "run.status"}
    # Lightning's `epoch` is `trainer/epoch`: the run's own metrics come first.
    assert metrics == ["train/loss", "trainer/epoch", "val/acc"]
    assert dashboards.sessions()["version_0"]["hparams"]["run.status"] == "success"
    assert _charts(dashboards.layout()) == [("metrics", ["loss", "acc"])]
