from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.tbserver import TensorBoardServer


@pytest.fixture
def tensorboard() -> Iterator[Callable[[str | Path], TensorBoardServer]]:
    """Factory fixture: ``server = tensorboard(logdir)`` starts a real server; all stop at teardown."""
    servers: list[TensorBoardServer] = []

    def start(logdir: str | Path) -> TensorBoardServer:
        server = TensorBoardServer(logdir)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(autouse=True)
def _spool_in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Remote runs spool into the test's own folder, never the user's ~/.cache."""
    monkeypatch.setenv("TBX_LIGHTNING_SPOOL", str(tmp_path / "spool"))
