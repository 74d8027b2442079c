"""The projector at scale: kills during replaces, memory of large writes, the order users see.

- A child process replaces the same ``(tag, step)`` over and over with matrices
  of alternating sizes and is SIGKILLed at random moments; after every kill each
  entry of ``projector_config.pbtxt`` must agree with its files (tensor rows =
  metadata rows = config shape), and TensorBoard's own projector plugin must
  serve every entry.
- Writing a large float32 matrix must not copy it: traced allocations (numpy,
  bytes) and the peak resident memory of a fresh process stay far below its size.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tbx_lightning import RunWriter
from tbx_lightning import projector as pj
from tbx_lightning.projector import log_embedding

REPO = Path(__file__).resolve().parents[1]

REPLACER = textwrap.dedent(
    """
    import sys
    import torch
    from tbx_lightning import RunWriter
    from tbx_lightning.projector import log_embedding

    run_dir = sys.argv[1]
    gen = torch.Generator().manual_seed(int(sys.argv[2]))
    with RunWriter(run_dir, flush_secs=0.2) as run:
        i = 0
        while True:
            rows = (200, 300)[i % 2]
            # Replace one entry again and again, and add steps of a second tag.
            log_embedding(
                run,
                "emb",
                torch.randn(rows, 256, generator=gen),
                metadata=[f"p{j}" for j in range(rows)],
                label_img=torch.rand(rows, 1, 4, 4, generator=gen),
                step=1,
            )
            log_embedding(run, "other", torch.randn(rows, 64, generator=gen), step=i % 3)
            if i == 0:
                print("ready", flush=True)
            i += 1
    """
)


class PluginView:
    """TensorBoard's projector plugin over a log dir, queried through its WSGI routes."""

    def __init__(self, logdir: Path) -> None:
        from tensorboard.backend.event_processing import data_provider
        from tensorboard.backend.event_processing import plugin_event_multiplexer as pem
        from tensorboard.plugins import base_plugin
        from tensorboard.plugins.projector.projector_plugin import ProjectorPlugin

        mux = pem.EventMultiplexer()
        mux.AddRunsFromDirectory(str(logdir))
        mux.Reload()
        provider = data_provider.MultiplexerDataProvider(mux, str(logdir))
        context = base_plugin.TBContext(logdir=str(logdir), data_provider=provider, multiplexer=mux)
        self.apps = ProjectorPlugin(context).get_plugin_apps()

    def get(self, route: str, **params: str) -> bytes:
        from werkzeug.test import Client

        response = Client(self.apps[route]).get("/", query_string=params)
        assert response.status_code == 200, (route, params, response.get_data(as_text=True))
        return bytes(response.get_data())

    def info(self, run: str) -> list[dict[str, Any]]:
        return list(json.loads(self.get("/info", run=run))["embeddings"])


