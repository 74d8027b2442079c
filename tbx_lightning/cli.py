"""``tbx-lightning``: train a config-driven experiment, sweep a grid, print the HParams table.

Commands::

    tbx-lightning fit [EXPERIMENT] [key=value ...]        # default: quickstart into ./runs
    tbx-lightning sweep [EXPERIMENT] key=a,b,c other=x,y  # a grid through Hydra's multirun
    tbx-lightning sweep ... --jobs 4 | hydra/launcher=slurm | hydra/sweeper=search
    tbx-lightning hparams RUNS_DIR [--sort METRIC] [--format table|csv|markdown|json]
    tbx-lightning list                                    # experiments, groups, sweeps

Configs are composed with Hydra's compose API from ``configs/`` (``--config-dir``
points elsewhere); overrides use OmegaConf dot paths, the same keys that become the
run's HParams columns. A config that does not compose, names an unknown key or
option, or gives a value of the wrong type stops before anything is written.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tbx_lightning.errors import ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from tbx_lightning.templates.runner import RunResult

__all__ = [
    "ConfigError",
    "compose_config",
    "expand_grid",
    "find_config_dir",
    "list_options",
    "main",
]

ROOT_CONFIG = "train"
DEFAULT_EXPERIMENT = "quickstart"
RUNNERS = ("lightning", "accelerate")
_COMMANDS = ("fit", "sweep", "hparams", "list", "-h", "--help", "--version")
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
    try:
        from hydra.core.config_store import ConfigStore
        from hydra.core.plugins import Plugins

        Plugins.instance()  # registers the installed plugins' configs
        repo: Any = ConfigStore.instance().repo.get("hydra", {})
    except ImportError:
        repo = {}
    for group in _HYDRA_GROUPS:
        names = {p.stem for p in (config_dir / "hydra" / group).glob("*.yaml")}
        names |= {n.removesuffix(".yaml") for n in repo.get(group, {}) if n.endswith(".yaml")}
        options[f"hydra/{group}"] = sorted(names)
    return options


# ---------------------------------------------------------------------------- composing
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
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

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
    from hydra.core.override_parser.types import OverrideType

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
    from hydra.core.override_parser.overrides_parser import OverridesParser

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
    from omegaconf import DictConfig

    return sorted(str(k) for k in node) if isinstance(node, DictConfig) else []


def _check_keys(base: DictConfig, overrides: Sequence[_Override]) -> None:
    from omegaconf import OmegaConf

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
    from omegaconf import DictConfig, ListConfig

    if isinstance(value, DictConfig):
        return "mapping"
    if isinstance(value, ListConfig):
        return "list"
    return type(value).__name__


def _compatible(old: Any, new: Any) -> bool:
    from omegaconf import DictConfig, ListConfig

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
    from omegaconf import OmegaConf

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


def _hydra_message(error: Exception) -> str:
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
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from tbx_lightning.templates.resolvers import register_resolvers

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
        raise ConfigError(_hydra_message(error)) from None
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


def _load_sweep_file(
    name: str, directory: Path
) -> tuple[str | None, dict[str, str], list[str], str | None]:
    """``configs/sweep/NAME.yaml``: experiment, params, Hydra overrides, optimized_metric."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    options = list_options(directory).get("sweep", [])
    if name not in options:
        raise ConfigError(
            f"Unknown sweep {name!r}; choose one of: {', '.join(options) or '(none)'}"
        )
    try:
        with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
            grid = compose(f"sweep/{name}")
    except HydraException as error:
        raise ConfigError(_hydra_message(error)) from None
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


def _load_grid(name: str, directory: Path) -> tuple[str | None, dict[str, str]]:
    """``configs/sweep/NAME.yaml``'s experiment and params (``key: 'a,b,c'``)."""
    experiment, params, _, _ = _load_sweep_file(name, directory)
    return experiment, params


