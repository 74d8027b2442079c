"""Projector dumps, read back by a real TensorBoard server through the projector plugin's routes."""

from __future__ import annotations

import io
import math
import shutil
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from tbx_lightning import RunWriter
from tbx_lightning.projector import MAX_SPRITE_PX, log_embedding
from tbx_lightning.projector import _embedding as pj
from tbx_lightning.projector._sprite import sprite_png
from tests.tbserver import TensorBoardServer

PLUGIN = "/data/plugin/projector"


@dataclass
class Expected:
    """What one (run, tensor name) must serve."""

    run: str
    name: str
    tensor: np.ndarray
    metadata: list[str] | None = None  # lines, header first when there is one
    sprite_size: tuple[int, int] | None = None  # (width, height)
    thumb: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def lines(data: bytes) -> list[str]:
    text = data.decode("utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n")


def one_column(labels: list[str], rows: Any = None, name: str = "label") -> list[str]:
    """Lines of a one-column metadata file: a header, then each label with its row index."""
    rows = range(len(labels)) if rows is None else rows
    return [f"{name}\tindex", *(f"{label}\t{row}" for label, row in zip(labels, rows, strict=True))]


def ramp_images(n: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Float images in [0, 1] where image i has the constant colour i / n (easy to check)."""
    level = torch.arange(n, dtype=torch.float32).div(max(n - 1, 1))
    return level.view(n, 1, 1, 1).expand(n, channels, height, width).contiguous()


def write_core_layouts(logdir: Path) -> dict[str, Expected]:
    """Every layout of the core function, with what TensorBoard must serve for each."""
    expected: dict[str, Expected] = {}
    gen = torch.Generator().manual_seed(0)

    with RunWriter(logdir / "main") as run:
        # Two steps of one tag whose name has a slash, a space and non-ASCII characters.
        tag = "enc/tokens é 词"
        for step in (3, 7):
            mat = torch.randn(37, 5, generator=gen)
            labels = [f"tok{i}_s{step}" for i in range(37)]
            rec = log_embedding(run, tag, mat, metadata=labels, step=step)
            expected[f"steps{step}"] = Expected(
                "main", rec.tensor_name, mat.numpy(), one_column(labels)
            )

        # Low-precision and double inputs, each converted once to float32.
        for dtype in (torch.bfloat16, torch.float16, torch.float64):
            mat = torch.randn(11, 6, generator=gen).to(dtype)
            rec = log_embedding(run, f"dtype/{dtype}", mat, step=0)
            expected[str(dtype)] = Expected("main", rec.tensor_name, mat.float().numpy())
        arr = np.random.default_rng(1).standard_normal((9, 4))  # numpy float64
        rec = log_embedding(run, "numpy", arr, step=0)
        expected["numpy"] = Expected("main", rec.tensor_name, arr.astype(np.float32))

        # The same (tag, step) twice: one entry, the second data.
        first = torch.randn(8, 3, generator=gen)
        log_embedding(
            run, "dup", first, metadata=list("abcdefgh"), label_img=torch.rand(8, 3, 4, 4), step=1
        )
        second = torch.randn(6, 3, generator=gen)
        rec = log_embedding(run, "dup", second, metadata=list("uvwxyz"), step=1)
        assert rec.replaced
        expected["dup"] = Expected(
            "main", rec.tensor_name, second.numpy(), one_column(list("uvwxyz"))
        )
        expected["dup"].extra["folder"] = rec.folder

        # Several columns; tabs, newlines, carriage returns and blank labels.
        names = ["a\tb", "line\nbreak", "", " ", "cr\rhere", "plain"]
        mat = torch.randn(6, 4, generator=gen)
        rows = [[name, i % 2, "x" if i else ""] for i, name in enumerate(names)]
        rows[2] = ["", "", ""]  # a row that would be all blank
        rec = log_embedding(
            run, "columns", mat, metadata=rows, metadata_header=["name", "parity", "flag"]
        )
        expected["columns"] = Expected(
            "main",
            rec.tensor_name,
            mat.numpy(),
            [
                "name\tparity\tflag",
                "a\\tb\t0\t",
                "line\\nbreak\t1\tx",
                '""\t""\t""',
                " \t1\tx",
                "cr\\rhere\t0\tx",
                "plain\t1\tx",
            ],
        )
        # One column with blank and whitespace labels: the index column keeps every
        # line non-blank, so the labels are written as they are.
        mat = torch.randn(4, 2, generator=gen)
        rec = log_embedding(run, "blank", mat, metadata=["", " ", "\u3000", "ok"])
        expected["blank"] = Expected(
            "main", rec.tensor_name, mat.numpy(), one_column(["", " ", "\u3000", "ok"])
        )

        # Matrices whose float32 bytes are valid UTF-8: written as exact TSV text.
        for key, mat in {
            "zeros": torch.zeros(5, 3),
            "twos": torch.tensor([[0.0, 2.0], [2.0, 0.0], [2.0, 2.0]]),
        }.items():
            rec = log_embedding(run, key, mat)
            assert rec.tensor_format == "tsv"
            expected[key] = Expected("main", rec.tensor_name, mat.numpy())

        # Non-square colour float images: padded to square, transparent padding.
        mat = torch.randn(10, 3, generator=gen)
        imgs = ramp_images(10, 3, 6, 10)
        rec = log_embedding(run, "img/color", mat, label_img=imgs, metadata=list(range(10)))
        expected["img_color"] = Expected(
            "main",
            rec.tensor_name,
            mat.numpy(),
            one_column([str(i) for i in range(10)]),
            (40, 30),
            10,
        )
        # Grey (N, H, W) uint8, taller than wide.
        grey = torch.arange(7, dtype=torch.uint8).mul(30).view(7, 1, 1).expand(7, 9, 5).contiguous()
        mat = torch.randn(7, 2, generator=gen)
        rec = log_embedding(run, "img/grey", mat, label_img=grey)
        expected["img_grey"] = Expected("main", rec.tensor_name, mat.numpy(), None, (27, 27), 9)
        # Too large for 8192 px at full size: thumbnails shrink to fit.
        n = 1025  # 33 columns x 32 rows
        big = torch.arange(n, dtype=torch.int64).remainder(256).to(torch.uint8)
        big = big.view(n, 1, 1, 1).expand(n, 1, 256, 256)
        mat = torch.randn(n, 2, generator=gen)
        rec = log_embedding(run, "img/big", mat, label_img=big)
        thumb = MAX_SPRITE_PX // 33
        assert rec.thumbnail_px == thumb
        expected["img_big"] = Expected(
            "main", rec.tensor_name, mat.numpy(), None, (33 * thumb, 32 * thumb), thumb
        )

        # max_points: a seeded sample; metadata and images follow the same rows.
        mat = torch.arange(50 * 3, dtype=torch.float32).view(50, 3).add(0.5)
        labels = [f"row{i}" for i in range(50)]
        imgs = ramp_images(50, 1, 4, 4)
        rec = log_embedding(
            run, "sampled", mat, metadata=labels, label_img=imgs, max_points=20, seed=5
        )
        again = pj._sample_index(50, 20, 5)
        assert again is not None
        expected["sampled"] = Expected(
            "main",
            rec.tensor_name,
            mat.numpy()[again],
            one_column([labels[i] for i in again], again.tolist()),
            (20, 16),
            4,
        )
        expected["sampled"].extra["index"] = again

        # Step None: the next free step of the tag.
        a = log_embedding(run, "auto", torch.randn(3, 2, generator=gen))
        b = log_embedding(run, "auto", torch.randn(3, 2, generator=gen))
        assert (a.step, b.step) == (0, 1)

    # A second process (a new writer) adds to the run: earlier entries stay.
    with RunWriter(logdir / "main") as run:
        mat = torch.randn(4, 4, generator=gen)
        rec = log_embedding(run, "after_restart", mat, step=2)
        expected["restart"] = Expected("main", rec.tensor_name, mat.numpy())

    # Threads logging into one run: no entry lost.
    with RunWriter(logdir / "threads") as run:
        mats = {f"t{i}": torch.randn(5, 3, generator=gen) for i in range(8)}
        threads = [
            threading.Thread(target=log_embedding, args=(run, tag, mat), kwargs={"step": 0})
            for tag, mat in mats.items()
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for tag, mat in mats.items():
            expected[f"thread_{tag}"] = Expected("threads", pj.tensor_name(tag, 0), mat.numpy())

    # A remote (fsspec) log dir, copied to disk for the server.
    url = "memory://projector-test/remote"
    with RunWriter(url) as run:
        mat = torch.randn(12, 3, generator=gen)
        rec = log_embedding(
            run,
            "remote/emb",
            mat,
            metadata=[f"r{i}" for i in range(12)],
            label_img=torch.rand(12, 3, 5, 5),
            step=4,
        )
        assert rec.folder.startswith("memory://")
    mem = fsspec.filesystem("memory")
    mem.get("/projector-test/remote", str(logdir / "remote"), recursive=True)
    expected["remote"] = Expected(
        "remote",
        rec.tensor_name,
        mat.numpy(),
        one_column([f"r{i}" for i in range(12)]),
        (20, 15),
        5,
    )

    mem.rm("/projector-test", recursive=True)
    return expected


def info(server: TensorBoardServer, run: str) -> dict[str, dict[str, Any]]:
    data = server.get_json(f"{PLUGIN}/info", {"run": run})
    return {e["tensorName"]: e for e in data["embeddings"]}


def check(server: TensorBoardServer, exp: Expected) -> dict[str, Any]:
    entry = info(server, exp.run)[exp.name]
    assert entry["tensorShape"] == list(exp.tensor.shape)
    served = server.get_bytes(f"{PLUGIN}/tensor", {"run": exp.run, "name": exp.name})
    assert served == np.ascontiguousarray(exp.tensor, dtype="<f4").tobytes()
    if exp.metadata is None:
        assert "metadataPath" not in entry
    else:
        got = server.get_bytes(f"{PLUGIN}/metadata", {"run": exp.run, "name": exp.name})
        assert lines(got) == exp.metadata
    if exp.sprite_size is None:
        assert "sprite" not in entry
    else:
        assert entry["sprite"]["singleImageDim"] == [exp.thumb, exp.thumb]
        png = server.get_bytes(f"{PLUGIN}/sprite_image", {"run": exp.run, "name": exp.name})
        assert png_size(png) == exp.sprite_size
        assert max(exp.sprite_size) <= MAX_SPRITE_PX
        entry["png"] = png
    return entry


@pytest.mark.slow
@pytest.mark.parametrize(
    "key",
    [
        pytest.param("steps3", id="step-3"),
        pytest.param("steps7", id="step-7"),
        pytest.param("torch.bfloat16", id="bf16"),
        pytest.param("torch.float16", id="fp16"),
        pytest.param("torch.float64", id="fp64"),
        pytest.param("numpy", id="numpy-f64"),
        pytest.param("dup", id="replaced"),
        pytest.param("columns", id="multi-column-escaped"),
        pytest.param("blank", id="blank-labels"),
        pytest.param("zeros", id="utf8-zeros-tsv"),
        pytest.param("twos", id="utf8-ints-tsv"),
        pytest.param("img_color", id="sprite-color-nonsquare"),
        pytest.param("img_grey", id="sprite-grey-nhw"),
        pytest.param("img_big", id="sprite-downscaled"),
        pytest.param("sampled", id="max-points"),
        pytest.param("restart", id="after-restart"),
        pytest.param("remote", id="fsspec-memory"),
    ],
)
def test_layout_served_by_tensorboard(served: tuple[TensorBoardServer, dict], key: str) -> None:
    server, expected = served
    check(server, expected[key])


@pytest.mark.slow
def test_steps_and_tags_are_separate_tensors(served: tuple[TensorBoardServer, dict]) -> None:
    server, expected = served
    names = list(info(server, "main"))
    assert names.count("dup:00000001") == 1
    assert expected["steps3"].name == "enc/tokens é 词:00000003"
    # The latest of several steps is named so that it sorts (and opens) first.
    assert expected["steps7"].name == "enc/tokens é 词 (latest):00000007"
    assert {"auto:00000000", "auto (latest):00000001", "after_restart:00000002"} <= set(names)
    assert len(names) == len(set(names))
    threads = info(server, "threads")
    assert sorted(threads) == sorted(pj.tensor_name(f"t{i}", 0) for i in range(8))
    for i in range(8):
        check(server, expected[f"thread_t{i}"])


@pytest.mark.slow
def test_replaced_entry_drops_its_stale_sprite(served: tuple[TensorBoardServer, dict]) -> None:
    _, expected = served
    folder = Path(expected["dup"].extra["folder"])
    assert sorted(p.name for p in folder.iterdir()) == ["metadata.tsv", "tensors.bin"]
    # The first write's folder (with its sprite) is gone: one folder for the one entry.
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


@pytest.mark.slow
def test_sprite_pixels(served: tuple[TensorBoardServer, dict]) -> None:
    server, expected = served
    exp = expected["img_color"]
    image = Image.open(io.BytesIO(check(server, exp)["png"]))
    assert image.mode == "RGBA"
    pixels = np.asarray(image)
    # Image 7 sits in grid row 1, column 3 (4 columns); 6 x 10 centred in 10 x 10.
    tile = pixels[10:20, 30:40]
    assert (tile[:2, :, 3] == 0).all() and (tile[8:, :, 3] == 0).all()  # transparent padding
    assert (tile[2:8, :, 3] == 255).all()
    assert (tile[2:8, :, :3] == round(7 / 9 * 255)).all()
    grey = np.asarray(Image.open(io.BytesIO(check(server, expected["img_grey"])["png"])))
    assert grey.shape == (27, 27, 2)  # grey + alpha
    assert (grey[9:18, 2 + 9 : 7 + 9, 0] == 4 * 30).all()  # image 4: grid row 1, column 1
    big = np.asarray(Image.open(io.BytesIO(check(server, expected["img_big"])["png"])))
    thumb = expected["img_big"].thumb
    assert big.ndim == 2 and big[thumb * 30 + 5, thumb * 5 + 5] == (30 * 33 + 5) % 256
    sampled = np.asarray(Image.open(io.BytesIO(check(server, expected["sampled"])["png"])))
    index = expected["sampled"].extra["index"]
    for k, i in enumerate(index):
        row, col = divmod(k, 5)
        assert sampled[row * 4 + 1, col * 4 + 1] == round(i / 49 * 255)


# ---------------------------------------------------------------------- without a server
@pytest.fixture
def run(tmp_path: Path) -> Iterator[RunWriter]:
    with RunWriter(tmp_path / "run") as writer:
        yield writer


def test_sample_is_deterministic_and_ordered(run: RunWriter) -> None:
    mat = torch.arange(300.0).view(100, 3)
    a = log_embedding(run, "s", mat, max_points=10, seed=3, step=0)
    b = log_embedding(run, "s", mat, max_points=10, seed=3, step=1)
    c = log_embedding(run, "s", mat, max_points=10, seed=4, step=2)
    read = [np.fromfile(r.tensor_path, dtype="<f4").reshape(-1, 3) for r in (a, b, c)]
    assert np.array_equal(read[0], read[1]) and not np.array_equal(read[0], read[2])
    assert (np.diff(read[0][:, 0]) > 0).all()
    assert (a.num_points, a.total_points) == (10, 100)


def test_warns_above_100k_points_without_max_points(run: RunWriter) -> None:
    mat = torch.randn(pj.WARN_POINTS + 1, 1)
    with pytest.warns(UserWarning, match=r"100,001 points.*max_points="):
        rec = log_embedding(run, "big", mat)
    assert rec.num_points == pj.WARN_POINTS + 1
    log_embedding(run, "big", mat, max_points=1000)  # no warning with a sample


def test_warns_on_non_finite(run: RunWriter) -> None:
    mat = torch.ones(4, 2)
    mat[1, 0] = float("nan")
    with pytest.warns(UserWarning, match="NaN or Inf in 1 of 4 rows"):
        rec = log_embedding(run, "nan", mat)
    data = np.fromfile(rec.tensor_path, dtype="<f4").reshape(4, 2)
    assert np.isnan(data[1, 0])


def test_mapping_and_tensor_metadata(run: RunWriter) -> None:
    mat = torch.randn(3, 2)
    rec = log_embedding(
        run, "m", mat, metadata={"word": ["a", "b", "c"], "count": torch.tensor([1, 2, 3])}
    )
    assert rec.metadata_path is not None
    assert Path(rec.metadata_path).read_text() == "word\tcount\na\t1\nb\t2\nc\t3\n"
    # One column gets a header and an index column, so TensorBoard offers choices.
    rec = log_embedding(run, "t", mat, metadata=torch.tensor([4, 5, 6]))
    assert Path(str(rec.metadata_path)).read_text() == "label\tindex\n4\t0\n5\t1\n6\t2\n"
    rec = log_embedding(run, "h1", mat, metadata=["x", "y", "z"], metadata_header=["only"])
    assert Path(str(rec.metadata_path)).read_text() == "only\tindex\nx\t0\ny\t1\nz\t2\n"
    rec = log_embedding(run, "h2", mat, metadata={"index": ["x", "y", "z"]})
    assert Path(str(rec.metadata_path)).read_text() == "index\trow\nx\t0\ny\t1\nz\t2\n"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param(
            {"metadata": ["a"] * 4},
            ValueError,
            r"`metadata` has 4 rows but `mat` has 3 points",
            id="meta-length",
        ),
        pytest.param(
            {"metadata": [["a", 1]] * 3},
            ValueError,
            r"pass `metadata_header`",
            id="rows-without-header",
        ),
        pytest.param(
            {"metadata": [["a", 1]] * 3, "metadata_header": ["x", "y", "z"]},
            ValueError,
            r"row 0 has 2 values but `metadata_header` has 3",
            id="row-width",
        ),
        pytest.param(
            {"metadata": [["a", 1]] * 3, "metadata_header": ["x", "x"]},
            ValueError,
            r"repeats a name",
            id="dup-header",
        ),
        pytest.param(
            {"metadata": ["a"] * 3, "metadata_header": "x"},
            TypeError,
            r"pass \['x'\]",
            id="header-str",
        ),
        pytest.param({"metadata": "abc"}, TypeError, r"single string", id="meta-str"),
        pytest.param(
            {"metadata": {"a": [1, 2]}},
            ValueError,
            r"column 'a' has 2 rows but `mat` has 3",
            id="mapping-length",
        ),
        pytest.param(
            {"label_img": torch.rand(2, 3, 4, 4)},
            ValueError,
            r"`label_img` has 2 images but `mat` has 3 points",
            id="img-count",
        ),
        pytest.param(
            {"label_img": torch.rand(3, 5, 5, 3)},
            ValueError,
            r"permute\(0, 3, 1, 2\)",
            id="channels-last",
        ),
        pytest.param({"step": -1}, ValueError, r"`step` must be >= 0", id="negative-step"),
        pytest.param({"step": 1.5}, TypeError, r"`step` must be an int", id="float-step"),
        pytest.param({"max_points": 0}, ValueError, r"`max_points` must be >= 1", id="max-points"),
    ],
)
def test_bad_arguments_raise_and_write_nothing(
    run: RunWriter, kwargs: dict, error: type, match: str
) -> None:
    with pytest.raises(error, match=match):
        log_embedding(run, "bad", torch.randn(3, 2), **kwargs)
    assert not (Path(run.log_dir) / pj.CONFIG_FILENAME).exists()
    # Checked before any file is touched: not even the projector folder exists.
    assert not (Path(run.log_dir) / "projector").exists()


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("this label cannot be printed")


def test_an_error_while_building_the_labels_leaves_no_entry(run: RunWriter) -> None:
    # The labels are made on a helper thread while the tensor is written; its error
    # reaches the caller and the written tensor's folder is removed.
    log_embedding(run, "ok", torch.randn(3, 2), step=0)
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="cannot be printed"):
        log_embedding(run, "bad", torch.randn(3, 2), metadata=["a", Unprintable(), "c"])
    assert set(threading.enumerate()) <= before  # the helper thread was joined
    config = pj.read_config(run.fs, run.log_dir)
    assert [e.tensor_name for e in config.embeddings] == ["ok:00000000"]
    assert list((Path(run.log_dir) / "projector" / pj.safe_tag("bad")).iterdir()) == []


@pytest.mark.parametrize(
    ("mat", "match"),
    [
        pytest.param(torch.randn(5), r"2-D \(N, D\), got shape \(5,\).*reshape\(-1, 1\)", id="1d"),
        pytest.param(torch.randn(0, 3), r"at least one row", id="empty"),
        pytest.param(np.array([["a", "b"]]), r"dtype <U1", id="strings"),
    ],
)
def test_bad_matrix(run: RunWriter, mat: Any, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        log_embedding(run, "bad", mat)


def test_bad_tag(run: RunWriter) -> None:
    with pytest.raises(ValueError, match="`tag` must not be empty"):
        log_embedding(run, "", torch.randn(2, 2))
    with pytest.raises(TypeError, match="`tag` must be a str"):
        log_embedding(run, 3, torch.randn(2, 2))  # type: ignore[arg-type]


def test_corrupt_config_is_left_alone(run: RunWriter) -> None:
    path = Path(run.log_dir) / pj.CONFIG_FILENAME
    path.write_text("embeddings { tensor_name: ")
    with pytest.raises(ValueError, match="not a valid projector config"):
        log_embedding(run, "x", torch.randn(2, 2))
    assert path.read_text() == "embeddings { tensor_name: "


def test_foreign_entries_are_kept(run: RunWriter) -> None:
    path = Path(run.log_dir) / pj.CONFIG_FILENAME
    path.write_text(
        'embeddings {\n  tensor_name: "theirs"\n  tensor_path: "00000/theirs/tensors.tsv"\n}\n'
    )
    log_embedding(run, "ours", torch.randn(2, 2), step=0)
    config = pj.read_config(run.fs, str(Path(run.log_dir)))
    assert [e.tensor_name for e in config.embeddings] == ["theirs", "ours:00000000"]


def test_safe_tag_is_distinct() -> None:
    tags = ["a/b", "a b", "a_b", "A/B", "é", "..", "", "x" * 300]
    folders = [pj.safe_tag(t) for t in tags]
    assert len(set(folders)) == len(tags)
    assert all(len(f) < 64 and "/" not in f and not f.startswith(".") for f in folders)


def test_sprite_larger_than_limit_is_rejected_only_at_one_pixel(
    monkeypatch: pytest.MonkeyPatch, run: RunWriter
) -> None:
    from tbx_lightning.projector import _sprite

    monkeypatch.setattr(_sprite, "MAX_SPRITE_PX", 4)
    rec = log_embedding(run, "tiny", torch.randn(16, 2), label_img=torch.rand(16, 1, 3, 3))
    assert rec.thumbnail_px == 1
    with pytest.raises(ValueError, match=r"cannot fit a 4 px sprite.*max_points <= 16"):
        log_embedding(run, "tiny", torch.randn(17, 2), label_img=torch.rand(17, 1, 3, 3))


def test_sprite_grid_geometry() -> None:
    # The grid is ceil(sqrt(N)) columns wide, as the projector expects.
    for n in (1, 2, 5, 10, 17):
        cols = math.ceil(math.sqrt(n))
        png, thumb = sprite_png(torch.rand(n, 3, 2, 2), None)
        assert png_size(png) == (cols * 2, math.ceil(n / cols) * 2) and thumb == 2


def test_remote_files_exist_in_memory_fs() -> None:
    with RunWriter("memory://projector-unit/run") as run:
        rec = log_embedding(run, "m", torch.randn(3, 2), metadata=["a", "b", "c"], step=0)
    mem = fsspec.filesystem("memory")
    try:
        assert mem.cat_file(rec.metadata_path) == b"label\tindex\na\t0\nb\t1\nc\t2\n"
        assert b'tensor_name: "m:00000000"' in mem.cat_file(rec.config_path)
    finally:
        mem.rm("/projector-unit", recursive=True)


# ---------------------------------------------------------------------- Lightning callback
DDP_SCRIPT = """
import sys

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from tbx_lightning import EmbeddingProjector, TBXLogger


class Model(LightningModule):
    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Identity()
        self.head = torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.encoder(x))

    def training_step(self, batch, batch_idx):
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class Done(Callback):
    # Each process says it got past the end of training (none blocked in a collective).

    def on_train_end(self, trainer, pl_module):
        open(f"{sys.argv[1]}/done_{trainer.global_rank}.txt", "w").close()


