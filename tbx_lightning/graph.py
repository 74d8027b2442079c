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
module. Each method runs on the model as :mod:`tbx_lightning._graph_prepare`
presents it: wrappers (``torch.compile``, peft, data parallel) skipped, one
parameter per tensor input, outputs reduced to their tensors (caches and other
values a graph cannot hold are left out and named in the notes). The model is
left exactly as it was: modes, parameters, gradients, buffers and random number
generator states are restored, and no autograd graph is built.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import operator
import random
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tensorboardX.proto import event_pb2
from tensorboardX.proto.attr_value_pb2 import AttrValue
from tensorboardX.proto.graph_pb2 import GraphDef
from tensorboardX.proto.node_def_pb2 import NodeDef
from tensorboardX.proto.plugin_text_pb2 import TextPluginData
from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
from tensorboardX.proto.tensor_pb2 import TensorProto
from tensorboardX.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboardX.proto.types_pb2 import DataType
from tensorboardX.proto.versions_pb2 import VersionDef

from tbx_lightning._graph_prepare import (
    CACHE_HINT,
    capture_root,
    mentions_cache,
    one_line,
    prepare,
)
from tbx_lightning.errors import GraphExportError

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

_MAX_ATTR_CHARS = 240

Shape = tuple[int | None, ...] | None
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
        raise TypeError(
            f"`model` must be a torch.nn.Module, got {type(model).__name__}: "
            "pass the module itself (e.g. your LightningModule), not its output"
        )
    chosen = _check_methods(methods)
    if max_depth is not None and (isinstance(max_depth, bool) or max_depth < 0):
        raise ValueError(f"`max_depth` must be None or an int >= 0, got {max_depth!r}")
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
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()),
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
        raise ValueError(
            f"`methods` must be a non-empty sequence drawn from {METHODS}, got {methods!r}"
        )
    return chosen


