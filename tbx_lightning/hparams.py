"""Configs to HParams: flat, typed, keyed by OmegaConf dot paths, with run statuses.

TensorBoard's HParams dashboard builds its table from every run's *session start*
record when no run declares an experiment summary. So each run writes exactly one
session start (its hyperparameters) and one session end (its status), and never an
experiment summary: then every key of every run is a column and every scalar tag
is a metric column. TensorBoard keeps the first record of a tag it reads, so both
records (and the ``run/config`` text) live in the run's records file, one per tag,
which sorts before the event files and is replaced whole when the hyperparameters
or the status change (see ``RunWriter.put_record``).

The row holds the flattened config without the keys matched by ``hparams_exclude``
(:data:`DEFAULT_HPARAMS_EXCLUDE` by default: the keys Hydra's ``instantiate`` reads,
``_target_``, ``_partial_``, ...; an application passes its own list, as the
templates' logger config does for their paths, callbacks and runner settings); they
stay in ``config.yaml`` and the ``run/config`` text entry, not in the table. Two columns
of the run itself are added when it finishes: ``run.status`` and ``run.duration_s``
(TensorBoard's table has no status or time column of its own).
"""

from __future__ import annotations

import fnmatch
import re
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import yaml
from tensorboardX.proto.api_pb2 import Status
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.plugin_hparams_pb2 import (
    HParamsPluginData,
    SessionEndInfo,
    SessionStartInfo,
)
from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboardX.summary import text as text_summary

from tbx_lightning import _fs
from tbx_lightning._convert import (
    MAX_DEPTH,
    HParamValue,
    _convert,
    config_yaml,
    flatten,
    to_container,
)
from tbx_lightning._secrets import MASK, Masker, is_secret_key, mask_secrets_in
from tbx_lightning.errors import ConfigTypeError, HParamsError, LoggedValueError, RunWriterError

if TYPE_CHECKING:
    from tbx_lightning._writer import RunWriter

__all__ = [
    "CONFIG_TEXT_TAG",
    "DEFAULT_HPARAMS_EXCLUDE",
    "DURATION_COLUMN",
    "MASK",
    "MAX_DEPTH",
    "STATUSES",
    "STATUS_COLUMN",
    "HParamValue",
    "HParamsError",
    "RunHParams",
    "check_hparams_exclude",
    "config_markdown",
    "flatten",
    "is_secret_key",
    "mask_secrets_in",
    "status_key",
    "status_label",
    "table_columns",
    "to_container",
]

SESSION_START_TAG = "_hparams_/session_start_info"
SESSION_END_TAG = "_hparams_/session_end_info"

# What users pass to ``finish`` / Lightning's ``finalize`` -> TensorBoard's status set.
# TensorBoard has no "aborted": an interrupted run shows as a failure.
STATUSES: dict[str, int] = {
    "running": Status.Value("STATUS_RUNNING"),
    "success": Status.Value("STATUS_SUCCESS"),
    "finished": Status.Value("STATUS_SUCCESS"),
    "failed": Status.Value("STATUS_FAILURE"),
    "failure": Status.Value("STATUS_FAILURE"),
    "aborted": Status.Value("STATUS_FAILURE"),
    "interrupted": Status.Value("STATUS_FAILURE"),
    "unknown": Status.Value("STATUS_UNKNOWN"),
}


# The run's own columns of the HParams row, and its config as a text entry.
STATUS_COLUMN = "run.status"
DURATION_COLUMN = "run.duration_s"
CONFIG_TEXT_TAG = "run/config"
# Synonyms shown as one value in the status column, so a sweep's column has few values.
_STATUS_LABELS = {"finished": "success", "failure": "failed"}

# Config keys that no user wants as a column: what Hydra's ``instantiate`` reads to build
# an object, at any depth. fnmatch patterns over the dot paths of the flattened config
# (``*`` also matches dots); keys matched stay in config.yaml and in the ``run/config``
# text entry, only the HParams row leaves them out. Policy of one application (the
# templates' runner settings, their paths and callbacks) belongs in that application's
# logger config: see configs/logger/tbx.yaml and docs/hparams.md.
DEFAULT_HPARAMS_EXCLUDE: tuple[str, ...] = (
    "_target_",
    "*._target_",
    "_partial_",
    "*._partial_",
    "_recursive_",
    "*._recursive_",
    "_convert_",
    "*._convert_",
    "_args_",
    "*._args_",
)


