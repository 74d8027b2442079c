"""A real ``tensorboard --logdir`` server on 127.0.0.1 for tests.

Tests read what the package wrote through TensorBoard's own plugin routes, so a
run is proven readable by the program users open, not only by a file parser.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ALL_STATUSES = ("STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LoopbackProcess:
    """A server in a child process on a free 127.0.0.1 port; ``stop()`` ends it.

    Waits until ``ready_path`` answers over HTTP, and fails with the log's name when
    the process exits early or does not answer within ``timeout`` seconds.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        *,
        port: int,
        ready_path: str,
        log_dir: Path,
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(log_dir / f"{name}-{port}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited early, see {self._log.name}")
            try:
                urllib.request.urlopen(self.url + ready_path, timeout=5).read()
                return
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"{name} did not answer in time") from None
                time.sleep(0.25)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


class TensorBoardServer(LoopbackProcess):
    """Starts ``tensorboard`` on a free loopback port and stops it on ``stop()``."""

    def __init__(self, logdir: str | Path, *, timeout: float = 60.0) -> None:
        self.logdir = str(logdir)
        port = free_port()
        env = dict(os.environ)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        argv = [sys.executable, "-m", "tensorboard.main", "--logdir", self.logdir]
        argv += ["--host", "127.0.0.1", "--port", str(port)]
        argv += ["--load_fast", "false", "--reload_interval", "1"]
        super().__init__(
            "tensorboard",
            argv,
            port=port,
            ready_path="/data/runs",
            log_dir=Path(self.logdir).parent,
            env=env,
            timeout=timeout,
        )

    def get_bytes(self, route: str, params: dict[str, Any] | None = None) -> bytes:
        url = self.url + route
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=30) as resp:
            return bytes(resp.read())

    def get_json(self, route: str, params: dict[str, Any] | None = None) -> Any:
        return json.loads(self.get_bytes(route, params))

    def post_json(self, route: str, body: dict[str, Any]) -> Any:
        """POST a JSON body, as TensorBoard's hparams routes expect."""
        req = urllib.request.Request(self.url + route, data=json.dumps(body).encode())
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def hparams_experiment(self) -> Any:
        """The HParams plugin's experiment: hparam and metric columns of all runs."""
        return self.post_json("/data/plugin/hparams/experiment", {"experimentName": ""})

    def session_groups(
        self,
        *,
        col_params: list[dict[str, Any]] | None = None,
        statuses: tuple[str, ...] = ALL_STATUSES,
        slice_size: int = 100,
    ) -> list[Any]:
        """The HParams plugin's rows (session groups), with every status allowed by default."""
        body = {
            "experimentName": "",
            "allowedStatuses": list(statuses),
            "colParams": col_params or [],
            "startIndex": 0,
            "sliceSize": slice_size,
        }
        return list(self.post_json("/data/plugin/hparams/session_groups", body)["sessionGroups"])

    def wait_for_runs(self, expected: int, timeout: float = 60.0) -> list[str]:
        """Polls ``/data/runs`` until at least ``expected`` runs are loaded."""
        deadline = time.monotonic() + timeout
        runs: list[str] = []
        while time.monotonic() < deadline:
            runs = self.get_json("/data/runs")
            if len(runs) >= expected:
                # One more reload cycle so late tags of these runs are in too.
                time.sleep(1.5)
                return list(self.get_json("/data/runs"))
            time.sleep(0.5)
        raise TimeoutError(f"tensorboard loaded {runs}, expected {expected} runs")
