"""Alert notices to a webhook, against HTTP servers on 127.0.0.1 started by the tests.

Four servers: one that records what it is sent, one that answers 500, one that
accepts connections and never answers, and a port nothing listens on. What is checked
is what the servers received (exact bodies in both styles), the notifier's counts and
the log records it left; nothing here is timed.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from tbx_lightning._notify import ENV_VAR, WebhookNotifier, notifier_from_env
from tbx_lightning._secrets import MASK
from tbx_lightning.errors import ConfigError

pytestmark = pytest.mark.timeout(60)

EVENT = {
    "kind": "loss_spike",
    "run": "runs/quickstart/version_0",
    "step": 14,
    "where": "model",
    "value": 9.5,
    "threshold": 2.125,
    "message": "loss 9.5 at step 14 is above 2.125: check this batch",
    "time": 1_700_000_000.25,
}


class Recorder(ThreadingHTTPServer):
    """Answers every POST with ``status`` and keeps ``(path, headers, body)``."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.received: list[tuple[str, dict[str, str], Any]] = []
        self.arrived = threading.Semaphore(0)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                body = json.loads(self.rfile.read(length))
                server.received.append((self.path, dict(self.headers), body))
                self.send_response(server.status)
                self.end_headers()
                self.wfile.write(b"ok")
                server.arrived.release()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class Silent:
    """Accepts connections, reads nothing and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"
        self.accepted = threading.Semaphore(0)
        self.connections: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)
            self.accepted.release()

    def stop(self) -> None:
        self._stop = True
        self.sock.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.stop()


@pytest.fixture
def silent() -> Iterator[Silent]:
    server = Silent()
    yield server
    server.stop()


def _refused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def _records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "tbx_lightning.notify" and text in r.message]


def test_json_style_posts_the_events_fields(recorder: Recorder) -> None:
    notifier = WebhookNotifier(recorder.url + "/alerts", style="json")
    notifier.notify(EVENT)
    notifier.notify({"kind": "run_end", "run": "runs/quickstart/version_0", "message": "done"})
    notifier.close(timeout=20)
    assert (notifier.sent, notifier.failed, notifier.dropped) == (2, 0, 0)
    (path, headers, first), (_, _, second) = recorder.received
    assert path == "/alerts"
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"].startswith("tbx-lightning/")
    assert first == {
        "kind": "loss_spike",
        "run": "runs/quickstart/version_0",
        "step": 14,
        "where": "model",
        "value": 9.5,
        "threshold": 2.125,
        "message": "loss 9.5 at step 14 is above 2.125: check this batch",
        "time": "2023-11-14T22:13:20.250Z",
    }
    assert list(first) == list(EVENT)  # the documented field order
    assert second["kind"] == "run_end" and second["step"] is None and second["value"] is None
    assert second["time"].endswith("Z")


def test_slack_style_posts_one_text(recorder: Recorder) -> None:
    notifier = WebhookNotifier(recorder.url, style="slack")
    notifier.notify({**EVENT, "message": "loss <b> & more"})
    notifier.notify({"kind": "nonfinite_loss", "run": "r", "step": 3, "value": float("nan")})
    notifier.close(timeout=20)
    bodies = [body for _, _, body in recorder.received]
    assert bodies == [
        {
            "text": "tbx-lightning: *loss_spike* in `runs/quickstart/version_0` at step 14 "
            "(model): loss &lt;b&gt; &amp; more"
        },
        {"text": "tbx-lightning: *nonfinite_loss* in `r` at step 3: value nan"},
    ]


def test_auto_style_follows_the_host() -> None:
    assert WebhookNotifier("https://hooks.slack.com/services/T0/B0/abcdefgh").style == "slack"
    assert WebhookNotifier("https://example.org/hook").style == "json"


def test_secrets_are_masked_in_payload_and_messages(
    recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    url = recorder.url + "/services/T000/B000/XXXXsecrettoken"
    notifier = WebhookNotifier(url, style="json")
    assert notifier.shown_url == f"{recorder.url}/{MASK}"
    notifier.notify(
        {
            "kind": "loss_spike",
            "message": f"posting to {url} from s3://KEY:hunter22@bucket/runs",
            "where": "XXXXsecrettoken",
            "api_token": "abcd-1234-efgh",
        }
    )
    notifier.close(timeout=20)
    ((_, _, body),) = recorder.received
    text = json.dumps(body)
    assert "XXXXsecrettoken" not in text and "hunter22" not in text and "abcd-1234" not in text
    assert body["message"] == f"posting to {MASK} from s3://KEY:{MASK}@bucket/runs"
    assert body["where"] == MASK and body["api_token"] == MASK
    with pytest.raises(ConfigError, match=r"got '\*+'") as error:
        WebhookNotifier("hooks.slack.com/services/T000/B000/XXXXsecrettoken")
    assert "XXXXsecrettoken" not in str(error.value)


def test_a_server_that_never_answers_blocks_nothing_and_the_queue_is_bounded(
    silent: Silent, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tbx_lightning.notify")
    notifier = WebhookNotifier(silent.url, timeout=1.0, max_queue=4)
    notifier.notify(EVENT)
    assert silent.accepted.acquire(timeout=30)  # the first notice is in flight, unanswered
    for step in range(300):  # would hang here if notify waited for the server
        notifier.notify({**EVENT, "step": step})
    assert len(notifier._queue) == 4
    assert notifier.dropped == 296
    notifier.close(timeout=0.5)  # returns although the delivery thread is still waiting
    assert notifier._thread is not None
    notifier._thread.join(30)
    assert not notifier._thread.is_alive()
    assert (notifier.sent, notifier.failed, notifier.dropped) == (0, 1, 300)
    notifier.notify(EVENT)  # after close: dropped, not queued
    assert notifier.dropped == 301 and not notifier._queue
    assert len(_records(caplog, "could not deliver")) == 1
    assert len(_records(caplog, "were dropped")) == 1
    assert "/hook" not in caplog.text


@pytest.mark.parametrize(
    "kind", [pytest.param("refused", id="refused"), pytest.param("500", id="status-500")]
)
def test_an_unreachable_server_costs_one_warning(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tbx_lightning.notify")
    server = Recorder(status=500) if kind == "500" else None
    try:
        notifier = WebhookNotifier(server.url if server else _refused_url(), timeout=2.0)
        for step in range(5):
            notifier.notify({**EVENT, "step": step})
        notifier.close(timeout=30)  # at close, what is queued is tried without the pause
    finally:
        if server is not None:
            server.stop()
    assert (notifier.sent, notifier.failed, notifier.dropped) == (0, 5, 0)
    (record,) = _records(caplog, "could not deliver")
    expected = "HTTPError" if kind == "500" else "Connection refused"
    assert expected in record.message
    assert "alerts RUNS" in record.message
    if server is not None:
        assert len(server.received) == 5


def test_notify_never_raises() -> None:
    notifier = WebhookNotifier("http://127.0.0.1:9/hook")
    notifier.notify(42)  # type: ignore[arg-type]
    assert notifier.dropped == 1
    notifier.close(timeout=1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"url": "ftp://host/x"}, r"http:// or https:// URL", id="scheme"),
        pytest.param({"style": "teams"}, r"`style` to be one of", id="style"),
        pytest.param({"timeout": 0}, r"`timeout` > 0", id="timeout"),
        pytest.param({"max_queue": 0}, r"`max_queue` to be an int >= 1", id="queue"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, Any], message: str) -> None:
    url = options.pop("url", "http://127.0.0.1:9/hook")
    with pytest.raises(ConfigError, match=message):
        WebhookNotifier(url, **options)


def test_notifier_from_env(recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert notifier_from_env() is None
    monkeypatch.setenv(ENV_VAR, "  ")
    assert notifier_from_env() is None
    monkeypatch.setenv(ENV_VAR, recorder.url + "/from-env")
    notifier = notifier_from_env()
    assert notifier is not None and notifier.style == "json"
    notifier.notify(EVENT)
    notifier.close(timeout=20)
    assert [path for path, _, _ in recorder.received] == ["/from-env"]
    monkeypatch.setenv(ENV_VAR, "not a url")
    with pytest.raises(ConfigError, match=ENV_VAR):
        notifier_from_env()


# ---------------------------------------------------------------------- from the monitors
def _sick_fit(tmp_path: Path, **monitor: Any) -> Any:
    from tbx_lightning import TrainingMonitor
    from tests.test_alerts import fit

    callback = TrainingMonitor(**monitor)
    fit(tmp_path, callback)
    return callback


def test_the_lightning_monitor_sends_each_new_alert_and_the_run_end(
    recorder: Recorder, tmp_path: Path
) -> None:
    callback = _sick_fit(
        tmp_path, alert_webhook=recorder.url + "/hook", webhook_events=["alerts", "end"]
    )
    kinds = [body["kind"] for _, _, body in recorder.received]
    found = {a.kind for a in callback.monitor.alerts}
    # One notice per new alert (kind and place), then the end; repeats are not sent.
    assert sorted(k for k in kinds if k != "run_end") == sorted(
        a.kind for a in callback.monitor.alerts
    )
    assert {"loss_spike", "nonfinite_loss", "nonfinite_grads"} <= found
    assert kinds[-1] == "run_end"
    spike = next(body for _, _, body in recorder.received if body["kind"] == "loss_spike")
    assert spike["step"] == 40 and spike["where"] == "model"
    assert spike["run"].endswith("version_0")
    end = recorder.received[-1][2]
    assert end["where"] == "success"


def test_the_environment_names_the_webhook_of_a_plain_loop(
    recorder: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch import nn

    from tbx_lightning.monitor import ModelMonitor
    from tbx_lightning.run import Run

    monkeypatch.setenv(ENV_VAR, recorder.url + "/env")
    run = Run(lambda: str(tmp_path), owner="test")
    model = nn.Linear(4, 1)
    monitor = ModelMonitor(model, run, norm_every_n_steps=1)
    loss = model(torch.randn(2, 4)).sum() * float("nan")
    loss.backward()
    monitor.after_backward(0, loss=loss)
    monitor.log_throughput(0, samples=2)
    monitor.detach()
    run.finish("success")
    run.release()  # the notifier was closed at the finish: what was queued is sent
    paths = {path for path, _, _ in recorder.received}
    assert paths == {"/env"}
    assert {body["kind"] for _, _, body in recorder.received} >= {"nonfinite_grads"}


def test_a_webhook_that_never_answers_does_not_hold_training_back(
    silent: Silent, tmp_path: Path
) -> None:
    from tests.rows import session

    callback = _sick_fit(tmp_path, alert_webhook=silent.url, webhook_events=["alerts", "end"])
    assert callback.monitor.alerts  # the alerts are in the run all the same
    assert session(tmp_path / "sick" / "version_0")[1] == "STATUS_SUCCESS"


def test_a_stall_is_sent_once_and_again_after_logging_resumed(
    recorder: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tbx_lightning import _notify
    from tbx_lightning.run import Run

    monkeypatch.setattr(_notify, "STALL_MIN_SECONDS", 0.4)
    run = Run(lambda: str(tmp_path), owner="test")
    run.use_webhook(recorder.url + "/hook", ["stall"])
    for step in range(3):
        run.log({"train/loss": 1.0}, step=step)
    assert recorder.arrived.acquire(timeout=20)  # silence: one stall notice
    time.sleep(1.0)
    assert [body["kind"] for _, _, body in recorder.received] == ["stall"]
    stall = recorder.received[0][2]
    assert stall["step"] == 2 and stall["threshold"] >= 0.4
    run.log({"train/loss": 1.0}, step=3)  # it goes on: a later silence is a new stall
    assert recorder.arrived.acquire(timeout=20)
    run.finish("success")
    run.release()
    assert [body["kind"] for _, _, body in recorder.received] == ["stall", "stall"]


def test_the_stall_watch_rests_while_the_run_is_released_and_comes_back_with_it(
    recorder: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a fit releases the writer, an idle process is no stall; a second fit in the
    # same run (trainer.test, a resumed fit) is watched again.
    from tbx_lightning import _notify
    from tbx_lightning.run import Run

    monkeypatch.setattr(_notify, "STALL_MIN_SECONDS", 0.4)
    run = Run(lambda: str(tmp_path), owner="test")
    run.use_webhook(recorder.url + "/hook", ["stall"])
    run.log({"train/loss": 1.0}, step=0)
    run.release()
    assert not recorder.arrived.acquire(timeout=2.0)  # released: no notice
    run.log({"test/loss": 1.0}, step=1)  # reopens the writer
    assert recorder.arrived.acquire(timeout=20)
    assert [body["kind"] for _, _, body in recorder.received] == ["stall"]
    run.finish("success")
    run.release()
