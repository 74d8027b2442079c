"""Composing a run's config: Hydra's compose API over ``configs/``, with checked overrides.

An override that names an unknown key or option, or gives a value of the wrong type,
stops with a :class:`~tbx_lightning.errors.ConfigError` before anything is written.
Used by the commands that compose configs (fit, sweep, list); only Hydra's public
API (``hydra``, ``hydra.core``, ``hydra.errors``) is used.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.core.plugins import Plugins
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tbx_lightning.errors import ConfigError
from tbx_lightning.templates.resolvers import register_resolvers

ROOT_CONFIG = "train"
DEFAULT_EXPERIMENT = "quickstart"
RUNNERS = ("lightning", "accelerate", "hf")
# Groups that are not part of the root config's defaults list.
_NOT_COMPOSED = ("sweep",)
# Hydra's own groups (launchers, sweepers): picked with hydra/launcher=..., not composed.
_HYDRA_GROUPS = ("launcher", "sweeper")


# ---------------------------------------------------------------------------- finding configs
def _candidate_dirs() -> list[Path]:
    package = Path(__file__).resolve().parent
    return [package.parent / "configs", package / "configs"]


def find_config_dir(config_dir: str | os.PathLike[str] | None = None) -> Path:
    """The configs directory: ``config_dir`` if given, else the checkout's or the packaged one.

    Lookup order: ``config_dir`` (``--config-dir``), ``$TBX_LIGHTNING_CONFIG_DIR``,
    ``configs/`` next to the package (a source checkout), ``tbx_lightning/configs``
    (shipped inside the wheel).

    Raises:
        ConfigError: The directory has no ``train.yaml``.
    """
    explicit = config_dir or os.environ.get("TBX_LIGHTNING_CONFIG_DIR")
    if explicit:
        path = Path(explicit).expanduser().resolve()
        if not (path / f"{ROOT_CONFIG}.yaml").is_file():
            raise ConfigError(
                f"--config-dir {str(explicit)!r} has no {ROOT_CONFIG}.yaml: point it at a copy "
                "of the configs/ folder (train.yaml plus the model/, data/, ... groups)."
            )
        return path
    for path in _candidate_dirs():
        if (path / f"{ROOT_CONFIG}.yaml").is_file():
            return path
    raise ConfigError(
        "No configs found next to the package: reinstall tbx-lightning or pass --config-dir."
    )


def list_options(config_dir: Path) -> dict[str, list[str]]:
    """Options of each config group: ``{"experiment": ["finetune", "quickstart", ...], ...}``."""
    groups: dict[str, list[str]] = {}
    for child in sorted(config_dir.iterdir()):
        if child.is_dir() and not child.name.startswith((".", "_", "hydra")):
            groups[child.name] = sorted(p.stem for p in child.glob("*.yaml"))
    return groups


def hydra_options(config_dir: Path) -> dict[str, list[str]]:
    """Options of Hydra's launcher and sweeper groups: ours in ``configs/hydra/`` and the plugins'."""
    options: dict[str, list[str]] = {}
    Plugins.instance()  # registers the installed plugins' configs
    repo: Any = ConfigStore.instance().repo.get("hydra", {})
    for group in _HYDRA_GROUPS:
        names = {p.stem for p in (config_dir / "hydra" / group).glob("*.yaml")}
        names |= {n.removesuffix(".yaml") for n in repo.get(group, {}) if n.endswith(".yaml")}
        options[f"hydra/{group}"] = sorted(names)
    return options


# ---------------------------------------------------------------------------- composing
def split_positional(args: Sequence[str]) -> tuple[str | None, list[str]]:
    """A command's positional arguments as ``(EXPERIMENT or None, [key=value overrides])``.

    Raises:
        ConfigError: a second word that is no override.
    """
    experiment = None
    overrides = []
    for arg in args:
        if "=" in arg or arg.startswith(("+", "~")):
            overrides.append(arg)
        elif experiment is None:
            experiment = arg
        else:
            raise ConfigError(
                f"Unexpected argument {arg!r}: give one EXPERIMENT, then key=value overrides."
            )
    return experiment, overrides


@dataclass(frozen=True)
class _Override:
    text: str
    key: str
    kind: str  # "change", "add", "force_add", "delete"
    is_group: bool
    is_sweep: bool


def parse_hydra_overrides(texts: Sequence[str]) -> list[Any]:
    """Each override parsed with Hydra's grammar, in order.

    Raises:
        ConfigError: an override that does not parse; the message names it.
    """
    parser = OverridesParser.create()
    parsed = []
    for text in texts:
        try:
            (override,) = parser.parse_overrides([text])
        except OverrideParseException as error:
            raise ConfigError(
                f"Cannot parse override {text!r}: write key=value with a dot path such as "
                f"model.optimizer.lr=0.01 ({str(error).splitlines()[0]})"
            ) from None
        parsed.append(override)
    return parsed


def _parse_overrides(overrides: Sequence[str], groups: dict[str, list[str]]) -> list[_Override]:
    parsed = []
    for text, override in zip(overrides, parse_hydra_overrides(overrides), strict=True):
        key = override.key_or_group
        kind = {
            OverrideType.CHANGE: "change",
            OverrideType.ADD: "add",
            OverrideType.FORCE_ADD: "force_add",
            OverrideType.DEL: "delete",
        }[override.type]
        parsed.append(_Override(text, key, kind, key in groups, bool(override.is_sweep_override())))
    return parsed


def _check_group_options(overrides: Sequence[_Override], groups: dict[str, list[str]]) -> None:
    parser = OverridesParser.create()
    for override in overrides:
        if not override.is_group or override.kind == "delete":
            continue
        if override.key in _NOT_COMPOSED or override.key == "experiment":
            raise ConfigError(
                f"{override.text!r}: pick the {override.key} as the command's first argument, "
                f"not as an override; choose one of: {', '.join(groups[override.key])}"
            )
        (parsed,) = parser.parse_overrides([override.text])
        values = (
            list(parsed.sweep_string_iterator()) if parsed.is_sweep_override() else [parsed.value()]
        )
        for value in values:
            if value is not None and str(value) not in groups[override.key]:
                raise ConfigError(
                    f"Unknown option {str(value)!r} for config group {override.key!r}; "
                    f"choose one of: {', '.join(groups[override.key])}"
                )


def _keys_under(node: Any) -> list[str]:
    return sorted(str(k) for k in node) if isinstance(node, DictConfig) else []


def _check_keys(base: DictConfig, overrides: Sequence[_Override]) -> None:
    missing = object()
    for override in overrides:
        if override.is_group or override.kind not in ("change", "delete"):
            continue
        value = OmegaConf.select(
            base, override.key, default=missing, throw_on_resolution_failure=False
        )
        if value is not missing:
            continue
        parts = override.key.split(".")
        parent_key, parent = "", base
        for i in range(len(parts) - 1, 0, -1):
            candidate = OmegaConf.select(
                base, ".".join(parts[:i]), default=missing, throw_on_resolution_failure=False
            )
            if candidate is not missing:
                parent_key, parent = ".".join(parts[:i]), candidate
                break
        where = f"under {parent_key!r}" if parent_key else "at the top level"
        keys = _keys_under(parent)
        raise ConfigError(
            f"Unknown key {override.key!r}: the keys {where} are: {', '.join(keys) or '(none)'}. "
            f"To add a new key, write +{override.key}=VALUE."
        )


def _type_name(value: Any) -> str:
    if isinstance(value, DictConfig):
        return "mapping"
    if isinstance(value, ListConfig):
        return "list"
    return type(value).__name__


def _compatible(old: Any, new: Any) -> bool:
    if old is None or new is None:
        return True
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, int):
        return isinstance(new, int)
    if isinstance(old, float):
        return isinstance(new, int | float)
    if isinstance(old, str):
        return isinstance(new, str | int | float)  # "32-true" and 16 are both fine for Lightning
    if isinstance(old, DictConfig):
        return isinstance(new, DictConfig)
    if isinstance(old, ListConfig):
        return isinstance(new, ListConfig)
    return True


def _check_types(base: DictConfig, cfg: DictConfig, overrides: Sequence[_Override]) -> None:
    for override in overrides:
        if override.is_group or override.kind != "change":
            continue
        old = OmegaConf.select(base, override.key, throw_on_resolution_failure=False)
        new = OmegaConf.select(cfg, override.key, throw_on_resolution_failure=False)
        if not _compatible(old, new):
            shown = (
                OmegaConf.to_yaml(old).strip() if _type_name(old) in ("mapping", "list") else old
            )
            raise ConfigError(
                f"Wrong type for {override.key!r}: got {new!r} ({_type_name(new)}), expected "
                f"{_type_name(old)} like the default {shown!r}."
            )


def hydra_message(error: Exception) -> str:
    """A Hydra error's message without the config search path Hydra appends."""
    return str(error).split("\n\nConfig search path")[0].strip()


