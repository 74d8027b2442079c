from __future__ import annotations

import argparse
import dataclasses
import enum
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata

from tbx_lightning import HParamsError, RunWriter
from tbx_lightning.hparams import MASK, RunHParams, flatten, is_secret_key, to_container


class Color(enum.Enum):
    RED = 1
    BLUE = 2


@dataclasses.dataclass
class Optim:
    lr: float = 0.001
    betas: tuple[float, float] = (0.9, 0.999)


def session_infos(path: Path) -> tuple[dict[str, object], int]:
    acc = EventAccumulator(str(path))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(content["_hparams_/session_start_info"])
    end = metadata.parse_session_end_info_plugin_data(content["_hparams_/session_end_info"])
    values: dict[str, object] = {}
    for key, value in start.hparams.items():
        values[key] = getattr(value, value.WhichOneof("kind"))
    return values, end.status


def test_omegaconf_is_resolved_and_flattened_to_dot_paths(monkeypatch) -> None:
    monkeypatch.setenv("TBX_TEST_DATA", "/data/digits")
    OmegaConf.register_new_resolver("tbx_times", lambda a, b: a * b, replace=True)
    cfg = OmegaConf.create(
        {
            "model": {
                "optimizer": {"lr": 0.01, "name": "adam"},
                "width": 64,
                "depth": "${tbx_times:2,3}",
            },
            "data": {"root": "${oc.env:TBX_TEST_DATA}", "batch_size": 32, "aug": None},
            "trainer": {"precision": "${model.width}", "deterministic": True},
            "betas": [0.9, 0.999],
            "layers": [{"width": 8}, {"width": 16}],
        }
    )
    flat = flatten(cfg)
    assert flat == {
        "model.optimizer.lr": 0.01,
        "model.optimizer.name": "adam",
        "model.width": 64,
        "model.depth": 6,
        "data.root": "/data/digits",
        "data.batch_size": 32,
        "trainer.precision": 64,
        "trainer.deterministic": True,
        "betas": "[0.9, 0.999]",
        "layers.0.width": 8,
        "layers.1.width": 16,
    }
    # Every column is a valid override of the original config.
    for key in flat:
        assert OmegaConf.select(cfg, key) is not None, key


@pytest.mark.parametrize(
    "params,expected",
    [
        pytest.param({"a": 1, "b": {"c": "x"}}, {"a": 1, "b.c": "x"}, id="dict"),
        pytest.param(
            argparse.Namespace(lr=0.1, name="n"), {"lr": 0.1, "name": "n"}, id="namespace"
        ),
        pytest.param(Optim(), {"lr": 0.001, "betas": "[0.9, 0.999]"}, id="dataclass"),
        pytest.param({"color": Color.BLUE}, {"color": "BLUE"}, id="enum-by-name"),
        pytest.param({"path": Path("/tmp/x")}, {"path": "/tmp/x"}, id="path-as-str"),
        pytest.param({"t": torch.tensor(3)}, {"t": 3}, id="tensor-item"),
        pytest.param({"big": 2**60}, {"big": str(2**60)}, id="int-beyond-double"),
        pytest.param(
            {"cls": torch.nn.Linear}, {"cls": "torch.nn.modules.linear.Linear"}, id="class"
        ),
        pytest.param({"obj": Color}, {"obj": "tests.test_hparams.Color"}, id="enum-class"),
        pytest.param({"none": None, "k": 1}, {"k": 1}, id="none-left-out"),
        pytest.param(
            {"nested": {"cfg": OmegaConf.create({"x": 1})}},
            {"nested.cfg.x": 1},
            id="dictconfig-in-dict",
        ),
        pytest.param({"mixed": [1, "a", None]}, {"mixed": "[1, 'a', None]"}, id="scalar-list"),
    ],
)
def test_flatten_value_types(params: object, expected: dict[str, object]) -> None:
    assert flatten(params) == expected


