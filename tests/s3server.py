"""A real S3 API on 127.0.0.1 for tests: moto's server mode in a child process.

Clients reach it the way users reach their own S3-compatible stores: an endpoint URL
and credentials given through fsspec's configuration (``fsspec.config.conf``) and the
usual AWS environment variables. Nothing leaves the machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.tbserver import free_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server:
    """Starts ``moto.server`` on a free loopback port; ``stop()`` ends it."""

    def __init__(self, log_dir: str | Path, *, timeout: float = 30.0) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = open(Path(log_dir) / f"moto-{self.port}.log", "w")  # noqa: SIM115
        env = dict(os.environ, **CREDENTIALS)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited early, see {self._log.name}")
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError("moto server did not answer in time") from None
                time.sleep(0.2)

    def reset(self) -> None:
        """Deletes every bucket and object (moto's reset route)."""
        request = urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