if __name__ == "__main__":
    out = sys.argv[1]
    x = torch.arange(30 * 4, dtype=torch.float32).view(30, 4).add(0.25)
    data = TensorDataset(x, torch.arange(30))
    projector = EmbeddingProjector(
        "encoder",
        label_key=1,
        image_fn=lambda b: b[0].view(-1, 1, 2, 2) / 120.0,
        dataloader=DataLoader(data, batch_size=4),  # 8 batches, the last of 2: uneven shards
        every_n_epochs=0,
        max_points=None,
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",  # forked ranks: no second interpreter start-up
        max_epochs=1,
        logger=TBXLogger(out, name="ddp", version=0),
        callbacks=[projector, Done()],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Model(), DataLoader(data, batch_size=8))
"""


class TinyEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(x))


def make_model() -> Any:
    from lightning.pytorch import LightningModule

    class Classifier(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = TinyEncoder()
            self.head = torch.nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(x))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.5)

    return Classifier()


def toy_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return x, y


def trainer_for(logger: Any, callbacks: list[Any], epochs: int = 2) -> Any:
    from lightning.pytorch import Trainer

    return Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )


class EmbeddingOnlyLogger:
    """Stand-in for any Lightning logger that has ``log_embedding``: owns a RunWriter."""

    @staticmethod
    def make(path: Path) -> Any:
        from lightning.pytorch.loggers.logger import Logger

        class _Logger(Logger):
            def __init__(self) -> None:
                super().__init__()
                self.run = RunWriter(path)
                self.records: list[Any] = []

            @property
            def name(self) -> str:
                return "embedding-only"

            @property
            def version(self) -> int:
                return 0

            def log_metrics(self, metrics: Any, step: int | None = None) -> None:
                pass

            def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
                pass

            def log_embedding(self, tag: str, mat: Any, **kwargs: Any) -> Any:
                record = log_embedding(self.run, tag, mat, **kwargs)
                self.records.append(record)
                return record

            def finalize(self, status: str) -> None:
                self.run.close()

        return _Logger()


def write_callback_runs(logdir: Path) -> dict[str, Any]:
    """Runs written by the callback in this process: fine-tuning before/after, periodic."""
    from lightning.pytorch import seed_everything
    from torch.utils.data import DataLoader, TensorDataset

    from tbx_lightning import EmbeddingProjector, TBXLogger

    facts: dict[str, Any] = {}
    seed_everything(0)
    x, y = toy_data()
    data = TensorDataset(x, y)
    # Before and after fine-tuning, side by side as two steps.
    model = make_model()
    before = model.encoder(x).detach()
    projector = EmbeddingProjector(
        "encoder",
        label_key=1,
        image_fn=lambda batch: batch[0].view(-1, 1, 2, 2),
        log_before_fit=True,
        every_n_epochs=0,
        max_points=None,
    )
    trainer = trainer_for(TBXLogger(logdir, name="finetune", version=0), [projector], epochs=3)
    trainer.fit(
        model, DataLoader(data, batch_size=10, shuffle=True), DataLoader(data, batch_size=16)
    )
    facts["finetune"] = {
        "before": before.numpy(),
        "after": model.encoder(x).detach().numpy(),
        "labels": [str(v) for v in y.tolist()],
        "final_step": trainer.global_step,
    }

    # Every epoch, an embed_fn over a loader of our own, through a minimal logger.
    model = make_model()
    logger = EmbeddingOnlyLogger.make(logdir / "periodic")
    projector = EmbeddingProjector(
        embed_fn=lambda module, batch: module.encoder(batch[0]).unsqueeze(1).expand(-1, 3, -1),
        pool="mean",
        label_fn=lambda batch: [[f"s{int(v)}", int(v) % 2] for v in batch[1]],
        metadata_header=["name", "odd"],
        dataloader=DataLoader(TensorDataset(x, torch.arange(40)), batch_size=8),
        max_batches=3,
        every_n_epochs=1,
        max_points=20,
        tag="periodic/enc",
    )
    trainer = trainer_for(logger, [projector], epochs=2)
    trainer.fit(model, DataLoader(data, batch_size=20))
    facts["periodic"] = {
        "steps": [r.step for r in logger.records],
        "records": logger.records,
        "x": x,
        "after": model.encoder(x[:24]).detach().numpy(),
    }

    return facts


@pytest.fixture(scope="module")
def tb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TensorBoardServer, dict, dict]]:
    """One log dir with every layout and every callback run, one TensorBoard server reading it."""
    root = tmp_path_factory.mktemp("projector")
    logdir = root / "logs"
    # Two DDP processes in the background while this process writes the other runs.
    script = root / "projector_ddp.py"
    script.write_text(DDP_SCRIPT)
    ddp_out = root / "ddp_out"
    ddp_out.mkdir()
    ddp = subprocess.Popen(
        [sys.executable, str(script), str(ddp_out)],
        cwd=str(Path(__file__).resolve().parents[1]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        expected = write_core_layouts(logdir)
        facts = write_callback_runs(logdir)
        out, _ = ddp.communicate(timeout=240)
    finally:
        if ddp.poll() is None:
            ddp.kill()
            ddp.wait()
    assert ddp.returncode == 0, out.decode(errors="replace")[-4000:]
    facts["ddp_done"] = sorted(p.name for p in ddp_out.glob("done_*"))
    shutil.copytree(ddp_out / "ddp", logdir / "ddp")

    server = TensorBoardServer(logdir)
    try:
        server.wait_for_runs(6)
        yield server, expected, facts
    finally:
        server.stop()


@pytest.fixture
def served(tb: tuple[TensorBoardServer, dict, dict]) -> tuple[TensorBoardServer, dict]:
    return tb[0], tb[1]


@pytest.fixture
def fitted(tb: tuple[TensorBoardServer, dict, dict]) -> tuple[TensorBoardServer, dict]:
    return tb[0], tb[2]


def served_tensor(server: TensorBoardServer, run: str, name: str) -> np.ndarray:
    entry = info(server, run)[name]
    data = server.get_bytes(f"{PLUGIN}/tensor", {"run": run, "name": name})
    return np.frombuffer(data, dtype="<f4").reshape(entry["tensorShape"])


@pytest.mark.slow
def test_callback_before_and_after_finetuning(fitted: tuple[TensorBoardServer, dict]) -> None:
    server, facts = fitted
    fact = facts["finetune"]
    run = "finetune/version_0"
    final = fact["final_step"]
    latest = f"embeddings (latest):{final:08d}"
    assert list(info(server, run)) == [latest, "embeddings:00000000"]  # latest first
    np.testing.assert_allclose(
        served_tensor(server, run, "embeddings:00000000"), fact["before"], rtol=1e-6
    )
    np.testing.assert_allclose(served_tensor(server, run, latest), fact["after"], rtol=1e-6)
    assert not np.allclose(fact["before"], fact["after"])
    for name in ("embeddings:00000000", latest):
        meta = server.get_bytes(f"{PLUGIN}/metadata", {"run": run, "name": name})
        assert lines(meta) == one_column(fact["labels"])
        png = server.get_bytes(f"{PLUGIN}/sprite_image", {"run": run, "name": name})
        assert png_size(png) == (7 * 2, 6 * 2)  # 40 images of 2 x 2 px, 7 columns


@pytest.mark.slow
def test_callback_every_epoch_with_embed_fn(fitted: tuple[TensorBoardServer, dict]) -> None:
    server, facts = fitted
    fact = facts["periodic"]
    assert fact["steps"] == [2, 4]  # after epochs 1 and 2; fit end is the same step: not repeated
    names = list(info(server, "periodic"))
    assert names == ["periodic/enc (latest):00000004", "periodic/enc:00000002"]
    served = served_tensor(server, "periodic", names[0])
    meta = lines(server.get_bytes(f"{PLUGIN}/metadata", {"run": "periodic", "name": names[0]}))
    assert meta[0] == "name\todd" and len(meta) == 21  # 3 batches of 8 -> 24, sampled to 20
    rows = [int(m.split("\t")[0][1:]) for m in meta[1:]]
    assert rows == sorted(rows) and max(rows) < 24
    np.testing.assert_allclose(
        served, fact["after"][rows], rtol=1e-6
    )  # mean over a repeat = itself


@pytest.mark.slow
def test_callback_gathers_ddp_ranks_to_rank_zero(fitted: tuple[TensorBoardServer, dict]) -> None:
    server, facts = fitted
    assert facts["ddp_done"] == ["done_0.txt", "done_1.txt"]
    run = "ddp/version_0"
    (name,) = info(server, run)
    served = served_tensor(server, run, name)
    meta_lines = lines(server.get_bytes(f"{PLUGIN}/metadata", {"run": run, "name": name}))
    assert meta_lines[0] == "label\tindex"
    meta = [int(v.split("\t")[0]) for v in meta_lines[1:]]
    assert [int(v.split("\t")[1]) for v in meta_lines[1:]] == list(range(30))
    # Batches 0, 2, 4, 6 on rank 0 then 1, 3, 5, 7 on rank 1 (7 holds 2 samples): uneven, padded.
    order = [i for b in (0, 2, 4, 6, 1, 3, 5, 7) for i in range(4 * b, min(4 * b + 4, 30))]
    assert meta == order
    x = np.arange(30 * 4, dtype=np.float32).reshape(30, 4) + 0.25
    assert served.tobytes() == x[order].tobytes()
    png = server.get_bytes(f"{PLUGIN}/sprite_image", {"run": run, "name": name})
    assert png_size(png) == (6 * 2, 5 * 2)


def test_callback_requires_a_logger_with_log_embedding(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from tbx_lightning import EmbeddingProjector

    x, y = toy_data()
    trainer = trainer_for(
        CSVLogger(tmp_path), [EmbeddingProjector("encoder", label_key=1)], epochs=1
    )
    with pytest.raises(
        RuntimeError, match=r"has CSVLogger: use Trainer\(logger=tbx_lightning.TBXLogger"
    ):
        trainer.fit(make_model(), DataLoader(TensorDataset(x, y), batch_size=8))


def test_callback_unknown_submodule(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from tbx_lightning import EmbeddingProjector

    x, y = toy_data()
    logger = EmbeddingOnlyLogger.make(tmp_path / "run")
    trainer = trainer_for(logger, [EmbeddingProjector("encodr", label_key=1)], epochs=1)
    with pytest.raises(RuntimeError, match=r"no submodule 'encodr'.*'encoder'"):
        trainer.fit(make_model(), DataLoader(TensorDataset(x, y), batch_size=8))
    logger.run.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({}, r"exactly one of `module_name`", id="neither"),
        pytest.param({"module_name": "a", "embed_fn": len}, r"exactly one of", id="both"),
        pytest.param({"module_name": "a", "pool": "max"}, r"`pool` must be one of", id="pool"),
        pytest.param(
            {"module_name": "a", "dataloader": "test"}, r"`dataloader` must be one of", id="loader"
        ),
        pytest.param(
            {"module_name": "a", "label_key": 1, "label_fn": len},
            r"`label_key` or `label_fn`",
            id="labels",
        ),
        pytest.param(
            {"module_name": "a", "every_n_epochs": -1}, r"`every_n_epochs` must be >= 0", id="every"
        ),
    ],
)
def test_callback_bad_options(kwargs: dict, match: str) -> None:
    from tbx_lightning import EmbeddingProjector

    with pytest.raises(ValueError, match=match):
        EmbeddingProjector(**kwargs)
