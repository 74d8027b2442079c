"""Remote runs never freeze training: the local spool and its background uploader.

The remote is a real S3 API on 127.0.0.1 (moto server), reached either directly, through
an endpoint that accepts connections and never answers (a black hole), or through a
proxy that can be switched into a black hole and back (an outage and its end).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata

from tbx_lightning import _fs
from tbx_lightning._spool import spool_dir, upload_spool
from tbx_lightning._writer import RunWriter
from tbx_lightning.errors import ConfigError, ConfigTypeError, RunWriterError
from tbx_lightning.hparams import RunHParams
from tests.s3server import CREDENTIALS, S3Server
from tests.tb import read

pytest.importorskip("s3fs")
pytest.importorskip("moto")

pytestmark = pytest.mark.timeout(120)


class BlackHole:
    """A TCP server on 127.0.0.1 that accepts every connection and never answers."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self._held.append(conn)

    def close(self) -> None:
        self._server.close()
        for conn in self._held:
            conn.close()


class ToggleProxy:
    """A TCP proxy to ``upstream``; :meth:`down` makes it a black hole, :meth:`up` undoes it."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit("//", 1)[1].split(":")
        self._upstream = (host, int(port))
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._forward = True
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self._open.append(client)
                if not self._forward:
                    continue  # held, never answered
            upstream = socket.create_connection(self._upstream)
            with self._lock:
                self._open.append(upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, dest: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                dest.sendall(data)
        except OSError:
            pass
        finally:
            for conn in (source, dest):
                conn.close()

    def _drop_all(self) -> None:
        with self._lock:
            conns, self._open = self._open, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def down(self) -> None:
        self._forward = False
        self._drop_all()  # open keep-alive connections end; new ones are held

    def up(self) -> None:
        self._forward = True
        self._drop_all()

    def close(self) -> None:
        self._server.close()
        self._drop_all()


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Credentials, a spool inside the test's folder, 1 s requests; returns an endpoint switch."""
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TBX_LIGHTNING_SPOOL", str(tmp_path / "spool"))
    monkeypatch.setattr(_fs, "REQUEST_TIMEOUT", 1.0)
    monkeypatch.setitem(fsspec.config.conf, "s3", {})

    def use(endpoint: str) -> None:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})

    return use


@pytest.fixture
def bucket(moto: S3Server, s3_env: Any) -> str:
    s3_env(moto.endpoint)
    name = f"runs-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(name)
    return name


def _download(url: str, dest: Path) -> Path:
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    fs.get(path.rstrip("/") + "/", str(dest), recursive=True)
    return dest


def _steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def _status(acc: EventAccumulator) -> int:
    content = acc.PluginTagToContent("hparams")["_hparams_/session_end_info"]
    return int(metadata.parse_session_end_info_plugin_data(content).status)


def _until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_black_hole_endpoint_never_freezes_training_and_the_spool_uploads_later(
    bucket: str, moto: S3Server, s3_env: Any, tmp_path: Path
) -> None:
    hole = BlackHole()
    s3_env(hole.url)
    url = f"s3://{bucket}/runs/x"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.monotonic()
            run = RunWriter(url, flush_secs=0.2, upload_timeout=1)
            hp = RunHParams(run)
            hp.log({"lr": 0.1})
            for step in range(1000):
                run.log_scalars({"loss": float(step)}, step)
            run.flush()
            hp.finish("success")
            run.close()
            elapsed = time.monotonic() - start
    finally:
        hole.close()
    assert elapsed < 8, elapsed  # open waits ~1 s for an answer, close ~1 s for the upload
    messages = [str(w.message) for w in caught]
    down = [m for m in messages if "cannot reach" in m]
    assert len(down) == 1 and url in down[0], messages
    spool = spool_dir(url)
    assert run.spool_dir == spool and spool.startswith(str(tmp_path / "spool"))
    left = [m for m in messages if "were not uploaded" in m]
    assert len(left) == 1 and f"tbx-lightning upload {spool}" in left[0], messages
    # Everything is in the spool, readable as a local run.
    assert _steps(read(spool), "loss") == list(range(1000))

    # The storage answers again: the command from the warning finishes the upload.
    s3_env(moto.endpoint)
    from tbx_lightning import cli

    assert cli.main(["upload", spool]) == 0
    assert not os.path.exists(spool)
    acc = read(_download(url, tmp_path / "copy"))
    assert _steps(acc, "loss") == list(range(1000))
    assert _status(acc) == api_pb2.STATUS_SUCCESS
    assert yaml.safe_load((tmp_path / "copy" / "config.yaml").read_text()) == {"lr": 0.1}
    assert not fsspec.filesystem("s3").exists(f"{bucket}/runs/x/.tbx-lease.json")


