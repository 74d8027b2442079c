"""Alert notices to a webhook: Slack-compatible or plain JSON, from one background thread.

A training loop must never wait on, or fail because of, somebody's chat server. So
:meth:`WebhookNotifier.notify` only copies the event into a bounded in-memory queue
and returns: no lock, no I/O, no exception. One daemon thread per notifier takes the
events out and POSTs each one with bounded connect and read timeouts (``urllib``).

- A full queue drops the *new* notice and counts it; the first drop is reported once.
  Only notices are ever dropped: the alerts themselves are in the run (its ``alerts``
  Text entry and ``vitals/alerts``), where ``tbx-lightning alerts RUNS`` lists them.
- A server that refuses, fails or does not answer in ``timeout`` seconds costs one
  warning for the notifier's life, not one per notice; later notices are still tried,
  after a pause that doubles with each failure in a row (up to 30 s), so a server
  that comes back receives what is queued.
- Secrets are masked: the webhook URL (its path and query are the credential of a
  Slack or Teams webhook) is shown as ``https://hooks.slack.com/********`` in
  messages, and every text of a payload has the URL, its token and the password part
  of any ``scheme://user:password@host`` masked, as the run's config is
  (``tbx_lightning._secrets``); a field whose name names a credential is masked whole.
- Warnings go to the ``tbx_lightning.notify`` logger (the thread that delivers them
  is not the caller's, so a warnings filter set to ``error`` cannot turn them into an
  exception in training).

:func:`notifier_from_env` builds one from ``TBX_LIGHTNING_ALERT_WEBHOOK``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Mapping
from typing import Any

from tbx_lightning._secrets import MASK, Masker
from tbx_lightning._version import __version__
from tbx_lightning.errors import ConfigError

__all__ = [
    "ENV_VAR",
    "FIELDS",
    "STALL_MIN_SECONDS",
    "STYLES",
    "RunNotices",
    "WebhookNotifier",
    "alert_fields",
    "notifier_from_env",
]

ENV_VAR = "TBX_LIGHTNING_ALERT_WEBHOOK"
"""The environment variable :func:`notifier_from_env` reads the webhook URL from."""
STYLES = ("auto", "slack", "json")
"""Payload styles: ``slack`` (``{"text": ...}``), ``json`` (the event's fields), ``auto``."""
FIELDS = ("kind", "run", "step", "where", "value", "threshold", "message", "time")
"""The fields of a notice, in the order the ``json`` style writes them."""

_log = logging.getLogger("tbx_lightning.notify")
_MAX_PAUSE = 30.0  # the longest pause between attempts after failures in a row
_SLACK_HOSTS = ("hooks.slack.com",)


def _shown_url(url: str) -> str:
    """The URL without its credentials: scheme and host, the rest masked."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    rest = parts.path.strip("/") or parts.query
    return f"{parts.scheme}://{host}/{MASK if rest else ''}"


def _url_secrets(url: str) -> set[str]:
    """The texts of the URL that are credentials: the URL, its path and query, each part."""
    parts = urllib.parse.urlsplit(url)
    found = {url, parts.path, parts.query, parts.password or ""}
    found.update(p for p in parts.path.split("/") if len(p) >= 8)
    found.update(v for _, v in urllib.parse.parse_qsl(parts.query) if v)
    return {s for s in found if s and s != "/"}


def _iso(seconds: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        + f".{int(seconds * 1000) % 1000:03d}Z"
    )


def _plain(value: Any) -> Any:
    """A JSON value: non-finite numbers as ``"nan"``/``"inf"``/``"-inf"``, other objects as text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    try:
        return _plain(float(value))  # numpy scalars, one-element tensors
    except (TypeError, ValueError):
        return str(value)


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class WebhookNotifier:
    """Sends alert notices to a webhook without ever blocking or failing the caller.

    Args:
        url: The webhook, ``http://`` or ``https://`` (a Slack incoming webhook, or any
            endpoint that takes a JSON POST).
        style: ``slack`` posts ``{"text": "..."}`` (Slack, Mattermost, Rocket.Chat and
            others that take Slack's form); ``json`` posts the event's fields
            (:data:`FIELDS`, then any others); ``auto`` picks ``slack`` for
            ``hooks.slack.com`` and ``json`` for any other host.
        timeout: Seconds to wait for a connection, and for each read of the answer.
        max_queue: Notices kept while waiting for delivery; more are dropped and counted.

    Raises:
        ConfigError: a URL that is not http(s), an unknown style, ``timeout`` <= 0 or
            ``max_queue`` < 1; the message shows the URL masked.

    Example:
        >>> notifier = WebhookNotifier("https://hooks.slack.com/services/T0/B0/abcdefgh")
        >>> notifier.style, notifier.shown_url
        ('slack', 'https://hooks.slack.com/********')
        >>> notifier.payload({"kind": "loss_spike", "run": "runs/a/version_0", "step": 14,
        ...                   "message": "loss 9.5 at step 14 is above 2.1"})
        {'text': 'tbx-lightning: *loss_spike* in `runs/a/version_0` at step 14: loss 9.5 at step 14 is above 2.1'}
        >>> notifier.close(timeout=1.0)
    """

    def __init__(
        self,
        url: str,
        *,
        style: str = "auto",
        timeout: float = 5.0,
        max_queue: int = 256,
    ) -> None:
        url = str(url).strip()
        parts = urllib.parse.urlsplit(url)
        self.shown_url = _shown_url(url) if parts.scheme else MASK
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"Expected an http:// or https:// URL for the alert webhook, got "
                f"{self.shown_url!r}: set {ENV_VAR} (or alert_webhook=) to the webhook's URL."
            )
        if style not in STYLES:
            raise ConfigError(f"Expected `style` to be one of {STYLES}, got {style!r}.")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ConfigError(f"Expected `timeout` > 0 seconds, got {timeout!r}.")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ConfigError(f"Expected `max_queue` to be an int >= 1, got {max_queue!r}.")
        if style == "auto":
            style = "slack" if parts.hostname in _SLACK_HOSTS else "json"
        self.style = style
        self.timeout = float(timeout)
        self.max_queue = max_queue
        self._url = url
        self._masker = Masker(_url_secrets(url))
        self._pid = os.getpid()
        self._queue: deque[dict[str, Any]] = deque()
        self._wake = threading.Event()  # set by notify() and close(): the queue changed
        self._thread: threading.Thread | None = None
        self._closed = False
        self._deadline: float | None = None
        self._warned_unreachable = False
        self._warned_dropped = False
        self.sent = 0
        """Notices the webhook accepted (a 2xx answer)."""
        self.failed = 0
        """Notices tried and not accepted (refused, an error status, no answer in time)."""
        self.dropped = 0
        """Notices never tried: the queue was full, or the notifier closed before them."""

    # ------------------------------------------------------------------ the caller's side
    def notify(self, event: Mapping[str, Any]) -> None:
        """Queues one notice and returns at once; never raises, never waits.

        Args:
            event: :data:`FIELDS` (``kind``, ``run``, ``step``, ``where``, ``value``,
                ``threshold``, ``message``, ``time`` in seconds since the epoch; missing
                ones are null, ``time`` defaults to now), and any others to pass on.
        """
        try:
            if os.getpid() != self._pid:
                self._after_fork()
            if self._closed or len(self._queue) >= self.max_queue:
                self.dropped += 1
                return
            item = dict(event)
            item.setdefault("time", time.time())
            self._queue.append(item)
            self._wake.set()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._deliver_all, name="tbx-alert-webhook", daemon=True
                )
                self._thread.start()
        except Exception:  # a notice is never worth an error in training
            self.dropped += 1

    def close(self, timeout: float = 5.0) -> None:
        """Delivers what is queued for at most ``timeout`` seconds, then stops the thread.

        Notices still queued then are dropped (and counted); later :meth:`notify` calls
        are dropped too. Safe to call more than once.

        Args:
            timeout: The most seconds to wait for the delivery thread.
        """
        if self._closed:
            return
        self._closed = True
        self._deadline = time.monotonic() + max(0.0, float(timeout))
        self._wake.set()
        thread = self._thread
        if thread is not None and os.getpid() == self._pid:
            thread.join(max(0.0, float(timeout)) + 0.1)

    def _after_fork(self) -> None:
        """A forked child starts empty: the parent's thread and queue stay the parent's."""
        self._pid = os.getpid()
        self._queue = deque()
        self._wake = threading.Event()
        self._thread = None
        self.sent = self.failed = self.dropped = 0

    # ------------------------------------------------------------------ payloads
    def payload(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """The JSON body posted for ``event`` in this notifier's style, secrets masked.

        Args:
            event: A notice, as :meth:`notify` takes it.
        """
        fields: dict[str, Any] = {name: event.get(name) for name in FIELDS}
        fields.update((str(k), v) for k, v in event.items() if k not in fields)
        when = fields.get("time")
        if isinstance(when, int | float) and not isinstance(when, bool):
            fields["time"] = _iso(float(when))
        masked = self._masker.container(_plain(fields), "")
        if self.style == "json":
            return dict(masked)
        return {"text": self._masker.text(self._slack_text(masked))}

    @staticmethod
    def _slack_text(fields: Mapping[str, Any]) -> str:
        kind = _slack_escape(str(fields.get("kind") or "notice"))
        parts = [f"tbx-lightning: *{kind}*"]
        if fields.get("run"):
            parts.append(f"in `{_slack_escape(str(fields['run']))}`")
        if fields.get("step") is not None:
            parts.append(f"at step {fields['step']}")
        where = fields.get("where")
        head = " ".join(parts) + (f" ({_slack_escape(str(where))})" if where else "")
        message = fields.get("message")
        if message:
            return f"{head}: {_slack_escape(str(message))}"
        value, threshold = fields.get("value"), fields.get("threshold")
        if value is not None:
            head += f": value {value}" + (
                f", threshold {threshold}" if threshold is not None else ""
            )
        return head

    # ------------------------------------------------------------------ the delivery thread
    def _deliver_all(self) -> None:
        pause_until = 0.0
        failures = 0
        while True:
            if self._closed and self._deadline is not None and time.monotonic() >= self._deadline:
                self._drop_rest()
                return
            if not self._queue:
                if self._closed:
                    return
                self._wake.wait()  # until a notice or close(); cleared, then looked at
                self._wake.clear()
                continue
            wait = pause_until - time.monotonic()
            if not self._closed and wait > 0:
                self._wake.wait(wait)  # a close() ends the pause early
                self._wake.clear()
                continue
            event = self._queue.popleft()
            if self._send(event):
                failures = 0
            else:
                failures += 1
                pause_until = time.monotonic() + min(_MAX_PAUSE, 2.0 ** (failures - 1))
            if self.dropped and not self._warned_dropped:
                self._warn_dropped()

    def _drop_rest(self) -> None:
        left = len(self._queue)
        self._queue.clear()
        if left:
            self.dropped += left
            if not self._warned_dropped:
                self._warn_dropped()

    def _warn_dropped(self) -> None:
        self._warned_dropped = True
        _log.warning(
            "tbx_lightning: %d alert notice(s) for %s were dropped (more than %d waiting for "
            "delivery, or still waiting at close); further drops are not reported. The alerts "
            "themselves are in the runs: `tbx-lightning alerts RUNS` lists them.",
            self.dropped,
            self.shown_url,
            self.max_queue,
        )

    def _request_timeout(self) -> float:
        if self._deadline is None:
            return self.timeout
        return max(0.05, min(self.timeout, self._deadline - time.monotonic()))

    def _send(self, event: Mapping[str, Any]) -> bool:
        try:
            body = json.dumps(self.payload(event), allow_nan=False).encode("utf-8")
            request = urllib.request.Request(
                self._url,
                data=body,
                method="POST",
                headers={
                    "Content-Type": "application/json",
                    "User-Agent": f"tbx-lightning/{__version__}",
                },
            )
            with (
                urllib.request.urlopen(request, timeout=self._request_timeout()) as answer,
                contextlib.suppress(Exception),
            ):
                answer.read(65536)
            self.sent += 1
            return True
        except Exception as error:  # refused, an error status, a timeout, a bad payload
            self.failed += 1
            if not self._warned_unreachable:
                self._warned_unreachable = True
                reason = self._masker.text(f"{type(error).__name__}: {error}")
                _log.warning(
                    "tbx_lightning: could not deliver an alert notice to %s (%s); later "
                    "failures are not reported. Training goes on, and the alerts are in the "
                    "runs: `tbx-lightning alerts RUNS` lists them.",
                    self.shown_url,
                    reason,
                )
            return False


def alert_fields(alert: Any) -> dict[str, Any]:
    """The fields of an alert's notice, beside its ``kind`` and ``run``."""
    return {
        "step": alert.step,
        "where": alert.where or "model",
        "value": alert.value,
        "threshold": alert.threshold,
        "message": alert.message,
    }


def notifier_from_env(environ: Mapping[str, str] | None = None) -> WebhookNotifier | None:
    """A :class:`WebhookNotifier` for ``$TBX_LIGHTNING_ALERT_WEBHOOK``, or None when unset or empty.

    Args:
        environ: Where to read the variable (default: ``os.environ``).

    Raises:
        ConfigError: the variable holds something that is not an http(s) URL.

    Example:
        >>> notifier_from_env({}) is None
        True
        >>> notifier_from_env({ENV_VAR: "http://127.0.0.1:9/hook"}).style
        'json'
    """
    url = (os.environ if environ is None else environ).get(ENV_VAR, "").strip()
    return WebhookNotifier(url) if url else None


# The least silence that counts as a stall for the ``stall`` notice, in seconds; the
# limit is 10x the run's longest gap between logging calls when that is longer.
STALL_MIN_SECONDS = 120.0


class RunNotices:
    """The notices of one run: new alerts, and on request its end and its stalls.

    A run (:class:`tbx_lightning.run.Run`) holds one; monitors turn it on through the
    run's ``use_webhook``. ``stall`` runs a daemon thread that wakes every few seconds
    and sends one notice per silence: nothing logged for longer than
    ``max(STALL_MIN_SECONDS, 10 x`` the longest gap between logging calls so far``)``
    (a stall's own gap never sets the pace). It stops at the run's end and while the
    run's writer is released (an idle process after a fit is no stall), and starts
    again when the run reopens its writer.

    Args:
        where: Returns the run's directory, for the notices' ``run`` field.
        step: Returns the run's latest step.
    """

    def __init__(self, where: Any, step: Any) -> None:
        self._where = where
        self._step = step
        self._lock = threading.Lock()
        self._notifier: WebhookNotifier | None = None
        self._events: frozenset[str] = frozenset()
        self._last = time.monotonic()
        self._longest_gap = 0.0
        self._watch: threading.Event | None = None

    def use(self, url: str, events: Any = ("alerts",)) -> None:
        """Starts sending ``events`` (``alerts``, ``end``, ``stall``) to ``url``."""
        with self._lock:
            if self._notifier is None:
                self._notifier = WebhookNotifier(url)
                atexit.register(self._notifier.close, 2.0)
            self._events = frozenset(events) | self._events
        self.watch()

    def watch(self) -> None:
        """Watches for a stall, if ``stall`` was asked for (again after :meth:`pause`)."""
        with self._lock:
            if "stall" in self._events and self._watch is None:
                self._last = time.monotonic()  # the silence counts from now
                self._watch = threading.Event()
                threading.Thread(
                    target=self._watch_for_stall,
                    args=(self._watch,),
                    name="tbx-stall-watch",
                    daemon=True,
                ).start()

    def send(self, kind: str, **fields: Any) -> None:
        """Sends one notice (``kind`` plus :data:`FIELDS`), if a webhook is set."""
        notifier = self._notifier
        if notifier is not None:
            notifier.notify({"kind": kind, "run": self._where(), **fields})

    def alert(self, alert: Any) -> None:
        """Sends a new alert, when alerts were asked for."""
        if "alerts" in self._events:
            self.send(alert.kind, **alert_fields(alert))

    def touch(self) -> None:
        """Something was logged now."""
        now = time.monotonic()
        gap = now - self._last
        if gap <= max(STALL_MIN_SECONDS, 10 * self._longest_gap):  # a stall sets no pace
            self._longest_gap = max(self._longest_gap, gap)
        self._last = now

    def pause(self) -> None:
        """Stops watching for a stall until :meth:`watch` starts again."""
        with self._lock:
            watch, self._watch = self._watch, None
        if watch is not None:
            watch.set()

    def end(self, status: str, note: str | None) -> None:
        """The end notice, if asked for; then delivers what is queued (at most 5 s) and stops."""
        self.pause()
        with self._lock:
            notifier, self._notifier = self._notifier, None
            events, self._events = self._events, frozenset()
        if notifier is None:
            return
        if "end" in events:
            notifier.notify(
                {
                    "kind": "run_end",
                    "run": self._where(),
                    "step": self._step(),
                    "where": status,
                    "message": note or f"run ended: {status}",
                }
            )
        notifier.close(timeout=5.0)

    def _watch_for_stall(self, stop: threading.Event) -> None:
        said = False
        while not stop.wait(min(5.0, STALL_MIN_SECONDS / 4)):
            idle = time.monotonic() - self._last
            limit = max(STALL_MIN_SECONDS, 10 * self._longest_gap)
            if idle <= limit:
                said = False
            elif not said:
                said = True
                self.send(
                    "stall",
                    step=self._step(),
                    value=round(idle, 1),
                    threshold=round(limit, 1),
                    message=f"nothing logged for {idle:.0f} s, over {limit:.0f} s (10x the "
                    "run's longest gap so far, at least "
                    f"{STALL_MIN_SECONDS:.0f} s): is training hung?",
                )
