"""The shipped configs and templates: every YAML composes and builds; experiments run end to end.

Runs are read back with TensorBoard's EventAccumulator and its HParams parser, the
projector config with TensorBoard's projector proto.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from google.protobuf import text_format
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_accumulator import (
    SCALARS,
    TENSORS,
    EventAccumulator,
)
from tensorboard.plugins.hparams import api_pb2, metadata
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

from tbx_lightning import cli
from tbx_lightning.cli import _compose, _main, _sweep
from tbx_lightning.errors import ConfigError
from tbx_lightning.templates import runner

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
QUICK = [
    "trainer.max_epochs=1",
    "data.limit=128",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
]
QUIET = ["trainer.enable_model_summary=false"]

pytestmark = pytest.mark.filterwarnings(
    # Lightning's own advice on tiny CPU runs, not something these tests check.
    "ignore:.*does not have many workers.*",
    "ignore:.*log_every_n_steps.*",
    "ignore:.*isinstance.treespec, LeafSpec.*",
)


def _options() -> list[tuple[str, str]]:
    pairs = []
    for group in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir()):
        for option in sorted(group.glob("*.yaml")):
            pairs.append((group.name, option.stem))
    return pairs


def _accumulator(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={SCALARS: 0, TENSORS: 0})
    acc.Reload()
    return acc


def _session(acc: EventAccumulator) -> tuple[dict[str, Any], int]:
    content = acc.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    values = {}
    for key, value in start.hparams.items():
        values[key] = getattr(value, value.WhichOneof("kind"))
    return values, end.status


def _projector(log_dir: str) -> ProjectorConfig:
    text = Path(log_dir, "projector_config.pbtxt").read_text(encoding="utf-8")
    return text_format.Parse(text, ProjectorConfig())


def _fit(tmp: Path, experiment: str, *overrides: str) -> str:
    """Runs ``tbx-lightning fit`` in-process; returns the run directory."""
    code = cli.main(["fit", experiment, f"paths.runs_dir={tmp}", *QUIET, *overrides])
    assert code == 0
    runs = sorted((tmp / experiment).glob("version_*")) if (tmp / experiment).is_dir() else []
    assert runs, f"no run directory under {tmp / experiment}"
    return str(runs[-1])


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One reduced quickstart run, shared by the tests that need a run or a checkpoint."""
    runs = tmp_path_factory.mktemp("runs")
    return runs, _fit(runs, "quickstart", *QUICK)


# ------------------------------------------------------------------------ compose + build
@pytest.mark.parametrize(("group", "option"), _options(), ids=lambda v: str(v))
def test_every_yaml_composes_and_instantiates(
    group: str, option: str, quickstart_run: tuple[Path, str]
) -> None:
    runs, _ = quickstart_run
    text = (CONFIG_DIR / group / f"{option}.yaml").read_text(encoding="utf-8")
    first = text.splitlines()[0]
    assert first.startswith("#"), f"{group}/{option}.yaml must open with a comment"
    if group == "sweep":
        if "hydra/sweeper" in text:
            # A search, not a grid: its space is planned and checked by the sweep command.
            args = _main._parser().parse_args(["sweep", "--grid", option, f"paths.runs_dir={runs}"])
            assert _sweep.plan_sweep(args).search
            return
        experiment, params = _compose._load_grid(option, CONFIG_DIR)
        points = cli.expand_grid(params)
        assert len(points) >= 2
        for point in points:
            cli.compose_config(experiment, point, CONFIG_DIR)
        return
    if group == "paths":
        cfg = cli.compose_config("quickstart", [f"paths={option}"], CONFIG_DIR)
        assert "runs_dir" in cfg.paths
        return
    experiment, overrides = "quickstart", [f"{group}={option}"]
    if group == "experiment":
        experiment, overrides = option, []
    elif (group, option) in (("data", "chars"), ("model", "tiny_lm")):
        experiment = "tiny_lm"
    elif (group, option) == ("model", "finetune_lm"):
        experiment = "finetune_lm"
    elif (group, option) == ("model", "finetune"):
        experiment = "finetune"
    elif (group, option) == ("model", "llama_lora"):
        experiment = "finetune_lm_hf"
    elif (group, option) == ("trainer", "gpu") and not torch.cuda.is_available():
        overrides += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    # Loggers are built but never written to; the finetune model reads the fixture's checkpoint.
    cfg = cli.compose_config(experiment, [*overrides, f"paths.runs_dir={runs}"], CONFIG_DIR)
    if cfg.get("runner") == "hf":  # transformers.Trainer: built by its runner (tests/test_hf.py)
        from tbx_lightning.templates import hf_finetune

        trainer, _ = hf_finetune.build(cfg)
        assert type(trainer).__name__ == "Trainer"
        return
    _build_everything(cfg)