def test_outage_then_recovery_catches_up_and_loses_nothing(
    bucket: str, moto: S3Server, s3_env: Any, tmp_path: Path
) -> None:
    proxy = ToggleProxy(moto.endpoint)
    s3_env(proxy.url)
    url = f"s3://{bucket}/runs/y"
    remote = fsspec.filesystem("s3", skip_instance_cache=True, endpoint_url=moto.endpoint)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run = RunWriter(url, flush_secs=0.2, upload_timeout=20)
            hp = RunHParams(run)
            hp.log({"lr": 0.1})
            for step in range(100):
                run.log_scalars({"loss": float(step)}, step)
            run.flush()

            def uploaded() -> bool:
                remote.invalidate_cache()
                return any("tfevents" in p for p in remote.find(f"{bucket}/runs/y"))

            _until(uploaded, 15, "the first upload")

            proxy.down()
            start = time.monotonic()
            for step in range(100, 300):
                run.log_scalars({"loss": float(step)}, step)
                if step % 50 == 0:
                    run.flush()
            assert time.monotonic() - start < 2  # logging and flushing never wait on the network

            def said(text: str) -> bool:
                run.flush()  # notices reach the caller on its next call
                return any(text in str(w.message) for w in caught)

            _until(lambda: said("cannot reach"), 20, "the outage warning")
            proxy.up()
            _until(lambda: said("answers again"), 30, "the catch-up message")
            hp.finish("success")
            run.close()
    finally:
        proxy.close()
    messages = [str(w.message) for w in caught]
    assert sum("cannot reach" in m and url in m for m in messages) == 1, messages
    assert not any("were not uploaded" in m for m in messages), messages
    assert not os.path.exists(spool_dir(url))  # all sent: the spool is removed
    s3_env(moto.endpoint)
    acc = read(_download(url, tmp_path / "copy"))
    assert _steps(acc, "loss") == list(range(300))
    assert _status(acc) == api_pb2.STATUS_SUCCESS


def test_claiming_a_version_on_an_unreachable_store_fails_in_bounded_time(s3_env: Any) -> None:
    hole = BlackHole()
    s3_env(hole.url)
    start = time.monotonic()
    try:
        with pytest.raises(
            RunWriterError,
            match=r"No answer from the storage within 2 s while claiming a version under "
            r"'s3://bkt/runs'.*check the endpoint",
        ):
            _fs.claim_version(fsspec.filesystem("s3"), "bkt/runs", timeout=2)
    finally:
        hole.close()
    assert time.monotonic() - start < 5


