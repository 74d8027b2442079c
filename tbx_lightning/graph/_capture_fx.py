"""Capture backend 2: ``torch.fx`` symbolic tracing, for models ``torch.export`` rejects."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from tbx_lightning.errors import LoggedValueError
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
from tbx_lightning.graph._prepare import one_line

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
        raise LoggedValueError(f"shape propagation failed: {one_line(err)}") from err

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