def _build_everything(cfg: DictConfig) -> None:
    import lightning.pytorch as pl

    datamodule = runner.instantiate_node(cfg, "data")
    assert isinstance(datamodule, pl.LightningDataModule)
    model = runner.instantiate_node(cfg, "model")
    assert isinstance(model, pl.LightningModule)
    callbacks = runner.build_callbacks(cfg)
    assert all(isinstance(c, pl.Callback) for c in callbacks)
    trainer = runner.instantiate_node(cfg, "trainer", callbacks=callbacks, logger=False)
    assert isinstance(trainer, pl.Trainer)
    loggers = runner.build_loggers(cfg)
    assert [type(lg).__name__ for lg in loggers] == ["TBXLogger"]
    # One forward pass on a real batch: data and model agree on shapes.
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    with torch.no_grad():
        out = model(batch[0])
    assert out.shape[0] == batch[0].shape[0]


def test_every_config_opens_with_a_comment_and_targets() -> None:
    for path in CONFIG_DIR.rglob("*.yaml"):
        lines = path.read_text(encoding="utf-8").splitlines()
        comments = [ln for ln in lines[:2] if ln.startswith("#") and "@package" not in ln]
        assert comments, f"{path} has no one-line description at the top"
        body = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for key, value in body.items() if isinstance(body, dict) else []:
            if key in ("model", "data", "trainer") and isinstance(value, dict):
                assert "_target_" in value or "defaults" in body, path


_PATH_KEYS = ("save_dir", "dirpath", "default_root_dir", "ckpt_path", "path", "log_dir")


def _path_leaves(node: Any, where: str) -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        if node.get("_target_") == "hydra.utils.get_method":
            return []  # `path` there is a Python import path
        return [leaf for k, v in node.items() for leaf in _path_leaves(v, f"{where}.{k}")]
    return [(where, node)] if where.rsplit(".", 1)[-1] in _PATH_KEYS else []


def test_paths_only_by_interpolation() -> None:
    for path in CONFIG_DIR.rglob("*.yaml"):
        if path.parent.name == "paths":
            continue  # the one place paths are written out
        body = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for where, value in _path_leaves(body, path.stem):
            assert value is None or "${" in str(value), f"{path}: {where}={value!r}"