def test_second_writer_on_a_live_s3_run_is_refused(bucket: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    url = f"s3://{bucket}/runs/held"
    script = tmp_path / "hold.py"
    script.write_text(
        "import sys, time\n"
        "from tbx_lightning._writer import RunWriter\n"
        "run = RunWriter(sys.argv[1], flush_secs=0.2)\n"
        "run.log_scalars({'a': 1.0}, 0)\n"
        "print('READY', flush=True)\n"
        "sys.stdin.readline()\n"
        "run.close()\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env["TBX_LIGHTNING_SPOOL"] = str(tmp_path / "other-spool")
    holder = subprocess.Popen(
        [sys.executable, str(script), url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "READY"
        with pytest.raises(RunWriterError, match=rf"in use by another writer: pid {holder.pid}"):
            RunWriter(url)
    finally:
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
    with RunWriter(url) as run:  # the lease was given back at close
        run.log_scalars({"a": 2.0}, 1)


def test_memory_run_is_spooled_and_the_spool_removed_once_uploaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TBX_LIGHTNING_SPOOL", str(tmp_path / "spool"))
    url = f"memory://spool-{uuid.uuid4().hex[:8]}/run"
    with RunWriter(url) as run:
        run.log_scalars({"loss": 0.5}, 3)
        run.flush()
        assert run.spool_dir is not None and os.path.isdir(run.spool_dir)
        assert run.log_dir.startswith("memory://") and run.log_dir.endswith(url[len("memory://") :])
        assert _steps(read(run.spool_dir), "loss") == [3]
    assert not os.path.exists(run.spool_dir)
    fs = fsspec.filesystem("memory")
    assert any("tfevents" in p for p in fs.ls(url.split("://", 1)[1], detail=False))


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "5", True])
def test_upload_timeout_is_validated(tmp_path: Path, bad: Any) -> None:
    with pytest.raises((ConfigError, ConfigTypeError), match=r"`upload_timeout`"):
        RunWriter(tmp_path, upload_timeout=bad)


def test_upload_spool_names_a_folder_that_is_no_spool(tmp_path: Path) -> None:
    with pytest.raises(RunWriterError, match=r"is not a tbx_lightning spool folder"):
        upload_spool(tmp_path)


def test_logger_on_a_black_hole_finishes_and_keeps_hparams_yaml_in_the_spool(
    bucket: str, moto: S3Server, s3_env: Any, tmp_path: Path
) -> None:
    from tbx_lightning import TBXLogger

    hole = BlackHole()
    s3_env(hole.url)
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            start = time.monotonic()
            logger = TBXLogger(f"s3://{bucket}/runs", name="lg", version=0, upload_timeout=1)
            logger.log_hyperparams({"lr": 0.1})
            for step in range(100):
                logger.log_metrics({"loss": float(step)}, step=step)
            logger.finalize("success")
            elapsed = time.monotonic() - start
    finally:
        hole.close()
    assert elapsed < 10, elapsed
    spool = spool_dir(f"s3://{bucket}/runs/lg/version_0")
    assert yaml.safe_load(Path(spool, "hparams.yaml").read_text()) == {"lr": 0.1}
    s3_env(moto.endpoint)
    upload_spool(spool)
    acc = read(_download(f"s3://{bucket}/runs/lg/version_0", tmp_path / "copy"))
    assert _steps(acc, "loss") == list(range(100))
    assert yaml.safe_load((tmp_path / "copy" / "hparams.yaml").read_text()) == {"lr": 0.1}


def test_objects_of_a_resumed_run_are_fetched_only_inside_the_spool(
    bucket: str, tmp_path: Path
) -> None:
    """Whoever can write the bucket must not create files outside the spool of a resumed run."""
    url = f"s3://{bucket}/runs/d/version_0"
    with RunWriter(url, flush_secs=0.2) as run:
        run.log_scalars({"loss": 1.0}, 0)
    target = tmp_path / "outside" / "pwned.pth"
    climb = "/".join([".."] * 40)
    remote = fsspec.filesystem("s3")
    planted = f"{bucket}/runs/d/version_0/{climb}{target}"
    remote.pipe_file(planted, b"import os  # runs at the next interpreter start\n")
    remote.invalidate_cache()
    assert planted in remote.find(f"{bucket}/runs/d/version_0")  # S3 keeps the name as it is
    with (
        pytest.warns(UserWarning, match=r"1 object\(s\) under .* were not fetched .*lead outside"),
        RunWriter(url, flush_secs=0.2) as run,
    ):
        run.log_scalars({"loss": 2.0}, 1)
    assert not target.exists()
    assert not list(tmp_path.rglob("pwned.pth"))
    remote.rm_file(planted)
    acc = read(_download(url, tmp_path / "copy"))
    assert _steps(acc, "loss") == [0, 1]


def test_a_bucket_deleted_while_the_run_writes_is_an_error_naming_it(
    bucket: str, tmp_path: Path
) -> None:
    url = f"s3://{bucket}/runs/gone"
    run = RunWriter(url, flush_secs=0.2, upload_timeout=2)
    run.log_scalars({"loss": 0.0}, 0)
    run.flush()
    remote = fsspec.filesystem("s3")
    _until(lambda: any("tfevents" in p for p in remote.find(url)), 15, "the first upload")
    remote.rm(bucket, recursive=True)
    remote.invalidate_cache()
    logged = [0]
    with pytest.raises(
        RunWriterError,
        match=rf"The bucket '{bucket}' .* does not exist.*deleted meanwhile.*tbx-lightning upload",
    ):
        for step in range(1, 400):
            run.log_scalars({"loss": float(step)}, step)
            logged.append(step)
            run.flush()
            time.sleep(0.05)
    spool = run.spool_dir
    run.log_scalars({"loss": -1.0}, 1000)  # the run goes on in its spool
    run.close()
    assert spool is not None and _steps(read(spool), "loss") == [*logged, 1000]
    remote.mkdir(bucket)
    upload_spool(spool)
    assert _steps(read(_download(url, tmp_path / "copy")), "loss") == [*logged, 1000]
