"""Configs that used to break a run: undecodable text, colliding keys, deep, cyclic, odd objects.

Each bad config either is stored escaped with one warning (lone surrogates) or is
rejected with an ``HParamsError`` naming the key before anything is stored; either way
the run stays usable: a later ``log_hyperparams`` and the final status work. Shared
behaviour is tested once over both integrations (``TBXLogger`` and ``TBXTracker``),
reading back what TensorBoard reads.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from lightning.pytorch import LightningModule, Trainer
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tbx_lightning  # noqa: F401  (registers log_with="tbx")
from tbx_lightning import RunWriter, TBXLogger
from tbx_lightning.hparams import MAX_DEPTH, HParamsError, RunHParams, flatten, to_container
from tests.rows import session, split_run_columns

pytestmark = pytest.mark.timeout(120)

# What os.fsdecode makes of a Latin-1 file name on a UTF-8 system.
CAFE = os.fsdecode(b"/data/caf\xe9.csv")
CAFE_ESCAPED = "/data/caf\\udce9.csv"


def nested(levels: int) -> dict[str, Any]:
    """A config of ``levels`` nested mappings (the root counts as one) with one leaf."""
    root: dict[str, Any] = {}
    node = root
    for _ in range(levels - 1):
        node["k"] = {}
        node = node["k"]
    node["leaf"] = 1
    return root


def self_referential() -> dict[str, Any]:
    cfg: dict[str, Any] = {"model": {"lr": 0.1}}
    cfg["model"]["parent"] = cfg
    return cfg


class Unprintable:
    def __str__(self) -> str:
        raise ValueError("no text for you")


class Color(enum.Enum):
    RED = 1


# ---------------------------------------------------------------- both integrations
class Integration:
    """One run through TBXLogger or TBXTracker: log configs, finish, find the run."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind = kind
        if kind == "logger":
            self.logger = TBXLogger(root, name="exp")
        else:
            self.accelerator = Accelerator(log_with="tbx", project_dir=root)
            self.accelerator.init_trackers("exp")
            self.tracker = self.accelerator.get_tracker("tbx")

    def log(self, params: Any) -> None:
        if self.kind == "logger":
            self.logger.log_hyperparams(params)
        else:
            self.tracker.store_init_configuration(params)

    def finish(self) -> Path:
        if self.kind == "logger":
            self.logger.finalize("success")
            return Path(self.logger.log_dir)
        self.accelerator.end_training()
        return Path(self.tracker.log_dir)


@pytest.fixture(params=["logger", "tracker"])
def integration(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Integration]:
    AcceleratorState._reset_state(True)
    yield Integration(request.param, tmp_path)
    AcceleratorState._reset_state(True)


def stored_files(run_dir: Path) -> dict[str, Any]:
    files = {"config.yaml": yaml.safe_load((run_dir / "config.yaml").read_text("utf-8"))}
    if (run_dir / "hparams.yaml").exists():
        files["hparams.yaml"] = yaml.safe_load((run_dir / "hparams.yaml").read_text("utf-8"))
    return files


# ---------------------------------------------------------------- lone surrogates
def test_surrogates_in_keys_values_nested_and_lists_are_escaped() -> None:
    cfg = {"data": {"path": CAFE, "files": [CAFE, "ok"]}, CAFE: 1, "layers": [{"src": CAFE}]}
    container = to_container(cfg)
    assert container == {
        "data": {"path": CAFE_ESCAPED, "files": [CAFE_ESCAPED, "ok"]},
        CAFE_ESCAPED: 1,
        "layers": [{"src": CAFE_ESCAPED}],
    }
    assert flatten(cfg) == {
        "data.path": CAFE_ESCAPED,
        "data.files": f"['{CAFE_ESCAPED}', 'ok']".replace("\\", "\\\\"),
        CAFE_ESCAPED: 1,
        "layers.0.src": CAFE_ESCAPED,
    }
    assert yaml.safe_dump(container, allow_unicode=True).encode("utf-8")