def _normalize_input(
    model: torch.nn.Module, example_input: Any
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if example_input is None:
        example_input = getattr(model, "example_input_array", None)
        if example_input is None:
            raise ValueError(
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
    raise TypeError(
        f"`example_input` has type {type(example_input).__name__}; expected a tensor, a tuple "
        "or list of positional arguments, a dict of keyword arguments, or an (args, kwargs) pair"
    )


def _check_kwargs(kwargs: Mapping[Any, Any]) -> dict[str, Any]:
    bad = [key for key in kwargs if not isinstance(key, str)]
    if bad:
        raise TypeError(
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


def _same_values(tensor: torch.Tensor, saved: torch.Tensor) -> bool:
    return tensor.shape == saved.shape and bool(torch.equal(tensor, saved))


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


# --------------------------------------------------------------------------------------
# Intermediate representation
# --------------------------------------------------------------------------------------

_OP, _INPUT, _OUTPUT, _PARAM = "op", "input", "output", "param"


@dataclass
class _Node:
    key: str
    scope: tuple[str, ...]
    leaf: str
    op: str
    kind: str = _OP
    inputs: list[tuple[str, int]] = field(default_factory=list)
    shapes: list[Shape] = field(default_factory=list)
    dtypes: list[torch.dtype | None] = field(default_factory=list)
    attrs: dict[str, str] = field(default_factory=dict)
    device: str = ""


@dataclass
class _Captured:
    nodes: list[_Node]
    notes: list[str] = field(default_factory=list)


def _module_path(path: str) -> str:
    """Normalizes module paths recorded by torch (``L['self'].layers[0]``, ``enc@1``)."""
    path = re.sub(r"^(L\['self'\]|L__self__|self)\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    path = re.sub(r"@\d+", "", path)
    # A compiled submodule's own path adds a level the user never wrote.
    path = re.sub(r"(?:^|\.)_orig_mod(?=\.|$)", "", path)
    return path.strip(".")


def _scope(path: str) -> tuple[str, ...]:
    """``1.layers.0.self_attn`` -> ``("1", "layers", "0", "self_attn")``.

    One segment per module level, containers included, so the dashboard groups the
    items of a ``Sequential``/``ModuleList`` under it (``backbone/0``, ``backbone/1``).
    """
    return tuple(part for part in _module_path(path).split(".") if part)


def _scope_types(model: torch.nn.Module) -> dict[tuple[str, ...], str]:
    return {_scope(name): type(m).__name__ for name, m in model.named_modules() if name}


def _io_groups(model: torch.nn.Module) -> tuple[str, str]:
    """Top-level group names for inputs and outputs that no child module uses."""
    taken = {name for name, _ in model.named_children()}
    names = []
    for base in ("input", "output"):
        name = base
        while name in taken:
            name += "_"
        names.append(name)
    return names[0], names[1]


def _tensor_meta(value: Any) -> tuple[list[Shape], list[torch.dtype | None], str]:
    """Shapes, dtypes and device of a node's output value (tensor, tuple of tensors, ...)."""
    shapes: list[Shape] = []
    dtypes: list[torch.dtype | None] = []
    device = ""
    values = value if isinstance(value, (tuple, list)) else (value,)
    for item in values:
        if isinstance(item, torch.Tensor):
            shapes.append(tuple(d if isinstance(d, int) else None for d in item.shape))
            dtypes.append(item.dtype)
            device = device or str(item.device)
        elif isinstance(item, (torch.SymInt, int)) and not isinstance(item, bool):
            shapes.append(())
            dtypes.append(torch.int64)
        elif isinstance(item, (torch.SymFloat, float)):
            shapes.append(())
            dtypes.append(torch.float64)
        elif isinstance(item, (torch.SymBool, bool)):
            shapes.append(())
            dtypes.append(torch.bool)
        else:
            shapes.append(None)
            dtypes.append(None)
    return shapes, dtypes, device


def _format_arg(value: Any, name_of: Callable[[Any], str | None]) -> str:
    name = name_of(value)
    if name is not None:
        return name
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_format_arg(v, name_of) for v in value)
        return f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_format_arg(v, name_of)}" for k, v in value.items()) + "}"
    if isinstance(value, torch.Tensor):
        return f"tensor{list(value.shape)}"
    return repr(value)


def _format_call(
    args: Sequence[Any], kwargs: Mapping[str, Any], name_of: Callable[[Any], str | None]
) -> str:
    parts = [_format_arg(a, name_of) for a in args]
    parts += [f"{k}={_format_arg(v, name_of)}" for k, v in kwargs.items()]
    text = ", ".join(parts)
    return text if len(text) <= _MAX_ATTR_CHARS else text[: _MAX_ATTR_CHARS - 3] + "..."


def _function_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return str(target._schema.name)
    if isinstance(target, torch._ops.OpOverloadPacket):
        return str(target._qualified_op_name)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher_order::{target.name()}"
    name = getattr(target, "__name__", None) or type(target).__name__
    module = getattr(target, "__module__", None) or ""
    module = {"_operator": "operator", "torch._C._nn": "torch.nn.functional"}.get(module, module)
    if module.startswith("torch._C") or not module:
        module = "torch"
    return f"{module}.{name}"


def _param_nodes(
    model: torch.nn.Module,
) -> tuple[dict[int, str], dict[str, list[str]]]:
    """``id(tensor) -> first name`` and ``first name -> every name`` (tied weights)."""
    first: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    named: list[tuple[str, torch.Tensor]] = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        key = first.setdefault(id(tensor), name)
        aliases.setdefault(key, []).append(name)
    return first, aliases


def _state_node(
    fqn: str, tensor: Any, kind: str, aliases: Sequence[str], key: str | None = None
) -> _Node:
    scope = _scope(fqn.rpartition(".")[0]) if "." in fqn else ()
    leaf = fqn.rpartition(".")[2]
    shapes, dtypes, device = _tensor_meta(tensor)
    attrs = {"target": fqn}
    if len(aliases) > 1:
        attrs["tied_to"] = ", ".join(a for a in aliases if a != fqn)
    if isinstance(tensor, torch.Tensor):
        attrs["numel"] = str(tensor.numel())
        if kind == "Parameter":
            attrs["requires_grad"] = str(bool(getattr(tensor, "requires_grad", False)))
    return _Node(
        key=key or f"state:{fqn}",
        scope=scope,
        leaf=leaf,
        op=kind,
        kind=_PARAM,
        shapes=shapes,
        dtypes=dtypes,
        attrs=attrs,
        device=device,
    )


def _key_path_name(path: Sequence[Any]) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "idx", "name"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return ".".join(parts)


def _output_nodes(
    group: str, outputs: Sequence[tuple[str, tuple[str, int] | None, Any]]
) -> list[_Node]:
    """One ``Output`` node per flattened model output: ``(path, producer, value)``."""
    nodes = []
    single = len(outputs) == 1
    for i, (path, producer, value) in enumerate(outputs):
        leaf = "output" if single and not path else (path or str(i))
        node = _Node(key=f"output:{i}:{leaf}", scope=(group,), leaf=leaf, op="Output", kind=_OUTPUT)
        if producer is not None:
            node.inputs.append(producer)
        else:
            node.attrs["value"] = repr(value)[:_MAX_ATTR_CHARS]
        nodes.append(node)
    return nodes


# --------------------------------------------------------------------------------------
# Method 1: torch.export
# --------------------------------------------------------------------------------------


def _build_export(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> _Captured:
    from torch.export.graph_signature import InputKind, OutputKind

    program = torch.export.export(model, args, kwargs=kwargs, strict=False)
    signature = program.graph_signature
    in_group, out_group = _io_groups(model)
    first, aliases = _param_nodes(model)
    canonical = {
        name: first[id(tensor)]
        for name, tensor in [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]
    }
    state_keys: dict[str, str] = {}
    kinds = {
        InputKind.PARAMETER: "Parameter",
        InputKind.BUFFER: "Buffer",
        InputKind.CONSTANT_TENSOR: "Constant",
    }
    state_of: dict[str, tuple[str, str]] = {}
    user_inputs: set[str] = set()
    for spec in signature.input_specs:
        name = getattr(spec.arg, "name", None)
        if name is None:
            continue
        if spec.kind in kinds and spec.target is not None:
            state_of[name] = (spec.target, kinds[spec.kind])
        elif spec.kind == InputKind.USER_INPUT:
            user_inputs.add(name)

    nodes: list[_Node] = []
    ref: dict[str, tuple[str, int]] = {}
    vals: dict[str, Any] = {}

    def name_of(value: Any) -> str | None:
        return value.name if isinstance(value, torch.fx.Node) else None

    output_node = None
    for fx_node in program.graph.nodes:
        val = fx_node.meta.get("val")
        vals[fx_node.name] = val
        if fx_node.op == "placeholder":
            if fx_node.name in state_of:
                fqn, kind = state_of[fx_node.name]
                fqn = canonical.get(fqn, fqn)
                if fqn in state_keys:  # tied weights: one node, every placeholder reads it
                    ref[fx_node.name] = (state_keys[fqn], 0)
                    continue
                node = _state_node(fqn, val, kind, aliases.get(fqn, [fqn]), key=fx_node.name)
                state_keys[fqn] = node.key
            elif fx_node.name in user_inputs:
                shapes, dtypes, device = _tensor_meta(val)
                node = _Node(
                    key=fx_node.name,
                    scope=(in_group,),
                    leaf=fx_node.name,
                    op="Input",
                    kind=_INPUT,
                    shapes=shapes,
                    dtypes=dtypes,
                    device=device,
                )
            else:
                continue  # effect tokens and the like carry no data
            nodes.append(node)
            ref[fx_node.name] = (node.key, 0)
            continue
        if fx_node.op == "output":
            output_node = fx_node
            continue
        if fx_node.op == "get_attr":
            continue  # submodules of higher-order ops; their results are what matters
        inputs = [ref[n.name] for n in fx_node.all_input_nodes if n.name in ref]
        if fx_node.target is operator.getitem and _is_flat_multi(
            vals.get(_first_node_name(fx_node))
        ):
            source, index = fx_node.args[0], fx_node.args[1]
            if isinstance(source, torch.fx.Node) and source.name in ref and isinstance(index, int):
                ref[fx_node.name] = (ref[source.name][0], index)
                continue
        if val is None and not fx_node.users:
            continue  # runtime asserts and other effect-only nodes
        stack = fx_node.meta.get("nn_module_stack") or {}
        path, module_type = _innermost(stack)
        shapes, dtypes, device = _tensor_meta(val)
        attrs = {"args": _format_call(fx_node.args, fx_node.kwargs, name_of)}
        if module_type:
            attrs["module"] = f"{path} ({module_type})" if path else module_type
        node = _Node(
            key=fx_node.name,
            scope=_scope(path),
            leaf=fx_node.name,
            op=_function_name(fx_node.target),
            inputs=_dedup(inputs),
            shapes=shapes,
            dtypes=dtypes,
            attrs=attrs,
            device=device,
        )
        nodes.append(node)
        ref[fx_node.name] = (node.key, 0)

    if output_node is not None:
        flat = output_node.args[0]
        flat = list(flat) if isinstance(flat, (tuple, list)) else [flat]
        user = [
            value
            for value, spec in zip(flat, signature.output_specs, strict=False)
            if spec.kind in (OutputKind.USER_OUTPUT, OutputKind.LOSS_OUTPUT)
        ]
        paths = _spec_paths(program, len(user))
        outs = []
        for path, value in zip(paths, user, strict=False):
            producer = ref.get(value.name) if isinstance(value, torch.fx.Node) else None
            outs.append((path, producer, value))
        nodes += _output_nodes(out_group, outs)
    return _Captured(nodes)


def _first_node_name(fx_node: torch.fx.Node) -> str:
    first = fx_node.args[0] if fx_node.args else None
    return first.name if isinstance(first, torch.fx.Node) else ""


def _is_flat_multi(val: Any) -> bool:
    return isinstance(val, (tuple, list)) and all(
        v is None or isinstance(v, torch.Tensor) for v in val
    )


def _innermost(stack: Mapping[str, Any]) -> tuple[str, str]:
    if not stack:
        return "", ""
    path, module_type = list(stack.values())[-1][:2]
    if isinstance(module_type, type):
        module_type = module_type.__name__
    return _module_path(str(path)), str(module_type).rpartition(".")[2]


def _dedup(refs: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    return list(dict.fromkeys(refs))


def _spec_paths(program: Any, count: int) -> list[str]:
    import torch.utils._pytree as pytree

    try:
        spec = program.call_spec.out_spec
        tree = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
        leaves = pytree.tree_flatten_with_path(tree)[0]
        paths = [_key_path_name(path) for path, _ in leaves]
    except Exception:  # names are cosmetic; fall back to indices
        paths = []
    if len(paths) != count:
        paths = [str(i) for i in range(count)] if count > 1 else [""]
    return paths


# --------------------------------------------------------------------------------------
# Method 2: torch.fx symbolic tracing
# --------------------------------------------------------------------------------------


def _build_fx(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Captured:
    signature = inspect.signature(model.forward)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    values = dict(bound.arguments)
    concrete = {
        name: value
        for name, value in values.items()
        if not isinstance(value, torch.Tensor)
        and signature.parameters[name].kind
        not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }
    tracer = torch.fx.Tracer()
    graph = tracer.trace(model, concrete_args=concrete or None)
    module = torch.fx.GraphModule(tracer.root, graph)

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    names = [n for n in signature.parameters if n not in ("self",)]
    # Placeholders follow the signature order; concrete ones are baked in.
    arg_of = dict(zip([p.name for p in placeholders], names, strict=False))
    notes: list[str] = []
    call_args = [values.get(arg_of.get(p.name, "")) for p in placeholders]
    try:
        vals = _fake_values(module, call_args)
    except Exception as err:
        # Tracing never runs the model; shape propagation does (on fake tensors). If that
        # fails, the model does not run on this input, and a graph without shapes would hide it.
        raise RuntimeError(f"shape propagation failed: {_one_line(err)}") from err

    in_group, out_group = _io_groups(model)
    first, aliases = _param_nodes(model)
    nodes: list[_Node] = []
    ref: dict[str, tuple[str, int]] = {}
    dropped: set[str] = set()
    state_keys: dict[str, str] = {}

    def state_ref(fqn: str, tensor: Any, kind: str) -> tuple[str, int]:
        fqn = first.get(id(tensor), fqn)
        if fqn not in state_keys:
            node = _state_node(fqn, tensor, kind, aliases.get(fqn, [fqn]))
            nodes.append(node)
            state_keys[fqn] = node.key
        return (state_keys[fqn], 0)

    def name_of(value: Any) -> str | None:
        return value.name if isinstance(value, torch.fx.Node) else None

    output_node = None
    for fx_node in graph.nodes:
        val = vals.get(fx_node.name)
        if fx_node.op == "placeholder":
            arg = arg_of.get(fx_node.name, fx_node.name)
            if arg in concrete:
                dropped.add(fx_node.name)
                continue
            shapes, dtypes, device = _tensor_meta(val)
            node = _Node(
                key=f"input:{fx_node.name}",
                scope=(in_group,),
                leaf=arg,
                op="Input",
                kind=_INPUT,
                shapes=shapes,
                dtypes=dtypes,
                device=device,
            )
            nodes.append(node)
            ref[fx_node.name] = (node.key, 0)
            continue
        if fx_node.op == "output":
            output_node = fx_node
            continue
        inputs_all = fx_node.all_input_nodes
        if fx_node.target is torch._assert or (
            inputs_all and all(n.name in dropped for n in inputs_all)
        ):
            dropped.add(fx_node.name)
            continue
        if fx_node.op == "get_attr":
            target = str(fx_node.target)
            tensor = _get_attr(model, target)
            kind = "Parameter" if isinstance(tensor, torch.nn.Parameter) else "Buffer"
            ref[fx_node.name] = state_ref(target, tensor, kind)
            continue
        inputs = [ref[n.name] for n in inputs_all if n.name in ref]
        stack = fx_node.meta.get("nn_module_stack") or {}
        path, module_type = _innermost(stack)
        leaf = fx_node.name
        if fx_node.op == "call_module":
            target = str(fx_node.target)
            submodule = model.get_submodule(target)
            op = leaf = type(submodule).__name__
            path, module_type = target, op
            for pname, tensor in submodule.named_parameters():
                inputs.append(state_ref(f"{target}.{pname}", tensor, "Parameter"))
            for bname, tensor in submodule.named_buffers():
                inputs.append(state_ref(f"{target}.{bname}", tensor, "Buffer"))
        elif fx_node.op == "call_method":
            op = f"Tensor.{fx_node.target}"
        else:
            op = _function_name(fx_node.target)
        shapes, dtypes, device = _tensor_meta(val)
        attrs = {"args": _format_call(fx_node.args, fx_node.kwargs, name_of)}
        if module_type:
            attrs["module"] = f"{path} ({module_type})" if path else module_type
        node = _Node(
            key=f"fx:{fx_node.name}",
            scope=_scope(path),
            leaf=leaf,
            op=op,
            inputs=_dedup(inputs),
            shapes=shapes,
            dtypes=dtypes,
            attrs=attrs,
            device=device,
        )
        nodes.append(node)
        ref[fx_node.name] = (node.key, 0)

    if output_node is not None:
        import torch.utils._pytree as pytree

        leaves = pytree.tree_flatten_with_path(output_node.args[0])[0]
        outs = []
        for key_path, value in leaves:
            producer = ref.get(value.name) if isinstance(value, torch.fx.Node) else None
            outs.append((_key_path_name(key_path), producer, value))
        nodes += _output_nodes(out_group, outs)
    return _Captured(nodes, notes)


def _fake_values(module: torch.fx.GraphModule, inputs: Sequence[Any]) -> dict[str, Any]:
    """Runs ``module`` on fake tensors (no real compute, real state untouched): node -> value."""
    from torch._dynamo.utils import deepcopy_to_fake_tensor
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_module = deepcopy_to_fake_tensor(module, mode)
    values: dict[str, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            result = super().run_node(n)
            values[n.name] = result
            return result

    fake_inputs = [mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs]
    with mode:
        Recorder(fake_module, graph=module.graph).run(*fake_inputs)
    return values


def _get_attr(model: torch.nn.Module, target: str) -> Any:
    owner: Any = model
    for part in target.split("."):
        owner = getattr(owner, part)
    return owner


# --------------------------------------------------------------------------------------
# Method 3: torch.jit.trace, trace check off
# --------------------------------------------------------------------------------------

_JIT_DTYPES = {
    "Float": torch.float32,
    "Double": torch.float64,
    "Half": torch.float16,
    "BFloat16": torch.bfloat16,
    "Long": torch.int64,
    "Int": torch.int32,
    "Short": torch.int16,
    "Char": torch.int8,
    "Byte": torch.uint8,
    "Bool": torch.bool,
    "ComplexFloat": torch.complex64,
    "ComplexDouble": torch.complex128,
}


def _build_jit(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Captured:
    if kwargs:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
        trace_args: tuple[Any, ...] | None = None
        trace_kwargs: dict[str, Any] | None = dict(bound.arguments)
    else:
        trace_args, trace_kwargs = args, None
    root = capture_root(model)
    # The trace runs the model for real: keep a copy of parameters in case forward writes them.
    saved = [(p, p.detach().clone()) for p in model.parameters()]
    # LightningModule's `trainer` property raises when no Trainer is attached, unless this
    # flag (set by Lightning's own to_torchscript) says a TorchScript conversion is running.
    flagged = [
        m
        for m in {id(m): m for m in (*model.modules(), *root.modules())}.values()
        if getattr(m, "_jit_is_scripting", None) is False
    ]
    for module in flagged:
        setattr(module, "_jit_is_scripting", True)  # noqa: B010
    try:
        traced = torch.jit.trace(
            model,
            example_inputs=trace_args,
            example_kwarg_inputs=trace_kwargs,
            check_trace=False,
            strict=False,
        )
    finally:
        for module in flagged:
            setattr(module, "_jit_is_scripting", False)  # noqa: B010
        with torch.no_grad():
            for param, value in saved:
                if not _same_values(param, value):
                    param.copy_(value)
    del saved
    graph = traced.graph.copy()
    torch._C._jit_pass_inline(graph)

    in_group, out_group = _io_groups(model)
    first, aliases = _param_nodes(model)
    module_types = {name: type(m).__name__ for name, m in model.named_modules() if name}
    named = dict(model.named_parameters(remove_duplicate=False))
    named_buffers = dict(model.named_buffers(remove_duplicate=False))
    nodes: list[_Node] = []
    ref: dict[Any, tuple[str, int]] = {}  # jit Value unique id -> (key, index)
    module_path: dict[int, str] = {}
    constants: dict[int, Any] = {}
    state_keys: dict[str, str] = {}

    graph_inputs = list(graph.inputs())
    if graph_inputs:
        module_path[graph_inputs[0].unique()] = ""
    used: set[str] = set()
    for value in graph_inputs[1:]:
        leaf = re.sub(r"\.\d+$", "", value.debugName()) or "input"
        while leaf in used:
            leaf += "_"
        used.add(leaf)
        shapes, dtypes = _jit_meta(value)
        node = _Node(
            key=f"jit_in:{value.unique()}",
            scope=(in_group,),
            leaf=leaf,
            op="Input",
            kind=_INPUT,
            shapes=shapes,
            dtypes=dtypes,
        )
        nodes.append(node)
        ref[value.unique()] = (node.key, 0)

    # Tuples, lists and dicts built only to be returned are the output's structure,
    # drawn as the output nodes' names, not ops.
    packers: set[Any] = set()
    pending = list(graph.return_node().inputs())
    while pending:
        producer = pending.pop().node()
        if producer.kind() in (
            "prim::TupleConstruct",
            "prim::ListConstruct",
            "prim::DictConstruct",
        ):
            users = [use.user for use in producer.output().uses()]
            if all(u.kind() == "prim::Return" or u in packers for u in users):
                packers.add(producer)
                pending.extend(producer.inputs())

    for jit_node in graph.nodes():
        kind = jit_node.kind()
        outputs = list(jit_node.outputs())
        if jit_node in packers:
            continue
        if kind == "prim::Constant":
            if outputs:
                with contextlib.suppress(Exception):
                    constants[outputs[0].unique()] = outputs[0].toIValue()
            continue
        if kind == "prim::GetAttr":
            owner = module_path.get(jit_node.input().unique())
            if owner is None:
                continue
            fqn = f"{owner}.{jit_node.s('name')}" if owner else jit_node.s("name")
            out = jit_node.output()
            if isinstance(out.type(), torch._C.TensorType):
                tensor = named.get(fqn, named_buffers.get(fqn))
                fqn = first.get(id(tensor), fqn) if tensor is not None else fqn
                if fqn not in state_keys:
                    state_kind = "Parameter" if fqn in named else "Buffer"
                    state = _state_node(fqn, tensor, state_kind, aliases.get(fqn, [fqn]))
                    nodes.append(state)
                    state_keys[fqn] = state.key
                ref[out.unique()] = (state_keys[fqn], 0)
            else:
                module_path[out.unique()] = fqn
            continue
        scope_name = jit_node.scopeName().split("/")[-1]
        path = scope_name.removeprefix("__module.").removeprefix("__module")
        inputs = [ref[v.unique()] for v in jit_node.inputs() if v.unique() in ref]
        consts = [repr(constants[v.unique()]) for v in jit_node.inputs() if v.unique() in constants]
        shapes, dtypes = [], []
        for out in outputs:
            s, d = _jit_meta(out)
            shapes += s
            dtypes += d
        key = f"jit:{outputs[0].unique() if outputs else id(jit_node)}"
        leaf = kind.split("::")[-1]
        attrs = {"constants": ", ".join(consts)[:_MAX_ATTR_CHARS]} if consts else {}
        if path in module_types:
            attrs["module"] = f"{path} ({module_types[path]})"
        node = _Node(
            key=key,
            scope=_scope(path),
            leaf=f"{leaf}_{len(nodes)}",
            op=kind,
            inputs=_dedup(inputs),
            shapes=shapes,
            dtypes=dtypes,
            attrs=attrs,
        )
        nodes.append(node)
        for index, out in enumerate(outputs):
            ref[out.unique()] = (key, index)

    outs: list[tuple[str, tuple[str, int] | None, Any]] = []

    def flatten(value: Any, path: str) -> None:
        producer = value.node()
        kind = producer.kind()
        if kind in ("prim::TupleConstruct", "prim::ListConstruct"):
            for i, item in enumerate(producer.inputs()):
                flatten(item, f"{path}.{i}" if path else str(i))
        elif kind == "prim::DictConstruct":
            items = list(producer.inputs())
            for k, v in zip(items[0::2], items[1::2], strict=False):
                key = str(constants.get(k.unique(), k.debugName()))
                flatten(v, f"{path}.{key}" if path else key)
        else:
            outs.append((path, ref.get(value.unique()), None))

    for value in graph.return_node().inputs():
        flatten(value, "")
    nodes += _output_nodes(out_group, outs)
    return _Captured(nodes)


def _jit_meta(value: Any) -> tuple[list[Shape], list[torch.dtype | None]]:
    value_type = value.type()
    if isinstance(value_type, torch._C.TensorType):
        sizes = value_type.sizes()
        scalar = value_type.scalarType()
        shape: Shape = tuple(sizes) if sizes is not None else None
        return [shape], [_JIT_DTYPES.get(scalar) if scalar else None]
    for kind, dtype in (
        (torch._C.IntType, torch.int64),
        (torch._C.FloatType, torch.float64),
        (torch._C.BoolType, torch.bool),
    ):
        if isinstance(value_type, kind):
            return [()], [dtype]
    return [None], [None]


_BUILDERS: dict[str, Callable[[torch.nn.Module, tuple[Any, ...], dict[str, Any]], _Captured]] = {
    "torch.export": _build_export,
    "torch.fx": _build_fx,
    "torch.jit.trace": _build_jit,
}


# --------------------------------------------------------------------------------------
# Collapsing (max_depth, collapse_repeated)
# --------------------------------------------------------------------------------------


def _inside(scope: tuple[str, ...], block: tuple[str, ...]) -> bool:
    return len(scope) >= len(block) and scope[: len(block)] == block


def _collapse(
    nodes: list[_Node],
    blocks: Mapping[tuple[str, ...], dict[str, str]],
    scope_types: Mapping[tuple[str, ...], str],
) -> list[_Node]:
    """Replaces every node inside each block scope with a single node named by the scope."""
    if not blocks:
        return nodes
    block_of: dict[str, tuple[str, ...]] = {}
    by_depth = sorted(blocks, key=len)
    for node in nodes:
        if node.kind in (_INPUT, _OUTPUT):
            continue
        for block in by_depth:
            if _inside(node.scope, block):
                block_of[node.key] = block
                break
    merged: dict[tuple[str, ...], _Node] = {}
    slots: dict[tuple[str, ...], dict[tuple[str, int], int]] = {}
    counts: dict[tuple[str, ...], list[int]] = {}
    result: list[_Node] = []
    meta = {node.key: node for node in nodes}

    def redirect(source: tuple[str, int]) -> tuple[str, int]:
        block = block_of.get(source[0])
        if block is None:
            return source
        table = slots[block]
        if source not in table:
            table[source] = len(table)
            producer = meta[source[0]]
            index = source[1]
            target = merged[block]
            target.shapes.append(producer.shapes[index] if index < len(producer.shapes) else None)
            target.dtypes.append(producer.dtypes[index] if index < len(producer.dtypes) else None)
        return (merged[block].key, table[source])

    for node in nodes:
        member_of = block_of.get(node.key)
        if member_of is None:
            continue
        block = member_of
        if block not in merged:
            attrs = {"module": "/".join(block), "collapsed": "true"}
            attrs.update(blocks[block])
            merged[block] = _Node(
                key="block:" + "/".join(block),
                scope=block[:-1],
                leaf=block[-1],
                op=scope_types.get(block, "Module"),
                attrs=attrs,
                device=node.device,
            )
            slots[block] = {}
            counts[block] = [0, 0]
        counts[block][0] += node.kind == _OP
        if node.kind == _PARAM:
            counts[block][1] += int(node.attrs.get("numel", "0"))
    # Inputs of a block: everything its members read from outside it.
    for node in nodes:
        member_of = block_of.get(node.key)
        if member_of is None:
            continue
        for source in node.inputs:
            if block_of.get(source[0]) != member_of:
                merged[member_of].inputs.append(source)
    emitted: set[tuple[str, ...]] = set()
    for node in nodes:
        member_of = block_of.get(node.key)
        if member_of is not None:
            if member_of not in emitted:
                emitted.add(member_of)
                result.append(merged[member_of])
            continue
        node.inputs = _dedup([redirect(s) for s in node.inputs])
        result.append(node)
    for block, target in merged.items():
        target.inputs = _dedup([redirect(s) for s in target.inputs])
        target.attrs["collapsed_ops"] = str(counts[block][0])
        target.attrs["parameters"] = str(counts[block][1])
    return result


def _collapse_depth(
    nodes: list[_Node], max_depth: int, scope_types: Mapping[tuple[str, ...], str]
) -> list[_Node]:
    blocks: dict[tuple[str, ...], dict[str, str]] = {}
    for node in nodes:
        if node.kind not in (_INPUT, _OUTPUT) and len(node.scope) > max_depth:
            blocks.setdefault(node.scope[: max_depth + 1], {})
    return _collapse(nodes, blocks, scope_types)


def _collapse_repeated(
    nodes: list[_Node], scope_types: Mapping[tuple[str, ...], str]
) -> list[_Node]:
    members: dict[tuple[str, ...], list[_Node]] = {}
    for node in nodes:
        if node.kind in (_INPUT, _OUTPUT):
            continue
        for depth in range(1, len(node.scope) + 1):
            members.setdefault(node.scope[:depth], []).append(node)
    seen: dict[tuple[Any, ...], tuple[str, ...]] = {}
    blocks: dict[tuple[str, ...], dict[str, str]] = {}
    for scope in sorted(members, key=len):  # stable: parents first, then first appearance
        if any(_inside(scope, block) for block in blocks):
            continue
        group = members[scope]
        if sum(node.kind == _OP for node in group) < 2:
            continue
        # Only siblings of one family repeat each other (``layers/0``, ``layers/1``;
        # ``experts/0``, ``experts/3``; ``block1``, ``block2``): an equal-looking module
        # elsewhere (a layer's norm and the final norm) is a different part of the model.
        family = (scope[:-1], re.sub(r"\d+$", "", scope[-1]))
        signature = (family, _signature(scope, group, scope_types))
        first = seen.setdefault(signature, scope)
        if first != scope and not _inside(scope, first):
            blocks[scope] = {"same_as": "/".join(first)}
    return _collapse(nodes, blocks, scope_types)


def _signature(
    scope: tuple[str, ...], group: Sequence[_Node], scope_types: Mapping[tuple[str, ...], str]
) -> tuple[Any, ...]:
    position = {node.key: i for i, node in enumerate(group)}
    items: list[Any] = [scope_types.get(scope, "")]
    for node in group:
        inputs = tuple((position.get(k, -1), i) for k, i in node.inputs)
        items.append(
            (
                node.kind,
                node.op,
                node.scope[len(scope) :],
                node.leaf if node.kind == _PARAM else "",
                tuple(node.shapes),
                tuple(node.dtypes),
                inputs,
            )
        )
    return tuple(items)


# --------------------------------------------------------------------------------------
# GraphDef
# --------------------------------------------------------------------------------------

_TF_TYPES = {
    torch.float32: "DT_FLOAT",
    torch.float64: "DT_DOUBLE",
    torch.float16: "DT_HALF",
    torch.bfloat16: "DT_BFLOAT16",
    torch.int8: "DT_INT8",
    torch.int16: "DT_INT16",
    torch.int32: "DT_INT32",
    torch.int64: "DT_INT64",
    torch.uint8: "DT_UINT8",
    torch.uint16: "DT_UINT16",
    torch.bool: "DT_BOOL",
    torch.complex64: "DT_COMPLEX64",
    torch.complex128: "DT_COMPLEX128",
}

_NAME_RE = re.compile(r"[^A-Za-z0-9_.\-]")


def _clean(segment: str) -> str:
    return _NAME_RE.sub("_", segment) or "_"


def _shape_proto(shape: Shape) -> TensorShapeProto:
    if shape is None:
        return TensorShapeProto(unknown_rank=True)
    return TensorShapeProto(
        dim=[TensorShapeProto.Dim(size=-1 if d is None else int(d)) for d in shape]
    )


def _dtype_enum(dtype: torch.dtype | None) -> int:
    return int(DataType.Value(_TF_TYPES.get(dtype, "DT_INVALID"))) if dtype else 0


def _assign_names(nodes: Sequence[_Node]) -> dict[str, str]:
    """Full ``scope/leaf`` names, unique and never equal to a scope of another node.

    Op names are numbered per scope (``linear``, ``linear_1``), not per graph, so the
    same op has the same name in every layer: ``layers/0/self_attn/linear`` and
    ``layers/7/self_attn/linear``.
    """
    scopes: set[str] = set()
    for node in nodes:
        parts = [_clean(s) for s in node.scope]
        for depth in range(1, len(parts) + 1):
            scopes.add("/".join(parts[:depth]))
    names: dict[str, str] = {}
    taken: set[str] = set()
    for node in nodes:
        prefix = "/".join(_clean(s) for s in node.scope)
        leaf = _clean(node.leaf)
        if node.kind == _OP and not node.key.startswith("block:"):
            leaf = re.sub(r"(?<=.)_\d+$", "", leaf)
        base = f"{prefix}/{leaf}" if prefix else leaf
        name, n = base, 0
        while name in taken or (name in scopes and not node.key.startswith("block:")):
            n += 1
            name = f"{base}_{n}"
        taken.add(name)
        names[node.key] = name
    return names


def _to_graph_def(nodes: Sequence[_Node]) -> GraphDef:
    names = _assign_names(nodes)
    by_key = {node.key: node for node in nodes}
    graph_def = GraphDef(versions=VersionDef(producer=22))
    for node in nodes:
        proto: NodeDef = graph_def.node.add()
        proto.name = names[node.key]
        proto.op = node.op
        if node.device:
            proto.device = node.device
        for key, index in node.inputs:
            if key in names:
                proto.input.append(names[key] if index == 0 else f"{names[key]}:{index}")
        shapes = node.shapes
        dtypes = node.dtypes
        if node.kind == _OUTPUT and not shapes and node.inputs:
            shapes, dtypes = _source_meta(by_key, node.inputs[0])
        if shapes:
            proto.attr["_output_shapes"].CopyFrom(
                AttrValue(list=AttrValue.ListValue(shape=[_shape_proto(s) for s in shapes]))
            )
        if dtypes:
            proto.attr["dtype"].CopyFrom(AttrValue(type=_dtype_enum(dtypes[0])))
            if dtypes[0] is not None and dtypes[0] not in _TF_TYPES:
                proto.attr["torch_dtype"].CopyFrom(AttrValue(s=str(dtypes[0]).encode()))
            if len(dtypes) > 1:
                proto.attr["_output_types"].CopyFrom(
                    AttrValue(list=AttrValue.ListValue(type=[_dtype_enum(d) for d in dtypes]))
                )
        for name, text in node.attrs.items():
            proto.attr[name].CopyFrom(AttrValue(s=text.encode()))
    return graph_def


def _source_meta(
    by_key: Mapping[str, _Node], source: tuple[str, int]
) -> tuple[list[Shape], list[torch.dtype | None]]:
    node = by_key.get(source[0])
    if node is None:
        return [], []
    index = source[1]
    shape = node.shapes[index] if index < len(node.shapes) else None
    dtype = node.dtypes[index] if index < len(node.dtypes) else None
    return [shape], [dtype]
