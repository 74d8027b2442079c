"""The HParams table from run summaries vs from event files, side by side.

Builds RUNS runs of STEPS steps with TAGS scalar tags each (real RunWriters, each
feeding a RunSummary the way the writer's thread does), then times
``tbx-lightning hparams`` both ways in this process (read + rows + render) and the
command itself in a fresh process, and checks that both tables are the same.

    python benchmarks/bench_table.py                      # 300 runs x 5,000 steps x 10 tags
    python benchmarks/bench_table.py --runs 30 --steps 1000
    python benchmarks/bench_table.py --dir /tmp/bench_runs --keep   # build once, time again later

The floor to beat: 300 runs x 5,000 steps x 10 tags in at most 3 s on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from tbx_lightning import RunWriter, runs
from tbx_lightning.cli import _table
from tbx_lightning.hparams import RunHParams


def build(root: str, runs: int, steps: int, tags: int) -> float:
    names = [f"{'train' if i % 2 else 'val'}/metric_{i}" for i in range(tags)]
    names[0], names[1] = "train/loss", "val/acc"
    started = time.perf_counter()
    for index in range(runs):
        log_dir = os.path.join(root, "bench", f"version_{index}")
        run = RunWriter(log_dir, flush_secs=3600)  # keeps summary.json as it writes
        hp = RunHParams(run)
        hp.log(
            {"model": {"lr": 10 ** (-1 - index % 4), "width": 32 * (1 + index % 3)}, "seed": index}
        )
        for step in range(steps):
            run.log_scalars(
                {name: (step * (k + 1) + index) % 997 / 997 for k, name in enumerate(names)}, step
            )
            if step % 1000 == 999:
                run.flush()
        hp.finish("success")
        run.close()
        if index % 25 == 24:
            print(f"  built {index + 1}/{runs} runs", flush=True)
    return time.perf_counter() - started


def table(directory: str, summaries: bool) -> tuple[float, str, list[str]]:
    started = time.perf_counter()
    records = runs.read_runs(directory, summaries=summaries)
    text = _table.render(*_table.table_rows(records), "csv")
    return time.perf_counter() - started, text, [r.source for r in records]


def events_table(directory: str, fast: float, sample: int | None) -> None:
    """Times the table from events (on ``sample`` runs, extrapolated) and compares the rows."""
    root = os.path.abspath(directory)
    dirs = sorted(os.path.join(root, name) for name in os.listdir(root))
    chosen = dirs if sample is None or sample >= len(dirs) else dirs[:sample]
    started = time.perf_counter()
    slow_records = [runs.read_run_dir(d, root, summaries=False) for d in chosen]
    slow = time.perf_counter() - started
    fast_records = [runs.read_run_dir(d, root) for d in chosen]
    if len(chosen) < len(dirs):
        estimate = slow * len(dirs) / len(chosen)
        print(
            f"table from events:     {slow:8.3f} s for {len(chosen)} runs, "
            f"~{estimate:.0f} s for all {len(dirs)} ({estimate / fast:.0f}x)"
        )
    else:
        print(f"table from events:     {slow:8.3f} s  ({slow / fast:.0f}x)")
    for fmt in _table.FORMATS:
        a = _table.render(*_table.table_rows(fast_records), fmt)
        b = _table.render(*_table.table_rows(slow_records), fmt)
        if a != b:
            raise SystemExit(f"the {fmt} tables differ: summaries and events disagree")
    print(f"tables of those {len(chosen)} runs are identical in every format")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--tags", type=int, default=10)
    parser.add_argument("--dir", help="where to build the runs (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the runs afterwards")
    parser.add_argument("--skip-events", action="store_true", help="time the summaries only")
    parser.add_argument(
        "--events-runs",
        type=int,
        default=30,
        metavar="N",
        help="read only N runs from their events and extrapolate (0: all; default 30)",
    )
    args = parser.parse_args()

    root = args.dir or tempfile.mkdtemp(prefix="tbx_bench_table_")
    directory = os.path.join(root, "bench")
    try:
        if not os.path.isdir(directory):
            print(f"Building {args.runs} runs x {args.steps} steps x {args.tags} tags in {root}")
            seconds = build(root, args.runs, args.steps, args.tags)
            points = args.runs * args.steps * args.tags
            print(f"  built in {seconds:.1f} s ({points / seconds / 1e6:.2f} M points/s)")
        size = sum(
            os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(directory) for f in files
        )
        count = len(os.listdir(directory))
        print(f"{count} runs, {size / 1e6:.0f} MB on disk")

        fast, fast_text, sources = table(directory, summaries=True)
        print(f"table from summaries:  {fast:8.3f} s  ({sources.count('summary')} runs by summary)")
        command = [
            sys.executable,
            "-m",
            "tbx_lightning.cli",
            "hparams",
            directory,
            "--format",
            "csv",
        ]
        started = time.perf_counter()
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        cli_seconds = time.perf_counter() - started
        print(f"`tbx-lightning hparams` (new process, imports included): {cli_seconds:8.3f} s")
        if out.strip() != fast_text.strip():
            raise SystemExit("the command printed another table than read_runs gave")
        if not args.skip_events:
            events_table(directory, fast, args.events_runs or None)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