def test_an_object_whose_text_has_surrogates_is_stored_as_escaped_text() -> None:
    assert to_container({"path": Path(CAFE)}) == {"path": CAFE_ESCAPED}


def test_surrogates_warn_once_per_key_and_never_stick(tmp_path: Path) -> None:
    with RunWriter(tmp_path) as run:
        hp = RunHParams(run)
        with pytest.warns(UserWarning, match=r"Config keys 'data.path', 'data.files.0' of .* hold"):
            hp.log({"data": {"path": CAFE, "files": [CAFE]}})
        # The same keys again: no second warning (warnings are errors in this suite).
        hp.log({"data": {"path": CAFE}, "seed": 1})
        with pytest.warns(UserWarning, match=r"Config key 'out' of .* holds text that cannot"):
            hp.log({"out": CAFE})
        hp.finish("success")
    row, status = session(tmp_path)
    assert row == {
        "data.path": CAFE_ESCAPED,
        "data.files": f"['{CAFE_ESCAPED}']".replace("\\", "\\\\"),
        "seed": 1.0,
        "out": CAFE_ESCAPED,
    }
    assert status == "STATUS_SUCCESS"
    assert yaml.safe_load((tmp_path / "config.yaml").read_text("utf-8"))["out"] == CAFE_ESCAPED


def test_surrogates_through_both_integrations(integration: Integration) -> None:
    with pytest.warns(UserWarning, match=r"Config key 'data.path' of .* holds text"):
        integration.log({"data": {"path": CAFE}, "lr": 0.1})
    integration.log({"epochs": 3})
    run_dir = integration.finish()
    assert session(run_dir) == (
        {"data.path": CAFE_ESCAPED, "lr": 0.1, "epochs": 3.0},
        "STATUS_SUCCESS",
    )
    for name, stored in stored_files(run_dir).items():
        assert stored["data"] == {"path": CAFE_ESCAPED}, name
        assert stored["epochs"] == 3, name


