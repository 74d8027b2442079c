"""``tbx-lightning sweep`` on Hydra's multirun: grids, searches, launchers, progress, the table.

The command composes and checks what it can before anything runs (every grid point,
every value of a search space's bounds and choices, the Hydra launcher and sweeper
options), then hands the sweep to Hydra through its public entry point,
``hydra.main``, in multirun mode: its sweeper picks the points (the basic sweeper:
the grid; Optuna: a search) and its launcher starts them (joblib: worker processes on
this machine; submitit: local processes or SLURM jobs). Every run is :func:`job` in a
process of the launcher's; it trains with the same runner as ``tbx-lightning fit``,
claims its own ``version_N`` in the experiment directory, sends its output to a log
file, and leaves a small marker file that this process reads to print a progress line
per run. The objective a search needs is read back from the finished run itself. A
sweep over a seed key ends with the bands of ``tbx-lightning aggregate`` over it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import hydra
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.types import IntervalSweep
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from tbx_lightning.cli._aggregate import write_aggregates
from tbx_lightning.cli._compose import (
    DEFAULT_EXPERIMENT,
    ROOT_CONFIG,
    compose_config,
    expand_grid,
    find_config_dir,
    hydra_message,
    hydra_options,
    load_sweep_file,
    parse_hydra_overrides,
    split_positional,
)
from tbx_lightning.cli._table import render, table_rows
from tbx_lightning.cli._train import metric_text, record_failed, tensorboard_line, train
from tbx_lightning.errors import ConfigError
from tbx_lightning.runs import minimizes, read_run_dir, read_runs
from tbx_lightning.templates.resolvers import register_resolvers
from tbx_lightning.templates.runner import experiment_dir_of

__all__ = ["DIRECTION_ENV", "MARKER", "OBJECTIVE_ENV", "job", "run_sweep", "seed_keys"]

OBJECTIVE_ENV = "TBX_LIGHTNING_OBJECTIVE"
DIRECTION_ENV = "TBX_LIGHTNING_DIRECTION"
MARKER = "tbx_job.json"
OUTPUT_LOG = "output.log"
_SWEEP_EXTRA = "pip install 'tbx-lightning[sweep]'"
# The root config of the multirun: the configs directory's train.yaml, which Hydra finds
# through ``hydra.searchpath`` (Hydra looks a primary config up before it reads that
# option, so the root itself comes from Hydra's ConfigStore).
_ROOT_NODE = "tbx_lightning_sweep"


def _quote(value: str) -> str:
    """A value for Hydra's override grammar, quoted so paths and names pass as they are."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override_key(text: str) -> str:
    """``model.lr`` of ``model.lr=0.1``, ``+model.lr=0.1`` or ``~model.lr``."""
    return text.split("=", 1)[0].lstrip("+~")


def is_hydra_override(text: str) -> bool:
    """Whether an override is for Hydra itself (``hydra/launcher=...``, ``hydra.sweeper.x=...``)."""
    key = override_key(text)
    return key == "hydra" or key.startswith(("hydra/", "hydra."))


def joblib_available() -> bool:
    """Whether Hydra's joblib launcher plugin is installed."""
    return importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") is not None


# ---------------------------------------------------------------------------- the plan
@dataclass
class SweepPlan:
    """Everything the sweep runs with, composed and checked before the first run."""

    experiment: str
    name: str
    overrides: list[str]  # the task's overrides, sweeps (a,b / interval(...)) included
    hydra_overrides: list[str]
    swept_keys: list[str]
    total: int | None
    search: bool
    metric: str | None
    direction: str
    experiment_dir: str
    sweep_dir: str
    config_dir: Path
    notes: list[str] = field(default_factory=list)


def _probe_values(override: Any) -> list[str]:
    """Values that stand for a sweep override when checking it: every choice, or the bounds."""
    value = override.value()
    if isinstance(value, IntervalSweep):
        return [str(value.start), str(value.end)]
    return [str(v) for v in override.sweep_string_iterator()]


def _merge_hydra(first: Sequence[str], then: Sequence[str]) -> list[str]:
    """Hydra overrides of ``first`` whose key ``then`` does not set again, then ``then``."""
    keys = {override_key(t) for t in then}
    return [t for t in first if override_key(t) not in keys] + list(then)


