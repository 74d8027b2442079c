"""Behaviour TBXLogger and TBXTracker share, tested once for both.

Each test takes ``make``, a factory of a thin driver around one integration: the
same calls go to ``TBXLogger`` (Lightning's names: ``log_metrics``, ``finalize``)
and to ``TBXTracker`` (Accelerate's: ``log``, ``finish``), and what they write is
read back through TensorBoard's reader.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata

from tbx_lightning import (
    ConfigError,
    ConfigTypeError,
    GraphExportError,
    LoggedTypeError,
    LoggedValueError,
    RunWriter,
    TBXError,
    TBXLogger,
    TBXTracker,
)
from tests.tb import read


class Driver:
    """One integration behind one set of method names."""

    def __init__(self, kind: str, root: Path, **options: Any) -> None:
        self.kind = kind
        if kind == "logger":
            self.target: Any = TBXLogger(root, name="proj", **options)
        else:
            self.target = TBXTracker("proj", root, **options)

    def start(self) -> Driver:
        if self.kind == "tracker":
            self.target.start()
        return self

    @property
    def log_dir(self) -> str:
        return str(self.target.log_dir)

    def log(self, values: Any, step: Any = None) -> None:
        if self.kind == "logger":
            self.target.log_metrics(values, step)
        else:
            self.target.log(values, step)

    def finish(self, status: str = "success") -> None:
        if self.kind == "logger":
            self.target.finalize(status)
        else:
            self.target.finish(status)

    def __getattr__(self, name: str) -> Any:
        # log_text, log_images, log_histograms, log_embedding, log_graph, log_hyperparams
        return getattr(self.target, name)


class Make:
    """``make(**options)`` builds a started driver of the fixture's integration."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind = kind
        self.root = root
        self.drivers: list[Driver] = []

    def __call__(self, **options: Any) -> Driver:
        driver = Driver(self.kind, self.root / f"d{len(self.drivers)}", **options).start()
        self.drivers.append(driver)
        return driver


@pytest.fixture(params=["logger", "tracker"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Make]:
    AcceleratorState._reset_state(True)
    build = Make(request.param, tmp_path)
    yield build
    for driver in build.drivers:
        driver.target.close() if driver.kind == "logger" else driver.target.finish()
    AcceleratorState._reset_state(True)


def scalars(acc: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def texts(acc: EventAccumulator) -> dict[str, list[tuple[int, str]]]:
    out = {}
    for tag in acc.Tags()["tensors"]:
        if tag.endswith("/text_summary"):
            out[tag[: -len("/text_summary")]] = [
                (e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)
            ]
    return out


def closed(driver: Driver) -> EventAccumulator:
    driver.finish()
    return read(driver.log_dir)


# ----------------------------------------------------------------------------- values
def test_nested_dicts_of_any_depth_are_slash_tags(make: Make) -> None:
    run = make()
    run.log({"a": {"b": {"c": 1.0, "d": {"e": torch.tensor(2.0)}}}, "top": np.float32(3)}, 4)
    assert scalars(closed(run)) == {"a/b/c": [(4, 1.0)], "a/b/d/e": [(4, 2.0)], "top": [(4, 3.0)]}


def test_strings_are_text_entries(make: Make) -> None:
    run = make()
    run.log({"loss": 0.5, "note": "warm-up", "split": {"name": "val"}}, 2)
    acc = closed(run)
    assert scalars(acc) == {"loss": [(2, 0.5)]}
    assert texts(acc) == {"note": [(2, "warm-up")], "split/name": [(2, "val")]}


def test_nan_and_inf_are_kept(make: Make) -> None:
    run = make()
    run.log({"nan": float("nan"), "inf": torch.tensor(float("inf"))}, 0)
    got = scalars(closed(run))
    assert np.isnan(got["nan"][0][1]) and got["inf"] == [(0, float("inf"))]


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({"val": {"acc": 0.5}, "val/acc": 0.9}, id="nested-then-flat"),
        pytest.param({"val/acc": 0.9, "val": {"acc": 0.5}}, id="flat-then-nested"),
        pytest.param({"val": {"acc": "x"}, "val/acc": 1.0}, id="text-and-number"),
    ],
)
def test_a_tag_given_twice_is_an_error_and_nothing_is_written(
    make: Make, values: dict[str, Any]
) -> None:
    run = make()
    with pytest.raises(LoggedValueError, match=r"Value 'val/acc' is given twice in one call"):
        run.log({"first": 1.0, **values}, 0)
    run.log({"after": 1.0}, 1)
    acc = closed(run)
    assert scalars(acc) == {"after": [(1, 1.0)]}
    assert texts(acc) == {}


