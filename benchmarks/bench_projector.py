"""The projector's cost, side by side in one run: time against a raw write, and peak memory.

1. **Time.** A 20,000 x 256 float32 matrix with one metadata column, written by
   ``tbx_lightning.projector.log_embedding``, by a raw write of exactly the bytes
   it puts on disk (the tensor straight from memory plus the metadata text, made
   beforehand), and by tensorboardX's ``add_embedding``. ``--repeats`` pairs of
   ``log_embedding`` and the raw write, in a shuffled order within each pair, each
   after ``os.sync()``; the figure is the median of the per-pair ratios. The run
   writer is opened outside the timing (the raw write has no event file either).
   Then where ``log_embedding``'s time goes.
2. **Memory.** A 32,000 x 4,096 float32 matrix (an LLM's token embeddings,
   500 MiB), each variant in a fresh process: what ``log_embedding`` adds to the
   peak resident set (``VmHWM`` in ``/proc/self/status``, reset before the call)
   and to traced allocations (``tracemalloc``), next to the old way of writing
   (``tensor.numpy().tobytes()``, one full copy).

Both outputs of part 1 are read back and compared with the input, so the numbers
describe equal results.

Run: ``python benchmarks/bench_projector.py [--points 20000] [--dim 256] [--repeats 30]
[--mem-rows 32000] [--mem-dim 4096]``
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tbx_lightning import RunWriter
from tbx_lightning.projector import _embedding as pj
from tbx_lightning.projector import _files as files
from tbx_lightning.projector import log_embedding

TEMP: list[Path] = []  # folders to delete once read back


def disk_bytes(root: Path) -> int:
    """Bytes of every embedding file under ``root`` (event files excluded: both write one)."""
    return sum(
        p.stat().st_size for p in root.rglob("*") if p.is_file() and "tfevents" not in p.name
    )


def best_of(repeats: int, fn: Callable[[Path], float | None]) -> tuple[float, Path]:
    """Best seconds of ``fn`` over fresh folders; ``fn`` may return its own timing."""
    best = float("inf")
    last = Path()
    for _ in range(repeats):
        folder = Path(tempfile.mkdtemp(prefix="bench_projector_"))
        TEMP.append(folder)
        # Start every timing with no dirty pages left by the previous writer, so the
        # kernel's write-back of one run is not billed to the next (same for all sides).
        os.sync()
        time.sleep(0.3)
        start = time.perf_counter()
        own = fn(folder)
        best = min(best, own if own is not None else time.perf_counter() - start)
        last = folder
    return best, last


def timing(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    mat = torch.randn(args.points, args.dim)
    labels = [f"token_{i % 997}" for i in range(args.points)]
    metadata_bytes = pj._metadata_tsv(None, [labels], None)  # what log_embedding writes

    def with_tensorboardx(folder: Path) -> None:
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(folder))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            writer.add_embedding(mat, metadata=labels, tag="emb", global_step=0)
        writer.close()

    def with_tbx_lightning(folder: Path) -> float:
        with RunWriter(folder) as run:
            # Let the writer's thread finish starting the event file, which the raw
            # write has no counterpart of; on 2 loaded CPUs it would share the timing.
            time.sleep(0.3)
            start = time.perf_counter()
            log_embedding(run, "emb", mat, metadata=labels, step=0)
            return time.perf_counter() - start

    def raw_write(folder: Path) -> None:
        # The floor: the same bytes written straight to two files, nothing else.
        with open(folder / "tensors.bin", "wb", buffering=0) as handle:
            handle.write(mat.numpy().data)
        with open(folder / "metadata.tsv", "wb", buffering=0) as handle:
            handle.write(metadata_bytes)

    # In pairs, in a shuffled order within each pair, so that a change in machine load
    # (or in the kernel's write-back) hits both sides alike; the ratio is taken per pair.
    order = random.Random(0)
    ours_t: list[float] = []
    raw_t: list[float] = []
    ours_dir = Path()
    for _ in range(args.repeats):
        sides = ["ours", "raw"]
        order.shuffle(sides)
        for side in sides:
            if side == "ours":
                s, ours_dir = best_of(1, with_tbx_lightning)
                ours_t.append(s)
            else:
                raw_t.append(best_of(1, raw_write)[0])
    ratios = [o / r for o, r in zip(ours_t, raw_t, strict=True)]
    raw_s = statistics.median(raw_t)
    tbx_s, tbx_dir = best_of(1, with_tensorboardx)  # seconds each: one run is enough

    tsv = next(tbx_dir.rglob("tensors.tsv"))
    np.testing.assert_allclose(np.loadtxt(tsv, dtype=np.float32), mat.numpy(), rtol=1e-6)
    ours = np.fromfile(next(ours_dir.rglob("tensors.bin")), dtype="<f4").reshape(mat.shape)
    assert np.array_equal(ours, mat.numpy())
    assert next(ours_dir.rglob("metadata.tsv")).read_bytes() == metadata_bytes

    raw = mat.numel() * 4 + len(metadata_bytes)
    tbx_b, ours_b = disk_bytes(tbx_dir), disk_bytes(ours_dir)
    for folder in TEMP:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"## Time: embedding {args.points:,} x {args.dim} float32, one metadata column\n")
    print(f"{'writer':<30}{'median ms':>10}{'best ms':>9}{'MB on disk':>12}{'x raw':>8}")
    rows = [
        ("tensorboardX add_embedding", [tbx_s], tbx_b, tbx_s / raw_s),
        ("tbx_lightning log_embedding", ours_t, ours_b, statistics.median(ratios)),
        ("raw write of the same bytes", raw_t, raw, 1.0),
    ]
    for name, times, size, ratio in rows:
        print(
            f"{name:<30}{statistics.median(times) * 1e3:>10.1f}{min(times) * 1e3:>9.1f}"
            f"{size / 1e6:>12.2f}{ratio:>8.2f}"
        )
    deciles = statistics.quantiles(ratios, n=10)
    print(
        f"\n{args.repeats} pairs, each side after os.sync(); {os.cpu_count()} CPUs. x raw is the "
        f"median of the per-pair ratios (10th-90th percentile {deciles[0]:.2f}-"
        f"{deciles[-1]:.2f}); tensorboardX ran once, against the median raw write. The "
        "kernel's page-cache writes make single timings vary several-fold on a VM.\n"
    )
    breakdown(mat, labels, args.repeats)


def breakdown(mat: torch.Tensor, labels: list[str], repeats: int) -> None:
    """Where log_embedding's time goes, each part timed alone (best of ``repeats``)."""

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    root = Path(tempfile.mkdtemp(prefix="bench_projector_parts_"))
    TEMP.append(root)
    fs = RunWriter(root / "run")
    fs.close()
    counter = iter(range(10**9))

    def tensor_part() -> None:
        folder = root / f"t{next(counter)}"
        folder.mkdir()
        files.write_matrix(fs.fs, str(folder), mat, None)

    def config_part() -> None:
        config = pj.read_config(fs.fs, str(root / "run"))
        entry = pj.ProjectorConfig().embeddings.add()
        entry.tensor_name = "emb:00000000"
        entry.tensor_path = "projector/emb-0/00000000.0/tensors.bin"
        config, _ = pj._put_entry(config, "emb", 0, entry)
        from google.protobuf import text_format

        text = text_format.MessageToString(config, as_utf8=True)
        pj._fs.write_text_atomic(fs.fs, str(root / "run" / pj.CONFIG_FILENAME), text)

    parts = [
        ("tensor: stream + NaN check", best(tensor_part)),
        ("NaN/Inf check alone", best(lambda: files._count_bad_rows(mat.numpy()))),
        ("metadata text (label, index)", best(lambda: pj._metadata_tsv(None, [labels], None))),
        ("config read + atomic rewrite", best(config_part)),
    ]
    shutil.rmtree(root, ignore_errors=True)
    print("## Where log_embedding's time goes (each part alone)\n")
    print(f"{'part':<32}{'ms':>8}")
    for name, seconds in parts:
        print(f"{name:<32}{seconds * 1e3:>8.2f}")
    print()


