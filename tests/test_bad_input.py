"""Bad input: each case gets a clear error (or a documented, visible handling) and loses nothing.

Every test logs something good first, feeds the bad input, and then reads the run
back with TensorBoard's reader to prove what was logged before is still there.
See docs/robustness.md for the table these tests pin.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2

from tbx_lightning._writer import RunWriter, RunWriterError
from tbx_lightning.hparams import SESSION_START_TAG, HParamsError, RunHParams, flatten
from tests.rows import split_run_columns

pytestmark = pytest.mark.timeout(60)


def _scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def _hparams(run_dir: Path) -> dict[str, Any]:
    """The hyperparameters of the run's first session start record."""
    for path in sorted(run_dir.glob("*tfevents*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == SESSION_START_TAG:
                    data = plugin_data_pb2.HParamsPluginData.FromString(
                        value.metadata.plugin_data.content
                    )
                    out = {}
                    for key, item in data.session_start_info.hparams.items():
                        kind = item.WhichOneof("kind")
                        out[key] = getattr(item, kind)
                    return split_run_columns(out)
    raise AssertionError("no session start record")


@pytest.fixture
def run(tmp_path: Path) -> Any:
    writer = RunWriter(tmp_path / "run", flush_secs=60)
    writer.log_scalars({"before": 1.0}, 0)
    yield writer
    writer.close()


# ----------------------------------------------------------------------- metric values
@pytest.mark.parametrize(
    "value",
    [
        pytest.param(None, id="none"),
        pytest.param("0.5", id="str"),
        pytest.param([0.5], id="list"),
        pytest.param({"a": 1}, id="dict"),
        pytest.param(1 + 2j, id="complex"),
        pytest.param(object(), id="object"),
    ],
)
def test_non_numeric_metric_value_raises_and_keeps_the_run(
    run: RunWriter, tmp_path: Path, value: Any
) -> None:
    with pytest.raises(
        TypeError, match=r"Value 'bad' has type \w+, which cannot be logged as a value"
    ):
        run.log_scalars({"ok": 2.0, "bad": value}, 1)
    run.log_scalars({"after": 3.0}, 2)
    run.close()
    # The call with the bad value is rejected as a whole; nothing else is affected.
    assert _scalars(tmp_path / "run") == {"before": [(0, 1.0)], "after": [(2, 3.0)]}


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(torch.ones(3), id="vector-tensor"),
        pytest.param(torch.tensor(1 + 1j), id="complex-tensor"),
    ],
)
def test_tensor_metric_that_is_not_a_scalar_raises(run: RunWriter, value: Any) -> None:
    with pytest.raises(TypeError, match=r"Value 'bad' is a"):
        run.log_scalars({"bad": value}, 1)


def test_nan_and_inf_are_written_as_they_are(run: RunWriter, tmp_path: Path) -> None:
    run.log_scalars({"x": math.nan}, 1)
    run.log_scalars({"x": math.inf}, 2)
    run.log_scalars({"x": -math.inf}, 3)
    run.log_scalars({"x": torch.tensor(float("nan"))}, 4)
    run.log_scalars({"x": 1e300}, 5)  # beyond float32: stored as +inf, as a cast would
    run.log_scalars({"x": -1e300}, 6)
    run.close()
    values = [v for _, v in _scalars(tmp_path / "run")["x"]]
    assert math.isnan(values[0]) and math.isnan(values[3])
    assert values[1] == math.inf and values[2] == -math.inf and values[4] == math.inf
    assert values[5] == -math.inf


# ----------------------------------------------------------------------- tags
def test_empty_and_non_string_tags_raise(run: RunWriter) -> None:
    with pytest.raises(ValueError, match="Logged names must not be empty"):
        run.log_scalars({"": 1.0}, 1)
    with pytest.raises(TypeError, match="Logged names must be str, got int 3"):
        run.log_scalars({3: 1.0}, 1)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="cannot be written as UTF-8"):
        run.log_scalars({"bad\ud800": 1.0}, 1)


@pytest.mark.parametrize(
    "tag",
    [
        pytest.param("with spaces and\ttab", id="spaces"),
        pytest.param("a/b/c//d/", id="slashes"),
        pytest.param("ünïcödé/损失/😀", id="unicode"),
        pytest.param("x" * 10_000, id="very-long"),
        pytest.param("nul\x00byte", id="nul"),
    ],
)
def test_unusual_tags_round_trip_exactly(run: RunWriter, tmp_path: Path, tag: str) -> None:
    run.log_scalars({tag: 0.25}, 7)
    run.experiment.add_text(tag, "note", 7)
    run.close()
    assert _scalars(tmp_path / "run")[tag] == [(7, 0.25)]