def _compose_hydra(
    directory: Path, experiment: str, fixed: Sequence[str], hydra_overrides: Sequence[str]
) -> DictConfig:
    try:
        with initialize_config_dir(config_dir=str(directory), version_base="1.3"):
            return compose(
                ROOT_CONFIG,
                overrides=[f"experiment={experiment}", *fixed, *hydra_overrides],
                return_hydra_config=True,
            )
    except (HydraException, OmegaConfBaseException) as error:
        message = hydra_message(error)
        missing = re.search(r"Could not find '(hydra/(?:launcher|sweeper))/([^']+)'", message)
        if missing:
            group, option = missing.groups()
            choices = hydra_options(directory).get(group, [])
            message = (
                f"Unknown option {option!r} for {group}; choose one of: "
                f"{', '.join(choices) or '(none)'}. Hydra's launcher and sweeper plugins "
                f"come with {_SWEEP_EXTRA}; ours are in configs/hydra/."
            )
        raise ConfigError(" ".join(message.split())) from None


def plan_sweep(args: argparse.Namespace) -> SweepPlan:
    """Reads the command line and the grid file into a checked :class:`SweepPlan`."""
    directory = find_config_dir(args.config_dir)
    experiment, given = split_positional(args.args)
    params: dict[str, str] = {}
    grid_hydra: list[str] = []
    metric = args.optimized_metric
    if args.grid:
        grid_experiment, params, grid_hydra, grid_metric = load_sweep_file(args.grid, directory)
        experiment = experiment or grid_experiment
        metric = metric or grid_metric
    experiment = experiment or DEFAULT_EXPERIMENT
    cli_hydra = [o for o in given if is_hydra_override(o)]
    task = [*(f"{k}={v}" for k, v in params.items()), *(o for o in given if o not in cli_hydra)]
    hydra_overrides = _merge_hydra(grid_hydra, cli_hydra)
    parsed = parse_hydra_overrides(task)
    swept = [o for o, p in zip(task, parsed, strict=True) if p.is_sweep_override()]
    fixed = [o for o in task if o not in swept]
    swept_keys = [override_key(o) for o in swept]
    name = args.name or f"{experiment}_sweep_{time.strftime('%Y%m%d-%H%M%S')}"
    notes: list[str] = []

    # Launcher: --jobs N is joblib with N workers; no launcher means one worker process.
    launcher = next((o for o in hydra_overrides if override_key(o) == "hydra/launcher"), None)
    chosen = launcher.split("=", 1)[1] if launcher else None
    internal: list[str] = []
    if args.jobs is not None:
        if args.jobs < 1:
            raise ConfigError(f"--jobs {args.jobs}: give the number of runs at once, 1 or more.")
        if chosen not in (None, "joblib", "parallel"):
            raise ConfigError(
                f"--jobs sets the joblib launcher's workers, but {launcher!r} picks another "
                "launcher: leave out --jobs, or set that launcher's own parallelism "
                "(e.g. hydra.launcher.array_parallelism=N for SLURM)."
            )
        if not joblib_available():
            raise ConfigError(f"--jobs needs Hydra's joblib launcher: {_SWEEP_EXTRA}")
        if chosen is None:
            internal.append("hydra/launcher=joblib")
        internal.append(f"hydra.launcher.n_jobs={args.jobs}")
    elif chosen is None:
        if joblib_available():
            internal += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=1"]
        else:
            notes.append(
                f"(runs one after another in this process; {_SWEEP_EXTRA} runs each in a "
                "process of its own, and several at once with --jobs N)"
            )

    # Compose once with Hydra's own config: checks the launcher and sweeper options and
    # tells which sweeper this is.
    hydra_cfg = _compose_hydra(directory, experiment, fixed, [*internal, *hydra_overrides])
    sweeper = hydra_cfg.hydra.sweeper
    # Hydra's own grid sweeper is the option `basic`; any other sweeper searches.
    search = str(hydra_cfg.hydra.runtime.choices.get("hydra/sweeper", "basic")) != "basic"
    total: int | None
    if search:
        if not swept:
            raise ConfigError(
                "A search needs a search space: give overrides such as "
                "model.optimizer.lr='interval(0.0001,0.1)' or model.net.embed_dim='choice(32,64)'."
            )
        if not metric:
            raise ConfigError(
                "A search needs an objective: pass --optimized-metric METRIC (a scalar tag "
                "such as val/acc) or set optimized_metric: in the configs/sweep/ file."
            )
        trials = sweeper.get("n_trials")
        total = int(trials) if trials is not None else None
        if args.jobs is not None and not any(
            override_key(o) == "hydra.sweeper.n_jobs" for o in hydra_overrides
        ):
            internal.append(f"hydra.sweeper.n_jobs={args.jobs}")
    else:
        if not swept:
            raise ConfigError(
                "A sweep needs at least one key with several values, e.g. "
                "`tbx-lightning sweep quickstart model.optimizer.lr=0.01,0.001`."
            )
        total = None
    direction = "minimize" if metric and minimizes(metric) else "maximize"
    user_direction = next(
        (o for o in hydra_overrides if override_key(o) == "hydra.sweeper.direction"), None
    )
    if user_direction is not None:
        direction = user_direction.split("=", 1)[1].strip()
    elif search and "direction" in sweeper:
        internal.append(f"hydra.sweeper.direction={direction}")

    # Compose the runs' configs: one bad value stops the sweep before anything is written.
    if search:
        first = [
            f"{override_key(o)}={_probe_values(p)[0]}"
            for o, p in zip(task, parsed, strict=True)
            if p.is_sweep_override()
        ]
        points = [first]
        for index, (o, p) in enumerate(
            (o, p) for o, p in zip(task, parsed, strict=True) if p.is_sweep_override()
        ):
            for value in _probe_values(p)[1:]:
                point = list(first)
                point[index] = f"{override_key(o)}={value}"
                points.append(point)
        points = [[*fixed, *point] for point in points]
    else:
        points = expand_grid(task)
        total = len(points)
    configs = [
        compose_config(experiment, [*point, f"task_name={name}"], directory) for point in points
    ]
    runs_dir = str(configs[0].paths.runs_dir)
    experiment_dir = experiment_dir_of(configs[0])
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    if "://" in runs_dir:  # runs in an object store: Hydra's own files stay local
        sweep_dir = os.path.abspath(os.path.join(".tbx-sweeps", name, stamp))
    else:
        sweep_dir = os.path.join(experiment_dir, ".sweeps", stamp)
    internal += [
        f"task_name={_quote(name)}",
        f"hydra.sweep.dir={_quote(sweep_dir)}",
        "hydra.sweep.subdir=${hydra.job.num}",
        "hydra.output_subdir=null",
        "hydra.job.chdir=false",
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
        f"hydra.job.name={_quote(name)}",
        f"hydra.searchpath=[{_quote('file://' + str(directory))}]",
        f"++hydra.job.env_set.{DIRECTION_ENV}={direction}",
    ]
    if metric:
        internal.append(f"++hydra.job.env_set.{OBJECTIVE_ENV}={_quote(metric)}")
    return SweepPlan(
        experiment=experiment,
        name=name,
        overrides=task,
        hydra_overrides=[*internal, *hydra_overrides],
        swept_keys=swept_keys,
        total=total,
        search=search,
        metric=metric,
        direction=direction,
        experiment_dir=experiment_dir,
        sweep_dir=sweep_dir,
        config_dir=directory,
        notes=notes,
    )