PEAK = textwrap.dedent(
    """
    import shutil, sys, tempfile, time, tracemalloc
    import torch
    from tbx_lightning import RunWriter
    from tbx_lightning.projector import log_embedding

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

    variant, rows, dim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    mat = torch.randn(rows, dim, dtype=dtype)
    folder = tempfile.mkdtemp(prefix="bench_projector_mem_")
    with RunWriter(folder) as run:
        log_embedding(run, "warm", torch.randn(4, 4))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM restarts from the current resident size
        before = status("VmRSS:")
        tracemalloc.start()
        start = time.perf_counter()
        if variant == "copy":  # the old way: one full copy of the matrix as bytes
            with open(folder + "/tensors.bin", "wb") as handle:
                handle.write(mat.numpy().tobytes())
        elif variant == "sampled":
            log_embedding(run, "big", mat, step=0, max_points=rows // 2)
        else:
            log_embedding(run, "big", mat, step=0)
        seconds = time.perf_counter() - start
        _, traced = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        added = status("VmHWM:") - before
    shutil.rmtree(folder)
    print(added, traced, mat.numel() * mat.element_size(), seconds)
    """
)


def memory(args: argparse.Namespace) -> None:
    if not Path("/proc/self/clear_refs").exists():
        print("## Memory: skipped (needs Linux /proc)")
        return
    variants = [
        ("copy", "old way: tensor.numpy().tobytes()"),
        ("float32", "log_embedding, float32 CPU"),
        ("bf16", "log_embedding, bf16 CPU"),
        ("sampled", "log_embedding, max_points=N/2"),
    ]
    print(f"## Memory: {args.mem_rows:,} x {args.mem_dim} (fresh process per variant)\n")
    print(
        f"{'variant':<36}{'matrix MiB':>11}{'+peak RSS MiB':>15}{'% of matrix':>12}"
        f"{'traced MiB':>11}{'s':>7}"
    )
    for key, name in variants:
        out = subprocess.run(
            [sys.executable, "-c", PEAK, key, str(args.mem_rows), str(args.mem_dim)],
            capture_output=True,
            text=True,
            check=True,
        )
        added, traced, nbytes, seconds = out.stdout.split()
        size = int(nbytes) / 2**20
        grown = int(added) / 2**20
        print(
            f"{name:<36}{size:>11.0f}{grown:>15.1f}{grown / size * 100:>11.1f}%"
            f"{int(traced) / 2**20:>11.1f}{float(seconds):>7.2f}"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--mem-rows", type=int, default=32_000)
    parser.add_argument("--mem-dim", type=int, default=4096)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    timing(args)
    if not args.skip_memory:
        memory(args)


if __name__ == "__main__":
    main()
