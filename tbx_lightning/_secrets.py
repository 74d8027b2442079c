"""Which config values are credentials, and how they are hidden in what a run stores.

Three rules, applied together (docs/robustness.md has the table):

- a key whose name, or the name of one of its parents, names a credential has its
  text value masked (``db.password``, ``api_keys.openai``);
- the password part of a URL is masked in every text value
  (``s3://KEY:SECRET@bucket`` -> ``s3://KEY:********@bucket``);
- the text of a masked value is masked wherever else it appears, e.g. where an
  interpolation copied it into another key (``dsn: postgres://u:${db.password}@h/db``).

Numbers and flags are never masked: a port or a count under a secret-looking name is
not a credential, and masking it would turn a numeric column into text.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

from tbx_lightning.errors import HParamsError

MASK = "********"

# A secret text shorter than this is masked where it is the whole value, but not
# searched for inside other values: a two-letter password would mask every "ab" of
# the config. URLs are masked by their own rule whatever the password's length.
MIN_SUBSTRING = 4

# Words that name a credential when they end a key's name.
_WORDS = frozenset(
    {
        "password",
        "passwords",
        "passwd",
        "passphrase",
        "passphrases",
        "secret",
        "secrets",
        "token",
        "credential",
        "credentials",
        "authorization",
    }
)
# ``<kind>_key`` / ``<kind>Key`` / ``<kind>key`` (and plurals) name a key that is a secret;
# a bare ``key`` does not (``num_keys``, ``key_dim``, ``sort_key``).
_KEY_KINDS = frozenset(
    {
        "api",
        "access",
        "secret",
        "private",
        "auth",
        "ssh",
        "signing",
        "encryption",
        "master",
        "client",
        "session",
        "account",
        "storage",
        "license",
        "gpg",
        "pgp",
        "app",
        "deploy",
    }
)
_COMPOUND = frozenset(
    f"{kind}{suffix}" for kind in _KEY_KINDS for suffix in ("key", "keys")
) | frozenset({"apitoken", "authtoken", "accesstoken", "connectionstring", "connstr"})
_PAIRS = frozenset({("connection", "string"), ("connection", "str"), ("conn", "str")})
# ``db_pwd`` is a password; a bare ``PWD`` is the working directory (an environment dump).
_AFTER_ANOTHER_WORD = frozenset({"pwd"})
# A format after a secret name keeps it secret: ``private_key_pem``, ``api_key_b64``.
_FORMATS = frozenset({"pem", "der", "b64", "base64", "hex", "str", "value", "raw"})
# Tokenizer settings end in "token" but hold markers, not credentials.
_TOKENIZER_MARKERS = frozenset(
    {"bos", "eos", "pad", "unk", "mask", "sep", "cls", "start", "end", "special", "eot", "bot"}
)

_SPLIT = re.compile(r"[_\-\s]+|(?<=[a-z0-9])(?=[A-Z])")
# scheme://user:password@host -- the password may itself hold '@' (the last '@' of the
# authority ends it); the user may be empty (redis://:password@host).
_URL_CREDENTIALS = re.compile(
    r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@]*:)(?P<password>[^\s/?#]*)@"
)


def _words_are_secret(words: list[str]) -> bool:
    if not words:
        return False
    last = words[-1]
    if last == "token" and len(words) >= 2 and words[-2] in _TOKENIZER_MARKERS:
        return False
    if last in _WORDS or last in _COMPOUND:
        return True
    if len(words) >= 2:
        if last in _AFTER_ANOTHER_WORD:
            return True
        if last in ("key", "keys") and words[-2] in _KEY_KINDS:
            return True
        if (words[-2], last) in _PAIRS:
            return True
        if last in _FORMATS:
            return _words_are_secret(words[:-1])
    return False


def is_secret_name(name: str) -> bool:
    """True when one key name (no dots) names a credential."""
    return _words_are_secret([w.lower() for w in _SPLIT.split(name) if w])


def is_secret_key(key: str) -> bool:
    """True when a dot path names a credential: its last part, or one of its parents.

    A name is a secret when it *ends* in a credential word: ``db.password``,
    ``hf_token``, ``client_secret``, ``aws.secret_access_key``, ``apiKey``,
    ``passwords``, ``ssh_key``, ``private_key_pem``, ``gpg_passphrase``, ``db_pwd``,
    ``DJANGO_SECRETKEY``, ``headers.Authorization`` and ``azure.connection_string`` are
    secrets, and so is every key under such a name (``api_keys.openai``).
    ``pad_token_id``, ``token_dropout``, ``max_tokens``, ``tokenizer``, ``num_keys``,
    ``key_dim``, ``keypoints``, ``monkey`` and ``eos_token`` are not.

    Example:
        >>> is_secret_key("api_keys.openai"), is_secret_key("model.pad_token_id")
        (True, False)
    """
    return any(is_secret_name(part) for part in key.split("."))


def maskable(value: Any) -> bool:
    """Numbers and flags are never credentials (``num_token = 3``); text and blocks are."""
    return value is not None and not isinstance(value, bool | int | float)


def mask_urls(text: str) -> str:
    """``text`` with the password part of every ``scheme://user:password@host`` masked."""

    def hide(match: re.Match[str]) -> str:
        if not match.group("password"):
            return match.group(0)
        return f"{match.group('head')}{MASK}@"

    return _URL_CREDENTIALS.sub(hide, text) if "://" in text else text