# ---------------------------------------------------------------------------- running
def _run(cfg: DictConfig) -> RunResult:
    if cfg.get("runner", "lightning") == "accelerate":
        from tbx_lightning.templates.accelerate_loop import run as run_accelerate

        return run_accelerate(cfg)
    from tbx_lightning.templates.runner import run as run_lightning

    return run_lightning(cfg)


def _build_error_types() -> tuple[type[Exception], ...]:
    from tbx_lightning.templates.runner import BuildError

    return (BuildError,)


def _tensorboard_line(logdir: str) -> str:
    return f"tensorboard --logdir {shlex.quote(logdir)}"


def _metric_text(metrics: dict[str, float], limit: int = 6) -> str:
    shown: dict[str, float] = {}
    for key in sorted(metrics):
        if key.startswith("monitor/") or key.endswith("_step") or key == "epoch":
            continue
        shown.setdefault(key.removesuffix("_epoch"), metrics[key])
    return "  ".join(f"{k}={v:.4g}" for k, v in list(shown.items())[:limit])


def _summary(result: RunResult) -> str:
    lines = [
        f"Run {result.status} in {result.seconds:.1f} s",
        f"  run directory: {result.log_dir}",
        f"  config:        {os.path.join(result.log_dir, 'config.yaml')}",
    ]
    if result.checkpoint:
        lines.append(f"  checkpoint:    {result.checkpoint}")
    if result.metrics:
        lines.append(f"  metrics:       {_metric_text(result.metrics)}")
    if result.error is not None:
        lines.append(f"  error:         {type(result.error).__name__}: {result.error}")
    lines += ["View it in TensorBoard:", f"  {_tensorboard_line(result.experiment_dir)}"]
    return "\n".join(lines)


def _split_positional(args: Sequence[str]) -> tuple[str | None, list[str]]:
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


def cmd_fit(args: argparse.Namespace) -> int:
    """``tbx-lightning fit``."""
    from omegaconf import OmegaConf

    experiment, overrides = _split_positional(args.args)
    cfg = compose_config(experiment, overrides, args.config_dir)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg, resolve=True), end="")
        return 0
    try:
        result = _run(cfg)
    except _build_error_types() as error:
        raise ConfigError(str(error)) from None
    print(_summary(result), flush=True)
    return 0 if result.status == "success" else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    """``tbx-lightning sweep``: see :mod:`tbx_lightning._sweep`."""
    from tbx_lightning import _sweep

    return _sweep.run_sweep(args)


def _record_failed(cfg: DictConfig, error: BaseException) -> None:
    """Writes the config and a failed status for a run that broke before training."""
    from tbx_lightning.templates.runner import build_loggers, hyperparameters

    try:
        loggers = build_loggers(cfg)
        for logger in loggers:
            logger.log_hyperparams(hyperparameters(cfg))
            logger.finalize("failed")
            if hasattr(logger, "close"):
                logger.close()
    except Exception as nested:  # the run already failed; say so and keep sweeping
        print(f"  (could not record the failed run: {nested})", file=sys.stderr)


def cmd_hparams(args: argparse.Namespace) -> int:
    """``tbx-lightning hparams``."""
    from tbx_lightning import _table

    try:
        records = _table.read_runs(args.runs_dir)
        metrics = [m for part in args.metrics for m in part.split(",")] if args.metrics else None
        columns, rows = _table.table_rows(
            records, sort=args.sort, all_keys=args.all_keys, metrics=metrics
        )
        print(_table.render(columns, rows, args.format))
    except _table.TableError as error:
        raise ConfigError(str(error)) from None
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """``tbx-lightning list``."""
    directory = find_config_dir(args.config_dir)
    print(f"Configs in {directory}")
    for group, options in list_options(directory).items():
        print(f"  {group + '/':<12} {', '.join(options)}")
    for group, options in hydra_options(directory).items():
        print(f"  {group + '/':<16} {', '.join(options) or '(pip install tbx-lightning[sweep])'}")
    return 0