# ---------------------------------------------------------------------------- in each run
def _write_marker(path: str, info: dict[str, Any]) -> None:
    """Replaces the marker whole, so the progress thread never reads half of one.

    The sweep's own folder is always local (see :func:`plan_sweep`).
    """
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(info, handle, default=str)
    os.replace(partial, path)


def _objective(log_dir: str, metric: str, direction: str) -> float:
    """The run's best value of ``metric`` in the sweep's direction; NaN when it has none."""
    try:
        record = read_run_dir(log_dir)
    except Exception:
        return math.nan
    stats = record.stats.get(metric)
    if stats is None:
        return math.nan
    value = stats.min if direction.lower().startswith("min") else stats.max
    return math.nan if value is None else float(value)


@contextlib.contextmanager
def _log_handlers_to(stream: IO[str]) -> Iterator[None]:
    """Points the logging handlers that write to the terminal at ``stream`` for a block.

    Libraries bind a ``StreamHandler`` to the ``sys.stderr`` of the moment they are
    imported (Lightning does), which redirecting ``sys.stderr`` later does not reach.
    """
    terminal = {id(sys.__stdout__), id(sys.__stderr__), id(sys.stdout), id(sys.stderr)}
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    moved: list[tuple[logging.StreamHandler[Any], Any]] = []
    for logger in loggers:
        for handler in getattr(logger, "handlers", ()):
            if (
                type(handler) is logging.StreamHandler
                and id(handler.stream) in terminal
                and handler.stream is not stream
                and not any(handler is h for h, _ in moved)
            ):
                moved.append((handler, handler.setStream(stream)))
    try:
        yield
    finally:
        for handler, previous in moved:
            handler.setStream(previous)


