"""Secret masking: the name rules (a table), URL passwords, copies of secrets, checkpoints.

docs/robustness.md ("Secret masking") documents the rules these tests pin. The
end-to-end tests read every file of the run as bytes: the secret must appear nowhere.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.parsing import AttributeDict
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tbx_lightning  # noqa: F401  (registers log_with="tbx")
from tbx_lightning import RunWriter, TBXLogger
from tbx_lightning.hparams import (
    MASK,
    HParamsError,
    RunHParams,
    flatten,
    is_secret_key,
    mask_secrets_in,
    to_container,
)
from tests.rows import session

pytestmark = pytest.mark.timeout(120)

PASSWORD = "hunter2-Xq9"


# ------------------------------------------------------------------ the name rules
@pytest.mark.parametrize(
    "key,secret",
    [
        # a credential word ends the name
        ("db.password", True),
        ("passwords", True),
        ("passwd", True),
        ("gpg_passphrase", True),
        ("client_secret", True),
        ("secrets", True),
        ("hf_token", True),
        ("access_token", True),
        ("credentials", True),
        ("headers.Authorization", True),
        # <kind>_key, in any spelling
        ("wandb.api_key", True),
        ("apiKey", True),
        ("aws.secret_access_key", True),
        ("AWS_SECRET_ACCESS_KEY", True),
        ("DJANGO_SECRETKEY", True),
        ("ssh_key", True),
        ("signing_keys", True),
        # a format after a secret name
        ("private_key_pem", True),
        ("api_key_b64", True),
        # pwd after another word; connection strings
        ("db_pwd", True),
        ("azure.connection_string", True),
        ("sql.conn_str", True),
        # every key under a secret-named parent
        ("api_keys.openai", True),
        ("secrets.github", True),
        ("credentials.0.user", True),
        # not secrets
        ("model.pad_token_id", False),
        ("model.token_dropout", False),
        ("model.max_tokens", False),
        ("data.num_tokens", False),
        ("tokenizer", False),
        ("tokenizer.eos_token", False),
        ("pad_token", False),
        ("num_keys", False),
        ("key_dim", False),
        ("keypoints", False),
        ("monkey", False),
        ("sort_key", False),
        ("secret_sauce", False),
        ("env.PWD", False),
        ("password_min_length", False),
        ("lr", False),
    ],
)
def test_secret_name_rules(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


@pytest.mark.parametrize(
    "value,expected",
    [
        pytest.param("s3://KEY:SECRET@bucket", "s3://KEY:********@bucket", id="s3"),
        pytest.param(
            "postgres://user:PASS@host:5432/db", "postgres://user:********@host:5432/db", id="pg"
        ),
        pytest.param("redis://:PASS@cache:6379/0", "redis://:********@cache:6379/0", id="no-user"),
        pytest.param("mysql://u:p@ss@host/db", "mysql://u:********@host/db", id="at-in-password"),
        pytest.param(
            "copy from https://bot:tok123@git.example/x.git now",
            "copy from https://bot:********@git.example/x.git now",
            id="inside-text",
        ),
        pytest.param(
            "a=s3://K:S1@b1 b=s3://K:S2@b2", "a=s3://K:********@b1 b=s3://K:********@b2", id="two"
        ),
        pytest.param("https://host:8080/path", "https://host:8080/path", id="port-only"),
        pytest.param("ssh://git@github.com/x", "ssh://git@github.com/x", id="user-only"),
        pytest.param("s3://KEY:@bucket", "s3://KEY:@bucket", id="empty-password"),
    ],
)
def test_url_passwords_are_masked(value: str, expected: str) -> None:
    assert to_container({"url": value}) == {"url": expected}
    assert to_container({"urls": [value, 1]}) == {"urls": [expected, 1]}
    assert flatten({"urls": [value]}) == {"urls": repr([expected])}
    assert to_container({"url": value}, mask_secrets=False) == {"url": value}


def test_numbers_flags_and_none_are_never_masked() -> None:
    cfg = {"db": {"password": None, "port": 5432, "pin": 1234, "use_ssl": True}, "token": 0.5}
    assert flatten(cfg) == {"db.port": 5432, "db.pin": 1234, "db.use_ssl": True, "token": 0.5}
    assert to_container(cfg)["db"]["password"] is None


def test_a_secret_block_is_masked_whole_in_the_table_and_config() -> None:
    cfg = {"api_keys": {"openai": "sk-abcdef", "hf": "hf_xyz123"}, "model": "gpt"}
    assert flatten(cfg) == {"api_keys": MASK, "model": "gpt"}
    assert to_container(cfg) == {"api_keys": MASK, "model": "gpt"}


# ------------------------------------------------------------------ copies of secrets
def test_interpolated_secrets_are_masked_wherever_they_appear() -> None:
    cfg = OmegaConf.create(
        {
            "db": {"password": PASSWORD, "user": "u"},
            "dsn": "postgres://u:${db.password}@h/db",
            "cmd": "login --pw ${db.password} --quiet",
            "hosts": ["${db.password}", "x"],
            "api_keys": {"openai": "sk-openai-123"},
            "note": "openai key is ${api_keys.openai}",
        }
    )
    assert to_container(cfg) == {
        "db": {"password": MASK, "user": "u"},
        "dsn": f"postgres://u:{MASK}@h/db",
        "cmd": f"login --pw {MASK} --quiet",
        "hosts": [MASK, "x"],
        "api_keys": MASK,
        "note": f"openai key is {MASK}",
    }


def test_short_secrets_are_masked_only_as_whole_values() -> None:
    # A 3-character secret would mask every "abc" of the config; URLs still hide it.
    cfg = {"password": "abc", "name": "abcde", "dsn": "pg://u:abc@h"}
    assert to_container(cfg) == {"password": MASK, "name": "abcde", "dsn": f"pg://u:{MASK}@h"}


def test_a_secret_logged_later_is_masked_in_earlier_keys(tmp_path: Path) -> None:
    with RunWriter(tmp_path) as run:
        hp = RunHParams(run)
        hp.log({"cmd": f"run --pw {PASSWORD}"})
        hp.log({"db": {"password": PASSWORD}})
        hp.finish("success")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {
        "cmd": f"run --pw {MASK}",
        "db": {"password": MASK},
    }
    assert_secret_nowhere(tmp_path, PASSWORD)


def assert_secret_nowhere(run_dir: Path, secret: str) -> None:
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert secret.encode() not in path.read_bytes(), path


def hparams_row(run_dir: Path) -> dict[str, Any]:
    return session(run_dir)[0]


LEAKY = {
    "db": {"password": PASSWORD, "host": "h"},
    "dsn": "postgres://u:${db.password}@h/db",
    "storage": ["s3://AKIAKEY:s3-Secret-99@bucket/runs"],
    "azure": {"connection_string": "AccountName=a;AccountKey=azkey-1234"},
}
LEAKY_ROW = {
    "db.password": MASK,
    "db.host": "h",
    "dsn": f"postgres://u:{MASK}@h/db",
    "storage": repr([f"s3://AKIAKEY:{MASK}@bucket/runs"]),
    "azure.connection_string": MASK,
}


@pytest.fixture
def fresh_accelerate() -> Iterator[None]:
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("kind", ["logger", "tracker"])
def test_no_secret_reaches_any_file_of_the_run(
    tmp_path: Path, kind: str, fresh_accelerate: None
) -> None:
    cfg = OmegaConf.create(LEAKY)
    if kind == "logger":
        logger = TBXLogger(tmp_path)
        logger.log_hyperparams(cfg)
        logger.finalize("success")
        run_dir = Path(logger.log_dir)
        hparams_yaml = yaml.safe_load((run_dir / "hparams.yaml").read_text())
        assert hparams_yaml["dsn"] == f"postgres://u:{MASK}@h/db"
    else:
        accelerator = Accelerator(log_with="tbx", project_dir=tmp_path)
        accelerator.init_trackers("exp", config=cfg)
        accelerator.end_training()
        run_dir = Path(accelerator.get_tracker("tbx").log_dir)
    assert hparams_row(run_dir) == LEAKY_ROW
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert stored["storage"] == [f"s3://AKIAKEY:{MASK}@bucket/runs"]
    for secret in (PASSWORD, "s3-Secret-99", "azkey-1234"):
        assert_secret_nowhere(run_dir, secret)


# ------------------------------------------------------------------ mask_secrets_in
@dataclasses.dataclass
class Creds:
    user: str
    password: str
    retries: int = 3


def test_mask_secrets_in_keeps_shape_and_types() -> None:
    hparams = AttributeDict(
        lr=0.1,
        api_keys={"openai": "sk-openai-123", "n": 2},
        dsn="postgres://u:sk-openai-123@h/db",
        creds=Creds("me", PASSWORD),
        ns=argparse.Namespace(token="tok-12345", depth=(1, "tok-12345")),
        cfg=OmegaConf.create({"secret": "s-9876", "ref": "${secret}"}),
    )
    masked = mask_secrets_in(hparams)
    assert isinstance(masked, AttributeDict)
    assert masked["lr"] == 0.1
    assert masked["api_keys"] == {"openai": MASK, "n": 2}
    assert masked["dsn"] == f"postgres://u:{MASK}@h/db"
    assert masked["creds"] == Creds("me", MASK)
    assert masked["ns"] == argparse.Namespace(token=MASK, depth=(1, MASK))
    assert isinstance(masked["cfg"], DictConfig)
    assert OmegaConf.to_container(masked["cfg"]) == {"secret": MASK, "ref": MASK}
    # The input is left as it was.
    assert hparams["creds"].password == PASSWORD and hparams["api_keys"]["openai"] != MASK


def test_mask_secrets_in_rejects_cycles() -> None:
    cfg: dict[str, Any] = {"a": {}}
    cfg["a"]["b"] = cfg
    with pytest.raises(HParamsError, match=r"Hyperparameters at 'a.b' contain themselves"):
        mask_secrets_in(cfg)


class Client(LightningModule):
    def __init__(self, api_key: str, width: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(4, width)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_checkpoints_keep_secrets_unless_masked_and_reload_with_the_secret_again(
    tmp_path: Path,
) -> None:
    logger = TBXLogger(tmp_path)
    trainer = Trainer(
        logger=logger,
        max_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    data = DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=4)
    trainer.fit(Client(api_key="sk-live-5678"), data)
    ckpt_path = next(Path(logger.log_dir, "checkpoints").glob("*.ckpt"))
    # What the logger writes is masked; the checkpoint, written by Lightning, is not.
    assert yaml.safe_load(Path(logger.log_dir, "hparams.yaml").read_text())["api_key"] == MASK
    checkpoint = torch.load(ckpt_path, weights_only=False)
    assert checkpoint["hyper_parameters"]["api_key"] == "sk-live-5678"
    # The opt-in: mask them there too; loading then needs the secret passed again.
    checkpoint["hyper_parameters"] = mask_secrets_in(checkpoint["hyper_parameters"])
    torch.save(checkpoint, ckpt_path)
    assert b"sk-live-5678" not in ckpt_path.read_bytes()
    assert Client.load_from_checkpoint(ckpt_path).hparams.api_key == MASK
    reloaded = Client.load_from_checkpoint(ckpt_path, api_key="sk-live-5678")
    assert reloaded.hparams.api_key == "sk-live-5678" and reloaded.hparams.width == 4
