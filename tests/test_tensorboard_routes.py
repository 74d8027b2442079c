"""Every kind of data the package writes, read back through a real TensorBoard's plugin routes.

One logdir with one run per kind of data is written once per module, and one
``tensorboard --logdir`` server reads it; each test asks the plugin that users'
dashboards ask, so a run is proven to display, not only to parse.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tbx_lightning._writer import RunWriter
from tbx_lightning.hparams import RunHParams
from tests.rows import RUN_COLUMNS
from tests.tbserver import ALL_STATUSES, TensorBoardServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

LOSSES = [1.0, 0.5, 0.25, 0.125, math.nan, math.inf, -math.inf, 1e-30, 3.0e38, -7.5]
# run name -> (config, status, final metric)
HP_RUNS: dict[str, tuple[dict[str, Any], str, float]] = {
    "hp_success": (
        {"model": {"lr": 0.1, "layers": 2, "act": "relu"}, "seed": 1, "amp": False},
        "success",
        0.9,
    ),
    "hp_failed": (
        {"model": {"lr": 0.01, "layers": 4, "act": "gelu"}, "seed": 2, "amp": True},
        "failed",
        0.4,
    ),
    "hp_running": (
        {"model": {"lr": 0.001, "layers": 8, "act": "relu"}, "seed": 3, "amp": False},
        "running",
        0.1,
    ),
    "hp_aborted": (
        {"model": {"lr": 0.5, "layers": 1, "act": "tanh"}, "seed": 4, "amp": False},
        "aborted",
        0.2,
    ),
}
TEXT = "**bold** text with `code` and ünïcode"
IMAGE = (np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3) * 3) % 255
HIST_VALUES = np.linspace(-1.0, 1.0, 1001)
EMBEDDING = torch.arange(15, dtype=torch.float32).reshape(5, 3) / 7
LABELS = ["cat", "dog", "tab\there", "new\nline", "ünï"]


def _write_runs(root: Path) -> None:
    with RunWriter(root / "scalars", flush_secs=0.2) as run:
        for step, value in enumerate(LOSSES):
            run.log_scalars({"train/loss": value, "lr": 0.1 * step}, step=step)
        run.log_scalars({"tensor_metric": torch.tensor(2.5)}, step=3)

    for name, (config, status, metric) in HP_RUNS.items():
        with RunWriter(root / name, flush_secs=0.2) as run:
            hp = RunHParams(run)
            hp.log(config)
            run.log_scalars({"val/acc": metric, "train/loss": 1 - metric}, step=5)
            if status != "running":
                hp.finish(status)

    with RunWriter(root / "media", flush_secs=0.2) as run:
        run.experiment.add_text("notes", TEXT, 1)
        run.experiment.add_image("samples/rgb", IMAGE, 2, dataformats="HWC")
        run.experiment.add_histogram("weights", HIST_VALUES, 3)
        run.log_scalars({"after_media": 1.0}, step=4)

    from tbx_lightning.graph import write_graph
    from tbx_lightning.projector import log_embedding

    with RunWriter(root / "projector", flush_secs=0.2) as run:
        log_embedding(
            run,
            "words",
            EMBEDDING,
            metadata=LABELS,
            label_img=torch.rand(len(LABELS), 3, 4, 6),
            step=2,
        )
        run.log_scalars({"loss": 1.0}, step=0)

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with RunWriter(root / "graph", flush_secs=0.2) as run:
        write_graph(run.experiment, model, torch.zeros(3, 4))
        run.log_scalars({"loss": 1.0}, step=0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TensorBoardServer]:
    root = tmp_path_factory.mktemp("routes") / "logs"
    root.mkdir()
    _write_runs(root)
    tb = TensorBoardServer(root)
    try:
        tb.wait_for_runs(4 + len(HP_RUNS))
        yield tb
    finally:
        tb.stop()


def test_runs_are_listed(server: TensorBoardServer) -> None:
    runs = set(server.get_json("/data/runs"))
    assert runs == {"scalars", "media", "graph", "projector", *HP_RUNS}


def test_scalars_route_returns_every_step_and_value(server: TensorBoardServer) -> None:
    tags = server.get_json("/data/plugin/scalars/tags")
    assert set(tags["scalars"]) == {"train/loss", "lr", "tensor_metric"}
    points = server.get_json(
        "/data/plugin/scalars/scalars", {"run": "scalars", "tag": "train/loss"}
    )
    assert [p[1] for p in points] == list(range(len(LOSSES)))
    for (_, _, got), expected in zip(points, LOSSES, strict=True):
        want = float(np.float32(expected))
        if math.isnan(want):
            assert got == "NaN" or (isinstance(got, float) and math.isnan(got))
        elif math.isinf(want):
            assert got in (want, "Infinity" if want > 0 else "-Infinity")
        else:
            assert got == pytest.approx(want, rel=1e-7)
    tensor = server.get_json(
        "/data/plugin/scalars/scalars", {"run": "scalars", "tag": "tensor_metric"}
    )
    assert [(p[1], p[2]) for p in tensor] == [(3, 2.5)]


def _experiment(server: TensorBoardServer) -> dict[str, Any]:
    return dict(server.post_json("/data/plugin/hparams/experiment", {"experimentName": ""}))


def test_hparams_experiment_has_config_keys_and_metric_columns(
    server: TensorBoardServer,
) -> None:
    experiment = _experiment(server)
    hparams = {h["name"]: h for h in experiment["hparamInfos"]}
    assert set(hparams) == {"model.lr", "model.layers", "model.act", "seed", "amp", *RUN_COLUMNS}
    assert hparams["model.lr"]["type"] == "DATA_TYPE_FLOAT64"
    assert hparams["model.act"]["type"] == "DATA_TYPE_STRING"
    assert hparams["amp"]["type"] == "DATA_TYPE_BOOL"
    assert set(hparams["model.act"]["domainDiscrete"]) == {"relu", "gelu", "tanh"}
    metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
    assert {"val/acc", "train/loss"} <= metrics


def test_hparams_session_groups_have_values_metrics_and_statuses(
    server: TensorBoardServer,
) -> None:
    request = {
        "experimentName": "",
        "allowedStatuses": list(ALL_STATUSES),
        "colParams": [
            {"hparam": "model.lr"},
            {"hparam": "model.act"},
            {"hparam": "amp"},
            {"metric": {"group": "", "tag": "val/acc"}},
        ],
        "startIndex": 0,
        "sliceSize": 100,
        "includeMetrics": True,
    }
    body = server.post_json("/data/plugin/hparams/session_groups", request)
    groups = {g["name"]: g for g in body["sessionGroups"]}
    assert body["totalSize"] == len(HP_RUNS)
    expected_status = {
        "hp_success": "STATUS_SUCCESS",
        "hp_failed": "STATUS_FAILURE",
        "hp_aborted": "STATUS_FAILURE",
        "hp_running": "STATUS_RUNNING",
    }
    for name, (config, _, metric) in HP_RUNS.items():
        group = next(g for key, g in groups.items() if key.endswith(name))
        assert group["hparams"]["model.lr"] == pytest.approx(config["model"]["lr"])
        assert group["hparams"]["model.act"] == config["model"]["act"]
        assert group["hparams"]["amp"] is config["amp"]
        (session,) = group["sessions"]
        assert session["status"] == expected_status[name]
        values = {m["name"]["tag"]: m["value"] for m in session["metricValues"]}
        assert values["val/acc"] == pytest.approx(metric, rel=1e-6)

    only_failed = dict(request, allowedStatuses=["STATUS_FAILURE"])
    failed = server.post_json("/data/plugin/hparams/session_groups", only_failed)
    assert sorted(g["name"].rsplit("/", 1)[-1] for g in failed["sessionGroups"]) == [
        "hp_aborted",
        "hp_failed",
    ]


def test_text_route(server: TensorBoardServer) -> None:
    tags = server.get_json("/data/plugin/text/tags")
    # tensorboardX files text under ``<tag>/text_summary``.
    assert tags["media"] == ["notes/text_summary"]
    (entry,) = server.get_json(
        "/data/plugin/text/text", {"run": "media", "tag": "notes/text_summary"}
    )
    assert entry["step"] == 1
    assert "<strong>bold</strong>" in entry["text"]
    assert "ünïcode" in entry["text"]


def test_images_route_serves_the_exact_pixels(server: TensorBoardServer) -> None:
    from PIL import Image

    (meta,) = server.get_json(
        "/data/plugin/images/images", {"run": "media", "tag": "samples/rgb", "sample": 0}
    )
    assert meta["step"] == 2
    query = meta["query"]
    blob = server.get_bytes("/data/plugin/images/individualImage?" + query)
    pixels = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
    np.testing.assert_array_equal(pixels, IMAGE)


def test_histograms_route(server: TensorBoardServer) -> None:
    data = server.get_json("/data/plugin/histograms/histograms", {"run": "media", "tag": "weights"})
    (entry,) = data
    wall_time, step, buckets = entry
    assert step == 3 and wall_time > 0
    assert sum(b[2] for b in buckets) == pytest.approx(len(HIST_VALUES))
    assert min(b[0] for b in buckets) == pytest.approx(-1.0, abs=0.05)
    assert max(b[1] for b in buckets) == pytest.approx(1.0, abs=0.05)
    # Scalars logged after the histogram in the same stream are there too.
    after = server.get_json("/data/plugin/scalars/scalars", {"run": "media", "tag": "after_media"})
    assert [(p[1], p[2]) for p in after] == [(4, 1.0)]


def test_graph_route(server: TensorBoardServer) -> None:
    info = server.get_json("/data/plugin/graphs/info")
    assert info["graph"]["run_graph"] is True
    pbtxt = server.get_bytes("/data/plugin/graphs/graph", {"run": "graph", "conceptual": "false"})
    text = pbtxt.decode()
    assert text.count("node {") >= 3
    assert "linear" in text
    (entry,) = server.get_json("/data/plugin/text/text", {"run": "graph", "tag": "graph/export"})
    assert "Graph exported with" in entry["text"]


def test_plugins_listing_is_json(server: TensorBoardServer) -> None:
    listing = server.get_json("/data/plugins_listing")
    for plugin in ("scalars", "hparams", "text", "images", "histograms", "graphs"):
        assert listing[plugin]["enabled"] is True, json.dumps(listing[plugin])


def test_projector_routes_serve_tensor_bytes_metadata_and_sprite(server: TensorBoardServer) -> None:
    from PIL import Image

    # The projector plugin reads run configs on a thread of its own: poll for the run.
    deadline = time.monotonic() + 60
    while "projector" not in server.get_json("/data/plugin/projector/runs"):
        assert time.monotonic() < deadline, "the projector plugin never listed the run"
        time.sleep(0.5)
    info = server.get_json("/data/plugin/projector/info", {"run": "projector"})
    (entry,) = info["embeddings"]
    name = entry["tensorName"]
    assert name == "words:00000002"
    assert [int(n) for n in entry["tensorShape"]] == [5, 3]
    tensor = server.get_bytes("/data/plugin/projector/tensor", {"run": "projector", "name": name})
    np.testing.assert_array_equal(
        np.frombuffer(tensor, dtype="<f4").reshape(5, 3), EMBEDDING.numpy()
    )
    metadata = server.get_bytes(
        "/data/plugin/projector/metadata", {"run": "projector", "name": name}
    ).decode()
    assert metadata.splitlines() == [
        "label\tindex",
        "cat\t0",
        "dog\t1",
        "tab\\there\t2",
        "new\\nline\t3",
        "ünï\t4",
    ]
    sprite = server.get_bytes(
        "/data/plugin/projector/sprite_image", {"run": "projector", "name": name}
    )
    side = int(entry["sprite"]["singleImageDim"][0])
    assert Image.open(io.BytesIO(sprite)).size == (3 * side, 2 * side)  # 3 columns, 2 rows
