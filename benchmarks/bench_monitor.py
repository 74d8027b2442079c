"""One weight-and-gradient histogram pass: tensorboardX vs torch.histc vs ModelMonitor.

Model: a 6-layer, width-512 ``nn.TransformerEncoder`` (about 19 M parameters) after
one backward, on the CPU. Each method histograms every parameter and every gradient
once; host bytes are the bytes that leave the tensors' device (on the CPU: the bytes
copied into NumPy/Python objects), counted by wrapping the transfer functions.

    python benchmarks/bench_monitor.py [--repeat 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from tensorboardX import SummaryWriter
from torch import nn

from tbx_lightning.monitor import ModelMonitor

HOST_BYTES = 0


def _count(nbytes: int) -> None:
    global HOST_BYTES
    HOST_BYTES += nbytes


class _Sink:
    """The monitor's sink over a tensorboardX writer, counting what reaches the host."""

    def __init__(self, writer: SummaryWriter) -> None:
        self.experiment = writer

    def log_scalars(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                _count(value.element_size())
            self.experiment.add_scalar(key, float(value), step)


def build_model() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=512, nhead=8, dim_feedforward=2048, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, num_layers=6, enable_nested_tensor=False))
    x = torch.randn(4, 32, 512)
    model(x).pow(2).mean().backward()
    return model


def tensorboardx_pass(model: nn.Module, writer: SummaryWriter) -> None:
    for name, p in model.named_parameters():
        # add_histogram calls .numpy() on the tensor: the whole tensor goes to the host.
        _count(p.numel() * p.element_size())
        writer.add_histogram(f"w/{name}", p.detach(), 0)
        if p.grad is not None:
            _count(p.grad.numel() * p.grad.element_size())
            writer.add_histogram(f"g/{name}", p.grad, 0)


def histc_pass(model: nn.Module) -> None:
    out = []
    for p in model.parameters():
        for t in (p.detach(), p.grad):
            if t is not None:
                out.append(torch.histc(t, 64))
    host = torch.stack(out).cpu().numpy()
    _count(host.nbytes)


def monitor_pass(monitor: ModelMonitor, step: int) -> None:
    monitor._last_backward_step = None  # run the full pass on every repeat
    monitor.after_backward(step)


def timed(fn: Callable[[], None], repeat: int) -> tuple[float, int]:
    global HOST_BYTES
    fn()  # warm-up
    best = float("inf")
    nbytes = 0
    for _ in range(repeat):
        HOST_BYTES = 0
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        nbytes = HOST_BYTES
    return best, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sample", type=int, default=65536)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    _orig_cpu = torch.Tensor.cpu

    def counting_cpu(self: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        if self.device.type != "cpu":
            _count(self.numel() * self.element_size())
        return _orig_cpu(self, *a, **k)

    torch.Tensor.cpu = counting_cpu  # type: ignore[method-assign]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(tmp)
        sink = _Sink(writer)
        exact = ModelMonitor(model, sink, hist_every_n_steps=1, norm_every_n_steps=0)
        sampled = ModelMonitor(
            model, sink, hist_every_n_steps=1, norm_every_n_steps=0, sample=args.sample
        )
        # On the CPU the monitor's single transfer is a no-op .cpu(); count its bytes
        # as they would be on an accelerator: the packed moments and bins it reads.
        groups = len(exact.groups)
        packed = 2 * groups * (7 + exact.bins) * 8
        cases: list[tuple[str, Callable[[], None], int]] = [
            ("tensorboardX add_histogram", lambda: tensorboardx_pass(model, writer), 0),
            ("torch.histc per tensor", lambda: histc_pass(model), 0),
            ("ModelMonitor exact", lambda: monitor_pass(exact, 0), packed),
            (f"ModelMonitor sampled ({args.sample})", lambda: monitor_pass(sampled, 0), packed),
        ]
        for name, fn, extra in cases:
            seconds, nbytes = timed(fn, args.repeat)
            rows.append((name, seconds, nbytes + extra))
        writer.close()
    torch.Tensor.cpu = _orig_cpu  # type: ignore[method-assign]

    base_t, base_b = rows[0][1], rows[0][2]
    print(
        f"model: 6-layer width-512 TransformerEncoder, {n_params / 1e6:.1f} M parameters, "
        f"{groups} groups, {torch.get_num_threads()} threads, best of {args.repeat}"
    )
    print(f"{'method':34s} {'time [s]':>10s} {'speed-up':>9s} {'host bytes':>14s} {'ratio':>10s}")
    for name, seconds, nbytes in rows:
        print(
            f"{name:34s} {seconds:10.4f} {base_t / seconds:8.1f}x {nbytes:14,d} "
            f"{nbytes / base_b:10.2e}"
        )
    print(
        "host bytes: tensorboardX and torch.histc are measured (tensors copied to numpy); the "
        "monitor's figure is computed, the size of its one packed transfer (moments and bins "
        "per group), which on the CPU is a no-op."
    )


if __name__ == "__main__":
    main()
