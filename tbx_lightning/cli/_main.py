"""``tbx-lightning``: train a config-driven experiment, sweep a grid, print the HParams table.

Commands::

    tbx-lightning fit [EXPERIMENT] [key=value ...]        # default: quickstart into ./runs
    tbx-lightning sweep [EXPERIMENT] key=a,b,c other=x,y  # a grid through Hydra's multirun
    tbx-lightning sweep ... --jobs 4 | hydra/launcher=slurm | hydra/sweeper=search
    tbx-lightning hparams RUNS_DIR [--sort METRIC] [--format table|csv|markdown|json]
                          [--all | --all-keys --keys P --metrics P --best] [--width N]
    tbx-lightning list                                    # experiments, groups, sweeps

Configs are composed with Hydra's compose API from ``configs/`` (``--config-dir``
points elsewhere); overrides use OmegaConf dot paths, the same keys that become the
run's HParams columns. A config that does not compose, names an unknown key or
option, or gives a value of the wrong type stops before anything is written.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tbx_lightning.errors import ConfigError

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from tbx_lightning.templates.runner import RunResult

from tbx_lightning.cli._compose import (
    _COMMANDS,
    compose_config,
    find_config_dir,
    hydra_options,
    list_options,
)


def _run(cfg: DictConfig) -> RunResult:
    if cfg.get("runner", "lightning") == "accelerate":
        from tbx_lightning.templates.accelerate_loop import run as run_accelerate

        return run_accelerate(cfg)
    if cfg.get("runner", "lightning") == "hf":
        from tbx_lightning.templates.hf_finetune import run as run_hf

        return run_hf(cfg)
    from tbx_lightning.templates.runner import run as run_lightning

    return run_lightning(cfg)


def _build_error_types() -> tuple[type[Exception], ...]:
    from tbx_lightning.templates.runner import BuildError

    return (BuildError,)


def _tensorboard_line(logdir: str) -> str:
    return f"tensorboard --logdir {shlex.quote(logdir)}"


def _metric_text(metrics: dict[str, float], limit: int = 6) -> str:
    """The epoch-level metrics under their own tag names (``val/acc``, ``train/acc``)."""
    from tbx_lightning.templates.metrics import epoch_metrics

    return "  ".join(f"{k}={v:.4g}" for k, v in epoch_metrics(metrics, limit).items())


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
    """``tbx-lightning sweep``: see :mod:`tbx_lightning.cli._sweep`."""
    from tbx_lightning.cli import _sweep

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
    from tbx_lightning.cli import _table

    def patterns(given: list[str] | None) -> list[str] | None:
        return [p for part in given for p in part.split(",") if p] if given else None

    width = 0 if args.all else args.width
    try:
        records = _table.read_runs(args.runs_dir)
        columns, rows = _table.table_rows(
            records,
            sort=args.sort,
            all_keys=args.all_keys or args.all,
            metrics=patterns(args.metrics),
            keys=patterns(args.keys),
            best=args.best or args.all,
            all_metrics=args.all,
        )
        print(_table.render(columns, rows, args.format, width=width))
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


def cmd_upload(args: argparse.Namespace) -> int:
    """``tbx-lightning upload SPOOL_DIR``: finishes the upload of a remote run."""
    from tbx_lightning._spool import upload_spool
    from tbx_lightning.errors import RunWriterError

    try:
        sent = upload_spool(args.spool_dir, remove=not args.keep)
    except RunWriterError as error:
        print(f"tbx-lightning upload: error: {error}", file=sys.stderr)
        return 1
    print(f"Uploaded {sent} file(s) from {args.spool_dir}.")
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

    from tbx_lightning.cli._table import DEFAULT_WIDTH

    hparams = commands.add_parser(
        "hparams",
        help="print the HParams table of a runs directory",
        description="One row per run: the config keys that differ between runs, the last "
        "value of each val/* metric and of the training loss, status and duration, in at "
        "most --width characters a line.",
    )
    hparams.add_argument("runs_dir", metavar="RUNS_DIR")
    hparams.add_argument(
        "--sort", metavar="METRIC", help="sort by this metric's best value (and show it)"
    )
    hparams.add_argument("--format", choices=("table", "csv", "markdown", "json"), default="table")
    hparams.add_argument("--all-keys", action="store_true", help="show every config key")
    hparams.add_argument(
        "--keys",
        action="append",
        metavar="PATTERN",
        help="config keys to show (fnmatch patterns, comma-separated; default: those that differ)",
    )
    hparams.add_argument(
        "--metrics",
        action="append",
        metavar="PATTERN",
        help="metrics to show (fnmatch patterns, comma-separated, e.g. 'val/*,train/*'; "
        "default: val/* and the training loss)",
    )
    hparams.add_argument("--best", action="store_true", help="add each metric's best value")
    hparams.add_argument(
        "--all",
        action="store_true",
        help="every key, every metric but vitals/* with its best, no width limit",
    )
    hparams.add_argument(
        "--width",
        type=int,
        default=DEFAULT_WIDTH,
        metavar="N",
        help="table format: at most N characters a line (default 120; 0: no limit)",
    )
    hparams.set_defaults(func=cmd_hparams)

    upload = commands.add_parser(
        "upload",
        help="send what a remote run left in its local spool folder",
        description="A remote run whose storage was unreachable at its end keeps the unsent "
        "files in a local spool folder and names it in a warning; this sends them (with the "
        "endpoint and credentials the run used) and deletes the folder once all is sent.",
    )
    upload.add_argument("spool_dir", metavar="SPOOL_DIR")
    upload.add_argument("--keep", action="store_true", help="keep the folder after the upload")
    upload.set_defaults(func=cmd_upload)

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
        code = int(args.func(args))
        sys.stdout.flush()  # inside the try: a closed pipe shows up here, not at exit
        return code
    except BrokenPipeError:
        return _closed_pipe()
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


def _closed_pipe() -> int:
    """The reader of stdout went away (``| head -1``): stop quietly, as ``cat`` does.

    Python would report the broken pipe again when it flushes stdout at exit; pointing
    stdout at the null device first keeps that quiet.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no real file (captured in tests)
        pass
    return 0


# What the `templates` extra brings; a missing one gets the install command, not a traceback.
_TEMPLATE_PACKAGES = {"hydra", "sklearn", "lightning", "accelerate", "tensorboard"}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
