"""A config as plain, typed values: OmegaConf resolved, containers checked, leaves typed.

What :mod:`tbx_lightning.hparams` flattens into the HParams row and writes as
``config.yaml``: :func:`to_container` (a plain nested copy, masked), :func:`flatten`
(dot paths to bool, int, float or str), :func:`config_yaml`. Bad input names its key.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from tbx_lightning._secrets import Masker
from tbx_lightning.errors import HParamsError

__all__ = ["MAX_DEPTH", "HParamValue", "config_yaml", "flatten", "to_container"]

HParamValue = bool | int | float | str
_MAX_EXACT_INT = 2**53

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