def test_missing_value_names_key() -> None:
    cfg = OmegaConf.create({"model": {"lr": "???"}})
    with pytest.raises(HParamsError, match=r"Config key 'model.lr' is missing a mandatory value"):
        flatten(cfg)


def test_broken_interpolation_names_key() -> None:
    cfg = OmegaConf.create({"data": {"root": "${nowhere.path}"}})
    with pytest.raises(HParamsError, match=r"Config key 'data.root' cannot be resolved"):
        flatten(cfg)


def test_cyclic_interpolation_is_reported() -> None:
    cfg = OmegaConf.create({"a": "${b}", "b": "${a}"})
    with pytest.raises(HParamsError, match=r"Config key '(a|b)'"):
        flatten(cfg)


def test_colliding_keys_are_reported() -> None:
    with pytest.raises(HParamsError, match=r"Config key 'a.b' appears twice"):
        flatten({"a.b": 1, "a": {"b": 2}})


@pytest.mark.parametrize(
    "key,secret",
    [
        ("db.password", True),
        ("hf_token", True),
        ("aws.secret_access_key", True),
        ("wandb.api_key", True),
        ("apiKey", True),
        ("client_secret", True),
        ("access_token", True),
        ("model.max_tokens", False),
        ("tokenizer", False),
        ("data.num_tokens", False),
        ("model.pad_token_id", False),
        ("model.token_dropout", False),
        ("secret_sauce", False),
        ("lr", False),
    ],
)
def test_secret_key_detection(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_numbers_under_secret_looking_keys_are_kept() -> None:
    cfg = {"token": 3, "password": True, "db": {"credentials": {"user": "u", "key": "k"}}}
    assert flatten(cfg) == {"token": 3, "password": True, "db.credentials": MASK}


def test_secrets_masked_unless_opted_out() -> None:
    cfg = {"storage": {"password": "hunter2", "user": "me"}, "hf_token": "abc", "tokens": 5}
    assert flatten(cfg) == {
        "storage.password": MASK,
        "storage.user": "me",
        "hf_token": MASK,
        "tokens": 5,
    }
    assert to_container(cfg)["storage"]["password"] == MASK
    assert flatten(cfg, mask_secrets=False)["storage.password"] == "hunter2"


def test_run_records_config_files_and_status(tmp_path: Path) -> None:
    cfg = OmegaConf.create({"model": {"lr": 0.1, "seed": None}, "name": "${model.lr}"})
    with RunWriter(tmp_path) as run:
        hp = RunHParams(run)
        hp.log(cfg)
        run.flush()
        assert session_infos(tmp_path)[1] == api_pb2.STATUS_RUNNING
        hp.log({"model": {"dropout": 0.5}}, {"best/acc": 0.9}, step=3)
        hp.finish("success")
    values, status = session_infos(tmp_path)
    duration = values.pop("run.duration_s")
    assert values == {"model.lr": 0.1, "name": 0.1, "model.dropout": 0.5, "run.status": "success"}
    assert isinstance(duration, float) and 0 <= duration < 30
    assert status == api_pb2.STATUS_SUCCESS
    stored = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert stored == {"model": {"lr": 0.1, "seed": None, "dropout": 0.5}, "name": 0.1}
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("best/acc")] == [(3, pytest.approx(0.9))]


@pytest.mark.parametrize(
    "status,expected",
    [
        ("failed", api_pb2.STATUS_FAILURE),
        ("aborted", api_pb2.STATUS_FAILURE),
        ("success", api_pb2.STATUS_SUCCESS),
    ],
)
def test_status_mapping(tmp_path: Path, status: str, expected: int) -> None:
    with RunWriter(tmp_path) as run:
        hp = RunHParams(run)
        hp.log({"a": 1})
        hp.finish(status)
    assert session_infos(tmp_path)[1] == expected


def test_unknown_status_is_rejected(tmp_path: Path) -> None:
    with (
        RunWriter(tmp_path) as run,
        pytest.raises(ValueError, match="Unknown run status 'exploded'"),
    ):
        RunHParams(run).finish("exploded")


