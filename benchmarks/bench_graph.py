"""Graph export cost: ``torch.export`` alone vs ``tbx_lightning.graph.export_graph``.

Run with ``python benchmarks/bench_graph.py`` (about a minute on 2 CPU cores).
Prints, side by side on the same 24-layer ``nn.TransformerEncoder`` (width 128,
4 heads, the stock model of the graph issue):

- tensorboardX's ``add_graph`` on that model (the anchor: it fails on torch 2.13);
- ``torch.export.export(..., strict=False)`` alone;
- ``export_graph`` (export + conversion to a TensorBoard GraphDef), its ratio to
  ``torch.export`` alone, node count and GraphDef size, also with
  ``collapse_repeated`` and ``max_depth``;
- how time, nodes, bytes and peak Python memory grow with the number of layers.

The conversion to a GraphDef costs a few percent of the export itself. While
capturing, ``export_graph`` also silences torch's own logging of its fake-tensor
and symbolic-shape machinery (failures are reported through
``GraphExport.attempts`` or ``GraphExportError`` instead); on a loaded machine
that logging can make plain ``torch.export`` the slower of the two.

Measured on 2 CPU cores, torch 2.13 (best of 3): torch.export 0.75 s, export_graph
0.76 s (ratio 1.01), 1,135 nodes / 256 kB; collapse_repeated 77 nodes / 17 kB;
max_depth=2 (one node per layer; containers such as ``layers`` count as a level)
31 nodes / 6 kB. On a machine shared with other work, the seconds vary by several
times between runs and the ratios between about 0.8 and 1.2 (the export itself dominates).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import tracemalloc
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tbx_lightning.graph import export_graph


def stock_model(layers: int) -> nn.Module:
    return nn.Sequential(
        nn.Embedding(1000, 128),
        nn.TransformerEncoder(nn.TransformerEncoderLayer(128, 4, 256, batch_first=True), layers),
        nn.Linear(128, 1000),
    )


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def tensorboardx_anchor(model: nn.Module, x: torch.Tensor) -> str:
    from tensorboardX import SummaryWriter

    with tempfile.TemporaryDirectory() as logdir, SummaryWriter(logdir) as writer:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                writer.add_graph(model, x)
        except Exception as err:
            first = next((line for line in str(err).splitlines() if line.strip()), "")
            return f"FAILED {type(err).__name__}: {first[:90]}"
    return "ok (graph written)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3)
    options = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = stock_model(options.layers).eval()
    x = torch.randint(0, 1000, (2, 16))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model: {options.layers}-layer TransformerEncoder, width 128, 4 heads, input (2, 16)")
    print()
    print("tensorboardX SummaryWriter.add_graph (anchor):", tensorboardx_anchor(model, x))
    print()

    # Warm up imports and caches of torch.export once, outside the measurements.
    torch.export.export(stock_model(1).eval(), (x,), strict=False)

    def export_alone() -> Any:
        with torch.no_grad():
            return torch.export.export(model, (x,), strict=False)

    variants: list[tuple[str, Callable[[], Any]]] = [
        ("torch.export alone", export_alone),
        ("export_graph", lambda: export_graph(model, x)),
        ("export_graph collapse_repeated", lambda: export_graph(model, x, collapse_repeated=True)),
        # One scope level per module, containers included: ``1/layers/0`` is level 3, so
        # max_depth=3 keeps each layer's children and max_depth=2 gives one node per layer.
        ("export_graph max_depth=3", lambda: export_graph(model, x, max_depth=3)),
        ("export_graph max_depth=2", lambda: export_graph(model, x, max_depth=2)),
    ]
    # Interleaved rounds, best of each: other load on the machine hits all variants alike.
    times: dict[str, list[float]] = {label: [] for label, _ in variants}
    results: dict[str, Any] = {}
    for _ in range(options.repeat):
        for label, fn in variants:
            seconds, results[label] = timed(fn, 1)
            times[label].append(seconds)
    base = min(times["torch.export alone"])

    print(f"{'variant':34} {'seconds':>8} {'ratio':>6} {'nodes':>7} {'GraphDef bytes':>15}")
    for label, _ in variants:
        seconds = min(times[label])
        result = results[label]
        if label == "torch.export alone":
            nodes, size = str(len(result.graph.nodes)), "-"
        else:
            nodes, size = str(result.num_nodes), str(result.graph_def.ByteSize())
        print(f"{label:34} {seconds:8.3f} {seconds / base:6.2f} {nodes:>7} {size:>15}")
    print(f"(best of {options.repeat} interleaved rounds; ratio: vs torch.export alone;")
    print(" nodes for torch.export alone: nodes of its FX graph)")
    print()

    print("scaling with depth (export_graph; peak Python memory measured in a separate run):")
    print(f"{'layers':>6} {'seconds':>8} {'nodes':>7} {'GraphDef bytes':>15} {'peak MiB':>9}")
    for layers in (6, 12, options.layers):
        sized = stock_model(layers).eval()
        seconds, result = timed(lambda m=sized: export_graph(m, x), 1)
        tracemalloc.start()
        export_graph(sized, x)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        size = result.graph_def.ByteSize()
        print(f"{layers:6d} {seconds:8.3f} {result.num_nodes:7d} {size:15d} {peak:9.1f}")


if __name__ == "__main__":
    main()
