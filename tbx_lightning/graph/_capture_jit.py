"""Capture backend 3: ``torch.jit.trace`` with the trace check off, the last resort."""

from __future__ import annotations

import contextlib
import inspect
import re
from typing import Any

import torch

from tbx_lightning.graph._ir import (
    _INPUT,
    _MAX_ATTR_CHARS,
    Shape,
    _Captured,
    _dedup,
    _io_groups,
    _Node,
    _output_nodes,
    _param_nodes,
    _same_values,
    _scope,
    _state_node,
)
from tbx_lightning.graph._prepare import (
    capture_root,
)

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
