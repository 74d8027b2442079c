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

import argparse
import dataclasses
import enum
import fnmatch
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
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

HParamValue = bool | int | float | str
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

_MAX_EXACT_INT = 2**53

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

# Lightning writes hparams.yaml through OmegaConf, which takes about a dozen stack frames
# per level: 64 levels already overflow Python's stack when the logger is called from a
# deep stack (a Trainer's hooks). 32 leaves ample room; real configs nest a few levels.
MAX_DEPTH = 32


def _omegaconf_error(error: OmegaConfBaseException) -> HParamsError:
    key = getattr(error, "full_key", None) or "<root>"
    if isinstance(error, MissingMandatoryValue):
        return HParamsError(
            f"Config key '{key}' is missing a mandatory value ('???'): set it, e.g. with the "
            f"override `{key}=VALUE`, before logging hyperparameters."
        )
    detail = str(error).splitlines()[0]
    return HParamsError(
        f"Config key '{key}' cannot be resolved: {detail}. Fix the interpolation "
        "(or register the missing resolver) before logging hyperparameters."
    )


def _resolve_omegaconf(cfg: DictConfig | ListConfig) -> Any:
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as error:
        raise _omegaconf_error(error) from error
    except RecursionError as error:
        raise HParamsError(
            "Config has a cyclic interpolation (a key refers to itself through others) or "
            f"nests far deeper than {MAX_DEPTH} levels: break the cycle, or flatten the "
            "config, before logging hyperparameters."
        ) from error


def _shown(path: str) -> str:
    """A key path for a message: quoted, shortened in the middle when very long."""
    if not path:
        return "the config's root"
    if len(path) > 240:
        path = f"{path[:120]}...{path[-100:]}"
    return f"'{path}'"