@pytest.mark.parametrize(
    "values,error,match",
    [
        pytest.param({"x": None}, LoggedTypeError, r"Value 'x' has type NoneType", id="none"),
        pytest.param({"x": [1, 2]}, LoggedTypeError, r"Value 'x' has type list", id="list"),
        pytest.param(
            {"w": torch.ones(3)}, LoggedTypeError, r"'w' is a tensor of shape \(3,\)", id="tensor"
        ),
        pytest.param({3: 1.0}, LoggedTypeError, r"Logged names must be str", id="int-key"),
        pytest.param({"": 1.0}, LoggedValueError, r"must not be empty", id="empty-key"),
    ],
)
def test_values_that_cannot_be_written_are_named(
    make: Make, values: dict[Any, Any], error: type[Exception], match: str
) -> None:
    run = make()
    with pytest.raises(error, match=match):
        run.log({"ok": 1.0, **values}, 0)
    assert scalars(closed(run)) == {}


# ----------------------------------------------------------------------------- steps
@pytest.mark.parametrize(
    "step,shown",
    [
        pytest.param(1.5, "float 1.5", id="float"),
        pytest.param("7", "str '7'", id="str"),
        pytest.param(True, "bool True", id="bool"),
        pytest.param(torch.tensor(2.0), "Tensor", id="float-tensor"),
    ],
)
def test_a_step_that_is_not_an_int_is_a_type_error(make: Make, step: Any, shown: str) -> None:
    run = make()
    with pytest.raises(LoggedTypeError, match=rf"`step` must be an int or None, got {shown}"):
        run.log({"x": 1.0}, step)
    with pytest.raises(TypeError):  # a TypeError too, for code written against the stock loggers
        run.log_images({"i": torch.rand(3, 2, 2)}, step)
    assert scalars(closed(run)) == {}


def test_integer_steps_of_numpy_and_tensors_are_accepted(make: Make) -> None:
    run = make()
    run.log({"x": 1.0}, np.int64(3))
    run.log({"x": 2.0}, torch.tensor(5))
    assert scalars(closed(run)) == {"x": [(3, 1.0), (5, 2.0)]}


def test_step_none_rule(make: Make) -> None:
    # Values without a step go one past the highest step logged (0 first); everything
    # else goes to the highest step logged (0 before anything was logged).
    run = make()
    run.log_text({"first": "before anything"})
    run.log({"a": 1.0})
    run.log({"a": 2.0})
    run.log({"a": 3.0}, step=10)
    run.log({"a": 4.0})
    run.log({"a": 5.0}, step=7)  # an earlier step does not move the rule back
    run.log({"a": 6.0})
    run.log_text({"note": "latest"})
    run.log_images({"img": torch.rand(3, 2, 2)})
    run.log_histograms({"w": torch.arange(10.0)})
    run.log_hyperparams({"lr": 0.1}, metrics={"best": 0.5})
    acc = closed(run)
    assert scalars(acc)["a"] == [(1, 1.0), (2, 2.0), (10, 3.0), (11, 4.0), (7, 5.0), (12, 6.0)]
    assert scalars(acc)["best"] == [(12, 0.5)]
    assert texts(acc) == {
        "first": [(0, "before anything")],
        "note": [(12, "latest")],
        "run/config": [(0, "```yaml\nlr: 0.1\n```")],  # the resolved config, once
    }
    assert [e.step for e in acc.Images("img")] == [12]
    assert [e.step for e in acc.Histograms("w")] == [12]


# ----------------------------------------------------------------------------- features
def test_same_calls_write_the_same_tags_and_values(tmp_path: Path) -> None:
    from PIL import Image

    AcceleratorState._reset_state(True)
    results = []
    for kind in ("logger", "tracker"):
        run = Driver(kind, tmp_path / kind).start()
        run.log({"train": {"loss": 0.5, "lr": 0.25}, "note": "x"}, 1)
        run.log_text({"card": {"title": "demo"}}, 1)
        run.log_images({"pil": [Image.new("RGB", (4, 3))]}, 2)
        run.log_images({"hw": np.ones((5, 6))}, 2, dataformats="HW")
        run.log_images({"hwc": np.zeros((5, 7, 3), dtype=np.uint8)}, 2, dataformats="HWC")
        run.log_histograms({"w": torch.arange(8.0)}, 2)
        acc = closed(run)
        images = {
            tag: [(e.step, e.width, e.height) for e in acc.Images(tag)]
            for tag in acc.Tags()["images"]
        }
        hists = {tag: [e.step for e in acc.Histograms(tag)] for tag in acc.Tags()["histograms"]}
        results.append((scalars(acc), texts(acc), images, hists))
    AcceleratorState._reset_state(True)
    assert results[0] == results[1]
    assert results[0][2] == {"pil": [(2, 4, 3)], "hw": [(2, 6, 5)], "hwc": [(2, 7, 5)]}


