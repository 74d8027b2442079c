"""The ``tbx-lightning`` command: fit, sweep, hparams, list, bad input, LightningCLI.

Every run is a reduced quickstart (one epoch on a few dozen digits); results are
read back with TensorBoard's EventAccumulator and the HParams plugin's parser.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata

from tbx_lightning import cli
from tbx_lightning.cli import _compose, _train
from tbx_lightning.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "trainer.max_epochs=1",
    "data.limit=48",
    "data.batch_size=16",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.training_monitor.hist_every_n_steps=1",
]

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*log_every_n_steps.*",
    "ignore:.*isinstance.treespec, LeafSpec.*",
)


def _session(log_dir: Path) -> tuple[dict[str, Any], int]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return values, end.status


def _files(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


# ------------------------------------------------------------------------ fit
def test_no_arguments_runs_quickstart_into_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["tbx-lightning"])
    # The bare command is `fit quickstart`; the budget is cut through the environment-free
    # route a user has too: overrides are not allowed without a subcommand, so patch compose.
    real = cli.compose_config

    def reduced(experiment: Any = None, overrides: Any = (), config_dir: Any = None) -> Any:
        assert experiment is None and list(overrides) == []
        return real(experiment, TINY, config_dir)

    monkeypatch.setattr(_train, "compose_config", reduced)
    assert cli.main() == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "quickstart" / "version_0"
    assert (run / "config.yaml").is_file()
    assert f"tensorboard --logdir {tmp_path / 'runs' / 'quickstart'}" in out
    assert f"run directory: {run}" in out
    _, status = _session(run)
    assert status == api_pb2.STATUS_SUCCESS


def test_print_config_shows_the_default_experiment(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["fit", "--print-config", "model.optimizer.lr=0.01"]) == 0
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert cfg.task_name == "quickstart"
    assert cfg.paths.runs_dir == "runs"
    assert cfg.model.optimizer.lr == 0.01
    assert cfg.logger.tbx.save_dir == "runs"  # resolved from ${paths.runs_dir}


# ------------------------------------------------------------------------ bad input
def _options(group: str) -> str:
    """Every option of a config group, as the error lists them (the shipped set grows)."""
    names = sorted(p.stem for p in (ROOT / "configs" / group).glob("*.yaml"))
    assert len(names) >= 3
    return re.escape(", ".join(names))


BAD = [
    pytest.param(
        ["nope"],
        r"Unknown experiment 'nope'; choose one of: " + _options("experiment"),
        id="experiment",
    ),
    pytest.param(
        ["model.optimizer.lrr=0.1"],
        r"Unknown key 'model.optimizer.lrr': the keys under 'model.optimizer' are: "
        r"_partial_, _target_, lr, weight_decay\. To add a new key, write \+model",
        id="key",
    ),
    pytest.param(
        ["modle.lr=0.1"],
        r"Unknown key 'modle.lr': the keys at the top level are: .*model.*",
        id="top-level-key",
    ),
    pytest.param(
        ["model=resnet"],
        r"Unknown option 'resnet' for config group 'model'; choose one of: " + _options("model"),
        id="group-option",
    ),
    pytest.param(
        ["trainer.max_epochs=ten"],
        r"Wrong type for 'trainer.max_epochs': got 'ten' \(str\), expected int like "
        r"the default 10",
        id="type-int",
    ),
    pytest.param(
        ["model.optimizer.lr=fast"],
        r"Wrong type for 'model.optimizer.lr': got 'fast' \(str\), expected float",
        id="type-float",
    ),
    pytest.param(
        ["trainer.deterministic=3"],
        r"Wrong type for 'trainer.deterministic': got 3 \(int\), expected bool",
        id="type-bool",
    ),
    pytest.param(
        ["model.optimizer.lr=0.1,0.2"],
        r"lists several values: use `tbx-lightning sweep`",
        id="sweep-in-fit",
    ),
    pytest.param(
        ["runner=jax"], r"Unknown runner 'jax'; choose one of: lightning, accelerate", id="runner"
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_input_exits_nonzero_naming_it_and_writes_nothing(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["fit", *args, f"paths.runs_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("tbx-lightning fit: error: ")
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match=message):
        cli.compose_config(
            args[0] if "=" not in args[0] else None,
            [a for a in args if "=" in a],
        )
    assert _files(tmp_path) == []


def test_bad_config_dir_and_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--config-dir .* has no train.yaml"):
        cli.compose_config("quickstart", [], tmp_path)
    with pytest.raises(ConfigError, match=r"run that experiment first .*tbx-lightning fit"):
        cli.compose_config("finetune", [f"paths.runs_dir={tmp_path}"])
    assert _files(tmp_path) == []


def test_own_config_dir_with_a_new_experiment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", mine)
    (mine / "experiment" / "wide.yaml").write_text(
        "# @package _global_\n# Quickstart with a wider embedding.\n"
        "defaults:\n  - quickstart\n\ntask_name: wide\nmodel:\n  net:\n    embed_dim: 128\n",
        encoding="utf-8",
    )
    assert cli.main(["fit", "wide", "--config-dir", str(mine), "--print-config"]) == 0
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert cfg.task_name == "wide" and cfg.model.net.embed_dim == 128
    assert cli.main(["list", "--config-dir", str(mine)]) == 0
    assert "wide" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"Unknown experiment 'wide'"):
        cli.compose_config("wide", [])


# ------------------------------------------------------------------------ sweep + hparams
@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    runs = tmp_path_factory.mktemp("sweep")
    out = io.StringIO()
    saved = sys.stdout
    sys.stdout = out
    try:
        code = cli.main(
            [
                "sweep",
                "quickstart",
                "model.optimizer.lr=0.01,0.001",
                f"paths.runs_dir={runs}",
                "--name",
                "lr_sweep",
                *TINY,
            ]
        )
    finally:
        sys.stdout = saved
    return runs / "lr_sweep", code, out.getvalue()


def test_sweep_runs_the_grid_into_one_directory(swept: tuple[Path, int, str]) -> None:
    directory, code, out = swept
    assert code == 0
    assert "[1/2] model.optimizer.lr=0.01" in out and "[2/2] model.optimizer.lr=0.001" in out
    assert f"tensorboard --logdir {directory}" in out
    runs = sorted(directory.glob("version_*"))
    assert [r.name for r in runs] == ["version_0", "version_1"]
    lrs = [_session(r)[0]["model.optimizer.lr"] for r in runs]
    assert lrs == pytest.approx([0.01, 0.001])
    assert all(_session(r)[1] == api_pb2.STATUS_SUCCESS for r in runs)


def test_hparams_prints_one_row_per_run(
    swept: tuple[Path, int, str], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, _, _ = swept
    assert cli.main(["hparams", str(directory), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["run"] for r in rows] == ["version_0", "version_1"]
    # Only the key that differs, the last and best of val/*, the training loss, status,
    # seconds: no per-step accuracy, no vitals/*.
    assert list(rows[0]) == [
        "run",
        "model.optimizer.lr",
        "val/acc",
        "val/acc best",
        "val/loss",
        "val/loss best",
        "train/loss",
        "status",
        "seconds",
    ]
    assert [float(r["model.optimizer.lr"]) for r in rows] == [0.01, 0.001]
    assert [r["status"] for r in rows] == ["success", "success"]
    assert all(float(r["seconds"]) >= 0 for r in rows)

    assert cli.main(["hparams", str(directory), "--sort", "val/loss", "--format", "json"]) == 0
    table = json.loads(capsys.readouterr().out)
    best = [r["val/loss best"] for r in table]
    assert best == sorted(best)

    assert cli.main(["hparams", str(directory), "--all-keys", "--format", "markdown"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("| run |") and "| data.batch_size |" in text
    assert cli.main(["hparams", str(directory)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["run", "model.optimizer.lr"] and len(lines) == 4


def test_hparams_bad_input(
    swept: tuple[Path, int, str], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, _, _ = swept
    assert cli.main(["hparams", str(directory), "--sort", "val/nope"]) == 2
    err = capsys.readouterr().err
    assert "--sort 'val/nope' is not a metric of these runs; choose one of:" in err
    assert "val/loss" in err
    assert cli.main(["hparams", str(directory / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """A sweep over two seeds and two learning rates: it ends with the bands over the seed."""
    runs = tmp_path_factory.mktemp("seeds")
    out = io.StringIO()
    saved = sys.stdout
    sys.stdout = out
    try:
        code = cli.main(
            [
                "sweep",
                "quickstart",
                "seed=1,2",
                "model.optimizer.lr=0.01,0.001",
                f"paths.runs_dir={runs}",
                "--name",
                "seeds",
                *TINY,
            ]
        )
    finally:
        sys.stdout = saved
    return runs / "seeds", code, out.getvalue()


def _scalars(run: Path) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


def test_a_sweep_over_seeds_ends_with_bands(
    seeded: tuple[Path, int, str], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, code, out = seeded
    assert code == 0, out
    assert "Bands over seed: 2 aggregate runs in" in out
    assert f"tbx-lightning hparams {directory} --over seed" in out
    bands = directory / "aggregate"
    assert sorted(p.name for p in bands.iterdir()) == [
        "model.optimizer.lr=0.001",
        "model.optimizer.lr=0.01",
    ]
    members = {
        r: _session(r)[0] for r in sorted(directory.glob("version_*"))
    }  # run -> its HParams row
    for lr in (0.01, 0.001):
        runs = [r for r, row in members.items() if row["model.optimizer.lr"] == pytest.approx(lr)]
        assert len(runs) == 2
        seeds = [_scalars(r)["val/acc"] for r in runs]
        band = _scalars(bands / f"model.optimizer.lr={lr}")
        for step, mean in band["val/acc"].items():
            values = [s[step] for s in seeds]
            assert mean == pytest.approx(sum(values) / 2, rel=1e-6)
            half = abs(values[0] - values[1]) / 2**0.5  # the sample std of two values
            assert band["band/val/acc/upper"][step] == pytest.approx(mean + half, rel=1e-5)
    # The table over the seeds: one row per learning rate, n = 2 runs each.
    assert cli.main(["hparams", str(directory), "--over", "seed", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["model.optimizer.lr"] for row in rows] == [0.01, 0.001]
    assert all(row["val/acc n"] == 2 and row["status"] == "success" for row in rows)
    assert all(len(row["runs"]) == 2 for row in rows)


def test_sweep_records_a_failed_run_and_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        [
            "sweep",
            "model.optimizer.lr=-1.0,0.01",
            f"paths.runs_dir={tmp_path}",
            "--name",
            "with_failure",
            *TINY,
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "[1/2] model.optimizer.lr=-1.0: failed" in out
    assert "[2/2] model.optimizer.lr=0.01: success" in out
    assert "1 succeeded, 1 failed" in out
    runs = sorted((tmp_path / "with_failure").glob("version_*"))
    statuses = [_session(r)[1] for r in runs]
    assert statuses == [api_pb2.STATUS_FAILURE, api_pb2.STATUS_SUCCESS]


def test_sweep_rejects_a_bad_point_before_running_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["sweep", "trainer.max_epochs=1,two", f"paths.runs_dir={tmp_path}"])
    assert code == 2
    assert "Wrong type for 'trainer.max_epochs'" in capsys.readouterr().err
    assert _files(tmp_path) == []


def test_expand_grid_and_shipped_grids() -> None:
    points = cli.expand_grid(["a=1,2", "b=x,y", "c=3"])
    assert points == [
        ["a=1", "b=x", "c=3"],
        ["a=1", "b=y", "c=3"],
        ["a=2", "b=x", "c=3"],
        ["a=2", "b=y", "c=3"],
    ]
    experiment, params = _compose._load_grid("quickstart_lr", cli.find_config_dir())
    assert experiment == "quickstart"
    assert len(cli.expand_grid(params)) == 6


# ------------------------------------------------------------------------ LightningCLI
def _load_example(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lightning_cli_config_becomes_hparams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning_cli.py"])
    example = _load_example("lightning_cli")
    config = tmp_path / "cli.yaml"
    config.write_text(
        "trainer:\n"
        "  max_epochs: 1\n"
        "  enable_progress_bar: false\n"
        "  enable_model_summary: false\n"
        "  logger:\n"
        "    class_path: tbx_lightning.TBXLogger\n"
        f"    init_args: {{save_dir: '{tmp_path}', name: cli}}\n"
        "model:\n"
        "  channels: 8\n"
        "  embed_dim: ${model.channels}\n"
        "data:\n"
        "  batch_size: 16\n"
        "  limit: 32\n",
        encoding="utf-8",
    )
    example.main(["fit", "--config", str(config), "--model.lr=0.02"])
    run = tmp_path / "cli" / "version_0"
    hparams, status = _session(run)
    assert hparams["model.lr"] == pytest.approx(0.02)
    assert hparams["model.embed_dim"] == 8  # the OmegaConf interpolation, resolved
    assert hparams["trainer.max_epochs"] == 1
    assert hparams["data.batch_size"] == 16
    assert hparams["trainer.logger.class_path"] == "tbx_lightning.TBXLogger"
    assert status == api_pb2.STATUS_SUCCESS
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.model.lr == pytest.approx(0.02) and saved.data.limit == 32


def test_lightning_cli_logger_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning_cli.py"])
    example = _load_example("lightning_cli")
    example.main(
        [
            "fit",
            "--trainer.logger=tbx_lightning.TBXLogger",
            f"--trainer.logger.save_dir={tmp_path}",
            "--trainer.logger.name=flag",
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            "--data.limit=32",
        ]
    )
    hparams, _ = _session(tmp_path / "flag" / "version_0")
    assert hparams["trainer.logger.class_path"] == "tbx_lightning.TBXLogger"
    assert hparams["model.channels"] == 16


# ------------------------------------------------------------------------ the application's shape
APPLICATION = ("cli", "templates")


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at module level or inside functions."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def _application_files() -> list[Path]:
    return sorted(p for part in APPLICATION for p in (ROOT / "tbx_lightning" / part).glob("*.py"))


def test_the_application_uses_only_public_names() -> None:
    """cli/ and templates/ read like a user's code: no private module of the library or Hydra."""
    private = []
    for path in _application_files():
        for name in _imports(path):
            parts = name.split(".")
            library = parts[0] == "tbx_lightning" and parts[1:2] not in (["cli"], ["templates"])
            if name.startswith("hydra._internal") or (
                library and any(part.startswith("_") for part in parts[1:])
            ):
                private.append(f"{path.name}: {name}")
    assert not private, private


