"""``tbx-lightning hparams --over seed`` on 1,000 runs: the spread table, timed.

Builds RUNS runs (CONFIGS configs x SEEDS seeds, a template-sized config of about 50
keys, STEPS steps of TAGS scalar tags each) with real RunWriters, each keeping its
summary.json the way training does, then times, side by side on the same runs:

- the command in a fresh process, imports included (what a user waits for), with
  ``--over seed`` and without it, in the csv format;
- in this process: reading the runs, grouping them, rendering every format.

    python benchmarks/bench_spread.py                       # 1,000 runs = 200 configs x 5 seeds
    python benchmarks/bench_spread.py --configs 20 --seeds 3 --steps 200
    python benchmarks/bench_spread.py --dir /tmp/bench_spread --keep   # build once, time again

The floor to beat: 1,000 runs in at most 3 s on 2 cores, fresh process included.
The work is O(runs): one summary, one lease check and the first records of one event
file per run, then one pass to group; the number of logged points does not matter.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from tbx_lightning import RunWriter, runs
from tbx_lightning.cli import _table
from tbx_lightning.hparams import RunHParams


def _config(index: int, seed: int) -> dict[str, object]:
    """A config shaped like a composed template (about 50 keys), three keys swept."""
    return {
        "seed": seed,
        "tags": ["digits", "cnn"],
        "data": {"batch_size": 64, "val_fraction": 0.2, "limit": None, "seed": seed},
        "model": {
            "optimizer": {"lr": 10 ** -(1 + index % 4), "weight_decay": 0.0, "betas": [0.9, 0.99]},
            "scheduler": {"warmup_steps": 100, "total_steps": 5000, "min_lr": 1e-6},
            "net": {
                "embed_dim": 32 * (1 + index // 4 % 5),
                "channels": 16,
                "dropout": round(0.05 * (index // 20), 2),
                "layers": 3,
                "activation": "gelu",
            },
        },
        "trainer": {
            "max_epochs": 10,
            "precision": "32-true",
            "gradient_clip_val": 1.0,
            "accumulate_grad_batches": 1,
            "deterministic": False,
        },
        "callbacks": {
            "training_monitor": {"group_depth": 3, "bins": 64, "hist_every_n_steps": 25},
            "model_checkpoint": {"monitor": "val/loss", "mode": "min", "save_top_k": 1},
        },
        "extra": {f"option_{k}": k for k in range(15)},
    }


def build(root: str, configs: int, seeds: int, steps: int, tags: int) -> float:
    names = ["train/loss", "val/loss", "val/acc"] + [f"train/metric_{i}" for i in range(tags - 3)]
    started = time.perf_counter()
    index = 0
    for config in range(configs):
        for seed in range(seeds):
            with RunWriter(os.path.join(root, f"version_{index}"), flush_secs=3600) as writer:
                hp = RunHParams(writer)
                hp.log(_config(config, seed))
                for step in range(steps):
                    writer.log_scalars(
                        {
                            n: (step * (k + 1) + seed + config) % 997 / 997
                            for k, n in enumerate(names)
                        },
                        step,
                    )
                hp.finish("success")
            index += 1
            if index % 100 == 0:
                print(f"  built {index}/{configs * seeds} runs", flush=True)
    return time.perf_counter() - started


def command(directory: str, *options: str) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tbx_lightning.cli",
            "hparams",
            directory,
            "--format",
            "csv",
            *options,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--tags", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3, help="timings per figure (the median)")
    parser.add_argument("--dir", help="where to build the runs (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the runs afterwards")
    args = parser.parse_args()

    root = args.dir or tempfile.mkdtemp(prefix="tbx_bench_spread_")
    try:
        if not any(name.startswith("version_") for name in os.listdir(root)):
            total = args.configs * args.seeds
            print(f"Building {total} runs ({args.configs} configs x {args.seeds} seeds) in {root}")
            print(
                f"  built in {build(root, args.configs, args.seeds, args.steps, args.tags):.1f} s"
            )
        count = sum(1 for name in os.listdir(root) if name.startswith("version_"))
        print(
            f"{datetime.date.today()}  {platform.node()}  {platform.processor() or platform.machine()}"
            f"  {os.cpu_count()} cores  Python {platform.python_version()}"
        )
        print(f"{count} runs")

        over = [command(root, "--over", "seed") for _ in range(args.repeat)]
        plain = [command(root) for _ in range(args.repeat)]
        rows = over[0][1].count("\n")
        print(
            f"`hparams --over seed` (new process):  {statistics.median(t for t, _ in over):6.2f} s"
            f"  ({rows} rows of mean, std, n)"
        )
        print(
            f"`hparams` (new process, one row a run): {statistics.median(t for t, _ in plain):6.2f} s"
        )

        timings = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            records = runs.read_runs(root)
            read = time.perf_counter() - started
            columns, table, _ = _table.spread_rows(records, ["seed"])
            grouped = time.perf_counter() - started - read
            for fmt in _table.FORMATS:
                _table.render(columns, table, fmt)
            rendered = time.perf_counter() - started - read - grouped
            timings.append((read, grouped, rendered))
        read, grouped, rendered = (statistics.median(t[i] for t in timings) for i in range(3))
        print(
            f"in process: read {read:.2f} s, group {grouped:.3f} s, render 4 formats {rendered:.3f} s"
        )
        worst = max(t for t, _ in over)
        verdict = "within" if worst <= 3.0 else "OVER"
        print(f"slowest `--over` run: {worst:.2f} s, {verdict} the 3 s floor")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
