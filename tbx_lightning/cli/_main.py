"""``tbx-lightning``: train a config-driven experiment, sweep a grid, read runs back.

Commands::

    tbx-lightning fit [EXPERIMENT] [key=value ...]        # default: quickstart into ./runs
    tbx-lightning sweep [EXPERIMENT] key=a,b,c other=x,y  # a grid through Hydra's multirun
    tbx-lightning sweep ... --jobs 4 | hydra/launcher=slurm | hydra/sweeper=search
    tbx-lightning hparams RUNS_DIR [--over KEYS] [--sort METRIC]
                          [--format table|csv|markdown|json]
                          [--all | --all-keys --keys P --metrics P --best] [--width N]
    tbx-lightning aggregate RUNS_DIR --over KEYS [--metrics P]   # bands in TensorBoard
    tbx-lightning alerts RUNS_DIR [--format ...]          # every alert, newest first
    tbx-lightning upload SPOOL_DIR                        # finish a remote run's upload
    tbx-lightning list                                    # experiments, groups, sweeps

Configs are composed with Hydra's compose API from ``configs/`` (``--config-dir``
points elsewhere); overrides use OmegaConf dot paths, the same keys that become the
run's HParams columns. A config that does not compose, names an unknown key or
option, or gives a value of the wrong type stops before anything is written.

Each command lives in the module named in :data:`COMMANDS` and is imported when it
runs, so the commands that read runs (``hparams``, ``alerts``, ``upload``) start
without torch, Lightning or Hydra.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

import tbx_lightning
from tbx_lightning.cli._table import DEFAULT_WIDTH, FORMATS
from tbx_lightning.errors import ConfigError, RunWriterError
from tbx_lightning.runs import STALLED_AFTER, upload_spool

__all__ = ["COMMANDS", "main"]

COMMANDS: dict[str, str] = {
    "fit": "tbx_lightning.cli._train:fit",
    "sweep": "tbx_lightning.cli._sweep:run_sweep",
    "hparams": "tbx_lightning.cli._table:hparams",
    "aggregate": "tbx_lightning.cli._aggregate:aggregate",
    "alerts": "tbx_lightning.cli._alerts:alerts",
    "list": "tbx_lightning.cli._compose:list_command",
    "upload": "tbx_lightning.cli._main:upload",
}
"""Each command and the function that runs it, as ``module:function``."""
_FIRST_WORDS = (*COMMANDS, "-h", "--help", "--version")


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    module, function = COMMANDS[name].split(":")
    # The one place commands are imported: only the command that runs is loaded.
    return getattr(importlib.import_module(module), function)  # type: ignore[no-any-return]


def upload(args: argparse.Namespace) -> int:
    """``tbx-lightning upload SPOOL_DIR``: finishes the upload of a remote run."""
    try:
        sent = upload_spool(args.spool_dir, remove=not args.keep)
    except RunWriterError as error:
        print(f"tbx-lightning upload: error: {error}", file=sys.stderr)
        return 1
    print(f"Uploaded {sent} file(s) from {args.spool_dir}.")
    return 0


# ---------------------------------------------------------------------------- the parser
def _config_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config-dir",
        metavar="DIR",
        help="your own configs folder (a copy of configs/ with train.yaml); "
        "default: the configs that ship with tbx-lightning",
    )


def _hparams_parser(hparams: argparse.ArgumentParser) -> None:
    hparams.add_argument("runs_dir", metavar="RUNS_DIR")
    hparams.add_argument(
        "--over",
        action="append",
        metavar="KEYS",
        help="one row per config left when these keys are taken out (e.g. data.seed; "
        "comma-separated or repeated, fnmatch patterns): mean, standard deviation and "
        "number of runs of each metric",
    )
    hparams.add_argument(
        "--sort", metavar="METRIC", help="sort by this metric's best value (and show it)"
    )
    hparams.add_argument("--format", choices=FORMATS, default="table")
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
        help="every key, every metric but the monitor's with its best, no width limit",
    )
    hparams.add_argument(
        "--width",
        type=int,
        default=DEFAULT_WIDTH,
        metavar="N",
        help="table format: at most N characters a line (default 120; 0: no limit)",
    )
    hparams.add_argument(
        "--stalled-after",
        type=float,
        default=STALLED_AFTER,
        metavar="SECONDS",
        help="a running run whose writer gave no sign of life for this long shows as "
        f"stalled (default {STALLED_AFTER:g})",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tbx-lightning",
        description="Config-driven TensorBoard experiments for Lightning and Accelerate.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {tbx_lightning.__version__}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

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
    _config_dir_option(fit)

    sweep = commands.add_parser(
        "sweep",
        help="run a grid or a search through Hydra's multirun, into one experiment directory",
        description="Every combination of key=a,b,c overrides becomes one run under "
        "runs/NAME/version_N, so TensorBoard's HParams tab compares them. Each run is a "
        "process of Hydra's launcher (hydra/launcher=parallel|processes|slurm or any "
        "installed launcher); hydra/sweeper=search runs an Optuna search instead of a grid. "
        "A sweep over a seed key (seed, data.seed, ...) ends with the bands of "
        "`tbx-lightning aggregate` over it.",
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
    _config_dir_option(sweep)

    hparams = commands.add_parser(
        "hparams",
        help="print the HParams table of a runs directory",
        description="One row per run: the config keys that differ between runs, the last "
        "value of each val/* metric and of the training loss, status and duration, in at "
        "most --width characters a line. With --over KEYS, one row per config left when "
        "KEYS are taken out, with the mean, standard deviation and count of each metric.",
    )
    _hparams_parser(hparams)

    aggregate = commands.add_parser(
        "aggregate",
        help="write one band run per config over seeds, for TensorBoard",
        description="Groups the runs as `hparams --over KEYS` does and writes, per group, "
        "RUNS_DIR/aggregate/<group>: each scalar tag's per-step mean and its band (mean "
        "± sample standard deviation) with a Custom Scalars layout of Margin charts. "
        "Rebuilds what an earlier call wrote.",
    )
    aggregate.add_argument("runs_dir", metavar="RUNS_DIR")
    aggregate.add_argument(
        "--over",
        action="append",
        required=True,
        metavar="KEYS",
        help="config keys to aggregate over (e.g. seed; comma-separated or repeated, "
        "fnmatch patterns)",
    )
    aggregate.add_argument(
        "--metrics",
        action="append",
        metavar="PATTERN",
        help="scalar tags to aggregate (fnmatch patterns; default: all but vitals/*, "
        "vitals_layers/*, by_tokens/*, by_samples/* and epoch)",
    )

    alerts = commands.add_parser(
        "alerts",
        help="list every alert of every run, newest first",
        description="The training monitor's alerts (the `alerts` Text entry of each run): "
        "time, run, step, kind, where, value, threshold and message. --format json is "
        "for scripts and agents.",
    )
    alerts.add_argument("runs_dir", metavar="RUNS_DIR")
    alerts.add_argument("--format", choices=FORMATS, default="table")
    alerts.add_argument("--limit", type=int, metavar="N", help="only the newest N alerts")
    alerts.add_argument(
        "--width",
        type=int,
        default=DEFAULT_WIDTH,
        metavar="N",
        help="table format: messages clipped to fit N characters a line (0: no limit)",
    )

    upload = commands.add_parser(
        "upload",
        help="send what a remote run left in its local spool folder",
        description="A remote run whose storage was unreachable at its end keeps the unsent "
        "files in a local spool folder and names it in a warning; this sends them (with the "
        "endpoint and credentials the run used) and deletes the folder once all is sent.",
    )
    upload.add_argument("spool_dir", metavar="SPOOL_DIR")
    upload.add_argument("--keep", action="store_true", help="keep the folder after the upload")

    listing = commands.add_parser("list", help="list experiments, config groups and sweeps")
    _config_dir_option(listing)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 1 a run failed, 2 bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv:
        argv = ["fit"]
    if argv[0] not in _FIRST_WORDS and not argv[0].startswith("-"):
        argv = ["fit", *argv]  # `tbx-lightning quickstart lr=...` reads as `fit`
    # Overrides may come before or after options (`fit quickstart --config-dir d a=1`).
    args, extra = parser.parse_known_args(argv)
    if extra:
        flags = [e for e in extra if e.startswith("-")]
        if flags or getattr(args, "args", None) is None:
            parser.error(f"unrecognized arguments: {' '.join(flags or extra)}")
        args.args = [*args.args, *extra]
    if args.command is None:
        parser.error("choose a command: " + ", ".join(COMMANDS))
    try:
        code = int(_command(args.command)(args))
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