# ---------------------------------------------------------------------------- entry point
def _parser() -> argparse.ArgumentParser:
    from tbx_lightning._version import __version__

    parser = argparse.ArgumentParser(
        prog="tbx-lightning",
        description="Config-driven TensorBoard experiments for Lightning and Accelerate.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def config_dir_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config-dir",
            metavar="DIR",
            help="your own configs folder (a copy of configs/ with train.yaml); "
            "default: the configs that ship with tbx-lightning",
        )

    fit = commands.add_parser(
        "fit",
        help="train one experiment (default: quickstart into ./runs)",
        description="Compose configs/experiment/EXPERIMENT.yaml with key=value overrides "
        "and train it. The config keys become the run's HParams columns.",
    )
    fit.add_argument("args", nargs="*", metavar="[EXPERIMENT] [key=value ...]")
    fit.add_argument(
        "--print-config", action="store_true", help="print the composed config and exit"
    )
    config_dir_option(fit)
    fit.set_defaults(func=cmd_fit)

    sweep = commands.add_parser(
        "sweep",
        help="run a grid or a search through Hydra's multirun, into one experiment directory",
        description="Every combination of key=a,b,c overrides becomes one run under "
        "runs/NAME/version_N, so TensorBoard's HParams tab compares them. Each run is a "
        "process of Hydra's launcher (hydra/launcher=parallel|processes|slurm or any "
        "installed launcher); hydra/sweeper=search runs an Optuna search instead of a grid.",
    )
    sweep.add_argument("args", nargs="*", metavar="[EXPERIMENT] key=a,b,c ... [hydra/...=...]")
    sweep.add_argument("--grid", metavar="NAME", help="start from configs/sweep/NAME.yaml")
    sweep.add_argument(
        "--name", help="experiment directory name (default: EXPERIMENT_sweep_TIMESTAMP)"
    )
    sweep.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="N runs at once on this machine (Hydra's joblib launcher; default: 1)",
    )
    sweep.add_argument(
        "--optimized-metric",
        metavar="METRIC",
        help="the scalar tag a search optimises, e.g. val/acc (its best value per run)",
    )
    config_dir_option(sweep)
    sweep.set_defaults(func=cmd_sweep)

    hparams = commands.add_parser(
        "hparams",
        help="print the HParams table of a runs directory",
        description="One row per run: the config keys that differ between runs, the last "
        "and best value of each metric, status and duration.",
    )
    hparams.add_argument("runs_dir", metavar="RUNS_DIR")
    hparams.add_argument("--sort", metavar="METRIC", help="sort by this metric's best value")
    hparams.add_argument("--format", choices=("table", "csv", "markdown", "json"), default="table")
    hparams.add_argument("--all-keys", action="store_true", help="show every config key")
    hparams.add_argument(
        "--metrics",
        action="append",
        metavar="PATTERN",
        help="metrics to show (fnmatch patterns, comma-separated; default: all but monitor/*)",
    )
    hparams.set_defaults(func=cmd_hparams)

    listing = commands.add_parser("list", help="list experiments, config groups and sweeps")
    config_dir_option(listing)
    listing.set_defaults(func=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 1 a run failed, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv:
        argv = ["fit"]
    if argv[0] not in _COMMANDS and not argv[0].startswith("-"):
        argv = ["fit", *argv]  # `tbx-lightning quickstart lr=...` reads as `fit`
    # Overrides may come before or after options (`fit quickstart --config-dir d a=1`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        flags = [e for e in extra if e.startswith("-")]
        if flags or getattr(args, "args", None) is None:
            parser.error(f"unrecognized arguments: {' '.join(flags or extra)}")
        args.args = [*args.args, *extra]
    try:
        return int(args.func(args))
    except ConfigError as error:
        print(f"tbx-lightning {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] not in _TEMPLATE_PACKAGES:
            raise
        print(
            f"tbx-lightning {args.command}: error: the experiment templates need {error.name!r}, "
            "which is not installed: pip install 'tbx-lightning[templates]'",
            file=sys.stderr,
        )
        return 2


# What the `templates` extra brings; a missing one gets the install command, not a traceback.
_TEMPLATE_PACKAGES = {"hydra", "sklearn", "lightning", "accelerate", "tensorboard"}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