def texts_in(value: Any) -> Iterable[str]:
    """Every text leaf of a nested value (the parts of a masked block that must not leak)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from texts_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from texts_in(item)


class Masker:
    """Masks a plain container: secret keys, URL passwords, and secret texts elsewhere.

    Args:
        known: Secret texts found earlier (e.g. in an earlier call of the same run),
            also masked where they appear.
    """

    def __init__(self, known: Iterable[str] = ()) -> None:
        self.secrets: set[str] = set(known)
        self._pattern: re.Pattern[str] | None = None
        self._compiled = False

    def collect(self, value: Any, path: str) -> None:
        """Finds the texts of secret keys in ``value`` (a plain container)."""
        if isinstance(value, Mapping):
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                if is_secret_key(child) and maskable(item):
                    self.secrets.update(texts_in(item))
                else:
                    self.collect(item, child)
        elif isinstance(value, list | tuple):
            for i, item in enumerate(value):
                self.collect(item, f"{path}.{i}")
        self._compiled = False

    def text(self, text: str) -> str:
        """``text`` with URL passwords and every known secret text masked."""
        text = mask_urls(text)
        if not self._compiled:
            long_enough = sorted(
                (s for s in self.secrets if len(s) >= MIN_SUBSTRING and s != MASK),
                key=len,
                reverse=True,
            )
            self._pattern = (
                re.compile("|".join(re.escape(s) for s in long_enough)) if long_enough else None
            )
            self._compiled = True
        return text if self._pattern is None else self._pattern.sub(MASK, text)

    def container(self, value: Any, path: str) -> Any:
        """A masked copy: a secret key's text or block becomes ``MASK``; other text is scanned."""
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                if is_secret_key(child) and maskable(item):
                    out[key] = MASK
                else:
                    out[key] = self.container(item, child)
            return out
        if isinstance(value, list):
            return [self.container(item, f"{path}.{i}") for i, item in enumerate(value)]
        if isinstance(value, str):
            return self.text(value)
        return value


T = TypeVar("T")

_MAX_DEPTH_KEEPING_SHAPE = 64


