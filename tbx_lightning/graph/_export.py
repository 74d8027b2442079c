"""Model -> TensorBoard ``GraphDef``, through torch.export with fallbacks.

TensorBoard's graph dashboard reads a TensorFlow ``GraphDef``: nodes named with
``/``-separated scopes, an op type, inputs by name and ``_output_shapes``. This
module captures a PyTorch model with the first method that works, in order

1. ``torch.export`` (non-strict): ATen-level graph with module paths and
   output shapes from fake tensors, no real computation;
2. ``torch.fx`` symbolic tracing: Python-level graph, ``torch.nn`` modules kept
   as single nodes, shapes filled in by fake-tensor propagation;
3. ``torch.jit.trace`` with the trace check off: runs the model once for real
   and records the path it took, so it also handles data-dependent Python
   control flow (one branch only),

and turns the captured graph into a ``GraphDef`` whose scopes follow the module
hierarchy, one level per module, containers included
(``1/layers/0/self_attn/linear``), so the dashboard collapses and expands by
module. Each method runs on the model as :mod:`tbx_lightning.graph._prepare`
presents it: wrappers (``torch.compile``, peft, data parallel) skipped, one
parameter per tensor input, outputs reduced to their tensors (caches and other
values a graph cannot hold are left out and named in the notes). The model is
left exactly as it was: modes, parameters, gradients, buffers and random number
generator states are restored, and no autograd graph is built.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tensorboardX.proto import event_pb2
from tensorboardX.proto.graph_pb2 import GraphDef
from tensorboardX.proto.plugin_text_pb2 import TextPluginData
from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboardX.proto.tensor_pb2 import TensorProto
from tensorboardX.proto.tensor_shape_pb2 import TensorShapeProto

from tbx_lightning.errors import ConfigError, ConfigTypeError, GraphExportError
from tbx_lightning.graph._capture_export import _build_export
from tbx_lightning.graph._capture_fx import _build_fx
from tbx_lightning.graph._capture_jit import _build_jit
from tbx_lightning.graph._graphdef import _to_graph_def
from tbx_lightning.graph._ir import (
    _MAX_ATTR_CHARS,
    _Captured,
    _collapse_depth,
    _collapse_repeated,
    _same_values,
    _scope_types,
)
from tbx_lightning.graph._prepare import (
    CACHE_HINT,
    mentions_cache,
    one_line,
    prepare,
)

if TYPE_CHECKING:
    from tensorboardX import SummaryWriter

__all__ = [
    "METHODS",
    "TEXT_TAG",
    "GraphExport",
    "GraphExportError",
    "export_graph",
    "to_graph_def",
    "write_graph",
]

METHODS: tuple[str, ...] = ("torch.export", "torch.fx", "torch.jit.trace")
"""The capture methods, in the order they are tried by default."""

TEXT_TAG = "graph/export"
"""Tag of the text summary that says which method produced the run graph."""

"""Output shape: one entry per dimension (``None`` for symbolic), or ``None`` if unknown."""


@dataclass(frozen=True)
class GraphExport:
    """A model graph ready for TensorBoard, and how it was obtained.

    Attributes:
        graph_def: The graph, as tensorboardX's ``GraphDef`` proto.
        method: The method that produced it: ``"torch.export"``, ``"torch.fx"``
            or ``"torch.jit.trace"``.
        num_nodes: Number of nodes in ``graph_def``.
        attempts: ``(method, one-line error)`` of the methods that failed before.
        notes: Caveats about the graph, e.g. that ``torch.jit.trace`` recorded
            only one branch of data-dependent control flow.

    Example:
        >>> import torch
        >>> result = export_graph(torch.nn.Linear(4, 2), torch.zeros(3, 4))
        >>> result.method, result.num_nodes > 0
        ('torch.export', True)
    """

    graph_def: GraphDef
    method: str
    num_nodes: int
    attempts: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        """Markdown text saying which method produced the graph and what failed before."""
        lines = [f"Graph exported with **{self.method}** ({self.num_nodes} nodes)."]
        if self.attempts:
            lines += ["", "Methods that failed before:", ""]
            lines += [f"- `{method}`: {_md_escape(error)}" for method, error in self.attempts]
        if self.notes:
            lines += ["", "Notes:", ""]
            lines += [f"- {_md_escape(note)}" for note in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------


def export_graph(
    model: torch.nn.Module,
    example_input: Any,
    *,
    methods: Sequence[str] = METHODS,
    max_depth: int | None = None,
    collapse_repeated: bool = False,
) -> GraphExport:
    """Captures ``model`` on ``example_input`` and converts it to a TensorBoard graph.

    Args:
        model: The module to capture. It is left as it was (training/eval modes,
            parameters, gradients, buffers, random number generator states).
            ``torch.compile``, peft and data-parallel wrappers are skipped: scopes
            and ``max_depth`` count from the model inside.
        example_input: One call's inputs: a tensor; a tuple or list of positional
            arguments; a dict of keyword arguments; or an ``(args, kwargs)`` pair
            (a 2-tuple of a tuple/list and a dict). ``None`` uses
            ``model.example_input_array`` (Lightning's convention). Tensors on
            another device than the model's (single) device are moved to it.
        methods: Capture methods to try, in order; a subset of :data:`METHODS`.
        max_depth: Keep at most this many module scope levels (a container such
            as ``layers`` is a level, ``layers/0`` the next); each deeper module
            becomes a single node (op type = module class). ``None`` keeps all.
        collapse_repeated: Show each module whose graph repeats an earlier sibling's
            (same container or name family, same class, ops and shapes, e.g.
            ``layers/1`` ... ``layers/23``) as a single node, keeping the first
            one expanded.

    Returns:
        The graph, the method that produced it and the methods that failed before.

    Raises:
        GraphExportError: Every method failed; the message lists each one's error.
        TypeError: ``model`` is not a module or ``example_input`` has an
            unsupported type.
        ValueError: ``methods`` or ``max_depth`` is invalid, or there is no
            example input.
    """
    if not isinstance(model, torch.nn.Module):
        raise ConfigTypeError(
            f"`model` must be a torch.nn.Module, got {type(model).__name__}: "
            "pass the module itself (e.g. your LightningModule), not its output"
        )
    chosen = _check_methods(methods)
    if max_depth is not None and (isinstance(max_depth, bool) or max_depth < 0):
        raise ConfigError(f"`max_depth` must be None or an int >= 0, got {max_depth!r}")
    args, kwargs = _normalize_input(model, example_input)
    args, kwargs = _to_model_device(model, args, kwargs)
    prepared = prepare(model, args, kwargs)

    attempts: list[tuple[str, str]] = []
    captured: _Captured | None = None
    method = ""
    for method in chosen:
        try:
            with (
                _preserved_state(model),
                _quiet_torch_logs(),
                # A failed torch.export prints the partial graph it traced; the reason
                # reaches the user through ``attempts`` instead.
                _silence_this_thread(),
                warnings.catch_warnings(record=True) as caught,
            ):
                warnings.simplefilter("always")
                captured = _BUILDERS[method](prepared.module, prepared.values, {})
        except Exception as err:  # every failure is reported, none dropped
            attempts.append((method, _one_line(err)))
            continue
        captured.notes.extend(_notes_from_warnings(method, caught))
        break
    if captured is None:
        hint = _HINT
        if mentions_cache([error for _, error in attempts]):
            hint = CACHE_HINT + hint
        raise GraphExportError(_qualname(type(model)), tuple(attempts), hint)
    output_note = prepared.output_note()
    captured.notes[:0] = [*prepared.notes, *([output_note] if output_note else [])]

    nodes = captured.nodes
    scope_types = _scope_types(prepared.root)
    if collapse_repeated:
        nodes = _collapse_repeated(nodes, scope_types)
    if max_depth is not None:
        nodes = _collapse_depth(nodes, max_depth, scope_types)
    graph_def = _to_graph_def(nodes)
    return GraphExport(
        graph_def=graph_def,
        method=method,
        num_nodes=len(graph_def.node),
        attempts=tuple(attempts),
        notes=tuple(captured.notes),
    )


def to_graph_def(
    model: torch.nn.Module,
    example_input: Any,
    *,
    methods: Sequence[str] = METHODS,
    max_depth: int | None = None,
    collapse_repeated: bool = False,
) -> GraphDef:
    """Returns the TensorBoard ``GraphDef`` of ``model``; see :func:`export_graph`.

    Args:
        model: The model to capture.
        example_input: What ``model`` is called with (a tensor, a tuple, or a dict of
            keyword arguments).
        methods: Capture backends to try, in order (``"export"``, ``"fx"``, ``"jit"``).
        max_depth: Module-tree depth of the scopes shown; deeper ones are collapsed.
        collapse_repeated: Show repeated blocks (layers of one stack) once.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU())
        >>> graph_def = to_graph_def(model, torch.zeros(2, 4))
        >>> sorted(n.name for n in graph_def.node if n.op == "aten::linear")
        ['0/linear']
    """
    return export_graph(
        model,
        example_input,
        methods=methods,
        max_depth=max_depth,
        collapse_repeated=collapse_repeated,
    ).graph_def


def write_graph(
    experiment: SummaryWriter,
    model: torch.nn.Module,
    example_input: Any,
    *,
    step: int = 0,
    methods: Sequence[str] = METHODS,
    max_depth: int | None = None,
    collapse_repeated: bool = False,
) -> GraphExport:
    """Exports the graph of ``model`` and writes it as the run graph of ``experiment``.

    Writes two events into the writer's event stream: the ``GraphDef`` (what
    TensorBoard's graphs plugin shows as the run graph) and a text summary under
    tag ``graph/export`` that says which method produced it and what failed before.

    Args:
        experiment: A tensorboardX ``SummaryWriter`` (or subclass).
        model: The module to capture; see :func:`export_graph`.
        example_input: One call's inputs; see :func:`export_graph`.
        step: Global step recorded with both events.
        methods: Capture methods to try, in order.
        max_depth: See :func:`export_graph`.
        collapse_repeated: See :func:`export_graph`.

    Returns:
        The :class:`GraphExport` that was written.

    Raises:
        GraphExportError: Every method failed; nothing is written.

    Example:
        >>> import tempfile, torch
        >>> from tensorboardX import SummaryWriter
        >>> with SummaryWriter(tempfile.mkdtemp()) as writer:
        ...     result = write_graph(writer, torch.nn.Linear(4, 2), torch.zeros(1, 4))
        >>> result.method
        'torch.export'
    """
    result = export_graph(
        model,
        example_input,
        methods=methods,
        max_depth=max_depth,
        collapse_repeated=collapse_repeated,
    )
    file_writer = experiment._get_file_writer()
    event = event_pb2.Event(graph_def=result.graph_def.SerializeToString())
    file_writer.add_event(event, step)
    file_writer.add_summary(_text_summary(TEXT_TAG, result.summary()), step)
    return result


def _text_summary(tag: str, text: str) -> Summary:
    """A text-plugin summary under exactly ``tag`` (``add_text`` appends ``/text_summary``)."""
    metadata = SummaryMetadata(
        plugin_data=SummaryMetadata.PluginData(
            plugin_name="text", content=TextPluginData(version=0).SerializeToString()
        )
    )
    tensor = TensorProto(
        dtype="DT_STRING",
        string_val=[text.encode("utf-8")],
        tensor_shape=TensorShapeProto(dim=[TensorShapeProto.Dim(size=1)]),
    )
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata, tensor=tensor)])


# --------------------------------------------------------------------------------------
# Inputs, state, errors
# --------------------------------------------------------------------------------------

_HINT = (
    "What to do: check that `model(*args, **kwargs)` runs on this example input "
    "(same device, dtypes and shapes as in training). Data-dependent Python control "
    "flow such as `if x.sum() > 0:` stops torch.export and torch.fx: write it with "
    "torch.where or torch.cond. To skip the graph, set log_graph=False; see "
    "docs/graph.md (Troubleshooting)."
)


def _check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    if isinstance(methods, str):
        methods = (methods,)
    chosen = tuple(methods)
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        raise ConfigError(
            f"`methods` must be a non-empty sequence drawn from {METHODS}, got {methods!r}"
        )
    return chosen


def _normalize_input(
    model: torch.nn.Module, example_input: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
        if example_input is None:
            raise ConfigError(
                f"No example input for {type(model).__name__}: pass `example_input` "
                "(a tensor, tuple, dict or (args, kwargs) pair) or set "
                "`self.example_input_array` in your LightningModule"
            )
    if isinstance(example_input, torch.Tensor):
        return (example_input,), {}
    if (
        isinstance(example_input, tuple)
        and len(example_input) == 2
        and isinstance(example_input[0], (tuple, list))
        and isinstance(example_input[1], Mapping)
    ):
        return tuple(example_input[0]), _check_kwargs(example_input[1])
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    if isinstance(example_input, Mapping):
        return (), _check_kwargs(example_input)
    raise ConfigTypeError(
        f"`example_input` has type {type(example_input).__name__}; expected a tensor, a tuple "
        "or list of positional arguments, a dict of keyword arguments, or an (args, kwargs) pair"
    )


def _check_kwargs(kwargs: Mapping[Any, Any]) -> dict[str, Any]:
    bad = [key for key in kwargs if not isinstance(key, str)]
    if bad:
        raise ConfigTypeError(
            f"`example_input` keyword arguments must have str keys, got {bad[0]!r}: "
            "use the names of the arguments of `forward`"
        )
    return dict(kwargs)


def _to_model_device(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    devices = {t.device for t in _state_tensors(model)}
    if len(devices) != 1:
        return args, kwargs
    device = devices.pop()
    if device.type == "meta":
        return args, kwargs

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value if value.device == device else value.to(device)
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(move(v) for v in value)
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    return move(args), move(kwargs)


def _state_tensors(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


@contextlib.contextmanager
def _preserved_state(model: torch.nn.Module) -> Iterator[None]:
    """Restores modes, parameter/buffer bindings, gradients, buffer values and RNG states."""
    modes = [(m, m.training) for m in model.modules()]
    params: list[tuple[torch.nn.Module, dict[str, Any]]]
    params = [(m, dict(m._parameters)) for m in model.modules()]
    buffers: list[tuple[torch.nn.Module, dict[str, Any]]]
    buffers = [(m, dict(m._buffers)) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    buffer_values = [(b, b.detach().clone()) for b in model.buffers() if b.device.type != "meta"]
    cuda = sorted({t.device.index or 0 for t in _state_tensors(model) if t.device.type == "cuda"})
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        for module, mode in modes:
            module.training = mode
        for module, saved in params:
            if not _same_items(module._parameters, saved):
                module._parameters.clear()
                module._parameters.update(saved)
        for module, saved in buffers:
            if not _same_items(module._buffers, saved):
                module._buffers.clear()
                module._buffers.update(saved)
        with torch.no_grad():
            # Compare values, not version counters: batch_norm updates running stats
            # in place without bumping the counter while tracing.
            for buffer, value in buffer_values:
                if not _same_values(buffer, value):
                    buffer.copy_(value)
        for param, grad in grads:
            if param.grad is not grad:
                param.grad = grad


def _same_items(current: Mapping[str, Any], saved: Mapping[str, Any]) -> bool:
    """Same keys bound to the very same objects (``==`` on tensors would compare values)."""
    return current.keys() == saved.keys() and all(current[k] is saved[k] for k in saved)


_NOISY_LOGGERS = (
    "torch._subclasses.fake_tensor",
    "torch.fx.experimental.symbolic_shapes",
    "torch._export",
    "torch.export",
)


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Silences torch's own error logs of a failed attempt; the attempt's error is reported."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


_one_line = one_line


class _OtherThreads(io.TextIOBase):
    """A text stream that drops what one thread writes and passes on everyone else's."""

    def __init__(self, real: Any, thread_id: int) -> None:
        self._real = real
        self._thread_id = thread_id

    def write(self, text: str) -> int:
        if threading.get_ident() == self._thread_id:
            return len(text)
        return int(self._real.write(text))

    def flush(self) -> None:
        self._real.flush()

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, isatty, ...
        return getattr(self._real, name)