def test_hparams_plugin_shows_all_keys_metrics_and_statuses(tmp_path: Path, tensorboard) -> None:
    configs = [
        {"model": {"lr": 0.1, "depth": 2}, "optimizer": "sgd"},
        {"model": {"lr": 0.01, "width": 128}, "data": {"augment": True}},
        {"model": {"lr": 0.001}},
    ]
    statuses = ["success", "failed", None]
    for i, (cfg, status) in enumerate(zip(configs, statuses, strict=True)):
        with RunWriter(tmp_path / f"version_{i}") as run:
            hp = RunHParams(run)
            hp.log(cfg)
            for step in range(3):
                run.log_scalars(
                    {"train/loss": 1.0 / (step + 1 + i), f"only_run_{i}": float(step)}, step
                )
            if status:
                hp.finish(status)
    server = tensorboard(tmp_path)
    server.wait_for_runs(3)
    experiment = server.hparams_experiment()
    assert {h["name"] for h in experiment["hparamInfos"]} == {
        "model.lr",
        "model.depth",
        "model.width",
        "optimizer",
        "data.augment",
        "run.status",
        "run.duration_s",
    }
    assert {m["name"]["tag"] for m in experiment["metricInfos"]} == {
        "train/loss",
        "only_run_0",
        "only_run_1",
        "only_run_2",
    }
    groups = server.session_groups()
    by_name = {g["name"]: g for g in groups}
    assert {name: g["sessions"][0]["status"] for name, g in by_name.items()} == {
        "version_0": "STATUS_SUCCESS",
        "version_1": "STATUS_FAILURE",
        "version_2": "STATUS_RUNNING",
    }
    assert by_name["version_1"]["hparams"].pop("run.duration_s") >= 0
    assert by_name["version_1"]["hparams"] == {
        "model.lr": 0.01,
        "model.width": 128.0,
        "data.augment": True,
        "run.status": "failed",
    }
    assert "run.status" not in by_name["version_2"]["hparams"]  # still running
    loss = {m["name"]["tag"]: m["value"] for m in by_name["version_0"]["metricValues"]}
    assert loss["train/loss"] == pytest.approx(1 / 3)
    session = by_name["version_0"]["sessions"][0]
    assert session["endTimeSecs"] >= session["startTimeSecs"] > 0


def test_hparams_yaml_masks_a_later_secret_inside_an_earlier_value(tmp_path: Path) -> None:
    from tbx_lightning import TBXLogger

    logger = TBXLogger(tmp_path, name="", version=0, find_trainer=False)
    logger.log_hyperparams({"dsn": "postgres://app@db/main?key=ab12cd34ef"})
    logger.log_hyperparams({"api_key": "ab12cd34ef", "lr": 0.1})
    logger.finalize("success")
    stored = yaml.safe_load((tmp_path / "version_0" / "hparams.yaml").read_text())
    assert stored == {"dsn": f"postgres://app@db/main?key={MASK}", "api_key": MASK, "lr": 0.1}
    assert "ab12cd34ef" not in (tmp_path / "version_0" / "config.yaml").read_text()
    assert logger.hparams == stored


def test_hparams_yaml_keeps_its_keys_and_shape(tmp_path: Path) -> None:
    from tbx_lightning import TBXLogger

    # The row leaves out what the patterns match; hparams.yaml keeps the whole config.
    logger = TBXLogger(
        tmp_path,
        name="",
        version=0,
        find_trainer=False,
        hparams_exclude=["*._target_", "callbacks.*"],
    )
    logger.log_hyperparams({"model": {"lr": 0.1, "_target_": "m.Net"}, "callbacks": {"x": 1}})
    logger.finalize("success")
    stored = yaml.safe_load((tmp_path / "version_0" / "hparams.yaml").read_text())
    assert stored == {"model": {"lr": 0.1, "_target_": "m.Net"}, "callbacks": {"x": 1}}
    values, _ = session_infos(tmp_path / "version_0")
    assert set(values) == {"model.lr", "run.status", "run.duration_s"}