def test_steps_that_go_backwards_are_kept_in_logged_order(run: RunWriter, tmp_path: Path) -> None:
    # Visible handling: TensorBoard draws what was logged; nothing is reordered or purged.
    for step in (5, 6, 7, 3, 4):
        run.log_scalars({"loss": float(step)}, step)
    run.close()
    assert _scalars(tmp_path / "run")["loss"] == [(s, float(s)) for s in (5, 6, 7, 3, 4)]


@pytest.mark.parametrize(
    ("step", "error", "match"),
    [
        pytest.param(1.5, TypeError, r"`step` must be an int, got float 1.5", id="float"),
        pytest.param("3", TypeError, r"`step` must be an int, got str", id="str"),
        pytest.param(None, TypeError, r"`step` must be an int, got NoneType", id="none"),
        pytest.param(2**64, ValueError, r"must fit in a signed 64-bit integer", id="too-big"),
    ],
)
def test_bad_steps_raise(run: RunWriter, step: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        run.log_scalars({"x": 1.0}, step)


# ----------------------------------------------------------------------- after close
def test_calls_after_close_raise_and_close_twice_is_fine(tmp_path: Path) -> None:
    run = RunWriter(tmp_path / "run", flush_secs=60)
    run.log_scalars({"x": 1.0}, 0)
    run.close()
    with pytest.raises(RunWriterError, match="is closed: nothing more can be logged"):
        run.log_scalars({"x": 2.0}, 1)
    with pytest.raises(RunWriterError, match="is closed"):
        _ = run.experiment
    run.flush()
    run.close()
    assert _scalars(tmp_path / "run") == {"x": [(0, 1.0)]}


def test_logger_log_after_close_opens_a_new_file_in_the_same_run(tmp_path: Path) -> None:
    from tbx_lightning.lightning import TBXLogger

    logger = TBXLogger(tmp_path, name="exp", flush_secs=60)
    logger.log_metrics({"x": 1.0}, 0)
    logger.close()
    logger.log_metrics({"x": 2.0}, 1)
    logger.close()
    run_dir = Path(logger.log_dir)
    assert len(list(run_dir.glob("*tfevents*"))) == 2
    assert _scalars(run_dir) == {"x": [(0, 1.0), (1, 2.0)]}


# ----------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    ("yaml", "match"),
    [
        pytest.param(
            "model:\n  lr: ???", r"Config key 'model.lr' is missing a mandatory value", id="missing"
        ),
        pytest.param(
            "a: ${nope}",
            r"Config key 'a' cannot be resolved: Interpolation key 'nope'",
            id="broken",
        ),
        pytest.param(
            "a: ${b}\nb: ${a}", r"Config key '[ab]' cannot be resolved: Recursive", id="cycle"
        ),
        pytest.param(
            "a: ${oc.env:TBX_SURELY_UNSET_VAR}", r"Config key 'a' cannot be resolved", id="env"
        ),
        pytest.param("a: ${bogus:1}", r"Unsupported interpolation type bogus", id="resolver"),
    ],
)
def test_unresolvable_configs_raise_naming_the_key(
    run: RunWriter, tmp_path: Path, yaml: str, match: str
) -> None:
    hp = RunHParams(run)
    hp.log({"seed": 1})
    with pytest.raises(HParamsError, match=match):
        hp.log(OmegaConf.create(yaml))
    hp.finish("success")
    run.close()
    # The earlier hyperparameters and scalars are intact.
    assert _hparams(tmp_path / "run") == {"seed": 1.0}
    assert _scalars(tmp_path / "run") == {"before": [(0, 1.0)]}


def test_a_config_with_ten_thousand_keys(run: RunWriter, tmp_path: Path) -> None:
    config: dict[str, dict[str, float]] = {}
    for i in range(10_000):
        config.setdefault(f"group{i // 100}", {})[f"key{i % 100}"] = i * 0.5
    hp = RunHParams(run)
    flat = hp.log(config)
    assert len(flat) == 10_000
    hp.finish("success")
    run.close()
    stored = _hparams(tmp_path / "run")
    assert len(stored) == 10_000
    assert stored["group99.key99"] == 9999 * 0.5
    assert "key99: 4999.5" in (tmp_path / "run" / "config.yaml").read_text()