def test_cli_modules_import_no_cycle_and_stay_small() -> None:
    cli_dir = ROOT / "tbx_lightning" / "cli"
    graph = {
        path.stem: {
            name.split(".")[2]
            for name in _imports(path)
            if name.startswith("tbx_lightning.cli._") and len(name.split(".")) >= 3
        }
        - {path.stem}
        for path in cli_dir.glob("_*.py")
    }
    assert "_main" not in graph["_sweep"] and "_sweep" not in graph["_main"]

    def visit(node: str, seen: tuple[str, ...]) -> None:
        assert node not in seen, f"import cycle: {' -> '.join((*seen, node))}"
        for child in graph.get(node, ()):
            visit(child, (*seen, node))

    for module in graph:
        visit(module, ())
    sizes = {p.name: len(p.read_text(encoding="utf-8").splitlines()) for p in _application_files()}
    assert max(sizes.values()) <= 700, sizes


def test_reading_commands_start_without_torch_or_hydra(tmp_path: Path) -> None:
    import subprocess

    code = (
        "import sys; from tbx_lightning import cli; cli.main(['alerts', sys.argv[1]]); "
        "print(sorted(m for m in ('torch', 'hydra', 'lightning', 'tensorboardX') "
        "if m in sys.modules))"
    )
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "events.out.tfevents.0.x").write_bytes(b"")
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
