"""Capture backend 1: ``torch.export``, the default and the most faithful."""

from __future__ import annotations

import operator
from typing import Any

import torch

from tbx_lightning.graph._ir import (
    _INPUT,
    _Captured,
    _dedup,
    _format_call,
    _function_name,
    _innermost,
    _io_groups,
    _key_path_name,
    _Node,
    _output_nodes,
    _param_nodes,
    _scope,
    _state_node,
    _tensor_meta,
)

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