def test_clashing_flat_keys_raise() -> None:
    with pytest.raises(HParamsError, match=r"Config key 'a.b' appears twice after flattening"):
        flatten({"a.b": 1, "a": {"b": 2}})


def test_non_mapping_hparams_raise() -> None:
    with pytest.raises(HParamsError, match="Hyperparameters must be a mapping"):
        flatten([1, 2, 3])


# ----------------------------------------------------------------------- embeddings
def test_embedding_with_mismatched_metadata_raises_and_writes_nothing(
    run: RunWriter, tmp_path: Path
) -> None:
    from tbx_lightning.projector import log_embedding

    with pytest.raises(ValueError, match=r"`metadata` has 2 rows but `mat` has 3 points"):
        log_embedding(run, "emb", torch.randn(3, 4), metadata=["a", "b"])
    with pytest.raises(ValueError, match=r"`label_img` has 2 images but `mat` has 3 points"):
        log_embedding(run, "emb", torch.randn(3, 4), label_img=torch.rand(2, 3, 8, 8))
    assert not (tmp_path / "run" / "projector_config.pbtxt").exists()


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (4,), (2, 3, 4)])
def test_embedding_of_empty_or_wrong_rank_matrix_raises(
    run: RunWriter, shape: tuple[int, ...]
) -> None:
    from tbx_lightning.projector import log_embedding

    with pytest.raises(ValueError, match=r"`mat` must"):
        log_embedding(run, "emb", torch.zeros(shape))


def test_embedding_labels_with_tabs_newlines_and_one_row(run: RunWriter) -> None:
    from tbx_lightning.projector import log_embedding

    record = log_embedding(run, "one", torch.tensor([[1.0, 2.0]]), metadata=["tab\there\nnew"])
    assert record.num_points == 1
    tsv = Path(record.metadata_path or "").read_text()
    # One line per point: the control characters are escaped, never split a row.
    assert tsv.splitlines() == ["label\tindex", "tab\\there\\nnew\t0"]
    raw = np.fromfile(record.tensor_path, dtype="<f4")
    assert raw.tolist() == [1.0, 2.0]


def test_embedding_with_non_square_odd_sized_images(run: RunWriter) -> None:
    from PIL import Image

    from tbx_lightning.projector import log_embedding

    images = torch.rand(7, 3, 5, 11)  # 7 points, 5 x 11 pixels
    record = log_embedding(run, "odd", torch.randn(7, 3), label_img=images)
    assert record.thumbnail_px == 11
    sprite = Image.open(record.sprite_path or "")
    # A square grid of square thumbnails: ceil(sqrt(7)) = 3 columns.
    assert sprite.size == (33, 33)


# ----------------------------------------------------------------------- graphs
class _Untraceable(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> Any:
        return x.numpy() * 2  # leaves torch: no capture method can follow it


def test_graph_of_an_untraceable_model_raises_listing_each_method(
    run: RunWriter, tmp_path: Path
) -> None:
    from tbx_lightning.graph import GraphExportError, write_graph

    with pytest.raises(
        GraphExportError, match=r"(?s)torch.export: .*torch.fx: .*torch.jit.trace: "
    ):
        write_graph(run.experiment, _Untraceable(), torch.ones(2))
    run.log_scalars({"after": 1.0}, 1)
    run.close()
    assert _scalars(tmp_path / "run") == {"before": [(0, 1.0)], "after": [(1, 1.0)]}


def test_logger_graph_failure_warns_and_training_goes_on(tmp_path: Path) -> None:
    from tbx_lightning.lightning import TBXLogger

    logger = TBXLogger(tmp_path, name="exp", flush_secs=60)
    with pytest.warns(UserWarning, match="Model graph not logged: Could not export a graph"):
        logger.log_graph(_Untraceable(), torch.ones(2))
    logger.log_metrics({"x": 1.0}, 0)
    strict = TBXLogger(tmp_path, name="exp", strict_graph=True, flush_secs=60)
    with pytest.raises(RuntimeError, match="Could not export a graph"):
        strict.log_graph(_Untraceable(), torch.ones(2))
    logger.close()
    strict.close()
    assert _scalars(logger.log_dir) == {"x": [(0, 1.0)]}