def check_consistent(run_dir: Path) -> int:
    """Every config entry agrees with its files; returns the number of entries."""
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    config = text_format.Parse(
        (run_dir / pj.CONFIG_FILENAME).read_text(encoding="utf-8"), ProjectorConfig()
    )
    for entry in config.embeddings:
        rows, dim = entry.tensor_shape
        size = (run_dir / entry.tensor_path).stat().st_size
        assert size == rows * dim * 4, (entry.tensor_name, size, rows, dim)
        if entry.metadata_path:
            lines = (run_dir / entry.metadata_path).read_text(encoding="utf-8").splitlines()
            assert len(lines) == rows + 1, (entry.tensor_name, len(lines), rows)  # header line
        if entry.sprite.image_path:
            assert (run_dir / entry.sprite.image_path).stat().st_size > 0
    return len(config.embeddings)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_during_replaces_leaves_every_entry_consistent(tmp_path: Path) -> None:
    logdir = tmp_path / "logs"
    run_dir = logdir / "run"
    script = tmp_path / "replacer.py"
    script.write_text(REPLACER)
    chooser = random.Random(16)
    kills = 14
    for kill in range(kills):
        child = subprocess.Popen(
            [sys.executable, str(script), str(run_dir), str(kill)],
            cwd=str(REPO),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline()  # after one full round of writes
            assert line == b"ready\n", child.stderr.read().decode() if child.stderr else ""
            time.sleep(chooser.uniform(0.0, 0.6))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
        assert child.returncode == -signal.SIGKILL
        assert check_consistent(run_dir) == 4  # emb:1 and other:0..2

        view = PluginView(logdir)
        entries = view.info("run")
        assert len(entries) == 4
        for entry in entries:
            rows, dim = (int(n) for n in entry["tensorShape"])
            name = entry["tensorName"]
            tensor = view.get("/tensor", run="run", name=name)
            assert len(tensor) == rows * dim * 4
            if "metadataPath" in entry:
                meta = view.get("/metadata", run="run", name=name).decode().splitlines()
                assert meta[0] == "label\tindex" and len(meta) == rows + 1
            if "sprite" in entry:
                assert view.get("/sprite_image", run="run", name=name)[:4] == b"\x89PNG"

    # A later write of the same step also removes folders that killed writes left.
    with RunWriter(run_dir) as run:
        rec = log_embedding(run, "emb", torch.randn(5, 3), step=1)
    folders = [p.name for p in Path(rec.folder).parent.iterdir()]
    assert folders == [Path(rec.folder).name]
    assert check_consistent(run_dir) == 4


@pytest.mark.slow
def test_plugin_lists_the_latest_step_first(tmp_path: Path) -> None:
    run_dir = tmp_path / "logs" / "run"
    with RunWriter(run_dir) as run:
        for step in (0, 5, 10):
            log_embedding(run, "tok", torch.randn(20, 4), metadata=list(range(20)), step=step)
        log_embedding(run, "sent", torch.randn(10, 4), metadata=list(range(10)), step=3)
        log_embedding(run, "tok", torch.randn(20, 4), metadata=list(range(20)), step=7)
    entries = PluginView(tmp_path / "logs").info("run")
    names = [e["tensorName"] for e in entries]
    assert names == [
        "tok (latest):00000010",
        "tok:00000007",
        "tok:00000005",
        "tok:00000000",
        "sent:00000003",
    ]

    # TensorBoard's projector front end lists tensors with metadata first, then
    # those with more points, then by name, and opens on the first of that list.
    def listed(entry: dict[str, Any]) -> tuple[bool, int, str]:
        rows = int(entry["tensorShape"][0])
        return ("metadataPath" not in entry, -rows, entry["tensorName"])

    assert min(entries, key=listed)["tensorName"] == "tok (latest):00000010"


# ---------------------------------------------------------------------- memory
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: torch.randn(4096, 4096), id="torch-float32"),
        pytest.param(
            lambda: np.random.default_rng(0).standard_normal((4096, 4096), "f4"), id="numpy"
        ),
        pytest.param(lambda: torch.randn(4096, 8192, dtype=torch.bfloat16), id="torch-bf16"),
    ],
)
def test_large_matrix_is_written_without_a_copy(tmp_path: Path, make: Any) -> None:
    mat = make()  # 64 MiB
    nbytes = mat.numel() * mat.element_size() if isinstance(mat, torch.Tensor) else mat.nbytes
    assert nbytes == 64 << 20
    with RunWriter(tmp_path / "run") as run:
        log_embedding(run, "warm", torch.randn(4, 4))  # imports and first-use caches
        tracemalloc.start()
        try:
            rec = log_embedding(run, "big", mat, step=0)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < nbytes * 0.2, f"peak traced allocation {peak / 2**20:.1f} MiB"
    expected = mat.float().numpy() if isinstance(mat, torch.Tensor) else mat
    written = np.fromfile(rec.tensor_path, dtype="<f4").reshape(expected.shape)
    assert np.array_equal(written, expected)


PEAK_RSS = textwrap.dedent(
    """
    import sys, tempfile, torch
    from tbx_lightning import RunWriter
    from tbx_lightning.projector import log_embedding

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

    dtype = getattr(torch, sys.argv[1])
    mat = torch.randn(4096, 4096 * 32 // torch.finfo(dtype).bits, dtype=dtype)
    with RunWriter(tempfile.mkdtemp()) as run:
        log_embedding(run, "warm", torch.randn(4, 4))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) restarts from the current resident size
        before = status("VmRSS:")
        log_embedding(run, "big", mat, step=0)
        print(status("VmHWM:") - before, mat.numel() * mat.element_size())
    """
)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_peak_resident_memory_of_a_large_write(tmp_path: Path, dtype: str) -> None:
    # A fresh process: its peak resident set (VmHWM) before and after the write.
    out = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, dtype],
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    added, nbytes = (int(v) for v in out.stdout.split())
    assert nbytes == 64 << 20
    assert added < nbytes * 0.2, f"peak resident memory grew by {added / 2**20:.1f} MiB"
