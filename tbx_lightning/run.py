"""The run both integrations share: value and step rules, writer options, features.

``TBXLogger`` (Lightning) and ``TBXTracker`` (Accelerate) are thin adapters of
their host's lifecycle around one :class:`Run`. Every rule a user meets when
logging is written here once, so the two integrations cannot drift:

- **Values**: numbers (int, float, bool, NumPy numbers, one-element tensors and
  arrays) become scalars, strings become text entries, dicts of any depth become
  ``a/b/c`` tags. Two values landing on one tag (``{"val": {"acc": 1},
  "val/acc": 2}``) are an error naming the tag, never a silent choice. NaN and
  Inf are written as they are.
- **Steps**: an ``int`` (or NumPy integer, or one-element integer tensor); any
  other type (``1.5``, ``"7"``, ``True``) is a :class:`LoggedTypeError` naming the
  value. Without a step, scalars and text logged with ``log``/``log_metrics`` go
  one step past the highest step logged so far (0 first), so repeated calls draw
  a curve; every other call (hyperparameter metrics, text, images, histograms,
  embeddings, graphs) goes to the highest step logged so far (0 first), next to
  the scalars it belongs to.
- **Writer options**: the keyword-only options of :class:`~tbx_lightning.RunWriter`
  (``flush_secs``, ``max_queue``, ``max_queue_bytes``, ``segment_bytes``,
  ``purge_step``, ``filename_suffix``, ``upload_timeout``), checked once when the
  integration is built, by the same rules ``RunWriter`` applies
  (:mod:`tbx_lightning._rules`).
- **Graphs**: a graph that cannot be exported warns and training goes on; with
  ``strict_graph=True`` it raises :class:`GraphExportError`.
- **Statuses**: any string. Known ones map to TensorBoard's statuses; any other is
  recorded as ``STATUS_UNKNOWN`` and kept as given in a text entry ``run/status``.
  The HParams row shows it in the ``run.status`` column, with ``run.duration_s``.
- **Dashboards**: the HParams row leaves out config plumbing (``hparams_exclude``,
  see :data:`~tbx_lightning.hparams.DEFAULT_HPARAMS_EXCLUDE`); the resolved config
  is a ``run/config`` text entry; a Custom Scalars layout (train and val curves of
  each metric on one chart, see :mod:`tbx_lightning._layout`) is rewritten when a
  new tag name changes it, checked with one integer comparison per ``log`` call.
- **Threads**: every method may be called from several threads at once; opening
  the writer and each call's step are decided under one lock.

Example:
    >>> import tempfile
    >>> from tbx_lightning.run import Run
    >>> run = Run(lambda: tempfile.mkdtemp(), owner="example")
    >>> run.log({"train": {"loss": 0.5}, "note": "warm-up"})
    0
    >>> run.log({"train": {"loss": 0.4}})
    1
    >>> run.finish("success")
    'success'
    >>> _ = run.release()
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from tbx_lightning._images import image_batch
from tbx_lightning._layout import LayoutBuilder
from tbx_lightning._notify import RunNotices
from tbx_lightning._rules import check_step, flatten_values
from tbx_lightning._signals import CallLock
from tbx_lightning._writer import RunWriter
from tbx_lightning.errors import (
    GraphExportError,
    LoggedTypeError,
    LoggedValueError,
    TBXError,
)
from tbx_lightning.hparams import RunHParams, check_hparams_exclude, status_key

if TYPE_CHECKING:
    from tbx_lightning.graph import GraphExport
    from tbx_lightning.projector import EmbeddingRecord

__all__ = ["STATUS_TEXT_TAG", "Run", "RunSink"]

STATUS_TEXT_TAG = "run/status"


# ---------------------------------------------------------------------- the run
class Run:
    """One TensorBoard run as both integrations see it: rules, options, features, lock.

    The writer opens on first use, in the directory ``log_dir()`` returns then
    (so an integration decides where the run lives, e.g. from properties a
    subclass may override). :meth:`release` closes it (its thread and event file
    end); a later call reopens the same run in a new event file, and the run's
    HParams row and status are updated in place.

    Args:
        log_dir: Called once per opening, returns the run directory (path or URL).
        writer_options: Options for :class:`~tbx_lightning.RunWriter`, checked with
            :func:`check_writer_options` by the caller. ``purge_step`` applies to the
            first opening only.
        mask_secrets: Mask config keys that look like credentials.
        hparams_exclude: fnmatch patterns of config keys left out of the HParams row
            (they stay in ``config.yaml`` and ``run/config``): None for
            :data:`~tbx_lightning.hparams.DEFAULT_HPARAMS_EXCLUDE`, ``[]`` for every key.
        strict_graph: Raise :class:`GraphExportError` when a graph cannot be
            exported, instead of warning.
        graph_options: Defaults for the graph exporter (``max_depth``, ...).
        owner: The integration's name, for messages.
        open_writer: Builds the writer from ``(log_dir, purge_step)``, for an
            integration that keeps its own copy of the options; by default
            ``RunWriter(log_dir, **writer_options)``.

    Example:
        >>> import tempfile
        >>> run = Run(lambda: tempfile.mkdtemp(), owner="example")
        >>> run.log({"loss": 1.0}, step=3)
        3
        >>> run.log_text({"note": "hello"})
        3
        >>> _ = run.release()
    """

    def __init__(
        self,
        log_dir: Callable[[], str],
        *,
        writer_options: Mapping[str, Any] | None = None,
        mask_secrets: bool = True,
        hparams_exclude: Sequence[str] | None = None,
        strict_graph: bool = False,
        graph_options: Mapping[str, Any] | None = None,
        owner: str = "run",
        open_writer: Callable[[str, int | None], RunWriter] | None = None,
    ) -> None:
        self._log_dir = log_dir
        self._open_writer = open_writer
        self.writer_options = dict(writer_options or {})
        self.mask_secrets = mask_secrets
        self.hparams_exclude = check_hparams_exclude(
            hparams_exclude, where=f"hparams_exclude of {owner}"
        )
        self.strict_graph = strict_graph
        self.graph_options = dict(graph_options or {})
        self.owner = owner
        # Re-entrant, and it knows when this thread is inside a call: a signal handler may
        # finish the run in the middle of one (see tbx_lightning._signals).
        self.lock = CallLock()
        self._writer: RunWriter | None = None
        self._unclosed: RunWriter | None = None  # released, but its close failed
        self._hparams: RunHParams | None = None
        self._step: int | None = None
        self._started: float | None = None
        self._layout = LayoutBuilder()
        self._layout_tags = 0
        # Why training ended early, when an alert ended it: (kind, step, message, action).
        self.alert_stop: tuple[str, int, str, str] | None = None
        self._sink: RunSink | None = None
        # Tags also written against tokens or samples seen: axis -> patterns, and the
        # counts the monitor reported per step.
        self._mirrors: dict[str, re.Pattern[str]] = {}
        self._counts: dict[str, dict[int, float]] = {}
        self._mirror_pending: dict[int, dict[str, dict[str, Any]]] = {}  # step -> axis -> values
        # Webhook delivery (use_webhook): alerts, and the run's end and stalls on request.
        self.notices = RunNotices(self._where, lambda: self._step)

    # ------------------------------------------------------------------ writer
    @property
    def is_open(self) -> bool:
        """True while a writer is open (between the first call and :meth:`release`)."""
        return self._writer is not None

    @property
    def current_writer(self) -> RunWriter | None:
        """The open writer, or None; never opens one."""
        return self._writer

    @property
    def writer(self) -> RunWriter:
        """The run's :class:`~tbx_lightning.RunWriter`, opened on first use."""
        writer = self._writer
        if writer is not None:
            return writer
        with self.lock:
            if self._writer is None:
                options = dict(self.writer_options)
                if self._open_writer is not None:
                    self._writer = self._open_writer(self._log_dir(), options.get("purge_step"))
                else:
                    self._writer = RunWriter(self._log_dir(), **options)
                if self._started is None:
                    self._started = time.time()
                self._hparams = RunHParams(
                    self._writer,
                    mask_secrets=self.mask_secrets,
                    hparams_exclude=self.hparams_exclude,
                    start_time=self._started,
                )
                # A new writer (a reopened or resumed run) writes the layout again.
                self._layout = LayoutBuilder()
                self._layout_tags = 0
                # A purge hides what an earlier process wrote past it: once per resume only.
                self.writer_options.pop("purge_step", None)
                self.notices.watch()  # stopped while the writer was released
            return self._writer

    @property
    def hparams(self) -> RunHParams:
        """The run's :class:`~tbx_lightning.hparams.RunHParams` (opens the writer)."""
        with self.lock:
            _ = self.writer
            assert self._hparams is not None  # created with the writer
            return self._hparams

    def release(self) -> RunWriter | None:
        """Closes the writer (thread and event file); returns it. Logging later reopens the run.

        A close that fails keeps the writer's pending data: :meth:`flush` (or the next
        writer of the run) retries it.
        """
        with self.lock:
            writer, self._writer, self._hparams = self._writer, None, None
            self.notices.pause()  # an idle process after a fit is no stall
        if writer is not None:
            try:
                writer.close()
            except BaseException:
                self._unclosed = writer
                raise
        return writer

    def release_later(self) -> None:
        """Releases the writer once the call this thread is inside returns; flushes it now.

        For a signal handler that interrupted a call of this run: closing the writer
        under that call would fail it when it resumes.
        """
        writer = self._writer
        if writer is not None:
            writer.flush()
        self.lock.defer(self.release)

    def reopen(self, *, purge_step: int | None = None) -> None:
        """Closes the writer; the next call opens a new one, with ``purge_step`` if given."""
        with self.lock:
            self.release()
            if purge_step is not None:
                self.writer_options["purge_step"] = check_step(purge_step, name="purge_step")
            self._step = None

    def flush(self) -> None:
        """Writes everything logged so far to storage (nothing happens when no writer is open)."""
        writer = self._writer
        if writer is None and self._unclosed is not None:
            self._unclosed.flush()  # retries its close: the last events and the status
            self._unclosed = None
        if writer is not None:
            writer.flush()
            with self.lock:
                if writer is self._writer:
                    self._update_layout(writer)

    def _update_layout(self, writer: RunWriter) -> None:
        """Writes the Custom Scalars layout again when the run has a new scalar tag (call locked).

        The writer thread counts the run's tags as it encodes them (scalars logged
        straight to the writer, as the training monitor does, included), so the
        check costs one integer comparison; the layout itself is rebuilt only when
        the count changed, and written only when its charts changed.
        """
        summary = writer._summary
        count = summary.tag_count
        if count == self._layout_tags:
            return
        self._layout_tags = count
        event = self._layout.update(summary.tag_names(), self._step or 0)
        if event is not None:
            writer.write_record(event)

    # ------------------------------------------------------------------ steps
    def step_for(self, step: Any, *, advance: bool) -> int:
        """``step`` checked, or for None the next step (``advance``) or the latest one."""
        if step is not None:
            return check_step(step)
        if self._step is None:
            return 0
        return self._step + 1 if advance else self._step

    def seen(self, step: int) -> None:
        """Records that something was logged at ``step``."""
        self._step = step if self._step is None else max(self._step, step)

    # ------------------------------------------------------------------ monitors
    @property
    def monitor_sink(self) -> RunSink:
        """What a training monitor writes into: follows this run's writer across reopenings."""
        with self.lock:
            if self._sink is None:
                self._sink = RunSink(self)
            return self._sink

    def mirror_by(self, axis: str, patterns: Sequence[str]) -> None:
        """Also writes scalar tags matching ``patterns`` as ``by_<axis>/<tag>`` against the
        count of ``axis`` (``tokens`` or ``samples``) seen at their step."""
        if not patterns:
            return
        regex = "|".join(fnmatch.translate(p) for p in patterns)
        with self.lock:
            old = self._mirrors.get(axis)
            self._mirrors[axis] = re.compile(regex if old is None else f"{old.pattern}|{regex}")
            self._counts.setdefault(axis, {})

    def count_seen(self, step: int, **counts: float) -> None:
        """Records the tokens/samples seen up to ``step`` (for :meth:`mirror_by`).

        Copies of tags logged at ``step`` before its count was known (a loop that logs
        its metrics before the monitor counts the batch) are written now.
        """
        with self.lock:
            for axis, count in counts.items():
                seen = self._counts.get(axis)
                if seen is None:
                    continue
                seen[step] = count
                if len(seen) > 4096:
                    for old in sorted(seen)[:2048]:
                        del seen[old]
            if self._writer is not None:
                self._mirror_waiting(self._writer, step, wait=True)

    def _mirror_waiting(self, writer: RunWriter, upto: int | None, *, wait: bool) -> None:
        """Writes the copies that waited for a count, of steps up to ``upto`` (all: None)."""
        for at in sorted(s for s in self._mirror_pending if upto is None or s <= upto):
            for axis, scalars in self._mirror_pending.pop(at).items():
                self.mirror(writer, scalars, at, wait=wait, axes=(axis,))

    def mirror(
        self,
        writer: RunWriter,
        scalars: Mapping[str, Any],
        step: int,
        *,
        wait: bool = True,
        axes: Sequence[str] | None = None,
    ) -> None:
        """Writes the ``by_<axis>/`` copies of ``scalars`` logged at ``step`` (call locked).

        Each axis (all, or ``axes``) whose count at ``step`` is not known yet waits for
        it (at most 64 steps wait; a step without a count of its own takes the latest
        count before it).
        """
        for axis, pattern in self._mirrors.items():
            if axes is not None and axis not in axes:
                continue
            copies = {
                f"by_{axis}/{tag}": value
                for tag, value in scalars.items()
                if pattern.fullmatch(tag) and not tag.startswith("by_")
            }
            if not copies:
                continue
            seen = self._counts.get(axis) or {}
            count = seen.get(step)
            if count is None:
                if wait and not any(s > step for s in seen) and len(self._mirror_pending) < 64:
                    self._mirror_pending.setdefault(step, {}).setdefault(axis, {}).update(scalars)
                    continue
                earlier = [s for s in seen if s <= step]
                if not earlier:
                    continue
                count = seen[max(earlier)]
            writer.log_scalars(copies, int(count))

    def _where(self) -> str | None:
        writer = self._writer
        return writer.log_dir if writer is not None else None

    # ------------------------------------------------------------------ notices
    def use_webhook(self, url: str, events: Sequence[str] = ("alerts",)) -> None:
        """Sends notices to ``url``: ``events`` among ``alerts``, ``end`` and ``stall``.

        See :class:`tbx_lightning._notify.RunNotices`; never blocks or fails training.
        """
        self.notices.use(url, events)

    def notify_alert(self, alert: Any) -> None:
        """Sends a new alert, when a webhook asked for alerts."""
        self.notices.alert(alert)

    def alert_stopped(self, kind: str, step: int, message: str, action: str) -> None:
        """Records that an alert ended training: :meth:`finish` then records a failure."""
        with self.lock:
            if self.alert_stop is None:
                self.alert_stop = (kind, step, message, action)

    # ------------------------------------------------------------------ values
    def log(self, values: Mapping[Any, Any], step: Any = None, *, prefix: str = "") -> int | None:
        """Logs numbers as scalars and strings as text; returns the step used (None if empty).

        Nothing of the call is written when one value is rejected.
        """
        scalars, texts = flatten_values(values, prefix=prefix)
        if not scalars and not texts:
            if step is not None:
                check_step(step)
            return None
        with self.lock, _logged_errors():
            writer = self.writer
            at = self.step_for(step, advance=True)
            if scalars:
                writer.log_scalars(scalars, at)
                if self._mirrors:
                    self.mirror(writer, scalars, at)
            for tag, text in texts.items():
                writer.experiment.add_text(tag, text, global_step=at)
            self.seen(at)
            self.notices.touch()
            if writer._summary.tag_count != self._layout_tags:
                self._update_layout(writer)
        return at

    def log_text(self, values: Mapping[Any, Any], step: Any = None) -> int | None:
        """Logs strings (dicts of them as ``a/b`` tags) as text entries; returns the step used."""
        scalars, texts = flatten_values(values)
        if scalars:
            tag = next(iter(scalars))
            raise LoggedTypeError(
                f"Text {tag!r} is a number, not a str: log numbers with `log`/`log_metrics`, or "
                "convert the value with str()."
            )
        if not texts:
            return None
        with self.lock:
            writer = self.writer
            at = self.step_for(step, advance=False)
            for tag, text in texts.items():
                writer.experiment.add_text(tag, text, global_step=at)
            self.seen(at)
        return at

    def log_images(
        self, values: Mapping[str, Any], step: Any = None, *, dataformats: str = "CHW"
    ) -> int | None:
        """Logs images (one image, a batch or a list of images per key); returns the step used."""
        if not isinstance(values, Mapping):
            raise LoggedTypeError(
                f"Images must be a dict of name -> image, got {type(values).__name__}."
            )
        batches = {key: image_batch(key, images, dataformats) for key, images in values.items()}
        if not batches:
            return None
        with self.lock:
            experiment = self.writer.experiment
            at = self.step_for(step, advance=False)
            for key, batch in batches.items():
                experiment.add_images(key, batch, global_step=at, dataformats="NCHW")
            self.seen(at)
        return at

    def log_histograms(self, values: Mapping[str, Any], step: Any = None) -> int | None:
        """Logs a histogram per tensor or array, binned on its device; returns the step used."""
        from tbx_lightning.monitor import log_histograms

        with self.lock, _logged_errors():
            at = self.step_for(step, advance=False)
            log_histograms(self.writer, values, at)
            if values:
                self.seen(at)
        return at if values else None

    def log_embedding(
        self,
        tag: str,
        mat: Any,
        *,
        metadata: Any = None,
        metadata_header: Any = None,
        label_img: Any = None,
        step: Any = None,
        max_points: int | None = None,
        seed: int = 0,
    ) -> EmbeddingRecord:
        """Writes an embedding for TensorBoard's projector.

        Without ``step``: the highest step logged so far, or, when nothing was
        logged yet, the next free step of ``tag``.
        """
        from tbx_lightning.projector import log_embedding

        with self.lock, _logged_errors():
            at = None if step is None and self._step is None else self.step_for(step, advance=False)
            record = log_embedding(
                self.writer,
                tag,
                mat,
                metadata=metadata,
                metadata_header=metadata_header,
                label_img=label_img,
                step=at,
                max_points=max_points,
                seed=seed,
            )
            if at is not None:
                self.seen(at)
        return record

    def log_graph(
        self, model: torch.nn.Module, input_array: Any, step: Any = None, **options: Any
    ) -> GraphExport | None:
        """Exports and writes the model graph; returns the export, or None when it failed.

        A model that cannot be exported (or an input the exporter cannot use) warns
        ``Model graph not logged: ...`` and returns None; with ``strict_graph`` it
        raises :class:`GraphExportError`.
        """
        from tbx_lightning.graph import write_graph

        with self.lock:
            at = self.step_for(step, advance=False)
            experiment = self.writer.experiment
        try:
            result = write_graph(
                experiment, model, input_array, step=at, **{**self.graph_options, **options}
            )
        except (GraphExportError, TypeError, ValueError) as error:
            if isinstance(error, TypeError) and _is_option_error(error, options):
                raise
            self.graph_problem(str(error), model, error)
            return None
        with self.lock:
            self.seen(at)
        return result

    def graph_problem(
        self, message: str, model: Any, error: BaseException | None = None, *, prefix: str = ""
    ) -> None:
        """Warns (or raises :class:`GraphExportError` under ``strict_graph``) that no graph was written."""
        if self.strict_graph:
            if isinstance(error, GraphExportError):
                raise error
            raise GraphExportError(
                type(model).__qualname__,
                (("input", message.splitlines()[0] if message else type(error).__name__),),
                message,
            ) from error
        text = f"{prefix}{message}" if prefix else f"Model graph not logged: {message}"
        warnings.warn(text, UserWarning, stacklevel=4)

    # ------------------------------------------------------------------ hparams, status
    def log_hyperparams(
        self, params: Any, metrics: Mapping[str, Any] | None = None, step: Any = None
    ) -> dict[str, Any]:
        """Adds ``params`` to the HParams row and ``config.yaml``; ``metrics`` as scalars."""
        scalars: dict[str, Any] = {}
        if metrics:
            scalars, texts = flatten_values(metrics)
            if texts:
                raise LoggedTypeError(
                    f"Metric {next(iter(texts))!r} is a str: hyperparameter metrics are numbers."
                )
        with self.lock:
            hparams = self.hparams
            at = self.step_for(step, advance=False)
            flat = hparams.log(params, scalars or None, step=at)
            if scalars:
                self.seen(at)
        return flat

    def finish(self, status: Any) -> str:
        """Records the run's status; returns the HParams status recorded.

        Any string is accepted: ``success``/``finished``, ``failed``/``failure``,
        ``aborted``, ``interrupted``, ``running`` and ``unknown`` map to TensorBoard's
        statuses (case-insensitive); any other string is recorded as ``unknown``, and
        the string itself as a text entry under ``run/status``. A run that an alert
        stopped or raised in (see :meth:`alert_stopped`) is recorded as ``failed``, the
        ``run.status`` column shows ``alert: <kind>`` and ``run/status`` the alert.
        """
        key, known = status_key(status)
        label = key if known else str(status)
        with self.lock:
            hparams = self.hparams
            note = None if known else str(status)
            if self.alert_stop is not None and key in ("success", "finished", "failed"):
                kind, step, message, action = self.alert_stop
                key, label = "failed", f"alert: {kind}"
                verb = "stopped" if action == "stop" else "raised"
                note = (
                    f"failed: training {verb} by the alert {kind} at step {step} "
                    f"(on_alert={action!r}): {message}"
                )
            if note is not None:
                at = self.step_for(None, advance=False)
                self.writer.experiment.add_text(STATUS_TEXT_TAG, note, global_step=at)
            self._mirror_waiting(self.writer, None, wait=False)  # no later count will come
            self.notices.end(key, note)
            hparams.finish(key, label=label)
            writer = self.writer
            if writer.has_data:
                # The last tags of the run (logged since the last check) get their charts.
                writer.flush()
                self._update_layout(writer)
        return key

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        if self._writer is not None:
            # A spawned process reopens the run: what this one logged must be on disk.
            self._writer.flush()
        state = self.__dict__.copy()
        state["_writer"] = None
        state["_unclosed"] = None
        state["_hparams"] = None
        state["lock"] = None
        state["_layout"] = None
        state["notices"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.notices = RunNotices(self._where, lambda: self._step)
        self.lock = CallLock()
        self._layout = LayoutBuilder()
        self._layout_tags = 0


class RunSink:
    """A run as a training monitor sees it (:class:`~tbx_lightning.monitor.MonitorSink`).

    Every call goes to the run's writer of the moment, so a monitor set up before
    Lightning moved the logger to a checkpoint's run (``fit(ckpt_path=...)``), or
    before a fit's end released the writer, writes into the right run. It also
    records an alert that ended training (:meth:`alert_stopped`), so the run's status
    says so, and carries the ``by_tokens``/``by_samples`` counts.
    """

    def __init__(self, run: Run) -> None:
        self._run = run

    @property
    def experiment(self) -> Any:
        """The current writer's tensorboardX ``SummaryWriter``."""
        return self._run.writer.experiment

    @property
    def log_dir(self) -> str:
        """The run directory (opens the writer)."""
        return self._run.writer.log_dir

    def log_scalars(self, metrics: Mapping[str, Any], step: int) -> None:
        """Writes ``metrics`` at ``step`` into the current writer."""
        run = self._run
        writer = run.writer
        writer.log_scalars(metrics, step)
        run.notices.touch()
        if run._mirrors:
            with run.lock:
                run.mirror(writer, metrics, step)

    def alert_stopped(self, alert: Any, action: str) -> None:
        """Records that ``alert`` ended training with ``action`` ("stop" or "raise")."""
        self._run.alert_stopped(alert.kind, alert.step, alert.message, action)

    def use_webhook(self, url: str, events: Sequence[str] = ("alerts",)) -> None:
        """See :meth:`Run.use_webhook`."""
        self._run.use_webhook(url, events)

    def notify_alert(self, alert: Any) -> None:
        """See :meth:`Run.notify_alert`."""
        self._run.notify_alert(alert)

    def count_seen(self, step: int, **counts: float) -> None:
        """Tokens/samples seen up to ``step``."""
        self._run.count_seen(step, **counts)

    def mirror_by(self, axis: str, patterns: Sequence[str]) -> None:
        """See :meth:`Run.mirror_by`."""
        self._run.mirror_by(axis, patterns)


@contextlib.contextmanager
def _logged_errors() -> Iterator[None]:
    """Bad input found by a feature module (histograms, projector) as the package's errors."""
    try:
        yield
    except TBXError:
        raise
    except TypeError as error:
        raise LoggedTypeError(str(error)) from error
    except ValueError as error:
        raise LoggedValueError(str(error)) from error


def _is_option_error(error: TypeError, options: Mapping[str, Any]) -> bool:
    """A TypeError about an exporter option the caller mistyped: not a graph problem."""
    text = str(error)
    return "unexpected keyword argument" in text and any(name in text for name in options)