def check_hparams_exclude(patterns: Any, *, where: str = "hparams_exclude") -> tuple[str, ...]:
    """The exclude patterns of the HParams row, checked: None is the default list.

    Args:
        patterns: None (:data:`DEFAULT_HPARAMS_EXCLUDE`), one fnmatch pattern, or a
            list of them; an empty list keeps every key in the row.
        where: Where the user sets them, for the message.

    Raises:
        ConfigTypeError: a value that is not None, a str or a list of str.

    Example:
        >>> check_hparams_exclude(["data.*"])
        ('data.*',)
        >>> check_hparams_exclude([])
        ()
    """
    if patterns is None:
        return DEFAULT_HPARAMS_EXCLUDE
    if isinstance(patterns, str):
        return (patterns,)
    if isinstance(patterns, Sequence | set | frozenset):
        items = tuple(patterns)
        bad = [item for item in items if not isinstance(item, str)]
        if not bad:
            return items
        raise ConfigTypeError(
            f"`hparams_exclude` must hold fnmatch patterns (str), got {type(bad[0]).__name__} "
            f"{bad[0]!r}: set {where} to a list of patterns such as ['callbacks.*', "
            "'*._target_'], [] to keep every key, or null for the default list."
        )
    raise ConfigTypeError(
        f"`hparams_exclude` must be a list of fnmatch patterns, [] or null, got "
        f"{type(patterns).__name__} {patterns!r}: set {where}."
    )


