"""Checks on a CUDA device: no hidden host synchronisation, MFU, on-device histograms.

1. Scalar logging and the monitor: the training step runs under
   ``torch.cuda.set_sync_debug_mode("error")``, so any call that would make the host
   wait for the device raises. Only the monitor's one packed transfer per interval
   (``ModelMonitor.flush``) and the writer's packing of tensor scalars are allowed to
   synchronise; they run with the mode relaxed, and each is counted.
2. MFU: a small transformer trained for a few steps with the default monitor; FLOPs
   are counted on the first step, the peak comes from the device table.
3. Histograms: the same tensors binned on the device and on the CPU give the same
   counts (up to values on a bin edge) and the same moments.
4. Stop before the harm: with ``on_alert="stop"`` every optimizer step is checked for
   NaN/Inf before it runs, with exactly one host read per step (counted, everything
   else still under the sync check); the step time beside the default monitor's; a
   NaN loss at one step leaves the weights finite and stops.

On a machine without CUDA it prints "no CUDA device" and exits 0. Runs in well under
5 minutes on one GPU.

    python benchmarks/gpu_check.py
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from tbx_lightning import RunWriter
from tbx_lightning.monitor import ModelMonitor
from tbx_lightning.monitor import _guard as monitor_guard
from tbx_lightning.monitor._binning import _Binner
from tbx_lightning.monitor._stats import Statistics


@contextlib.contextmanager
def sync_allowed() -> Iterator[None]:
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


class Counted:
    """Wraps a function so that it may synchronise, and counts its calls."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name = owner, name
        self.original = getattr(owner, name)
        self.calls = 0

    def __enter__(self) -> Counted:
        original = self.original

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            with sync_allowed():
                return original(*args, **kwargs)

        setattr(self.owner, self.name, wrapper)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(self.owner, self.name, self.original)


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.n2(x))