def job(cfg: DictConfig) -> float | None:
    """Hydra's task function: trains one run of the sweep and returns its objective.

    Never raises for a run that fails: the run is recorded as failed (NaN objective,
    which Optuna records as a failed trial) and the sweep goes on.
    """
    hydra_cfg = HydraConfig.get()
    job_dir = str(hydra_cfg.runtime.output_dir)
    marker = os.path.join(job_dir, MARKER)
    info: dict[str, Any] = {
        "num": int(hydra_cfg.job.num),
        "overrides": [str(o) for o in hydra_cfg.overrides.task],
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.time(),
        "state": "started",
        "log": os.path.join(job_dir, OUTPUT_LOG),
    }
    _write_marker(marker, info)
    metric = os.environ.get(OBJECTIVE_ENV)
    direction = os.environ.get(DIRECTION_ENV, "maximize")
    objective = math.nan
    try:
        register_resolvers()
        with (
            open(info["log"], "a", encoding="utf-8") as log,
            _log_handlers_to(log),
            contextlib.redirect_stdout(log),
            contextlib.redirect_stderr(log),
        ):
            try:
                result = train(cfg)
            except Exception as error:  # broke before training: record the run as failed
                record_failed(cfg, error)
                info.update(status="failed", error=f"{type(error).__name__}: {error}")
            else:
                info.update(
                    status=result.status,
                    seconds=result.seconds,
                    log_dir=result.log_dir,
                    metrics=metric_text(result.metrics, 3),
                )
                if result.error is not None:
                    info["error"] = f"{type(result.error).__name__}: {result.error}"
                if metric:
                    objective = _objective(result.log_dir, metric, direction)
    except Exception as error:  # the sweep goes on whatever happened here
        info.setdefault("status", "failed")
        info.setdefault("error", f"{type(error).__name__}: {error}")
    info.update(state="done", ended=time.time())
    if metric:
        info["objective"] = None if math.isnan(objective) else objective
    with contextlib.suppress(Exception):
        _write_marker(marker, info)
    return objective if metric else None


# ---------------------------------------------------------------------------- progress
class _Progress:
    """Prints a line when a run starts and when it ends, from the runs' marker files."""

    def __init__(self, plan: SweepPlan, out: IO[str]) -> None:
        self.plan = plan
        self.out = out
        self.started: set[int] = set()
        self.done: dict[int, dict[str, Any]] = {}
        self.seen: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="tbx-sweep-progress", daemon=True)

    def __enter__(self) -> _Progress:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            self.poll()

    def label(self, info: dict[str, Any]) -> str:
        keys = set(self.plan.swept_keys)
        chosen = [o for o in info.get("overrides", []) if override_key(o) in keys]
        return " ".join(chosen) or " ".join(info.get("overrides", []))

    def _prefix(self, num: int) -> str:
        total = self.plan.total if self.plan.total is not None else "?"
        return f"[{num + 1}/{total}]"

    def poll(self) -> None:
        with self._lock:
            try:
                entries = sorted(Path(self.plan.sweep_dir).glob(f"*/{MARKER}"))
            except OSError:
                return
            for path in entries:
                try:
                    info = json.loads(path.read_text(encoding="utf-8"))
                    num = int(info["num"])
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                self.seen[num] = info
                if num not in self.started:
                    self.started.add(num)
                    print(f"{self._prefix(num)} {self.label(info)} ...", file=self.out, flush=True)
                if info.get("state") == "done" and num not in self.done:
                    self.done[num] = info
                    print(
                        f"{self._prefix(num)} {self.label(info)}: {_outcome(info)}", file=self.out
                    )
                    self.out.flush()


def _outcome(info: dict[str, Any]) -> str:
    status = info.get("status", "failed")
    if "seconds" not in info:
        return f"{status}: {info.get('error', 'no result')} (log: {info.get('log')})"
    parts = [f"{status} in {float(info['seconds']):.1f} s", info.get("metrics", "")]
    if info.get("error"):
        parts.append(str(info["error"]))
    parts.append(f"-> {info.get('log_dir')}")
    if status != "success":
        parts.append(f"(log: {info.get('log')})")
    return " ".join(p for p in parts if p)


# ---------------------------------------------------------------------------- running
@contextlib.contextmanager
def _command_line(argv: list[str]) -> Iterator[None]:
    """``sys.argv`` for ``hydra.main``, and Hydra's errors raised here instead of exiting."""
    saved_argv, saved_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = argv
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of sys.exit(1)
    try:
        yield
    finally:
        sys.argv = saved_argv
        if saved_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_error