@contextlib.contextmanager
def _silence_this_thread() -> Iterator[None]:
    """Drops the exporting thread's prints; other threads keep writing to the terminal.

    torch prints a failed capture's partial graph with ``print``. Swapping the
    process's streams for a buffer (``contextlib.redirect_stdout``) would also swallow
    what the training loop, a progress bar or another thread prints meanwhile.
    """
    thread_id = threading.get_ident()
    saved = sys.stdout, sys.stderr
    sys.stdout = _OtherThreads(saved[0], thread_id)  # type: ignore[assignment]
    sys.stderr = _OtherThreads(saved[1], thread_id)  # type: ignore[assignment]
    try:
        yield
    finally:
        # Restore only what is still ours: a stream someone set meanwhile stays.
        if isinstance(sys.stdout, _OtherThreads) and sys.stdout._thread_id == thread_id:
            sys.stdout = saved[0]
        if isinstance(sys.stderr, _OtherThreads) and sys.stderr._thread_id == thread_id:
            sys.stderr = saved[1]


def _notes_from_warnings(method: str, caught: list[warnings.WarningMessage]) -> list[str]:
    if method != "torch.jit.trace":
        return []
    tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    if not tracer:
        return []
    first = str(tracer[0].message).splitlines()[0][:_MAX_ATTR_CHARS]
    return [
        f"torch.jit.trace recorded the path taken for this example input only "
        f"({len(tracer)} tracer warning(s), first: {first})"
    ]


def _qualname(cls: type) -> str:
    module = cls.__module__
    return (
        cls.__qualname__ if module in ("builtins", "__main__") else f"{module}.{cls.__qualname__}"
    )


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


_BUILDERS: dict[str, Callable[[torch.nn.Module, tuple[Any, ...], dict[str, Any]], _Captured]] = {
    "torch.export": _build_export,
    "torch.fx": _build_fx,
    "torch.jit.trace": _build_jit,
}
