"""``tbx-lightning sweep`` on Hydra's multirun: joblib workers, submitit processes, an Optuna search.

Every run is a reduced quickstart (one epoch on a few dozen digits). What the runs
did is read back from the runs themselves: their HParams session records (start and
end times, status, hyperparameters) through TensorBoard's EventAccumulator and the
HParams plugin's parser, and the sweep's own files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata

from tbx_lightning import cli
from tbx_lightning.cli import _main, _sweep
from tbx_lightning.cli._sweep import MARKER

TINY = [
    "trainer.max_epochs=1",
    "data.limit=48",
    "data.batch_size=16",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks=none",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(420),
    pytest.mark.filterwarnings(
        "ignore:.*does not have many workers.*",
        "ignore:.*log_every_n_steps.*",
        "ignore:.*isinstance.treespec, LeafSpec.*",
    ),
]

plugins = pytest.importorskip("hydra_plugins.hydra_joblib_launcher")


def _session(run: Path) -> tuple[dict[str, Any], int, float, float, list[str]]:
    acc = EventAccumulator(str(run))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    values = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return values, end.status, start.start_time_secs, end.end_time_secs, acc.Tags()["scalars"]


def _markers(experiment: Path) -> list[dict[str, Any]]:
    paths = sorted(experiment.glob(f".sweeps/*/*/{MARKER}"))
    return [json.loads(p.read_text(encoding="utf-8")) for p in paths]


def _run_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(["sweep", "quickstart", f"paths.runs_dir={tmp_path}", *TINY, *args])
    return code, capsys.readouterr().out


def test_joblib_runs_two_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Each run waits at the start of training until both are there: runs started one
    # after another would never get past it.
    barrier = [
        "+callbacks.barrier._target_=tests.sweep_barrier.Barrier",
        f"+callbacks.barrier.directory={tmp_path / 'barrier'}",
        "+callbacks.barrier.parties=2",
    ]
    code, out = _run_sweep(
        tmp_path, capsys, "model.optimizer.lr=0.01,0.001", *barrier, "--jobs", "2", "--name", "par"
    )
    assert code == 0, out
    assert "[1/2] model.optimizer.lr=0.01: success" in out
    assert "[2/2] model.optimizer.lr=0.001: success" in out
    assert "Sweep done: 2 succeeded, 0 failed." in out
    assert f"tensorboard --logdir {tmp_path / 'par'}" in out
    runs = sorted((tmp_path / "par").glob("version_*"))
    assert [r.name for r in runs] == ["version_0", "version_1"]
    sessions = [_session(r) for r in runs]
    assert sorted(s[0]["model.optimizer.lr"] for s in sessions) == pytest.approx([0.001, 0.01])
    assert all(s[1] == api_pb2.STATUS_SUCCESS for s in sessions)
    # The runs' own records overlap: each started before the other ended.
    (_, _, start_a, end_a, _), (_, _, start_b, end_b, _) = sessions
    assert start_a < end_b and start_b < end_a
    # Two processes, neither of them this one.
    pids = {m["pid"] for m in _markers(tmp_path / "par")}
    assert len(pids) == 2 and os.getpid() not in pids


def test_submitit_local_runs_each_in_a_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("submitit")
    code, out = _run_sweep(
        tmp_path,
        capsys,
        "model.optimizer.lr=0.01,0.001",
        "hydra/launcher=processes",
        "--name",
        "sub",
    )
    assert code == 0, out
    runs = sorted((tmp_path / "sub").glob("version_*"))
    assert [r.name for r in runs] == ["version_0", "version_1"]
    assert all(_session(r)[1] == api_pb2.STATUS_SUCCESS for r in runs)
    markers = _markers(tmp_path / "sub")
    pids = {m["pid"] for m in markers}
    assert len(pids) == 2 and os.getpid() not in pids
    # One submitit job (a process started by its local executor) per run, each with a result.
    results = list((tmp_path / "sub").glob(".sweeps/*/.submitit/*/*_result.pkl"))
    assert len({p.parent.name for p in results}) == 2


def test_optuna_search_lands_in_one_hparams_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("optuna")
    code, out = _run_sweep(
        tmp_path,
        capsys,
        "model.optimizer.lr=tag(log, interval(0.001, 0.1))",
        "hydra/sweeper=search",
        "hydra.sweeper.n_trials=3",
        "--optimized-metric",
        "val/acc",
        "--jobs",
        "2",
        "--name",
        "search",
    )
    assert code == 0, out
    assert "objective: val/acc (maximize)" in out
    assert "Sweep done: 3 succeeded, 0 failed." in out
    directory = tmp_path / "search"
    runs = sorted(directory.glob("version_*"))
    assert len(runs) == 3
    sessions = [_session(r) for r in runs]
    lrs = [s[0]["model.optimizer.lr"] for s in sessions]
    assert len(set(lrs)) == 3 and all(0.001 <= lr <= 0.1 for lr in lrs)
    assert all("val/acc" in s[4] for s in sessions)

    assert cli.main(["hparams", str(directory), "--format", "json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert len(table) == 3
    assert [row["model.optimizer.lr"] for row in table] == pytest.approx(lrs)
    assert all(row["status"] == "success" for row in table)
    # The objective every trial returned is that run's `val/acc best` column.
    objectives = {m["num"]: m["objective"] for m in _markers(directory)}
    by_dir = {m["log_dir"]: m["objective"] for m in _markers(directory)}
    assert len(objectives) == 3
    for row, run in zip(table, runs, strict=True):
        assert by_dir[str(run)] == pytest.approx(row["val/acc best"])
    results = yaml.safe_load(
        next(directory.glob(".sweeps/*/optimization_results.yaml")).read_text()
    )
    assert results["best_value"] == pytest.approx(max(row["val/acc best"] for row in table))


BAD = [
    pytest.param(
        ["model.optimizer.lr=0.1,0.01", "hydra/launcher=processes", "--jobs", "2"],
        r"--jobs sets the joblib launcher's workers, but 'hydra/launcher=processes'",
        id="jobs-with-other-launcher",
    ),
    pytest.param(
        ["model.optimizer.lr=interval(0.001,0.1)", "hydra/sweeper=search"],
        r"A search needs an objective: pass --optimized-metric METRIC",
        id="search-without-objective",
    ),
    pytest.param(
        ["model.optimizer.lr=0.1,0.01", "hydra/launcher=nope"],
        r"Unknown option 'nope' for hydra/launcher; choose one of: .*parallel, processes, "
        r"slurm.*pip install 'tbx-lightning\[sweep\]'",
        id="unknown-launcher",
    ),
    pytest.param(
        ["model.optimizer.lr=0.1,0.01", "--jobs", "0"],
        r"--jobs 0: give the number of runs at once",
        id="jobs-zero",
    ),
    pytest.param(
        [
            "model.optimizer.lr=choice(0.01,fast)",
            "hydra/sweeper=search",
            "--optimized-metric",
            "val/acc",
        ],
        r"Wrong type for 'model.optimizer.lr'",
        id="search-bound-type",
    ),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_sweeps_stop_before_anything_runs(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["sweep", "quickstart", f"paths.runs_dir={tmp_path}", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("tbx-lightning sweep: error: ")
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_list_shows_launchers_and_sweepers(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert {"parallel", "processes", "slurm", "joblib"} <= set(
        lines["hydra/launcher/"].replace(",", " ").split()
    )
    assert {"search", "optuna", "basic"} <= set(lines["hydra/sweeper/"].replace(",", " ").split())
    assert "quickstart_search" in lines["sweep/"]


def test_shipped_search_file_plans_an_optuna_search(tmp_path: Path) -> None:
    pytest.importorskip("optuna")
    args = _main._parser().parse_args(
        ["sweep", "--grid", "quickstart_search", f"paths.runs_dir={tmp_path}", "--name", "s"]
    )
    plan = _sweep.plan_sweep(args)
    assert plan.search and plan.total == 20 and plan.metric == "val/acc"
    assert plan.direction == "maximize"
    assert "hydra/sweeper=search" in plan.hydra_overrides
    assert "hydra.sweeper.direction=maximize" in plan.hydra_overrides
    assert plan.swept_keys == ["model.optimizer.lr", "model.net.embed_dim"]
    assert plan.experiment_dir == str(tmp_path / "s")
    # A loss-like objective is minimised; the command line's own direction wins.
    args = _main._parser().parse_args(
        ["sweep", "--grid", "quickstart_search", "--optimized-metric", "val/loss", "--name", "s"]
    )
    assert _sweep.plan_sweep(args).direction == "minimize"
    args = _main._parser().parse_args(
        ["sweep", "--grid", "quickstart_search", "hydra.sweeper.direction=minimize"]
    )
    plan = _sweep.plan_sweep(args)
    assert plan.direction == "minimize"
    assert plan.hydra_overrides.count("hydra.sweeper.direction=minimize") == 1
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