def _multirun(plan: SweepPlan) -> None:
    """Runs the plan as ``hydra.main`` would run ``app.py --multirun OVERRIDES``."""
    register_resolvers()
    if plan.search:
        # Optuna is the search sweeper's own dependency, there only when it is installed.
        with contextlib.suppress(ImportError):
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress lines say it
    ConfigStore.instance().store(name=_ROOT_NODE, node={"defaults": [ROOT_CONFIG, "_self_"]})
    app = hydra.main(config_path=None, config_name=_ROOT_NODE, version_base="1.3")(job)
    argv = [
        "tbx-lightning",
        "--multirun",
        f"experiment={plan.experiment}",
        *plan.overrides,
        *plan.hydra_overrides,
    ]
    with _command_line(argv):
        app()


def run_sweep(args: argparse.Namespace) -> int:
    """``tbx-lightning sweep``: plans, runs through Hydra, prints progress and the table."""
    plan = plan_sweep(args)
    out = sys.stdout
    kind = "search" if plan.search else "sweep"
    count = f"{plan.total} runs" if plan.total is not None else "runs"
    print(f"Sweep {plan.name}: {count} of {plan.experiment}", flush=True)
    if plan.search:
        print(f"  objective: {plan.metric} ({plan.direction})", flush=True)
    for note in plan.notes:
        print(f"  {note}", flush=True)
    stopped: BaseException | None = None
    with _Progress(plan, out) as progress:
        try:
            _multirun(plan)
        except Exception as error:  # a launcher that lost a worker, a sweeper that gave up
            stopped = error
    runs = progress.seen
    missing = [num for num in sorted(runs) if num not in progress.done]
    for num in missing:
        print(
            f"{progress._prefix(num)} {progress.label(runs[num])}: no result (its process "
            f"ended early; log: {runs[num].get('log')})",
            flush=True,
        )
    failed = len(missing) + sum(1 for i in progress.done.values() if i.get("status") != "success")
    total = len(runs)
    if stopped is not None:
        print(f"The {kind} stopped early: {type(stopped).__name__}: {stopped}", flush=True)
    print(f"Sweep done: {total - failed} succeeded, {failed} failed.")
    if plan.search:
        best = _best_trial(plan.sweep_dir)
        if best:
            print(best)
    seeds = seed_keys(plan.swept_keys)
    if os.path.isdir(plan.experiment_dir):
        try:
            records = read_runs(plan.experiment_dir)
            print(render(*table_rows(records), "table"))
            if seeds:
                _bands(plan.experiment_dir, seeds, records)
        except ConfigError:  # no readable run: the table is left out
            pass
    quoted = shlex.quote(plan.experiment_dir)
    print("Compare the runs in TensorBoard's HParams tab:")
    print(f"  {tensorboard_line(plan.experiment_dir)}")
    print(f"  tbx-lightning hparams {quoted}", flush=True)
    if seeds:
        print(f"  tbx-lightning hparams {quoted} --over {','.join(seeds)}", flush=True)
    return 0 if failed == 0 and stopped is None and total > 0 else 1


def seed_keys(keys: Sequence[str]) -> list[str]:
    """The swept keys that are seeds: their last part has the word ``seed`` in it.

    Example:
        >>> seed_keys(["seed", "data.seed", "model.optimizer.lr", "init_seed", "seeds_file"])
        ['seed', 'data.seed', 'init_seed']
    """
    return [key for key in keys if "seed" in re.split(r"[_\-]", key.rsplit(".", 1)[-1].lower())]


def _bands(experiment_dir: str, seeds: Sequence[str], records: Sequence[Any]) -> None:
    """Writes the aggregate runs over the swept seed keys; a failure is a note, not an error."""
    try:
        written = write_aggregates(experiment_dir, seeds, records=records)
    except Exception as error:  # the runs are there either way; the bands can be rebuilt
        print(
            f"(no bands over {', '.join(seeds)}: {type(error).__name__}: {error}; "
            f"rebuild them with `tbx-lightning aggregate {shlex.quote(experiment_dir)} "
            f"--over {','.join(seeds)}`)",
            flush=True,
        )
        return
    groups = len(written)
    print(
        f"Bands over {', '.join(seeds)}: {groups} aggregate run{'s' if groups != 1 else ''} "
        f"in {os.path.join(experiment_dir, 'aggregate')} (mean ± sample standard deviation, "
        "TensorBoard's Custom Scalars dashboard)",
        flush=True,
    )


def _best_trial(sweep_dir: str) -> str | None:
    """The sweeper's own account of the best run, if it left one (Optuna does)."""
    path = os.path.join(sweep_dir, "optimization_results.yaml")
    try:
        with open(path, encoding="utf-8") as handle:
            results = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(results, dict) or "best_value" not in results:
        return None
    params = " ".join(f"{k}={v}" for k, v in (results.get("best_params") or {}).items())
    return f"Best: {results['best_value']:.4g} with {params}"