# ------------------------------------------------------------------------ end to end
def test_quickstart_end_to_end(quickstart_run: tuple[Path, str]) -> None:
    _, log_dir = quickstart_run
    acc = _accumulator(log_dir)
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= scalars
    assert not any(tag.endswith("_step") for tag in scalars)
    assert any(tag.startswith("vitals_layers/weight_norm/") for tag in scalars)
    assert 0.0 <= acc.Scalars("val/acc")[-1].value <= 1.0
    # The graph, with the CNN's layers in it.
    graph = acc.Graph()
    names = [node.name for node in graph.node]
    assert any("backbone" in name for name in names)
    assert any(t.startswith("vitals_layers/weights/") for t in acc.Tags()["histograms"]) or any(
        t.startswith("vitals_layers/weights/") for t in acc.Tags()["tensors"]
    )
    # The projector: penultimate embeddings with digit labels and a sprite.
    config = _projector(log_dir)
    assert config.embeddings
    entry = config.embeddings[0]  # the latest step is listed first
    assert entry.metadata_path and entry.sprite.image_path
    tensor = Path(log_dir, entry.tensor_path)
    rows = tensor.stat().st_size // 4 // 64  # float32, embed_dim 64
    lines = Path(log_dir, entry.metadata_path).read_text(encoding="utf-8").splitlines()
    assert lines[0] == "label\tindex"
    labels = [line.split("\t")[0] for line in lines[1:]]
    assert len(labels) == rows and set(labels) <= {str(d) for d in range(10)}
    # HParams: the config's own dot-path keys, and the success status.
    hparams, status = _session(acc)
    assert hparams["model.optimizer.lr"] == pytest.approx(0.003)
    assert hparams["data.batch_size"] == 64
    assert hparams["trainer.max_epochs"] == 1
    assert status == api_pb2.STATUS_SUCCESS
    # config.yaml: the whole composed config, reloadable.
    saved = OmegaConf.load(Path(log_dir, "config.yaml"))
    assert saved.task_name == "quickstart"  # runner settings: in config.yaml, not the row
    assert saved.model.net.embed_dim == 64
    assert saved.trainer.max_epochs == 1
    assert saved.data.limit == 128
    # Checkpoints carry the config, so a later run can rebuild the network.
    ckpt = torch.load(Path(log_dir, "checkpoints", "last.ckpt"), weights_only=False)
    assert ckpt[runner.CONFIG_KEY]["model"]["net"]["embed_dim"] == 64


def test_finetune_logs_embeddings_before_and_after(
    quickstart_run: tuple[Path, str],
) -> None:
    runs, source = quickstart_run
    log_dir = _fit(runs, "finetune", *QUICK)
    config = _projector(log_dir)
    tags = [entry.tensor_name for entry in config.embeddings]
    # The latest step's name carries " (latest)" so the projector opens on it.
    bases = {name.rsplit(":", 1)[0].removesuffix(" (latest)") for name in tags}
    assert len(bases) == 1, tags  # one projector tag ...
    assert len(tags) == 2, tags  # ... at two steps: before and after fine-tuning
    steps = sorted(int(name.rsplit(":", 1)[1]) for name in tags)
    assert steps[0] == 0 and steps[1] > 0
    before, after = (
        Path(log_dir, e.tensor_path).read_bytes()
        for e in sorted(config.embeddings, key=lambda e: e.tensor_name)
    )
    assert before != after
    hparams, status = _session(_accumulator(log_dir))
    assert status == api_pb2.STATUS_SUCCESS
    assert hparams["model.ckpt_path"] == str(Path(source, "checkpoints", "last.ckpt").resolve())
    assert hparams["model.freeze_backbone"] is True


def test_tiny_lm_end_to_end(tmp_path: Path) -> None:
    log_dir = _fit(
        tmp_path,
        "tiny_lm",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        "callbacks.training_monitor.norm_every_n_steps=1",
        "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1",
        "data.block_size=32",
        "data.batch_size=8",
        "model.net.d_model=32",
        "model.net.n_layers=1",
        "trainer.enable_progress_bar=false",
    )
    acc = _accumulator(log_dir)
    scalars = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "train/perplexity",
        "vitals/tokens_per_sec",
        "vitals/lr/group_0",
        "val/loss",
        "val/perplexity",
    } <= scalars
    assert not {"train/lr", "train/tokens_per_sec"} & scalars, "the monitor's tags, once"
    lrs = [e.value for e in acc.Scalars("vitals/lr/group_0")]
    assert lrs[0] < lrs[-1]  # warming up
    assert any("blocks" in node.name for node in acc.Graph().node)
    config = _projector(log_dir)
    token = [e for e in config.embeddings if "token" in e.tensor_name]
    assert token, [e.tensor_name for e in config.embeddings]
    lines = Path(log_dir, token[0].metadata_path).read_text(encoding="utf-8").splitlines()
    assert lines[0] == "label\tindex"
    labels = [line.split("\t")[0] for line in lines[1:]]
    assert len(labels) == 96 and "a" in labels and "space" in labels
    hparams, _ = _session(acc)
    assert hparams["model.net.d_model"] == 32


