"""TBXTracker: Accelerate's tracker contract, round trips through TensorBoard's reader and server."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker
from google.protobuf import text_format
from omegaconf import OmegaConf

import tbx_lightning
from tbx_lightning.accelerate import TBXTracker, register
from tbx_lightning.hparams import HParamsError
from tests.launch import accelerate_launch
from tests.rows import session, split_run_columns
from tests.tb import read, scalars

REPO = Path(__file__).resolve().parents[1]
DDP_SCRIPT = REPO / "tests" / "scripts" / "accelerate_ddp.py"


@pytest.fixture(autouse=True)
def _fresh_accelerate_state() -> Iterator[None]:
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def versions(root: Path) -> list[str]:
    return (
        sorted(p.name for p in root.iterdir() if not p.name.startswith("."))
        if root.exists()
        else []
    )


def run_python(code: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ----------------------------------------------------------------------------- contract
def test_is_a_general_tracker_registered_as_tbx() -> None:
    assert tbx_lightning.TBXTracker is TBXTracker
    assert issubclass(TBXTracker, GeneralTracker)
    assert TBXTracker.name == "tbx"
    assert TBXTracker.requires_logging_directory is True
    assert TBXTracker.main_process_only is True
    assert LOGGER_TYPE_TO_CLASS["tbx"] is TBXTracker


def test_register_again_is_silent() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register()
        register()
    assert LOGGER_TYPE_TO_CLASS["tbx"] is TBXTracker


def test_constructing_touches_no_files_and_no_distributed_state(tmp_path: Path) -> None:
    PartialState._reset_state()
    tracker = TBXTracker("proj", tmp_path / "runs", flush_secs=5)
    assert PartialState._shared_state == {}
    assert AcceleratorState._shared_state == {}
    assert not (tmp_path / "runs").exists()
    with pytest.raises(RuntimeError, match=r"has no run yet: the run starts in `accelerator\.init"):
        _ = tracker.tracker
    with pytest.raises(RuntimeError, match="has no run yet"):
        tracker.log({"a": 1.0}, step=0)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        pytest.param({"flush_secs": 0}, ValueError, r"`flush_secs` > 0, got 0", id="flush_secs"),
        pytest.param({"max_queue": 0}, ValueError, r"`max_queue` >= 1", id="max_queue"),
        pytest.param({"version": 1.5}, TypeError, r"`version` must be None, an int", id="version"),
    ],
)
def test_bad_options_fail_at_construction(
    tmp_path: Path, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        TBXTracker("proj", tmp_path, **kwargs)


def test_unknown_init_kwarg_names_itself(tmp_path: Path) -> None:
    accelerator = Accelerator(log_with="tbx", project_dir=tmp_path)
    with pytest.raises(TypeError, match="flushsecs"):
        accelerator.init_trackers("proj", init_kwargs={"tbx": {"flushsecs": 3}})


def test_missing_logging_dir_is_explained() -> None:
    with pytest.raises(ValueError, match="requires a `logging_dir`"):
        Accelerator(log_with="tbx")


# ----------------------------------------------------------------------------- import hook
def test_import_tbx_lightning_makes_log_with_tbx_work(tmp_path: Path) -> None:
    # One interpreter for two runs: a finished one, then one that crashes before
    # end_training (its status must stay RUNNING, never SUCCESS).
    result = run_python(
        """
        import sys, warnings
        warnings.simplefilter("error", UserWarning)
        import tbx_lightning
        assert "accelerate" not in sys.modules, "accelerate imported eagerly"
        from accelerate import Accelerator
        accelerator = Accelerator(log_with="tbx", project_dir="runs")
        accelerator.init_trackers("hooked", config={"lr": 0.5})
        accelerator.log({"loss": 1.5}, step=2)
        print(type(accelerator.get_tracker("tbx")).__name__, flush=True)
        accelerator.end_training()
        accelerator = Accelerator(log_with="tbx", project_dir="runs")
        accelerator.init_trackers("crash", config={"lr": 0.1})
        accelerator.log({"loss": 3.0}, step=7)
        raise RuntimeError("boom")
        """,
        tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert "RuntimeError: boom" in result.stderr
    assert result.stdout.strip() == "TBXTracker"
    finished = read(tmp_path / "runs" / "hooked" / "version_0")
    assert scalars(finished, "loss") == [(2, 1.5)]
    assert session(finished) == ({"lr": 0.5}, "STATUS_SUCCESS")
    crashed = read(tmp_path / "runs" / "crash" / "version_0")
    assert scalars(crashed, "loss") == [(7, 3.0)]
    assert session(crashed) == ({"lr": 0.1}, "STATUS_RUNNING")


def test_importing_the_tracker_before_accelerate_registers_it(tmp_path: Path) -> None:
    result = run_python(
        """
        import warnings
        warnings.simplefilter("error", UserWarning)
        from tbx_lightning import TBXTracker  # loads accelerate.tracking from inside itself
        from accelerate import Accelerator
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS
        assert LOGGER_TYPE_TO_CLASS["tbx"] is TBXTracker
        assert Accelerator(log_with="tbx", project_dir="runs").log_with == ["tbx"]
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "imports",
    [
        pytest.param("import tbx_lightning, accelerate.tracking", id="tbx-first"),
        pytest.param("import accelerate.tracking, tbx_lightning", id="accelerate-first"),
    ],
)
def test_reloading_accelerate_tracking_keeps_log_with_tbx(tmp_path: Path, imports: str) -> None:
    result = run_python(
        f"""
        {imports}
        import importlib
        import accelerate.tracking as tracking
        importlib.reload(tracking)
        from accelerate import Accelerator
        from tbx_lightning import TBXTracker
        assert tracking.LOGGER_TYPE_TO_CLASS["tbx"] is TBXTracker
        accelerator = Accelerator(log_with="tbx", project_dir="runs")
        accelerator.init_trackers("reloaded")
        accelerator.log({{"loss": 0.5}}, step=1)
        accelerator.end_training()
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert scalars(read(tmp_path / "runs" / "reloaded" / "version_0"), "loss") == [(1, 0.5)]


# ----------------------------------------------------------------------------- layout, config
def test_layout_and_a_new_version_per_run(tmp_path: Path) -> None:
    for expected in range(2):
        accelerator = Accelerator(log_with="tbx", project_dir=tmp_path)
        accelerator.init_trackers("my-project")
        tracker = accelerator.get_tracker("tbx")
        assert tracker.version == expected
        assert tracker.log_dir == str(tmp_path / "my-project" / f"version_{expected}")
        accelerator.log({"x": float(expected)}, step=0)
        accelerator.end_training()
        AcceleratorState._reset_state(True)
    assert versions(tmp_path) == ["my-project"]
    assert versions(tmp_path / "my-project") == ["version_0", "version_1"]
    for n in range(2):
        run = tmp_path / "my-project" / f"version_{n}"
        assert len([p for p in run.iterdir() if p.name.startswith("events.")]) == 1
        assert scalars(read(run), "x") == [(0, float(n))]


def test_explicit_version_from_init_kwargs(tmp_path: Path) -> None:
    accelerator = Accelerator(log_with="tbx", project_dir=tmp_path)
    accelerator.init_trackers("p", init_kwargs={"tbx": {"version": "baseline", "flush_secs": 1}})
    assert accelerator.get_tracker("tbx").log_dir == str(tmp_path / "p" / "baseline")
    accelerator.end_training()


NESTED = {
    "model": {"lr": 0.001, "betas": [0.9, 0.999], "layers": [{"width": 8}, {"width": 4}]},
    "data": {"name": "mnist", "root": None},
    "seed": 7,
    "amp": False,
    "api_token": "abc",
}
EXPECTED_ROW = {
    "model.lr": 0.001,
    "model.betas": "[0.9, 0.999]",
    "model.layers.0.width": 8.0,
    "model.layers.1.width": 4.0,
    "data.name": "mnist",
    "seed": 7.0,
    "amp": False,
    "api_token": "********",
}


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(NESTED, id="dict"),
        pytest.param(OmegaConf.create(NESTED), id="omegaconf"),
        pytest.param(argparse.Namespace(**NESTED), id="namespace"),
    ],
)
def test_config_gives_hparams_row_and_config_yaml(tmp_path: Path, config: Any) -> None:
    accelerator = Accelerator(log_with="tbx", project_dir=tmp_path)
    accelerator.init_trackers("cfg", config=config)
    accelerator.log({"val/loss": 0.25}, step=1)
    accelerator.end_training()
    run = tmp_path / "cfg" / "version_0"
    row, status = session(read(run))
    assert row == EXPECTED_ROW
    assert status == "STATUS_SUCCESS"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved == {**NESTED, "api_token": "********"}


def test_omegaconf_interpolations_resolved_and_missing_named(tmp_path: Path) -> None:
    accelerator = Accelerator(log_with="tbx", project_dir=tmp_path)
    cfg = OmegaConf.create({"base": 0.1, "model": {"lr": "${base}"}, "name": "???"})
    with pytest.raises(HParamsError, match=r"Config key 'name' is missing a mandatory value"):
        accelerator.init_trackers("bad", config=cfg)
    tracker = accelerator.get_tracker("tbx")
    cfg.name = "ok"
    tracker.store_init_configuration(cfg)
    accelerator.end_training()
    row, _ = session(read(tmp_path / "bad" / "version_0"))
    assert row == {"base": 0.1, "model.lr": 0.1, "name": "ok"}


# ----------------------------------------------------------------------------- log
def test_log_numbers_tensors_nested_and_text(tmp_path: Path) -> None:
    accelerator = Accelerator(log_with="tbx", project_dir=tmp_path)
    accelerator.init_trackers("log")
    accelerator.log(
        {
            "loss": torch.tensor(0.5),
            "acc": np.float32(0.75),
            "n": 3,
            "flag": True,
            "half": torch.tensor([1.5], dtype=torch.float16),
            "train": {"lr": 0.01, "grad": {"norm": torch.tensor(2.0, dtype=torch.float64)}},
            "note": "warm-up",
        },
        step=4,
    )
    accelerator.end_training()
    acc = read(tmp_path / "log" / "version_0")
    assert sorted(acc.Tags()["scalars"]) == [
        "acc",
        "flag",
        "half",
        "loss",
        "n",
        "train/grad/norm",
        "train/lr",
    ]
    assert scalars(acc, "loss") == [(4, 0.5)]
    assert scalars(acc, "acc") == [(4, 0.75)]
    assert scalars(acc, "n") == [(4, 3.0)]
    assert scalars(acc, "flag") == [(4, 1.0)]
    assert scalars(acc, "half") == [(4, 1.5)]
    assert scalars(acc, "train/grad/norm") == [(4, 2.0)]
    assert scalars(acc, "train/lr")[0][0] == 4
    assert scalars(acc, "train/lr")[0][1] == pytest.approx(0.01)
    texts = acc.Tensors("note/text_summary")
    assert [(e.step, e.tensor_proto.string_val) for e in texts] == [(4, [b"warm-up"])]


def test_log_moves_all_tensors_of_a_call_in_one_transfer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracker = TBXTracker("t", tmp_path)
    tracker.start()
    calls = []
    original = torch.Tensor.cpu

    def counting_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    tracker.log({"a": torch.tensor(1.0), "b": {"c": torch.tensor(2.0)}, "d": torch.tensor(3)}, 0)
    monkeypatch.undo()
    tracker.finish()
    assert calls == [(3,)]
    assert scalars(read(tracker.log_dir), "b/c") == [(0, 2.0)]


def test_log_without_step_draws_a_curve(tmp_path: Path) -> None:
    tracker = TBXTracker("t", tmp_path)
    tracker.start()
    tracker.log({"a": 1.0})
    tracker.log({"a": 2.0})
    tracker.log({"a": 3.0}, step=10)
    tracker.log({"a": 4.0})
    tracker.log({"a": 5.0}, step=torch.tensor(20))
    tracker.finish()
    assert scalars(read(tracker.log_dir), "a") == [
        (0, 1.0),
        (1, 2.0),
        (10, 3.0),
        (11, 4.0),
        (20, 5.0),
    ]


@pytest.mark.parametrize(
    "values,error,match",
    [
        pytest.param(
            {"ok": 1.0, "bad": None}, TypeError, r"Value 'bad' has type NoneType", id="none"
        ),
        pytest.param(
            {"x": {"y": [1, 2]}}, TypeError, r"Value 'x/y' has type list", id="nested-list"
        ),
        pytest.param({"b": b"raw"}, TypeError, r"Value 'b' has type bytes", id="bytes"),
        pytest.param(
            {"w": torch.ones(3)},
            TypeError,
            r"'w' is a tensor of shape \(3,\).*log_histograms",
            id="tensor",
        ),
        pytest.param({"c": torch.tensor(1j)}, TypeError, r"'c' is a complex tensor", id="complex"),
        pytest.param({3: 1.0}, TypeError, r"Logged names must be str, got int 3", id="int-key"),
        pytest.param({"": 1.0}, ValueError, r"must not be empty", id="empty-key"),
        pytest.param(
            {"a/b": 1.0, "a": {"b": 2.0}}, ValueError, r"'a/b' is given twice", id="clash"
        ),
    ],
)
def test_log_rejects_what_it_cannot_write_and_writes_nothing(
    tmp_path: Path, values: dict[Any, Any], error: type[Exception], match: str
) -> None:
    tracker = TBXTracker("t", tmp_path)
    tracker.start()
    with pytest.raises(error, match=match):
        tracker.log({"first": 1.0, "text": "t", **values}, step=1)
    tracker.log({"after": 2.0}, step=2)
    tracker.finish()
    acc = read(tracker.log_dir)
    assert acc.Tags()["scalars"] == ["after"]
    assert acc.Tags()["tensors"] == []


def test_log_rejects_unknown_kwargs(tmp_path: Path) -> None:
    accelerator = Accelerator(log_with="tbx", project_dir=tmp_path)
    accelerator.init_trackers("k")
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['walltime'\]"):
        accelerator.log({"a": 1.0}, step=0, log_kwargs={"tbx": {"walltime": 3.0}})
    accelerator.end_training()


def test_bad_step_is_named(tmp_path: Path) -> None:
    tracker = TBXTracker("t", tmp_path)
    tracker.start()
    with pytest.raises(TypeError, match=r"`step` must be an int or None, got float 1\.5"):
        tracker.log({"a": 1.0}, step=1.5)  # type: ignore[arg-type]
    tracker.finish()


# ----------------------------------------------------------------------------- other kinds
def test_images_histograms_and_raw_writer_share_the_run(tmp_path: Path) -> None:
    from PIL import Image

    accelerator = Accelerator(log_with="tbx", project_dir=tmp_path)
    accelerator.init_trackers("media")
    accelerator.log({"loss": 1.0}, step=3)
    tracker = accelerator.get_tracker("tbx")
    tracker.log_images(
        {
            "chw": torch.rand(3, 8, 6),
            "batch": torch.rand(2, 1, 4, 4),
            "pil": [Image.new("RGB", (9, 4)), Image.new("RGB", (9, 4))],
        },
        dataformats="CHW",
    )
    tracker.log_images({"hwc": np.zeros((5, 7, 3), dtype=np.uint8)}, dataformats="HWC")
    tracker.log_images({"gray": np.ones((5, 7))}, step=9, dataformats="HW")
    tracker.log_histograms({"w": torch.arange(100.0), "g": np.linspace(0, 1, 10, dtype=np.float32)})
    writer = accelerator.get_tracker("tbx", unwrap=True)
    assert writer is tracker.tracker is tracker.run_writer.experiment
    writer.add_text("raw", "through the writer", 3)
    accelerator.end_training()
    acc = read(tmp_path / "media" / "version_0")
    images = {tag: acc.Images(tag) for tag in acc.Tags()["images"]}
    assert sorted(images) == ["batch", "chw", "gray", "hwc", "pil"]
    assert (images["chw"][0].width, images["chw"][0].height, images["chw"][0].step) == (6, 8, 3)
    assert (images["hwc"][0].width, images["hwc"][0].height) == (7, 5)
    assert (images["pil"][0].width, images["pil"][0].height) == (18, 4)  # a grid of two
    assert (images["gray"][0].width, images["gray"][0].step) == (7, 9)
    hist = acc.Histograms("w")
    assert hist[0].step == 9  # the latest step logged (the gray image)
    assert hist[0].histogram_value.num == 100
    assert hist[0].histogram_value.max == 99.0
    assert acc.Histograms("g")[0].histogram_value.num == 10
    assert acc.Tensors("raw/text_summary")[0].step == 3


@pytest.mark.parametrize(
    "values,kwargs,error,match",
    [
        pytest.param({"i": "x.png"}, {}, TypeError, r"Image 'i' has type str", id="path"),
        pytest.param({"i": torch.rand(5)}, {}, ValueError, r"Image 'i' has shape \(5,\)", id="1d"),
        pytest.param({"i": []}, {}, ValueError, r"Image list 'i' is empty", id="empty"),
        pytest.param(
            {"i": [np.zeros((3, 2, 2)), np.zeros((3, 4, 4))]},
            {},
            ValueError,
            r"Images of 'i' have different shapes",
            id="shapes",
        ),
        pytest.param(
            {"i": torch.rand(3, 4, 4)},
            {"fmt": 1},
            TypeError,
            r"unexpected keyword argument 'fmt'",
            id="kwarg",
        ),
        pytest.param(
            {"i": np.zeros((8, 8, 3))}, {}, ValueError, r"Image 'i' has 8 channels in", id="layout"
        ),
        pytest.param(
            {"i": np.zeros((8, 8))}, {"dataformats": "HX"}, ValueError, r"not a layout", id="fmt"
        ),
    ],
)
def test_log_images_errors_name_the_key(
    tmp_path: Path,
    values: dict[str, Any],
    kwargs: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    tracker = TBXTracker("t", tmp_path)
    tracker.start()
    with pytest.raises(error, match=match):
        tracker.log_images({"good": torch.rand(3, 4, 4), **values}, step=0, **kwargs)
    tracker.finish()
    assert read(tracker.log_dir).Tags()["images"] == []


def test_log_histograms_rejects_non_tensors(tmp_path: Path) -> None:
    tracker = TBXTracker("t", tmp_path)
    tracker.start()
    with pytest.raises(TypeError, match=r"Histogram 'h' has type float"):
        tracker.log_histograms({"h": 1.0})
    with pytest.raises(ValueError, match=r"Histogram 'e' is empty"):
        tracker.log_histograms({"e": torch.empty(0)})
    tracker.finish()


def test_log_graph_routes_to_graph_module(tmp_path: Path) -> None:
    from tbx_lightning.graph import GraphExportError

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    tracker = TBXTracker("g", tmp_path)
    tracker.start()
    export = tracker.log_graph(model, torch.randn(2, 4))
    assert export is not None and export.method
    # As TBXLogger: a graph that cannot be exported warns and the loop goes on ...
    with pytest.warns(UserWarning, match="Model graph not logged: Could not export a graph"):
        assert tracker.log_graph(model, torch.randn(2, 5)) is None  # wrong width
    tracker.finish()
    assert read(tracker.log_dir).Tags()["graph"] is True
    # ... and strict_graph=True raises.
    strict = TBXTracker("g", tmp_path, strict_graph=True)
    strict.start()
    with pytest.raises(GraphExportError):
        strict.log_graph(model, torch.randn(2, 5))  # wrong width: no method can trace it
    strict.finish()


def test_log_embedding_routes_to_projector(tmp_path: Path) -> None:
    # The embedding lands at the run's latest step, as float32 rows the projector reads.
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    tracker = TBXTracker("e", tmp_path)
    tracker.start()
    tracker.log({"loss": 1.0}, step=5)
    feats = torch.randn(10, 3)
    record = tracker.log_embedding("feats", feats, metadata=[f"p{i}" for i in range(10)])
    tracker.finish()
    assert (record.step, record.num_points, record.dim) == (5, 10, 3)
    config = ProjectorConfig()
    text_format.Parse((Path(tracker.log_dir) / "projector_config.pbtxt").read_text(), config)
    (entry,) = config.embeddings
    assert entry.tensor_name == "feats:00000005"
    assert list(entry.tensor_shape) == [10, 3]
    rows = np.fromfile(Path(tracker.log_dir) / entry.tensor_path, dtype="<f4").reshape(10, 3)
    np.testing.assert_array_equal(rows, feats.numpy())
    lines = (Path(tracker.log_dir) / entry.metadata_path).read_text().splitlines()
    assert [line.split("\t")[0] for line in lines[1:]] == [f"p{i}" for i in range(10)]


# ----------------------------------------------------------------------------- status
def test_status_failed_in_except_survives_end_training(tmp_path: Path) -> None:
    accelerator = Accelerator(log_with="tbx", project_dir=tmp_path)
    accelerator.init_trackers("fail", config={"lr": 1.0})
    with pytest.raises(ZeroDivisionError):
        try:
            accelerator.log({"loss": 1.0}, step=0)
            _ = 1 / 0
        except BaseException:
            accelerator.get_tracker("tbx").finish(status="failed")
            raise
        finally:
            accelerator.end_training()
    _, status = session(read(tmp_path / "fail" / "version_0"))
    assert status == "STATUS_FAILURE"


def test_any_status_is_recorded(tmp_path: Path) -> None:
    # Any status string is accepted, as Lightning's loggers accept any: an unknown one is
    # STATUS_UNKNOWN in the HParams table, the string itself kept as text (was: ValueError).
    tracker = TBXTracker("s", tmp_path)
    tracker.start()
    tracker.log({"a": 1.0}, step=0)
    tracker.finish("great")
    acc = read(tracker.log_dir)
    assert session(acc)[1] == "STATUS_UNKNOWN"
    texts = acc.Tensors("run/status/text_summary")
    assert [(e.step, e.tensor_proto.string_val) for e in texts] == [(0, [b"great"])]
    aborted = TBXTracker("s", tmp_path)
    aborted.start()
    aborted.finish("aborted")
    assert session(read(aborted.log_dir))[1] == "STATUS_FAILURE"


def test_memory_filesystem(tmp_path: Path) -> None:
    import fsspec

    tracker = TBXTracker("mem", "memory://tbx-accelerate-test")
    tracker.start()
    tracker.store_init_configuration({"lr": 0.1})
    tracker.log({"a": 1.0}, step=0)
    tracker.finish()
    fs = fsspec.filesystem("memory")
    names = sorted(
        p.rsplit("/", 1)[-1] for p in fs.ls("/tbx-accelerate-test/mem/version_0", detail=False)
    )
    assert "config.yaml" in names
    # What the run wrote reads back: the scalar, the config, the status.
    local = tmp_path / "copy"
    fs.get("/tbx-accelerate-test/mem/version_0", str(local), recursive=True)
    fs.rm("/tbx-accelerate-test", recursive=True)
    acc = read(local)
    assert scalars(acc, "a") == [(0, 1.0)]
    row, status = session(acc)
    assert row == {"lr": 0.1} and status == "STATUS_SUCCESS"
    assert yaml.safe_load((local / "config.yaml").read_text()) == {"lr": 0.1}


def test_minimal_example_runs(tmp_path: Path) -> None:
    example = REPO / "examples" / "accelerate_minimal.py"
    result = subprocess.run(
        [sys.executable, str(example), "train.steps=3", "train.log_every=1", "project_dir=out"],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    acc = read(tmp_path / "out" / "accelerate-minimal" / "version_0")
    assert [s for s, _ in scalars(acc, "train/loss")] == [0, 1, 2]
    assert [e.step for e in acc.Histograms("weights/layer0")] == [0]
    row, status = session(acc)
    assert (row["optim.lr"], row["optim.betas"], row["train.steps"]) == (0.01, "[0.9, 0.999]", 3)
    assert status == "STATUS_SUCCESS"


# ----------------------------------------------------------------------------- TensorBoard
@pytest.mark.slow
def test_hparams_plugin_shows_config_metrics_and_statuses(tmp_path: Path, tensorboard: Any) -> None:
    for lr, status in ((0.1, "success"), (0.01, "failed")):
        accelerator = Accelerator(log_with="tbx", project_dir=tmp_path / "runs")
        accelerator.init_trackers(
            "sweep",
            config=OmegaConf.create({"opt": {"lr": lr, "betas": [0.9, 0.99]}, "seed": None}),
        )
        for step in range(3):
            accelerator.log({"train": {"loss": lr * (3 - step)}}, step=step)
        if status == "failed":
            accelerator.get_tracker("tbx").finish(status="failed")
        accelerator.end_training()
        AcceleratorState._reset_state(True)
    server = tensorboard(tmp_path / "runs")
    assert sorted(server.wait_for_runs(2)) == ["sweep/version_0", "sweep/version_1"]
    experiment = server.hparams_experiment()
    assert sorted(h["name"] for h in experiment["hparamInfos"]) == [
        "opt.betas",
        "opt.lr",
        "run.duration_s",
        "run.status",
    ]
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == ["train/loss"]
    groups = server.session_groups(slice_size=10)
    by_run = {g["name"]: g for g in groups}
    first, second = by_run["sweep/version_0"], by_run["sweep/version_1"]
    assert split_run_columns(first["hparams"], "STATUS_SUCCESS") == {
        "opt.lr": 0.1,
        "opt.betas": "[0.9, 0.99]",
    }
    assert second["hparams"]["run.status"] == "failed"
    assert second["hparams"]["opt.lr"] == 0.01
    assert first["sessions"][0]["status"] == "STATUS_SUCCESS"
    assert second["sessions"][0]["status"] == "STATUS_FAILURE"
    loss = first["metricValues"][0]
    assert (loss["name"]["tag"], loss["trainingStep"]) == ("train/loss", 2)
    assert loss["value"] == pytest.approx(0.1)


# ----------------------------------------------------------------------------- processes
def _launch(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),  # no user accelerate config
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    if mode == "launch":
        env["ACCELERATE_USE_CPU"] = "true"
        cmd = accelerate_launch(DDP_SCRIPT, str(tmp_path))
    else:
        cmd = [sys.executable, str(DDP_SCRIPT), str(tmp_path), "--debug-launcher"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_two_processes_write_one_run_from_main(tmp_path: Path) -> None:
    # The script also runs under Accelerate's debug launcher (`--debug-launcher`), with the
    # same result; the suite runs the `accelerate launch` way only, to stay fast.
    result = _launch(tmp_path, "launch")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "done_0.txt").read_text() == "2"
    assert (tmp_path / "done_1.txt").read_text() == "2"
    root = tmp_path / "runs" / "ddp"
    assert versions(tmp_path / "runs") == ["ddp"]
    assert versions(root) == ["version_0"]
    run = root / "version_0"
    events = [p for p in run.iterdir() if p.name.startswith("events.")]
    assert len(events) == 1
    acc = read(run)
    assert [s for s, _ in scalars(acc, "loss")] == [0, 1, 2, 3, 4]
    assert scalars(acc, "rank") == [(s, 0.0) for s in range(5)]
    row, status = session(acc)
    assert row == {"model.lr": 0.01, "model.layers": "[4, 2]"}
    assert status == "STATUS_SUCCESS"


def test_model_monitor_from_accelerator_writes_into_the_run(tmp_path: Path) -> None:
    from tbx_lightning.monitor import ModelMonitor

    accelerator = Accelerator(log_with="tbx", project_dir=str(tmp_path))
    accelerator.init_trackers("mon", config={"lr": 0.1})
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    monitor = ModelMonitor.from_accelerator(
        accelerator, model, group_depth=1, hist_every_n_steps=1, norm_every_n_steps=1
    )
    loss = model(torch.randn(5, 4)).pow(2).mean()
    accelerator.backward(loss)
    monitor.after_backward(0)
    optimizer.step()
    accelerator.end_training()
    acc = read(tmp_path / "mon" / "version_0")
    assert {"vitals_layers/grads/0", "vitals_layers/grads/1"} <= set(acc.Tags()["histograms"])
    assert acc.Histograms("vitals_layers/grads/0")[0].histogram_value.num == 4 * 8 + 8


# ----------------------------------------------------------------------------- resume
def test_resume_reopens_a_version_with_a_purge_step(tmp_path: Path) -> None:
    accelerator = Accelerator(log_with="tbx", project_dir=tmp_path)
    accelerator.init_trackers("res", config={"lr": 0.1, "model": {"width": 8}})
    for step in range(10):
        accelerator.log({"loss": float(step), "first": 1.0}, step=step)
    accelerator.get_tracker("tbx").finish("failed")  # the first process died after step 9
    AcceleratorState._reset_state(True)

    accelerator = Accelerator(log_with="tbx", project_dir=tmp_path)
    accelerator.init_trackers(
        "res", config={"seed": 3}, init_kwargs={"tbx": {"version": 0, "purge_step": 5}}
    )
    tracker = accelerator.get_tracker("tbx")
    assert tracker.log_dir == str(tmp_path / "res" / "version_0")
    for step in range(5, 15):
        accelerator.log({"loss": 100.0 + step}, step=step)
    accelerator.end_training()

    assert versions(tmp_path / "res") == ["version_0"]
    run = tmp_path / "res" / "version_0"
    assert len([p for p in run.iterdir() if p.name.startswith("events.")]) == 2
    acc = read(run)
    # One continuous curve: the first process's steps 5-9 are purged, not drawn twice.
    assert scalars(acc, "loss") == [(s, float(s)) for s in range(5)] + [
        (s, 100.0 + s) for s in range(5, 15)
    ]
    assert [s for s, _ in scalars(acc, "first")] == [0, 1, 2, 3, 4]
    row, status = session(acc)
    assert row == {"lr": 0.1, "model.width": 8.0, "seed": 3.0}  # one row, updated in place
    assert status == "STATUS_SUCCESS"
    assert yaml.safe_load((run / "config.yaml").read_text()) == {
        "lr": 0.1,
        "model": {"width": 8},
        "seed": 3,
    }


def test_resume_example_in_the_docs_runs(tmp_path: Path) -> None:
    text = (REPO / "docs" / "accelerate.md").read_text()
    section = text.split("## Resume", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr
