"""Spread over seeds: ``hparams --over`` and the band runs of ``aggregate``.

Runs are written into ``tmp_path`` with the public ``RunWriter`` and ``RunHParams``
(what both integrations route to), with values chosen so that every mean and
standard deviation is known; the commands run through ``cli.main``; the band runs are
read back with TensorBoard's ``EventAccumulator`` and its Custom Scalars plugin.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
from tensorboard.context import RequestContext
from tensorboard.plugins import base_plugin
from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin
from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment

from tbx_lightning import RunWriter, cli, runs
from tbx_lightning.cli._aggregate import write_aggregates
from tbx_lightning.hparams import RunHParams

pytestmark = pytest.mark.timeout(120)

LRS = (0.01, 0.001)
SEEDS = (1, 2, 3)
STEPS = (0, 10, 20)


def _loss(lr: float, seed: int, step: int) -> float:
    return (1.0 if lr == 0.01 else 2.0) + seed / 4 - step / 100


def _acc(lr: float, seed: int) -> float:
    return (0.75 if lr == 0.01 else 0.5) + seed / 16


def _write(root: Path, index: int, lr: float, seed: int, *, steps: tuple[int, ...] = STEPS) -> None:
    with RunWriter(root / f"version_{index}", flush_secs=3600) as writer:
        hp = RunHParams(writer)
        hp.log({"model": {"lr": lr}, "seed": seed, "data": {"seed": seed, "batch_size": 32}})
        for step in steps:
            writer.log_scalars({"train/loss": _loss(lr, seed, step)}, step)
        writer.log_scalars({"val/acc": _acc(lr, seed), "epoch": 0}, steps[-1])
        hp.finish("success")


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """2 learning rates x 3 seeds; ``data.seed`` is a copy of ``seed``, as in the templates."""
    index = 0
    for lr in LRS:
        for seed in SEEDS:
            _write(tmp_path, index, lr, seed)
            index += 1
    return tmp_path


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


# ---------------------------------------------------------------------- hparams --over
def test_over_gives_one_row_per_config_with_mean_std_n(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = json.loads(_run(capsys, "hparams", str(sweep), "--over", "seed", "--format", "json"))
    assert [row["model.lr"] for row in rows] == [0.01, 0.001]
    first = rows[0]
    assert first["runs"] == ["version_0", "version_1", "version_2"]
    assert list(first) == [
        "runs",
        "model.lr",
        "val/acc mean",
        "val/acc std",
        "val/acc n",
        "val/acc best mean",
        "val/acc best std",
        "val/acc best n",
        "train/loss mean",
        "train/loss std",
        "train/loss n",
        "status",
        "seconds",
    ]
    accs = [_acc(0.01, seed) for seed in SEEDS]
    assert first["val/acc mean"] == pytest.approx(statistics.mean(accs))
    assert first["val/acc std"] == pytest.approx(statistics.stdev(accs))
    assert first["val/acc n"] == 3
    losses = [_loss(0.01, seed, STEPS[-1]) for seed in SEEDS]
    assert first["train/loss mean"] == pytest.approx(statistics.mean(losses), rel=1e-6)
    assert first["train/loss std"] == pytest.approx(statistics.stdev(losses), rel=1e-5)
    assert first["status"] == "success"
    # data.seed holds the same value as seed in every run: grouped over with it.
    assert "data.seed" not in first


def test_over_in_every_format_and_sorted(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    table = _run(capsys, "hparams", str(sweep), "--over", "seed,data.seed", "--sort", "val/acc")
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["runs", "model.lr", "val/acc"]
    assert len(lines) == 5 and "± " in lines[2] and "(3)" in lines[2]
    assert lines[-1].startswith(
        "(mean ± sample standard deviation (number of runs) over data.seed, seed"
    )
    markdown = _run(capsys, "hparams", str(sweep), "--over", "seed", "--format", "markdown")
    assert markdown.startswith("| runs | model.lr | val/acc | val/acc best | train/loss |")
    text = _run(capsys, "hparams", str(sweep), "--over", "seed", "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[0]["runs"] == "version_0 version_1 version_2"
    assert float(rows[1]["val/acc n"]) == 3
    # Sorted by the mean of the best values, best first; --sort on a loss: lowest first.
    ordered = json.loads(
        _run(
            capsys,
            "hparams",
            str(sweep),
            "--over",
            "seed",
            "--sort",
            "train/loss",
            "--format",
            "json",
        )
    )
    assert [row["model.lr"] for row in ordered] == [0.01, 0.001]
    assert ordered[0]["train/loss best mean"] < ordered[1]["train/loss best mean"]
    ordered = json.loads(
        _run(
            capsys,
            "hparams",
            str(sweep),
            "--over",
            "model.lr",
            "--sort",
            "val/acc",
            "--format",
            "json",
        )
    )
    # Over the learning rate instead: one row per seed, best val/acc first.
    assert [row["seed"] for row in ordered] == [3, 2, 1]
    assert all(row["val/acc n"] == 2 for row in ordered)


def test_over_a_key_of_no_run_is_an_error(sweep: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["hparams", str(sweep), "--over", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--over 'nope' matches no config key of these runs" in err
    assert "model.lr" in err


def test_a_single_run_has_no_deviation_and_a_missing_metric_counts_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path, 0, 0.01, 1)
    _write(tmp_path, 1, 0.01, 2, steps=(0,))  # a shorter run: val/acc at step 0
    _write(tmp_path, 2, 0.001, 1)
    rows = json.loads(_run(capsys, "hparams", str(tmp_path), "--over", "seed", "--format", "json"))
    assert [row["model.lr"] for row in rows] == [0.01, 0.001]
    assert rows[1]["val/acc std"] is None and rows[1]["val/acc n"] == 1
    assert rows[0]["val/acc n"] == 2


# ---------------------------------------------------------------------- aggregate
def _scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(path), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _layout(logdir: Path) -> dict[str, Any]:
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    context = base_plugin.TBContext(
        logdir=str(logdir),
        multiplexer=multiplexer,
        data_provider=data_provider.MultiplexerDataProvider(multiplexer, str(logdir)),
        plugin_name_to_instance={},
    )
    layout = CustomScalarsPlugin(context).layout_impl(RequestContext(), "")
    return dict(json.loads(layout) if isinstance(layout, str) else layout)


def test_aggregate_writes_mean_and_band_per_group(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _run(capsys, "aggregate", str(sweep), "--over", "seed")
    assert "aggregate/model.lr=0.01: mean and band of 2 tags over 3 runs" in out
    assert "aggregate/model.lr=0.001: mean and band of 2 tags over 3 runs" in out
    band = sweep / "aggregate" / "model.lr=0.01"
    scalars = _scalars(band)
    assert sorted(scalars) == [
        "band/train/loss/lower",
        "band/train/loss/upper",
        "band/val/acc/lower",
        "band/val/acc/upper",
        "train/loss",
        "val/acc",
    ]
    for step, mean in scalars["train/loss"]:
        values = [_loss(0.01, seed, step) for seed in SEEDS]
        assert mean == pytest.approx(statistics.mean(values), rel=1e-6)
        std = statistics.stdev(values)
        (lower,) = [v for s, v in scalars["band/train/loss/lower"] if s == step]
        (upper,) = [v for s, v in scalars["band/train/loss/upper"] if s == step]
        assert lower == pytest.approx(mean - std, rel=1e-5)
        assert upper == pytest.approx(mean + std, rel=1e-5)
    assert [s for s, _ in scalars["train/loss"]] == list(STEPS)
    marker = json.loads((band / runs.AGGREGATE_FILE).read_text())
    assert marker["over"] == ["seed", "data.seed"]
    assert marker["runs"] == ["version_0", "version_1", "version_2"]
    assert marker["config"] == {"data.batch_size": 32, "model.lr": 0.01}

    # TensorBoard's Custom Scalars plugin sees one Margin chart per tag.
    bands = next(c for c in _layout(sweep)["category"] if c["title"] == "bands")
    assert [chart["title"] for chart in bands["chart"]] == ["train/loss", "val/acc"]
    assert bands["chart"][0]["margin"]["series"] == [
        {"value": "train/loss", "lower": "band/train/loss/lower", "upper": "band/train/loss/upper"}
    ]


def test_aggregate_runs_are_no_ordinary_runs(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _run(capsys, "aggregate", str(sweep), "--over", "seed")
    rows = json.loads(_run(capsys, "hparams", str(sweep), "--format", "json"))
    assert [row["run"] for row in rows] == [f"version_{i}" for i in range(6)]
    assert [r.run for r in runs.read_runs(sweep)] == [f"version_{i}" for i in range(6)]
    assert runs.read_alerts(sweep) == []
    # A rebuild over another key replaces the bands; the old ones do not feed the new.
    _run(capsys, "aggregate", str(sweep), "--over", "model.lr")
    names = sorted(p.name for p in (sweep / "aggregate").iterdir())
    assert names == ["data.seed=1,seed=1", "data.seed=2,seed=2", "data.seed=3,seed=3"]
    marker = json.loads((sweep / "aggregate" / names[0] / runs.AGGREGATE_FILE).read_text())
    assert marker["runs"] == ["version_0", "version_3"]
    # TensorBoard's HParams dashboard has no row and no metric column from them.
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(sweep))
    multiplexer.Reload()
    context = base_plugin.TBContext(
        logdir=str(sweep),
        multiplexer=multiplexer,
        data_provider=data_provider.MultiplexerDataProvider(multiplexer, str(sweep)),
        plugin_name_to_instance={},
    )
    request = api_pb2.GetExperimentRequest(experiment_name="", hparams_limit=1000)
    experiment = get_experiment.Handler(
        RequestContext(), backend_context.Context(context), "", request
    ).run()
    tags = {info.name.tag for info in experiment.metric_infos}
    assert tags == {"train/loss", "val/acc", "epoch"}
    assert not [info for info in experiment.metric_infos if info.name.group]


def test_aggregate_refuses_one_run_and_foreign_runs(
    sweep: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["aggregate", str(sweep / "version_0"), "--over", "seed"]) == 2
    assert "is one run: point RUNS at the directory" in capsys.readouterr().err
    _write(sweep / "aggregate", 9, 0.5, 1)  # somebody's own run where the bands go
    assert cli.main(["aggregate", str(sweep), "--over", "seed"]) == 2
    assert "holds a run that is not an aggregate" in capsys.readouterr().err
    assert (sweep / "aggregate" / "version_9").is_dir()


def test_a_diverged_seed_shows_in_the_mean(tmp_path: Path) -> None:
    for index, seed in enumerate(SEEDS):
        with RunWriter(tmp_path / f"version_{index}", flush_secs=3600) as writer:
            hp = RunHParams(writer)
            hp.log({"seed": seed})
            writer.log_scalars({"train/loss": math.nan if seed == 3 else 1.0 * seed}, 0)
            writer.log_scalars({"train/loss": 0.5 * seed}, 1)
            hp.finish("success")
    (written,) = write_aggregates(tmp_path, ["seed"])
    scalars = _scalars(Path(written[0]))
    assert math.isnan(scalars["train/loss"][0][1])
    assert scalars["train/loss"][1] == (1, pytest.approx(1.0))
