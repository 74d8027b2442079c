"""Output: the intermediate graph as a TensorFlow ``GraphDef``, which TensorBoard draws."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from tensorboardX.proto.attr_value_pb2 import AttrValue
from tensorboardX.proto.graph_pb2 import GraphDef
from tensorboardX.proto.node_def_pb2 import NodeDef
from tensorboardX.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboardX.proto.types_pb2 import DataType
from tensorboardX.proto.versions_pb2 import VersionDef

from tbx_lightning.graph._ir import _OP, _OUTPUT, Shape, _Node

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