def test_accelerate_quickstart_end_to_end(tmp_path: Path) -> None:
    log_dir = _fit(tmp_path, "quickstart_accelerate", *QUICK)
    acc = _accumulator(log_dir)
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= scalars
    assert acc.Graph().node
    assert _projector(log_dir).embeddings
    hparams, status = _session(acc)
    assert hparams["model.optimizer.lr"] == pytest.approx(0.003)
    assert status == api_pb2.STATUS_SUCCESS
    assert OmegaConf.load(Path(log_dir, "config.yaml")).runner == "accelerate"
    # The logger config's hparams_exclude reaches the tracker: the default drops plumbing.
    assert not any(key.endswith("_target_") or key.startswith("paths.") for key in hparams)


def test_accelerate_runner_passes_hparams_exclude_to_the_tracker(tmp_path: Path) -> None:
    log_dir = _fit(tmp_path, "quickstart_accelerate", *QUICK, "logger.tbx.hparams_exclude=[]")
    hparams, _ = _session(_accumulator(log_dir))
    assert hparams["runner"] == "accelerate"
    assert any(key.endswith("._target_") for key in hparams)


def test_data_modules_are_deterministic_and_offline() -> None:
    from tbx_lightning.templates.digits import DigitsDataModule
    from tbx_lightning.templates.tiny_lm import VOCAB, CharDataModule, decode, encode

    a, b = DigitsDataModule(limit=50, seed=3), DigitsDataModule(limit=50, seed=3)
    a.setup("fit")
    b.setup("fit")
    assert a.train_set is not None and b.train_set is not None
    assert torch.equal(a.train_set.tensors[1], b.train_set.tensors[1])
    assert len(a.train_set) == 50
    assert decode(encode("Hello\n")) == "Hello\n"
    assert decode(encode("é")) == "?"
    assert len(VOCAB) == 96
    chars = CharDataModule(block_size=16, batch_size=4)
    chars.setup("fit")
    x, y = next(iter(chars.train_dataloader()))
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_latest_checkpoint_names_the_run_to_start(tmp_path: Path) -> None:
    from tbx_lightning.templates.resolvers import latest_checkpoint

    with pytest.raises(ConfigError, match=r"tbx-lightning fit quickstart"):
        latest_checkpoint(str(tmp_path / "quickstart"))
    for version in (0, 3):
        folder = tmp_path / "quickstart" / f"version_{version}" / "checkpoints"
        folder.mkdir(parents=True)
        (folder / "last.ckpt").write_bytes(b"x")
    found = latest_checkpoint(str(tmp_path / "quickstart"))
    assert found.endswith(os.path.join("version_3", "checkpoints", "last.ckpt"))


def _example(name: str) -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        name, CONFIG_DIR.parent / "examples" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_examples_write_runs(tmp_path: Path) -> None:
    before = torch.get_num_threads()
    log_dir = _example("quickstart_lightning").main(max_epochs=1, save_dir=str(tmp_path))
    torch.set_num_threads(before)
    lightning = _accumulator(log_dir)
    hparams, status = _session(lightning)
    assert hparams["model.lr"] == pytest.approx(3e-3) and status == api_pb2.STATUS_SUCCESS
    assert _projector(log_dir).embeddings
    log_dir = _example("accelerate_quickstart").main(
        ["trainer.max_epochs=1", "data.limit=320", f"paths.runs_dir={tmp_path}"]
    )
    torch.set_num_threads(before)
    acc = _accumulator(log_dir)
    # The two examples write the same training tags, and the same 32x32 sprites.
    curves = {t for t in lightning.Tags()["scalars"] if t.startswith(("train/", "val/"))}
    assert curves == {"train/loss", "train/acc"} | {
        "val/loss",
        "val/acc",
    }
    assert curves == {t for t in acc.Tags()["scalars"] if t.startswith(("train/", "val/"))}
    assert list(_projector(log_dir).embeddings[0].sprite.single_image_dim) == [32, 32]
    assert OmegaConf.load(Path(log_dir, "config.yaml")).runner == "accelerate"