def _exclude_regex(patterns: tuple[str, ...]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def table_columns(
    flat: Mapping[str, HParamValue], exclude: Sequence[str] | None = None
) -> dict[str, HParamValue]:
    """The keys of a flattened config that the HParams row shows: those ``exclude`` does not match.

    Patterns are fnmatch patterns over the whole dot path, case-sensitive; ``*``
    also matches dots, so ``callbacks.*`` drops every key under ``callbacks``.

    Example:
        >>> table_columns({"model.lr": 0.1, "model._target_": "m.Net", "paths.root": "/r"})
        {'model.lr': 0.1, 'paths.root': '/r'}
        >>> table_columns({"model.lr": 0.1, "paths.root": "/r"}, exclude=["paths.*"])
        {'model.lr': 0.1}
        >>> table_columns({"model._target_": "m.Net"}, exclude=[])
        {'model._target_': 'm.Net'}
    """
    regex = _exclude_regex(check_hparams_exclude(exclude))
    if regex is None:
        return dict(flat)
    return {key: value for key, value in flat.items() if not regex.match(key)}


def config_markdown(container: Mapping[str, Any]) -> str:
    """The resolved config as markdown for TensorBoard's Text tab: one fenced YAML block.

    Example:
        >>> print(config_markdown({"model": {"lr": 0.1}}))
        ```yaml
        model:
          lr: 0.1
        ```
    """
    body = config_yaml(container) if container else "{}\n"
    longest = max((len(run) for run in re.findall("`+", body)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}yaml\n{body}{fence}"


def config_text_event(container: Mapping[str, Any], wall_time: float) -> Event:
    """The ``run/config`` text entry: the run's resolved config, at step 0."""
    summary = text_summary(CONFIG_TEXT_TAG, config_markdown(container))
    return Event(wall_time=wall_time, step=0, summary=summary)


def _summary_event(tag: str, data: HParamsPluginData, wall_time: float) -> Event:
    metadata = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(
            plugin_name="hparams", content=data.SerializeToString()
        )
    )
    return Event(
        wall_time=wall_time, summary=Summary(value=[Summary.Value(tag=tag, metadata=metadata)])
    )


def session_start_event(hparams: Mapping[str, HParamValue], start_time: float) -> Event:
    """The session start record: one row of the HParams table."""
    info = SessionStartInfo(start_time_secs=start_time)
    for key, value in hparams.items():
        if isinstance(value, bool):
            info.hparams[key].bool_value = value
        elif isinstance(value, int | float):
            info.hparams[key].number_value = float(value)
        else:
            info.hparams[key].string_value = str(value)
    return _summary_event(
        SESSION_START_TAG, HParamsPluginData(version=0, session_start_info=info), start_time
    )


def session_end_event(status: str, end_time: float) -> Event:
    """The session end record: the run's status in the HParams table."""
    info = SessionEndInfo(status=STATUSES[status], end_time_secs=end_time)
    return _summary_event(
        SESSION_END_TAG, HParamsPluginData(version=0, session_end_info=info), end_time
    )


def status_key(status: Any) -> tuple[str, bool]:
    """``(status, known)``: the status TensorBoard is told for any status string.

    Known ones (:data:`STATUSES`, any case) are themselves; any other string is
    ``"unknown"`` (the integrations keep the string itself as the ``run/status`` text).

    Example:
        >>> status_key("Success"), status_key("preempted")
        (('success', True), ('unknown', False))
    """
    key = str(status).lower()
    return (key, True) if key in STATUSES else ("unknown", False)


def status_label(status: str) -> str:
    """What the ``run.status`` column shows: one word per outcome (``finished`` is ``success``)."""
    return _STATUS_LABELS.get(status, status)


class RunHParams:
    """The hyperparameters, config files and status of one run; shared by every integration.

    Each run gets one HParams row (its table columns, see :func:`table_columns`),
    ``config.yaml`` and one ``run/config`` text entry (the whole resolved config as
    YAML, masked like ``config.yaml``), both replaced when later calls add keys.
    :meth:`finish` adds the ``run.status`` and ``run.duration_s`` columns.

    Args:
        run: The run's writer.
        mask_secrets: Mask keys that look like credentials in the table and in config.yaml.
        hparams_exclude: fnmatch patterns of config keys left out of the HParams row
            (they stay in config.yaml): None for :data:`DEFAULT_HPARAMS_EXCLUDE`,
            ``[]`` to show every key.
        start_time: When the run started (``time.time()``), for ``run.duration_s``;
            by default, when the first hyperparameters are logged.

    Example:
        >>> import tempfile
        >>> from tbx_lightning import RunWriter
        >>> run = RunWriter(tempfile.mkdtemp())
        >>> hp = RunHParams(run)
        >>> hp.log({"model": {"lr": 0.01}, "seed": 1})
        {'model.lr': 0.01, 'seed': 1}
        >>> hp.finish("success"); run.close()
    """

    def __init__(
        self,
        run: RunWriter,
        *,
        mask_secrets: bool = True,
        hparams_exclude: Sequence[str] | None = None,
        start_time: float | None = None,
    ) -> None:
        self.run = run
        self.mask_secrets = mask_secrets
        self.hparams_exclude = check_hparams_exclude(hparams_exclude)
        self._exclude = _exclude_regex(self.hparams_exclude)
        self._started = start_time
        # A run directory that already has a config (a resumed run, a DDP-spawn child, a
        # writer reopened after close) keeps its keys: later calls add to them.
        self.config: dict[str, Any] = self._stored_config()
        self.flat: dict[str, HParamValue] = {}
        # The HParams row as written: the table columns of ``flat`` and the run's own.
        self.row: dict[str, HParamValue] = {}
        self._own: dict[str, HParamValue] = {}
        self.status: str | None = None
        self.start_time: float | None = None
        self._text_written = ""
        # Re-entrant: a signal handler (Lightning's SLURM requeue) may finish the run
        # while a call of this thread is inside log().
        self._lock = threading.RLock()
        self._secrets: set[str] = set()
        self._warned_escaped: set[str] = set()

    def log(
        self,
        params: Any,
        metrics: Mapping[str, Any] | None = None,
        *,
        step: int = 0,
    ) -> dict[str, HParamValue]:
        """Adds ``params`` to the run's hyperparameters (later calls update keys) and logs ``metrics``.

        Writes ``config.yaml`` (the resolved config) and the HParams records; the
        first call marks the run as running. A config that cannot be stored raises
        before anything is written, and the run takes the next valid call. Text that
        UTF-8 cannot hold is stored escaped, with one warning per key and run.

        Raises:
            HParamsError: see :func:`to_container`; the message names the key path.
        """
        with self._lock:
            container, escaped, secrets = _convert(
                params, mask_secrets=self.mask_secrets, known=self._secrets
            )
            merged = _deep_merge(self.config, container)
            if self.mask_secrets and secrets != self._secrets:
                # A secret of this call may have been copied into a key of an earlier one.
                masker = Masker(secrets)
                merged = masker.container(merged, "")
            flat = flatten(merged, mask_secrets=False)
            self._secrets = secrets
            self._warn_escaped(escaped)
            # Written before anything is kept: a call that storage refuses changes nothing.
            self.write_config_file("config.yaml", config_yaml(merged))
            self.config = merged
            row = self._row(flat)
            if self.start_time is None:
                self.start_time = time.time()
                if self._started is None:
                    self._started = self.start_time
                # A resumed run's records (in the records file) are replaced: TensorBoard
                # shows the first record of a tag, one row and one status per run.
                self._put_start(row)
                self.run.put_record(session_end_event("running", self.start_time))
                self.status = "running"
            elif row != self.row:
                self._put_start(row)
            self.flat = flat
            self.row = row
            self._write_config_text()
        if metrics:
            self.run.log_scalars(metrics, step)
        return dict(flat)

    def masked(self, params: Any) -> dict[str, Any]:
        """``params`` as :func:`to_container` makes it, masked with every secret of the run.

        What other files of the run (Lightning's ``hparams.yaml``) keep of a config:
        a secret text that an earlier call logged is masked wherever ``params`` holds a
        copy of it, as in ``config.yaml``.
        """
        with self._lock:
            return _convert(params, mask_secrets=self.mask_secrets, known=self._secrets)[0]

    def _warn_escaped(self, keys: list[str]) -> None:
        new = [key for key in dict.fromkeys(keys) if key not in self._warned_escaped]
        if not new:
            return
        self._warned_escaped.update(new)
        shown = ", ".join(f"'{key}'" for key in new[:10])
        more = f" and {len(new) - 10} more" if len(new) > 10 else ""
        warnings.warn(
            f"Config key{'s' if len(new) > 1 else ''} {shown}{more} of {self.run.log_dir!r} "
            f"{'hold' if len(new) > 1 else 'holds'} text that cannot be written as UTF-8 (a lone surrogate, as os.fsdecode, "
            "sys.argv or os.environ make from bytes that are not UTF-8): stored escaped, e.g. "
            "'caf\\udce9'. Decode such names with their real encoding to store them as they "
            "are.",
            stacklevel=3,
        )

    def _row(self, flat: Mapping[str, HParamValue]) -> dict[str, HParamValue]:
        """The HParams row of ``flat``: its table columns, then the run's own columns."""
        regex = self._exclude
        row = dict(flat) if regex is None else {k: v for k, v in flat.items() if not regex.match(k)}
        for key, value in self._own.items():
            # A config key of the same name keeps its value; the exclude patterns apply.
            if key not in row and (regex is None or not regex.match(key)):
                row[key] = value
        return row

    def _write_config_text(self) -> None:
        """Writes the ``run/config`` text entry, again whenever it changes.

        A run without hyperparameters (``finish`` with nothing logged) gets none.
        """
        if not self.config:
            return
        text = config_markdown(self.config)
        if text == self._text_written:
            return
        self.run.put_record(config_text_event(self.config, time.time()))
        self._text_written = text

    def _put_start(self, row: dict[str, HParamValue]) -> None:
        assert self.start_time is not None  # set by the first log()
        self.run.put_record(session_start_event(row, self.start_time))

    def finish(self, status: str = "success", *, label: str | None = None) -> None:
        """Records the run's final status (``success``, ``failed``, ``aborted``, ...) and end time.

        The row gets the columns ``run.status`` (``label``, by default the status) and
        ``run.duration_s`` (seconds since ``start_time``).
        """
        key, known = status_key(status)
        if not known:
            raise LoggedValueError(
                f"Unknown run status {status!r}: use one of {sorted(STATUSES)} (Run.finish and "
                "the integrations take any string and record other ones as 'unknown')."
            )
        with self._lock:
            if self.start_time is None:
                # A run that never logged hyperparameters still gets its row and status.
                self.log({})
            assert self._started is not None
            end = time.time()
            shown = key if label is None else label
            self._own = {
                STATUS_COLUMN: status_label(shown),
                DURATION_COLUMN: round(max(0.0, end - self._started), 3),
            }
            row = self._row(self.flat)
            if row != self.row:
                self._put_start(row)
                self.row = row
            self.run.put_record(session_end_event(key, end))
            self.status = key

    def _stored_config(self) -> dict[str, Any]:
        """The config a run directory already has (a resumed run); damage is skipped with a warning."""
        path = _fs.join(self.run.fs, self.run.path, "config.yaml")
        try:
            stored = yaml.safe_load(_fs.read_bytes(self.run.fs, path, limit=_CONFIG_LIMIT))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except (OSError, yaml.YAMLError, RecursionError, ValueError) as error:
            warnings.warn(
                f"tbx_lightning: ignored {_fs.url(self.run.fs, path)!r} "
                f"({getattr(error, 'strerror', None) or type(error).__name__}): the run's config "
                "starts anew from what is logged now.",
                stacklevel=4,
            )
            return {}
        return stored if isinstance(stored, dict) else {}

    def write_config_file(self, name: str, text: str) -> None:
        """Atomically (re)writes a text file in the run directory.

        Raises:
            RunWriterError: storage refused it (full disk, removed folder); the message
                names the file and what to do.
        """
        path = _fs.join(self.run.fs, self.run.path, name)
        try:
            _fs.write_text_atomic(self.run.fs, path, text)
        except OSError as error:
            raise RunWriterError(
                f"Writing {_fs.url(self.run.fs, path)!r} failed: {type(error).__name__}: "
                f"{error}. Free space or restore the run folder, then log the "
                "hyperparameters again."
            ) from error


_CONFIG_LIMIT = 64 << 20


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out