def _escaped(text: str) -> str:
    """``text`` as valid UTF-8: lone surrogates become ``\\udcXX`` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _key_repr(key: Any) -> str:
    if isinstance(key, enum.Enum):
        return f"{type(key).__name__}.{key.name}"
    try:
        return repr(key)
    except Exception:
        return f"<{type(key).__name__}>"


class _Plain:
    """One conversion of a config to plain dicts, lists and leaves, with its checks.

    Everything that could fail later (while writing the HParams records, config.yaml or
    Lightning's hparams.yaml) is found here, before anything is stored: keys that
    collide, containers that contain themselves or nest deeper than ``MAX_DEPTH``,
    leaves whose text cannot be made. Text that UTF-8 cannot hold (lone surrogates) is
    escaped and its key remembered in ``escaped``.
    """

    def __init__(self) -> None:
        self.escaped: list[str] = []
        self._active: dict[int, str] = {}

    def convert(self, value: Any, path: str, depth: int) -> Any:
        if isinstance(value, DictConfig | ListConfig):
            return self.convert(_resolve_omegaconf(value), path, depth)
        original = value
        if isinstance(value, argparse.Namespace):
            value = vars(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping | list | tuple):
            return self._container(original, value, path, depth + 1)
        return self._leaf(value, path)

    def _container(self, original: Any, value: Any, path: str, depth: int) -> Any:
        if id(original) in self._active:
            raise HParamsError(
                f"Config key {_shown(path)} holds {_shown(self._active[id(original)])} itself "
                "(a self-referential dict or list): replace the reference with a copy or a "
                "name before logging hyperparameters."
            )
        if depth > MAX_DEPTH:
            raise HParamsError(
                f"Config key {_shown(path)} is nested {depth} levels deep; hyperparameters may "
                f"nest at most {MAX_DEPTH} levels: flatten that part of the config (or log it "
                "as a string) before logging hyperparameters."
            )
        self._active[id(original)] = path
        try:
            if isinstance(value, Mapping):
                return self._mapping(value, path, depth)
            return [
                self.convert(item, f"{path}.{i}" if path else str(i), depth)
                for i, item in enumerate(value)
            ]
        finally:
            del self._active[id(original)]

    def _mapping(self, value: Mapping[Any, Any], path: str, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        origin: dict[str, Any] = {}
        for key, item in value.items():
            name = self._name(key, path)
            child = f"{path}.{name}" if path else name
            if name in out:
                where = f" under {_shown(path)}" if path else ""
                raise HParamsError(
                    f"Config keys {_key_repr(origin[name])} and {_key_repr(key)}{where} both "
                    f"become the column '{child}': rename one of them (keys are compared as "
                    "text, an Enum member by its name)."
                )
            origin[name] = key
            out[name] = self.convert(item, child, depth)
        return out

    def _name(self, key: Any, path: str) -> str:
        if isinstance(key, enum.Enum):
            key = key.name
        try:
            name = str(key)
        except Exception as error:
            raise HParamsError(
                f"A config key under {_shown(path)} (of type {type(key).__name__}) cannot be "
                f"turned into text: {type(error).__name__}: {error}. Use str keys."
            ) from error
        if not _encodable(name):
            name = _escaped(name)
            self.escaped.append(f"{path}.{name}" if path else name)
        return name

    def _leaf(self, value: Any, path: str) -> Any:
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            if _encodable(value):
                return value
            self.escaped.append(path)
            return _escaped(value)
        try:
            text = _leaf(value)
        except Exception as error:
            raise HParamsError(
                f"Config key {_shown(path)} holds a {type(value).__name__} that cannot be turned "
                f"into text: {type(error).__name__}: {error}. Log a str, number or bool there "
                "instead."
            ) from error
        if isinstance(text, str) and not _encodable(text):
            # The object's own text (a path from a non-UTF-8 file name, ...) cannot be
            # stored: keep its escaped text instead of the object.
            self.escaped.append(path)
            return _escaped(text)
        return value


def _convert(
    params: Any, *, mask_secrets: bool, known: Iterable[str] = ()
) -> tuple[dict[str, Any], list[str], set[str]]:
    """``to_container`` plus the keys whose text was escaped and the secret texts found."""
    if params is None:
        return {}, [], set(known)
    converter = _Plain()
    plain = converter.convert(params, "", 0)
    if not isinstance(plain, dict):
        raise HParamsError(
            f"Hyperparameters must be a mapping, config, Namespace or dataclass, got "
            f"{type(params).__name__}: wrap the value in a dict, e.g. {{'value': ...}}."
        )
    if not mask_secrets:
        return plain, converter.escaped, set(known)
    masker = Masker(known)
    masker.collect(plain, "")
    return masker.container(plain, ""), converter.escaped, masker.secrets


def to_container(params: Any, *, mask_secrets: bool = True) -> dict[str, Any]:
    """The resolved config as plain nested dicts and lists (what ``config.yaml`` holds).

    Accepts an OmegaConf DictConfig, a mapping (Lightning's ``AttributeDict``
    included), an ``argparse.Namespace`` or a dataclass instance; nested values may
    be any of these. Unless ``mask_secrets=False``, credentials are masked: the values
    of keys that look like credentials, the password part of URLs, and the text of
    those values wherever else it appears (see docs/robustness.md). Text that UTF-8
    cannot hold (lone surrogates, as ``os.fsdecode`` makes from non-UTF-8 file names)
    is escaped: ``'caf\\udce9'``. What is returned is safe for any YAML writer: no
    cycles, at most ``MAX_DEPTH`` levels, valid UTF-8.

    Raises:
        HParamsError: a missing mandatory value (``???``), a broken or cyclic
            interpolation, two keys that become one column (``1`` and ``"1"``), a
            self-referential container, nesting deeper than ``MAX_DEPTH``, a value
            whose text cannot be made; the message names the key path.

    Example:
        >>> to_container({"db": {"password": "pw", "url": "s3://KEY:SECRET@bucket"}})
        {'db': {'password': '********', 'url': 's3://KEY:********@bucket'}}
    """
    return _convert(params, mask_secrets=mask_secrets)[0]


def _leaf(value: Any) -> HParamValue | None:
    """One table value, typed; None means 'leave this key out of the table'."""
    if value is None:
        return None
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, enum.Enum):
        return str(value.name)
    if isinstance(value, int | np.integer):
        number = int(value)
        return number if abs(number) <= _MAX_EXACT_INT else str(number)
    if isinstance(value, float | np.floating):
        return float(value)
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value) if isinstance(os.fspath(value), str) else str(value)
    if isinstance(value, np.ndarray) and value.size == 1:
        return _leaf(value.item())
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return _leaf(value.item())
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}".lstrip(".")
    return str(value)


def _readable(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    leaf = _leaf(value)
    return "None" if leaf is None else str(leaf)


def _is_container(value: Any) -> bool:
    return isinstance(value, Mapping | list | tuple)


def flatten(params: Any, *, mask_secrets: bool = True) -> dict[str, HParamValue]:
    """Flattens a config to ``{dot.path: bool | int | float | str}`` for the HParams table.

    Every key can be pasted back as an OmegaConf override (``model.optimizer.lr=0.1``).
    Lists of scalars become one readable value (``[0.9, 0.999]``); lists that hold
    mappings are keyed by index (``layers.0.width``). None is left out of the table
    (it would turn a numeric column into a text column) but stays in config.yaml.

    Example:
        >>> from omegaconf import OmegaConf
        >>> flatten(OmegaConf.create({"model": {"lr": 0.1, "betas": [0.9, 0.99]}, "seed": None}))
        {'model.lr': 0.1, 'model.betas': '[0.9, 0.99]'}
    """
    out: dict[str, HParamValue] = {}

    def visit(value: Any, path: str) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                visit(item, f"{path}.{key}" if path else str(key))
            return
        if isinstance(value, list | tuple):
            if any(_is_container(item) for item in value):
                for i, item in enumerate(value):
                    visit(item, f"{path}.{i}" if path else str(i))
                return
            value = "[" + ", ".join(_readable(item) for item in value) + "]"
        leaf = _leaf(value)
        if leaf is None:
            return
        if path in out:
            raise HParamsError(
                f"Config key '{path}' appears twice after flattening (a key containing '.' "
                "clashes with a nested key): rename one of them."
            )
        out[path] = leaf

    visit(to_container(params, mask_secrets=mask_secrets), "")
    return out


def _yaml_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_yaml_safe(v) for v in value]
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return value
    leaf = _leaf(value)
    return leaf


def config_yaml(container: Mapping[str, Any]) -> str:
    """YAML text of a resolved config; leaves YAML cannot hold are written as their string."""
    return yaml.safe_dump(_yaml_safe(dict(container)), sort_keys=False, allow_unicode=True)


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