class Transformer(nn.Module):
    def __init__(self, vocab: int = 8192, d: int = 512, layers: int = 6, heads: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def check_no_sync_and_mfu(
    device: torch.device, steps: int = 60, on_alert: str = "warn"
) -> dict[str, float]:
    torch.manual_seed(0)
    model = Transformer().to(device=device, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, seq = 16, 256
    ids = torch.randint(0, 8192, (steps, batch, seq), device=device)
    with tempfile.TemporaryDirectory() as root:
        run = RunWriter(root)
        monitor = ModelMonitor(
            model, run, hist_every_n_steps=20, norm_every_n_steps=10, on_alert=on_alert
        )
        monitor.attach(opt)
        torch.cuda.synchronize()
        with (
            Counted(ModelMonitor, "flush") as flushes,
            Counted(RunWriter, "_stack") as packs,
            Counted(Statistics, "write_histograms") as hists,
            Counted(monitor_guard, "nonfinite_per_rank") as guards,
        ):
            started = time.perf_counter()
            for step in range(steps):
                torch.cuda.set_sync_debug_mode("error")
                try:
                    monitor.start_flop_count()
                    logits = model(ids[step])
                    loss = nn.functional.cross_entropy(
                        logits.flatten(0, 1).float(), ids[step].flatten()
                    )
                    loss.backward()
                    # Histogram steps move the bin counts in one transfer: allowed.
                    if monitor.is_hist_step(step):
                        with sync_allowed():
                            monitor.after_backward(step)
                    else:
                        monitor.after_backward(step)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    monitor.stop_flop_count()
                    monitor.observe_loss(step, loss)
                    if step % 10 == 0:  # scalar logging: one packed transfer per call
                        run.log_scalars({"train/loss": loss.detach()}, step)
                    monitor.log_throughput(step, tokens=batch * seq)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
        monitor.detach()
        run.close()
    scalar_steps = len(range(0, steps, monitor.norm_every_n_steps))
    if flushes.calls > scalar_steps + 1:
        raise SystemExit(f"FAIL: {flushes.calls} flushes for {scalar_steps} scalar steps")
    expected_guards = steps if on_alert == "stop" else 0
    if guards.calls != expected_guards:
        raise SystemExit(f"FAIL: {guards.calls} step checks for {steps} steps ({on_alert})")
    peak = monitor.peak_flops
    from tbx_lightning.monitor._efficiency import peak_flops

    peak = peak or peak_flops(device, torch.bfloat16)
    flops = monitor.flops_per_step or 0.0
    mfu = flops * steps / elapsed / peak if peak else float("nan")
    return {
        "flushes": flushes.calls,
        "packed_scalar_transfers": packs.calls,
        "histogram_writes": hists.calls,
        "flops_per_step": flops,
        "peak_flops": peak or float("nan"),
        "mfu": mfu,
        "step_ms": 1e3 * elapsed / steps,
        "step_checks": guards.calls,
    }


def check_nan_step_is_skipped(device: torch.device) -> None:
    torch.manual_seed(0)
    model = Transformer(vocab=512, d=128, layers=2, heads=4).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with tempfile.TemporaryDirectory() as root:
        run = RunWriter(root)
        monitor = ModelMonitor(model, run, norm_every_n_steps=5, on_alert="stop")
        monitor.attach(opt)
        for step in range(20):
            ids = torch.randint(0, 512, (4, 32), device=device)
            loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
            if step == 7:
                loss = loss * float("nan")
            loss.backward()
            allowed = monitor.after_backward(step, loss=loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            monitor.log_throughput(step, samples=4)
            if monitor.should_stop:
                break
        monitor.detach()
        run.close()
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    if allowed or step != 7 or not finite:
        raise SystemExit(f"FAIL: NaN step 7: allowed={allowed}, ended at {step}, finite={finite}")


def check_histograms(device: torch.device) -> float:
    torch.manual_seed(0)
    binner = _Binner(64)
    worst = 0.0
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3_000_001).mul_(3).to(dtype)
        x[17] = float("nan")
        on_dev = x.to(device)
        row_d = binner.row(on_dev, full=True)
        counts_d = binner.bin_device(on_dev, row_d[4], row_d[5]).cpu().numpy()
        row_c = binner.row(x, full=True)
        counts_c = torch.zeros(64, dtype=torch.int64)
        binner.bin_cpu(x, float(row_c[4]), float(row_c[5]), counts_c, True)
        diff = np.abs(counts_d - counts_c.numpy()).sum()
        if diff > 0.0001 * x.numel():
            raise SystemExit(f"FAIL: device and CPU histograms differ by {diff} counts ({dtype})")
        d, c = row_d.cpu().double(), row_c.double()
        exact = [0, 1, 4, 5]  # n, non-finite, min, max
        close = bool(torch.equal(d[exact], c[exact]))
        close &= bool(torch.isclose(d[3], c[3], rtol=1e-4))  # sum of squares
        close &= abs(float(d[2] - c[2])) <= 1e-3 * float(c[3].sqrt())  # sum
        if not close:
            raise SystemExit(f"FAIL: moments differ ({dtype}): {d.tolist()} {c.tolist()}")
        worst = max(worst, float(diff))
    return worst


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (the checks need a CUDA GPU); exiting.")
        return 0
    device = torch.device("cuda", 0)
    print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    stats = check_no_sync_and_mfu(device)
    print("no host synchronisation outside the packed transfers: OK")
    for key, value in stats.items():
        print(f"  {key}: {value:.4g}")
    stop = check_no_sync_and_mfu(device, on_alert="stop")
    print("on_alert='stop': one host read per step, none elsewhere: OK")
    print(
        f"  step_ms: {stop['step_ms']:.4g} against {stats['step_ms']:.4g} with the default "
        f"monitor ({100 * (stop['step_ms'] / stats['step_ms'] - 1):+.1f}%)"
    )
    check_nan_step_is_skipped(device)
    print("a NaN loss at step 7: that update skipped, weights finite, stopped: OK")
    diff = check_histograms(device)
    print(f"device histograms match the CPU's: OK (largest difference {diff:.0f} counts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