def compose_config(
    experiment: str | None = None,
    overrides: Sequence[str] = (),
    config_dir: str | os.PathLike[str] | None = None,
) -> DictConfig:
    """Composes ``train.yaml`` + ``experiment/<experiment>.yaml`` + overrides, and checks it.

    Args:
        experiment: A file stem under ``experiment/``; ``None`` means ``quickstart``.
        overrides: ``key=value`` in OmegaConf dot-path syntax, or ``group=option``;
            Hydra's ``+key=value`` adds a key and ``~key`` deletes one.
        config_dir: The configs directory; see :func:`find_config_dir`.

    Returns:
        The composed config with every interpolation checked (still unresolved).

    Raises:
        ConfigError: Unknown experiment, group option or key, a value of the wrong type,
            or a config that does not compose or resolve.
    """
    register_resolvers()
    directory = find_config_dir(config_dir)
    groups = list_options(directory)
    experiment = experiment or DEFAULT_EXPERIMENT
    experiments = groups.get("experiment", [])
    if experiment not in experiments:
        raise ConfigError(
            f"Unknown experiment {experiment!r}; choose one of: {', '.join(experiments)} "
            f"(files in {directory / 'experiment'})"
        )
    parsed = _parse_overrides(overrides, groups)
    sweeps = [o.text for o in parsed if o.is_sweep]
    if sweeps:
        raise ConfigError(
            f"{sweeps[0]!r} lists several values: use `tbx-lightning sweep` for a grid, "
            "or quote a value that contains a comma (key='a,b')."
        )
    _check_group_options(parsed, groups)
    first = [f"experiment={experiment}"]
    try:
        with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
            base = compose(ROOT_CONFIG, overrides=first + [o.text for o in parsed if o.is_group])
            _check_keys(base, parsed)
            cfg = compose(ROOT_CONFIG, overrides=first + list(overrides))
    except HydraException as error:
        raise ConfigError(hydra_message(error)) from None
    except OmegaConfBaseException as error:
        raise ConfigError(str(error)) from None
    _check_types(base, cfg, parsed)
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"The config does not resolve: {error}") from None
    if cfg.get("runner", "lightning") not in RUNNERS:
        raise ConfigError(
            f"Unknown runner {cfg.runner!r}; choose one of: {', '.join(RUNNERS)} (key: runner)"
        )
    return cfg