def mask_secrets_in(container: T) -> T:
    """A copy of ``container`` with its credentials masked, keeping its shape and types.

    Meant for what is kept outside the run's logs, e.g. the ``hyper_parameters`` of a
    Lightning checkpoint. Unlike the HParams table and ``config.yaml`` (where a secret
    block becomes one ``********``), every text leaf under a secret key becomes
    ``********`` and the structure stays as it was, so that code which reads the
    container (``load_from_checkpoint`` passing it to ``__init__``) still finds every
    argument. Text leaves elsewhere get their URL passwords and any copied secret text
    masked. Numbers, flags, ``None`` and other objects are kept as they are.

    Accepts mappings (dict subclasses such as Lightning's ``AttributeDict`` keep their
    type), lists, tuples, ``argparse.Namespace``, dataclass instances and OmegaConf
    configs (returned resolved, as a new config).

    Raises:
        HParamsError: the container refers to itself, or nests deeper than 64 levels.

    Example:
        >>> mask_secrets_in({"db": {"password": "pw12", "port": 5432}, "dsn": "pg://u:pw12@h"})
        {'db': {'password': '********', 'port': 5432}, 'dsn': 'pg://u:********@h'}
    """
    masker = Masker()
    _collect_any(masker, container, "", set(), 0)
    return _mask_any(masker, container, "", False, set(), 0)  # type: ignore[no-any-return]


def _guard(value: Any, path: str, active: set[int], depth: int) -> None:
    where = f"'{path}'" if path else "the root"
    if id(value) in active:
        raise HParamsError(
            f"Hyperparameters at {where} contain themselves (a self-referential container): "
            "break the cycle before masking them."
        )
    if depth > _MAX_DEPTH_KEEPING_SHAPE:
        raise HParamsError(
            f"Hyperparameters at {where} nest deeper than {_MAX_DEPTH_KEEPING_SHAPE} levels: "
            "flatten that part before masking them."
        )


def _fields(value: Any) -> dict[str, Any] | None:
    if isinstance(value, argparse.Namespace):
        return dict(vars(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return None


def _collect_any(masker: Masker, value: Any, path: str, active: set[int], depth: int) -> None:
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    fields = _fields(value)
    if fields is not None:
        value = fields
    if isinstance(value, Mapping | list | tuple):
        _guard(value, path, active, depth)
        active.add(id(value))
        items = value.items() if isinstance(value, Mapping) else enumerate(value)
        for key, item in items:
            child = f"{path}.{key}" if path else str(key)
            if is_secret_key(child) and maskable(item):
                masker.secrets.update(_texts_any(item))
            else:
                _collect_any(masker, item, child, active, depth + 1)
        active.discard(id(value))


def _texts_any(value: Any) -> Iterable[str]:
    if isinstance(value, DictConfig | ListConfig):
        value = OmegaConf.to_container(value, resolve=True)
    fields = _fields(value)
    yield from texts_in(fields if fields is not None else value)


def _mask_any(
    masker: Masker, value: Any, path: str, secret: bool, active: set[int], depth: int
) -> Any:
    if isinstance(value, str):
        return MASK if secret and value else masker.text(value)
    if isinstance(value, DictConfig | ListConfig):
        plain = OmegaConf.to_container(value, resolve=True)
        return OmegaConf.create(_mask_any(masker, plain, path, secret, active, depth))
    if isinstance(value, argparse.Namespace):
        masked = _mask_any(masker, dict(vars(value)), path, secret, active, depth)
        return argparse.Namespace(**masked)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = _fields(value) or {}
        masked = _mask_any(masker, fields, path, secret, active, depth)
        init = {f.name: masked[f.name] for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **init)
    if not isinstance(value, Mapping | list | tuple):
        return value
    _guard(value, path, active, depth)
    active.add(id(value))
    try:
        if isinstance(value, Mapping):
            items = {}
            for key, item in value.items():
                child = f"{path}.{key}" if path else str(key)
                hidden = secret or (is_secret_key(child) and maskable(item))
                items[key] = _mask_any(masker, item, child, hidden, active, depth + 1)
            return _rebuild(value, items)
        masked = [
            _mask_any(masker, item, f"{path}.{i}", secret, active, depth + 1)
            for i, item in enumerate(value)
        ]
        if isinstance(value, tuple) and hasattr(value, "_fields"):
            return type(value)(*masked)
        return type(value)(masked) if isinstance(value, tuple) else masked
    finally:
        active.discard(id(value))


def _rebuild(original: Mapping[Any, Any], items: dict[Any, Any]) -> Any:
    if type(original) is dict:
        return items
    kind: Any = type(original)
    try:
        return kind(items)
    except TypeError:
        return items