@pytest.mark.parametrize(
    "values,kwargs,error,match",
    [
        pytest.param({"i": "x.png"}, {}, LoggedTypeError, r"Image 'i' has type str", id="path"),
        pytest.param({"i": torch.rand(5)}, {}, LoggedValueError, r"Image 'i' has shape", id="1d"),
        pytest.param({"i": []}, {}, LoggedValueError, r"Image list 'i' is empty", id="empty"),
        pytest.param(
            {"i": np.zeros((8, 8))},
            {"dataformats": "HX"},
            LoggedValueError,
            r"not a layout",
            id="fmt",
        ),
    ],
)
def test_images_that_cannot_be_written_are_named(
    make: Make, values: dict[str, Any], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    run = make()
    with pytest.raises(error, match=match):
        run.log_images({"good": torch.rand(3, 4, 4), **values}, 0, **kwargs)
    assert closed(run).Tags()["images"] == []


def test_log_text_rejects_numbers(make: Make) -> None:
    run = make()
    with pytest.raises(LoggedTypeError, match=r"Text 'n' is a number, not a str"):
        run.log_text({"n": 1.0})


def test_log_graph_returns_the_export_and_warns_when_it_fails(make: Make) -> None:
    from tbx_lightning.graph import GraphExport

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    run = make()
    run.log({"loss": 1.0}, 3)
    export = run.log_graph(model, torch.randn(2, 4))
    assert isinstance(export, GraphExport) and export.method
    with pytest.warns(UserWarning, match=r"Model graph not logged: Could not export a graph"):
        assert run.log_graph(model, torch.randn(2, 5)) is None  # wrong width
    acc = closed(run)
    assert acc.Tags()["graph"] is True
    assert [e.step for e in acc.Tensors("graph/export")] == [3]


def test_log_graph_uses_example_input_array_and_options(make: Make) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Sequential(torch.nn.Linear(3, 1)))
    model.example_input_array = torch.zeros(1, 4)  # type: ignore[assignment]
    # TBXLogger's `log_graph` flag gates the call Lightning makes at fit start without input.
    run = make(log_graph=True) if make.kind == "logger" else make()
    export = run.log_graph(model, max_depth=1)
    assert export is not None
    assert all(node.name.count("/") <= 1 for node in closed(run).Graph().node)


def test_strict_graph_raises_graph_export_error(make: Make) -> None:
    run = make(strict_graph=True)
    model = torch.nn.Linear(4, 1)
    with pytest.raises(GraphExportError, match="Could not export a graph of"):
        run.log_graph(model, torch.randn(2, 5))
    with pytest.raises(GraphExportError):
        run.log_graph(model, np.zeros((2, 4)))  # an input the exporter cannot use
    run.log({"after": 1.0}, 0)
    assert scalars(closed(run)) == {"after": [(0, 1.0)]}


def test_log_embedding_with_seed_keeps_the_same_points(make: Make) -> None:
    mat = torch.arange(40.0).reshape(20, 2)
    run = make()
    first = run.log_embedding("e", mat, step=0, max_points=5, seed=3)
    again = run.log_embedding("e", mat, step=1, max_points=5, seed=3)
    other = run.log_embedding("e", mat, step=2, max_points=5, seed=4)
    assert (first.num_points, first.total_points, first.seed) == (5, 20, 3)
    rows = [json.loads(Path(r.sample_path).read_text())["rows"] for r in (first, again, other)]
    assert rows[0] == rows[1] and rows[0] != rows[2]
    run.finish()


def test_hyperparameters_and_any_status(make: Make) -> None:
    run = make()
    run.log_hyperparams({"model": {"lr": 0.1}, "api_token": "abc"})
    run.log({"x": 1.0}, 2)
    run.finish("not-a-status")
    acc = read(run.log_dir)
    start = metadata.parse_session_start_info_plugin_data(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    )
    end = metadata.parse_session_end_info_plugin_data(
        acc.PluginTagToContent("hparams")["_hparams_/session_end_info"]
    )
    assert dict(start.hparams)["model.lr"].number_value == 0.1
    assert dict(start.hparams)["api_token"].string_value == "********"
    assert end.status == 0  # STATUS_UNKNOWN
    assert texts(acc)["run/status"] == [(2, "not-a-status")]


