"""A real S3 API on 127.0.0.1 for tests: moto's server mode in a child process.

Clients reach it the way users reach their own S3-compatible stores: an endpoint URL
and credentials given through fsspec's configuration (``fsspec.config.conf``) and the
usual AWS environment variables. Nothing leaves the machine.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from tests.tbserver import LoopbackProcess, free_port

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


class S3Server(LoopbackProcess):
    """Starts ``moto.server`` on a free loopback port; ``stop()`` ends it."""

    def __init__(self, log_dir: str | Path, *, timeout: float = 30.0) -> None:
        port = free_port()
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        super().__init__(
            "moto",
            argv,
            port=port,
            ready_path="/moto-api/",
            log_dir=Path(log_dir),
            env=dict(os.environ, **CREDENTIALS),
            timeout=timeout,
        )
        self.endpoint = self.url

    def reset(self) -> None:
        """Deletes every bucket and object (moto's reset route)."""
        request = urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST")
        urllib.request.urlopen(request, timeout=10).read()