def expand_grid(params: dict[str, str] | Sequence[str]) -> list[list[str]]:
    """The cartesian product of ``key=a,b,c`` overrides, as lists of ``key=value`` overrides.

    Uses Hydra's override grammar, so ``range(1,4)``, ``choice(a,b)`` and quoted values
    with commas work as they do in a Hydra multirun.

    Example:
        >>> expand_grid(["model.optimizer.lr=0.1,0.01", "data.batch_size=32"])
        [['model.optimizer.lr=0.1', 'data.batch_size=32'], ['model.optimizer.lr=0.01', 'data.batch_size=32']]
    """
    texts = [f"{k}={v}" for k, v in params.items()] if isinstance(params, dict) else list(params)
    axes: list[list[str]] = []
    for text, override in zip(texts, parse_hydra_overrides(texts), strict=True):
        if override.is_sweep_override():
            key = override.get_key_element()
            axes.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            axes.append([text])
    return [list(point) for point in itertools.product(*axes)]


def load_sweep_file(
    name: str, directory: Path
) -> tuple[str | None, dict[str, str], list[str], str | None]:
    """``configs/sweep/NAME.yaml``: experiment, params, Hydra overrides, optimized_metric."""
    options = list_options(directory).get("sweep", [])
    if name not in options:
        raise ConfigError(
            f"Unknown sweep {name!r}; choose one of: {', '.join(options) or '(none)'}"
        )
    try:
        with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
            grid = compose(f"sweep/{name}")
    except HydraException as error:
        raise ConfigError(hydra_message(error)) from None
    grid = grid.get("sweep", grid)
    params = OmegaConf.to_container(grid.get("params") or {}, resolve=True)
    if not isinstance(params, dict):
        raise ConfigError(f"sweep/{name}.yaml: `params` must map keys to 'a,b,c' values.")
    flat = {
        str(k): ",".join(map(str, v)) if isinstance(v, list) else str(v) for k, v in params.items()
    }
    node = grid.get("hydra")
    hydra = {} if node is None else OmegaConf.to_container(node, resolve=False)
    if not isinstance(hydra, dict):
        raise ConfigError(
            f"sweep/{name}.yaml: `hydra` must map Hydra override keys to values, "
            "e.g. `hydra/sweeper: search`."
        )
    hydra_overrides = [f"{k!s}={v}" for k, v in hydra.items()]
    for text in hydra_overrides:
        if not text.startswith(("hydra/", "hydra.")):
            raise ConfigError(
                f"sweep/{name}.yaml: {text!r} under `hydra` is not a Hydra key "
                "(hydra/launcher, hydra/sweeper, hydra.launcher.*, hydra.sweeper.*); "
                "put the run's own keys under `params`."
            )
    metric = grid.get("optimized_metric")
    return grid.get("experiment"), flat, hydra_overrides, None if metric is None else str(metric)


def list_command(args: Any) -> int:
    """``tbx-lightning list``: experiments, config groups, sweeps, launchers and sweepers."""
    directory = find_config_dir(args.config_dir)
    print(f"Configs in {directory}")
    for group, options in list_options(directory).items():
        print(f"  {group + '/':<12} {', '.join(options)}")
    for group, options in hydra_options(directory).items():
        print(f"  {group + '/':<16} {', '.join(options) or '(pip install tbx-lightning[sweep])'}")
    return 0


def _load_grid(name: str, directory: Path) -> tuple[str | None, dict[str, str]]:
    """``configs/sweep/NAME.yaml``'s experiment and params (``key: 'a,b,c'``)."""
    experiment, params, _, _ = load_sweep_file(name, directory)
    return experiment, params