# ----------------------------------------------------------------------------- options
def test_writer_options_are_accepted_on_both(make: Make) -> None:
    run = make(flush_secs=1, max_queue=8, max_queue_bytes=4096, segment_bytes=1024, purge_step=0)
    run.log({"x": 1.0}, 0)
    writer = run.target.run_writer
    assert (writer.max_queue, writer.max_queue_bytes, writer.segment_bytes) == (8, 4096, 1024)
    assert scalars(closed(run)) == {"x": [(0, 1.0)]}


@pytest.mark.parametrize(
    "options,error,match",
    [
        pytest.param(
            {"flush_secs": -1}, ConfigError, r"Expected `flush_secs` > 0, got -1", id="fs"
        ),
        pytest.param(
            {"flush_secs": "5"}, ConfigTypeError, r"`flush_secs` must be a number", id="t"
        ),
        pytest.param({"max_queue": 0}, ConfigError, r"Expected `max_queue` >= 1, got 0", id="mq"),
        pytest.param({"max_queue_bytes": 0}, ConfigError, r"`max_queue_bytes` >= 1", id="mqb"),
        pytest.param({"segment_bytes": 1.5}, ConfigTypeError, r"`segment_bytes` must be", id="sb"),
        pytest.param({"purge_step": 1.5}, LoggedTypeError, r"`purge_step` must be an int", id="ps"),
        pytest.param({"flush_sec": 3}, ConfigTypeError, r"\['flush_sec'\]", id="typo"),
        pytest.param(
            {"upload_timeout": -1}, ConfigError, r"Expected `upload_timeout` >= 0", id="ut"
        ),
        pytest.param(
            {"upload_timeout": float("inf")}, ConfigError, r"`upload_timeout` >= 0", id="ut-inf"
        ),
    ],
)
def test_bad_writer_options_fail_at_construction(
    make: Make, options: dict[str, Any], error: type[Exception], match: str, tmp_path: Path
) -> None:
    with pytest.raises(error, match=match) as info:
        make(**options)
    assert isinstance(info.value, TBXError)
    if "flush_sec" not in options:
        # RunWriter itself applies the same rule, with the same words.
        with pytest.raises(error, match=match):
            RunWriter(tmp_path / "direct", **options)


def test_writer_options_are_the_writers_keyword_arguments() -> None:
    import inspect

    from tbx_lightning._rules import WRITER_OPTIONS

    keyword_only = {
        name
        for name, param in inspect.signature(RunWriter.__init__).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    }
    assert keyword_only == WRITER_OPTIONS


# ----------------------------------------------------------------------------- threads
@pytest.mark.timeout(120)
@pytest.mark.parametrize("trial", range(4))
def test_four_threads_on_first_use_write_one_run_at_exact_steps(make: Make, trial: int) -> None:
    before = {t for t in threading.enumerate() if t.name.startswith("tbx-run-writer:")}
    run = make(flush_secs=60)
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            barrier.wait()
            for i in range(100):
                step = worker * 100 + i
                run.log({"value": float(step), f"w{worker}": float(step)}, step)
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    writers = {t for t in threading.enumerate() if t.name.startswith("tbx-run-writer:")} - before
    assert len(writers) == 1
    acc = closed(run)
    root = Path(run.log_dir).parent
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["version_0"]
    assert len(list(Path(run.log_dir).glob("events.out.tfevents.*"))) == 1
    got = scalars(acc)
    assert sorted(got["value"]) == [(s, float(s)) for s in range(400)]
    for worker in range(4):
        assert sorted(got[f"w{worker}"]) == [
            (s, float(s)) for s in range(worker * 100, worker * 100 + 100)
        ]


def test_bad_histograms_and_embeddings_raise_the_package_errors(make: Make) -> None:
    run = make()
    with pytest.raises(LoggedTypeError, match=r"Histogram 'h' has type float"):
        run.log_histograms({"h": 1.0})
    with pytest.raises(LoggedValueError, match=r"Histogram 'e' is empty"):
        run.log_histograms({"e": torch.empty(0)})
    with pytest.raises(TBXError):
        run.log_embedding("e", torch.zeros(3))  # not (N, D)
    run.finish()


@pytest.mark.parametrize(
    "values",
    [
        pytest.param({"note": "caf\udce9"}, id="text"),
        pytest.param({"caf\udce9": 1.0}, id="name"),
    ],
)
def test_lone_surrogates_are_named_and_nothing_is_written(
    make: Make, values: dict[str, Any]
) -> None:
    run = make()
    with pytest.raises(LoggedValueError, match=r"cannot be written as UTF-8"):
        run.log({"first": 1.0, **values}, 0)
    run.log({"after": 2.0}, 1)
    acc = closed(run)
    assert scalars(acc) == {"after": [(1, 2.0)]}
    assert texts(acc) == {}