class PathModule(LightningModule):
    def __init__(self, data_path: str, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def test_a_fit_with_a_surrogate_in_its_hyperparameters_succeeds(tmp_path: Path) -> None:
    logger = TBXLogger(tmp_path)
    data = TensorDataset(torch.randn(16, 4), torch.randn(16, 1))
    trainer = Trainer(
        logger=logger,
        max_epochs=1,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    with pytest.warns(UserWarning, match=r"Config key 'data_path' of .* holds text"):
        trainer.fit(PathModule(CAFE), DataLoader(data, batch_size=4))
    run_dir = Path(logger.log_dir)
    row, status = session(run_dir)
    assert row == {"data_path": CAFE_ESCAPED, "lr": 0.05}
    assert status == "STATUS_SUCCESS"
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [0, 1, 2, 3]
    # Nothing sticks: the logger takes more hyperparameters after the fit.
    logger.log_hyperparams({"best": {"loss": 0.5}})
    for name, stored in stored_files(run_dir).items():
        assert stored == {"data_path": CAFE_ESCAPED, "lr": 0.05, "best": {"loss": 0.5}}, name


def test_the_hparams_dashboard_shows_the_escaped_value(tmp_path: Path, tensorboard) -> None:
    with RunWriter(tmp_path / "version_0") as run:
        hp = RunHParams(run)
        with pytest.warns(UserWarning, match="'data.path'"):
            hp.log({"data": {"path": CAFE}})
        run.log_scalars({"loss": 0.5}, 0)
        hp.finish("success")
    server = tensorboard(tmp_path)
    server.wait_for_runs(1)
    (group,) = server.session_groups()
    assert split_run_columns(group["hparams"], "STATUS_SUCCESS") == {"data.path": CAFE_ESCAPED}
    assert group["sessions"][0]["status"] == "STATUS_SUCCESS"


# ---------------------------------------------------------------- colliding keys
@pytest.mark.parametrize(
    "cfg,match",
    [
        pytest.param(
            {1: "a", "1": "b"}, r"Config keys 1 and '1' both become the column '1'", id="int-str"
        ),
        pytest.param(
            {"model": {Color.RED: 1, "RED": 2}},
            r"Config keys Color.RED and 'RED' under 'model' both become the column 'model.RED'",
            id="enum-name",
        ),
        pytest.param(
            {"layers": [{"2": 0.1, 2: 0.2}]},
            r"Config keys '2' and 2 under 'layers.0' both become the column 'layers.0.2'",
            id="in-list",
        ),
    ],
)
def test_keys_that_become_one_column_raise_naming_both(cfg: Any, match: str) -> None:
    with pytest.raises(HParamsError, match=match):
        flatten(cfg)
    with pytest.raises(HParamsError, match=match):
        to_container(cfg)


def test_omegaconf_int_and_str_keys_collide_too() -> None:
    cfg = OmegaConf.create({1: "a", "x": {"y": 1}})
    cfg["1"] = "b"
    with pytest.raises(HParamsError, match=r"Config keys 1 and '1' both become the column '1'"):
        flatten(cfg)


# ---------------------------------------------------------------- deep, cyclic, odd
BAD_CONFIGS = [
    pytest.param(
        nested(200),
        r"Config key 'k(\.k)+' is nested 33 levels deep; hyperparameters may nest at most 32",
        id="200-levels",
    ),
    pytest.param(
        nested(MAX_DEPTH + 1),
        r"Config key 'k(\.k){31}' is nested 33 levels deep",
        id="one-level-too-deep",
    ),
    pytest.param(
        self_referential(),
        r"Config key 'model.parent' holds the config's root itself \(a self-referential",
        id="self-referential",
    ),
    pytest.param(
        {"opt": {"scheduler": Unprintable()}},
        r"Config key 'opt.scheduler' holds a Unprintable that cannot be turned into text: "
        r"ValueError: no text for you",
        id="str-raises",
    ),
    pytest.param(
        {"layers": [[1, [2, {"x": Unprintable()}]]]},
        r"Config key 'layers.0.1.1.x' holds a Unprintable",
        id="str-raises-in-lists",
    ),
]


@pytest.mark.parametrize("cfg,match", BAD_CONFIGS)
def test_bad_configs_raise_naming_the_key(cfg: Any, match: str) -> None:
    with pytest.raises(HParamsError, match=match):
        to_container(cfg)
    with pytest.raises(HParamsError, match=match):
        flatten(cfg)


def test_a_list_that_holds_itself_is_named() -> None:
    items: list[Any] = [1]
    items.append(items)
    with pytest.raises(HParamsError, match=r"Config key 'items.1' holds 'items' itself"):
        to_container({"items": items})


def test_the_same_block_twice_is_not_a_cycle() -> None:
    block = {"width": 8}
    assert flatten({"a": block, "b": [block, block]}) == {
        "a.width": 8,
        "b.0.width": 8,
        "b.1.width": 8,
    }


def test_a_deep_omegaconf_config_is_rejected_naming_the_key() -> None:
    with pytest.raises(HParamsError, match=r"Config key 'k(\.k)+' is nested 33 levels deep"):
        flatten(OmegaConf.create(nested(40)))


@pytest.mark.parametrize("cfg,match", BAD_CONFIGS)
def test_bad_configs_store_nothing_and_the_run_goes_on(
    integration: Integration, cfg: Any, match: str
) -> None:
    integration.log({"lr": 0.1})
    with pytest.raises(HParamsError, match=match):
        integration.log(cfg)
    integration.log({"epochs": 2})
    run_dir = integration.finish()
    assert session(run_dir) == ({"lr": 0.1, "epochs": 2.0}, "STATUS_SUCCESS")
    for name, stored in stored_files(run_dir).items():
        assert stored == {"lr": 0.1, "epochs": 2}, name


def test_the_deepest_accepted_config_reaches_every_file(integration: Integration) -> None:
    integration.log(nested(MAX_DEPTH))
    run_dir = integration.finish()
    key = ".".join(["k"] * (MAX_DEPTH - 1) + ["leaf"])
    assert session(run_dir) == ({key: 1.0}, "STATUS_SUCCESS")
    for name, stored in stored_files(run_dir).items():
        assert stored == nested(MAX_DEPTH), name
