"""The intermediate graph: nodes with module scopes, and the transforms over it.

Every capture backend produces a list of :class:`_Node`; collapsing (``max_depth``,
``collapse_repeated``) and naming work on that list alone, before any GraphDef exists.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Shape = tuple[int | None, ...] | None

_MAX_ATTR_CHARS = 240


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


def _same_values(tensor: torch.Tensor, saved: torch.Tensor) -> bool:
    return tensor.shape == saved.shape and bool(torch.equal(tensor, saved))


def _dedup(refs: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    return list(dict.fromkeys(refs))


def _innermost(stack: Mapping[str, Any]) -> tuple[str, str]:
    if not stack:
        return "", ""
    path, module_type = list(stack.values())[-1][:2]
    if isinstance(module_type, type):
        module_type = module_type.__name__
    return _module_path(str(path)), str(module_type).rpartition(".")[2]
