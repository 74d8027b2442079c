"""Graph export: a zoo of models exported, written, and read back as TensorBoard reads them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from google.protobuf import text_format
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto.graph_pb2 import GraphDef as TBGraphDef
from tensorboardX import SummaryWriter
from torch import nn

from tbx_lightning.graph import (
    METHODS,
    TEXT_TAG,
    GraphExport,
    GraphExportError,
    export_graph,
    to_graph_def,
    write_graph,
)

# ----------------------------------------------------------------------------- zoo


class LSTMGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(6, 8, batch_first=True)
        self.gru = nn.GRU(8, 5, batch_first=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        y, (h, c) = self.lstm(x)
        z, _ = self.gru(y)
        return z, (h, c)


class Decoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerDecoderLayer(16, 2, 32, batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, 2)
        self.head = nn.Linear(16, 7)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.head(self.decoder(tgt, memory, tgt_mask=mask, tgt_is_causal=True))


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor, key_padding_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, weights = self.attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask)
        return out, weights


class KwargsDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.proj = nn.Linear(8, 3)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        hidden = self.embed(input_ids)
        if attention_mask is not None:
            hidden = hidden * attention_mask.unsqueeze(-1)
        return {"logits": self.proj(hidden), "hidden": hidden}


class DataDependent(nn.Module):
    """Python control flow on tensor values: torch.export and torch.fx cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.up = nn.Linear(4, 2)
        self.down = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if h.sum() > -1e9:
            return self.up(h)
        return self.down(h)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.lm_head = nn.Linear(8, 30, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.tanh(self.embed(ids)))


class Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def stock_model(layers: int = 4, width: int = 128) -> nn.Module:
    """The model of the issue: tensorboardX's add_graph fails on it."""
    return nn.Sequential(
        nn.Embedding(1000, width),
        nn.TransformerEncoder(
            nn.TransformerEncoderLayer(width, 4, 2 * width, batch_first=True), layers
        ),
        nn.Linear(width, 1000),
    )


def lightning_module() -> nn.Module:
    import lightning as L

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))
            self.example_input_array = torch.zeros(4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    return Classifier()


@dataclasses.dataclass
class Case:
    build: Callable[[], nn.Module]
    example: Callable[[], Any]
    method: str
    scopes: tuple[str, ...]  # scope prefixes that must appear in node names
    ops: tuple[str, ...]  # op types that must appear
    outputs: tuple[str, ...]  # output node names
    train: bool = True


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def _small_encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    return nn.TransformerEncoder(layer, 2)


ZOO = [
    pytest.param(
        Case(
            lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
            lambda: torch.randn(2, 8),
            "torch.export",
            ("0/", "2/"),
            ("aten::linear", "aten::relu"),
            ("output/output",),
        ),
        id="mlp",
    ),
    pytest.param(
        Case(
            _cnn,
            lambda: torch.randn(2, 3, 8, 8),
            "torch.export",
            ("0/", "1/", "3/", "6/"),
            ("aten::conv2d", "aten::batch_norm", "aten::dropout", "aten::linear"),
            ("output/output",),
        ),
        id="cnn-batchnorm-dropout",
    ),
    pytest.param(
        Case(
            LSTMGRU,
            lambda: torch.randn(2, 5, 6),
            "torch.export",
            ("lstm/", "gru/"),
            ("aten::lstm", "aten::gru"),
            ("output/0", "output/1.0", "output/1.1"),
        ),
        id="lstm-gru",
    ),
    pytest.param(
        Case(
            _small_encoder,
            lambda: torch.randn(2, 6, 16),
            "torch.export",
            ("layers/0/self_attn/", "layers/1/linear2/"),
            ("aten::scaled_dot_product_attention", "aten::layer_norm"),
            ("output/output",),
        ),
        id="transformer-encoder",
    ),
    pytest.param(
        Case(
            Decoder,
            lambda: (torch.randn(2, 5, 16), torch.randn(2, 7, 16)),
            "torch.export",
            ("decoder/layers/0/self_attn/", "decoder/layers/1/multihead_attn/", "head/"),
            ("aten::scaled_dot_product_attention", "aten::linear"),
            ("output/output",),
        ),
        id="transformer-decoder",
    ),
    pytest.param(
        Case(
            Attention,
            lambda: {
                "x": torch.randn(2, 5, 16),
                "attn_mask": torch.zeros(5, 5, dtype=torch.bool),
                "key_padding_mask": torch.tensor([[False] * 5, [False] * 3 + [True] * 2]),
            },
            "torch.export",
            ("attn/",),
            ("aten::linear", "aten::softmax"),
            ("output/0", "output/1"),
        ),
        id="multihead-attention-masks",
    ),
    pytest.param(
        Case(
            KwargsDict,
            lambda: {
                "input_ids": torch.randint(0, 50, (2, 6)),
                "attention_mask": torch.ones(2, 6),
            },
            "torch.export",
            ("embed/", "proj/"),
            ("aten::embedding", "aten::mul", "aten::linear"),
            ("output/logits", "output/hidden"),
        ),
        id="kwargs-dict-output",
    ),
    pytest.param(
        Case(
            DataDependent,
            lambda: torch.randn(3, 4),
            "torch.jit.trace",
            ("fc/", "up/"),
            ("aten::linear",),
            ("output/output",),
        ),
        id="data-dependent-control-flow",
    ),
    pytest.param(
        Case(
            Tied,
            lambda: torch.randint(0, 30, (2, 4)),
            "torch.export",
            ("embed/", "lm_head/"),
            ("aten::embedding", "aten::tanh", "aten::linear"),
            ("output/output",),
        ),
        id="tied-weights",
    ),
    pytest.param(
        Case(
            Frozen,
            lambda: torch.randn(4, 6),
            "torch.export",
            ("backbone/0/", "backbone/1/", "head/"),
            ("aten::linear", "aten::batch_norm"),
            ("output/output",),
        ),
        id="frozen-submodule",
    ),
    pytest.param(
        Case(
            lightning_module,
            lambda: None,
            "torch.export",
            ("net/0/", "net/2/"),
            ("aten::linear", "aten::gelu"),
            ("output/output",),
        ),
        id="lightning-example-input-array",
    ),
    pytest.param(
        Case(
            lambda: stock_model(layers=2, width=32),
            lambda: torch.randint(0, 1000, (2, 16)),
            "torch.export",
            ("0/", "1/layers/0/self_attn/", "1/layers/1/norm2/", "2/"),
            ("aten::embedding", "aten::scaled_dot_product_attention", "aten::linear"),
            ("output/output",),
            train=False,
        ),
        id="stock-issue-model-eval",
    ),
]


# ----------------------------------------------------------------------------- helpers


def read_run(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def text_of(acc: EventAccumulator, tag: str) -> str:
    events = acc.Tensors(tag)
    assert len(events) == 1
    return events[0].tensor_proto.string_val[0].decode()


def shapes(node: Any) -> list[list[int]]:
    return [[d.size for d in s.dim] for s in node.attr["_output_shapes"].list.shape]


def check_graph(graph: Any, case: Case | None = None) -> dict[str, Any]:
    """Structural checks every exported graph must pass; returns nodes by name."""
    nodes = {n.name: n for n in graph.node}
    assert len(nodes) == len(graph.node), "node names must be unique"
    scopes = {n.name.rsplit("/", 1)[0] for n in graph.node if "/" in n.name}
    for node in graph.node:
        assert node.name not in scopes, f"{node.name} is both a node and a scope"
        for ref in node.input:
            assert ref.split(":")[0] in nodes, f"{node.name} reads missing {ref}"
        if node.op in ("Output",):
            continue
        assert node.op, node.name
        assert node.attr["_output_shapes"].list.shape, f"{node.name} has no shapes"
        assert (
            node.attr["dtype"].type != 0
            or node.attr["_output_shapes"].list.shape[0].unknown_rank
            or node.op.startswith(("prim::", "aten::size"))
        ), node.name
    params = [n for n in graph.node if n.op == "Parameter"]
    assert params, "parameters must appear as nodes"
    readers = {ref.split(":")[0] for n in graph.node for ref in n.input}
    for param in params:
        assert shapes(param)[0], param.name
        assert param.name in readers, f"{param.name} feeds nothing"
    inputs = [n for n in graph.node if n.op == "Input"]
    outputs = [n for n in graph.node if n.op == "Output"]
    assert inputs and all(n.name.startswith("input/") for n in inputs)
    assert outputs and all(n.name.startswith("output/") and n.input for n in outputs)
    if case is not None:
        for scope in case.scopes:
            assert any(name.startswith(scope) for name in nodes), (scope, sorted(nodes)[:20])
        ops = {n.op for n in graph.node}
        for op in case.ops:
            assert op in ops, (op, sorted(ops))
        assert sorted(n.name for n in outputs) == sorted(case.outputs)
    return nodes


@dataclasses.dataclass
class Snapshot:
    modes: list[bool]
    params: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    buffers: list[torch.Tensor]
    requires_grad: list[bool]
    rng: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module) -> Snapshot:
        return cls(
            modes=[m.training for m in model.modules()],
            params=[p.detach().clone() for p in model.parameters()],
            grads=[None if p.grad is None else p.grad.clone() for p in model.parameters()],
            buffers=[b.clone() for b in model.buffers()],
            requires_grad=[p.requires_grad for p in model.parameters()],
            rng=torch.get_rng_state(),
        )

    def assert_same(self, model: nn.Module) -> None:
        after = Snapshot.of(model)
        assert after.modes == self.modes
        assert after.requires_grad == self.requires_grad
        assert all(torch.equal(a, b) for a, b in zip(after.params, self.params, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(after.buffers, self.buffers, strict=True))
        for a, b in zip(after.grads, self.grads, strict=True):
            assert (a is None and b is None) or (
                a is not None and b is not None and torch.equal(a, b)
            )
        assert torch.equal(after.rng, self.rng)


# ----------------------------------------------------------------------------- zoo tests


@pytest.mark.parametrize("case", ZOO)
def test_zoo_exports_and_reads_back(case: Case, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = case.build()
    model.train(case.train)
    example = case.example()
    before = Snapshot.of(model)

    with SummaryWriter(str(tmp_path)) as writer:
        result = write_graph(writer, model, example, step=3)

    before.assert_same(model)
    assert result.method == case.method
    assert result.num_nodes == len(result.graph_def.node)
    acc = read_run(tmp_path)
    graph = acc.Graph()
    assert graph == TBGraphDef.FromString(result.graph_def.SerializeToString())
    check_graph(graph, case)
    summary = text_of(acc, TEXT_TAG)
    assert f"**{case.method}**" in summary
    assert acc.Tensors(TEXT_TAG)[0].step == 3
    for method, _ in result.attempts:
        assert f"`{method}`" in summary


def test_stock_model_train_mode_names_shapes_and_dtypes() -> None:
    model = stock_model(layers=2, width=32).train()
    result = export_graph(model, torch.randint(0, 1000, (2, 16)))
    nodes = check_graph(result.graph_def)
    assert result.method == "torch.export" and result.attempts == ()
    embedding = nodes["0/embedding"]
    assert embedding.op == "aten::embedding"
    assert list(embedding.input) == ["0/weight", "input/input"]
    assert shapes(embedding) == [[2, 16, 32]]
    assert shapes(nodes["input/input"]) == [[2, 16]]
    assert nodes["input/input"].attr["dtype"].type == 9  # DT_INT64
    assert embedding.attr["dtype"].type == 1  # DT_FLOAT
    assert shapes(nodes["1/layers/0/self_attn/in_proj_weight"]) == [[96, 32]]
    attention = [n for n in nodes if n.startswith("1/layers/1/self_attn/scaled_dot_product")]
    assert len(attention) == 1
    assert shapes(nodes[attention[0]]) == [[2, 4, 16, 8]]
    assert nodes[attention[0]].attr["module"].s == b"1.layers.1.self_attn (MultiheadAttention)"
    dropouts = [n for n in result.graph_def.node if n.op == "aten::dropout"]
    assert dropouts, "train mode keeps dropout in the graph"
    assert shapes(nodes["output/output"]) == [[2, 16, 1000]]
    assert list(nodes["output/output"].input) == [
        next(n for n in nodes if n.startswith("2/linear"))
    ]


def test_tied_weights_are_one_node() -> None:
    nodes = check_graph(to_graph_def(Tied(), torch.randint(0, 30, (2, 4))))
    weights = [n for n in nodes.values() if n.op == "Parameter"]
    assert [n.name for n in weights] == ["embed/weight"]
    assert weights[0].attr["tied_to"].s == b"lm_head.weight"
    linear = next(n for n in nodes.values() if n.op == "aten::linear")
    assert "embed/weight" in linear.input


def test_frozen_parameters_say_so() -> None:
    nodes = check_graph(to_graph_def(Frozen(), torch.randn(4, 6)))
    assert nodes["backbone/0/weight"].attr["requires_grad"].s == b"False"
    assert nodes["head/weight"].attr["requires_grad"].s == b"True"
    assert nodes["backbone/1/running_mean"].op == "Buffer"


def test_data_dependent_control_flow_falls_back_and_says_why(tmp_path: Path) -> None:
    model = DataDependent()
    with SummaryWriter(str(tmp_path)) as writer:
        result = write_graph(writer, model, torch.randn(3, 4))
    assert result.method == "torch.jit.trace"
    assert [m for m, _ in result.attempts] == ["torch.export", "torch.fx"]
    assert "data-dependent" in result.attempts[0][1].lower()
    assert "TraceError" in result.attempts[1][1]
    assert result.notes and "path taken for this example input" in result.notes[0]
    nodes = check_graph(result.graph_def)
    assert any(n.startswith("up/") for n in nodes)
    assert not any(n.startswith("down/linear") for n in nodes), "only the branch taken"
    summary = text_of(read_run(tmp_path), TEXT_TAG)
    assert "**torch.jit.trace**" in summary
    assert "`torch.export`" in summary and "`torch.fx`" in summary


def test_export_keeps_other_threads_output_and_drops_its_own(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import sys
    import threading

    stop = threading.Event()
    started = threading.Event()
    streams_during_export: list[Any] = []

    def chatter() -> None:
        i = 0
        while not stop.is_set():
            print(f"progress {i}", flush=True)
            if i == 0:
                started.set()
            i += 1
            stop.wait(0.001)

    original = sys.stdout
    thread = threading.Thread(target=chatter)
    thread.start()
    started.wait(5)

    class Probe(DataDependent):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            streams_during_export.append(sys.stdout)
            return super().forward(x)

    try:
        # torch.export fails on this model and prints the partial graph it traced.
        result = export_graph(Probe(), torch.randn(3, 4))
        stop.set()
        thread.join()
    finally:
        stop.set()
    out = capsys.readouterr().out
    assert result.method == "torch.jit.trace"
    assert sys.stdout is original, "the process's stdout is restored"
    assert streams_during_export and all(s is not original for s in streams_during_export)
    printed = [line for line in out.splitlines() if line.startswith("progress ")]
    assert len(printed) >= 2 and printed[-1] == f"progress {len(printed) - 1}", (
        "every line another thread printed during the export reached stdout"
    )
    assert "def forward" not in out and "torch.ops.aten" not in out, (
        "the partial graph torch printed is not shown"
    )


@pytest.mark.parametrize("method", METHODS)
def test_each_method_alone(method: str) -> None:
    model = KwargsDict()
    example = ((torch.randint(0, 50, (2, 6)),), {"attention_mask": torch.ones(2, 6)})
    result = export_graph(model, example, methods=(method,))
    assert result.method == method
    nodes = check_graph(result.graph_def)
    assert "input/input_ids" in nodes and "input/attention_mask" in nodes
    assert {"output/logits", "output/hidden"} <= set(nodes)
    assert shapes(nodes["output/logits"]) == [[2, 6, 3]]
    assert any(n.startswith("embed/") for n in nodes)


@pytest.mark.parametrize(
    "example",
    [
        pytest.param(lambda x, m: x, id="tensor"),
        pytest.param(lambda x, m: (x, m), id="tuple"),
        pytest.param(lambda x, m: [x, m], id="list"),
        pytest.param(lambda x, m: {"input_ids": x, "attention_mask": m}, id="dict"),
        pytest.param(lambda x, m: ((x,), {"attention_mask": m}), id="args-kwargs"),
    ],
)
def test_input_forms(example: Callable[[torch.Tensor, torch.Tensor], Any]) -> None:
    ids, mask = torch.randint(0, 50, (2, 6)), torch.ones(2, 6)
    nodes = check_graph(to_graph_def(KwargsDict(), example(ids, mask)))
    assert "input/input_ids" in nodes
    has_mask = any(n.op == "aten::mul" for n in nodes.values())
    assert has_mask == ("input/attention_mask" in nodes)


# ----------------------------------------------------------------------------- state


class GradModeProbe(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 2)
        self.grad_modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.grad_modes.append(torch.is_grad_enabled())
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.fc(h.mean(dim=(2, 3)))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("method", METHODS)
def test_model_left_as_it_was(method: str, train: bool) -> None:
    torch.manual_seed(1)
    model = GradModeProbe()
    x = torch.randn(2, 3, 6, 6)
    model(x).sum().backward()  # real gradients and running stats to preserve
    model.grad_modes.clear()
    model.train(train)
    model.bn.eval()  # mixed modes must come back mixed
    before = Snapshot.of(model)

    result = export_graph(model, x, methods=(method,))

    assert result.method == method
    before.assert_same(model)
    assert model.grad_modes in ([], [False]), "no autograd graph while capturing"
    assert model.bn.training is False and model.training is train


# ----------------------------------------------------------------------------- errors


class Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_every_method_fails_with_one_clear_error() -> None:
    with pytest.raises(GraphExportError, match=r"Could not export a graph of .*Broken") as info:
        export_graph(Broken(), torch.randn(2, 5))
    message = str(info.value)
    for method in METHODS:
        assert f"  - {method}: " in message
    assert "What to do" in message and "log_graph=False" in message
    assert [m for m, _ in info.value.attempts] == list(METHODS)
    assert all("\n" not in error for _, error in info.value.attempts)
    assert info.value.model_class.endswith("Broken")


def test_failed_export_writes_nothing(tmp_path: Path) -> None:
    with SummaryWriter(str(tmp_path)) as writer, pytest.raises(GraphExportError):
        write_graph(writer, Broken(), torch.randn(2, 5))
    acc = read_run(tmp_path)
    assert acc.Tags()["graph"] is False
    assert TEXT_TAG not in acc.Tags()["tensors"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"methods": ("onnx",)}, ValueError, r"`methods` must be", id="method"),
        pytest.param({"methods": ()}, ValueError, r"`methods` must be", id="no-method"),
        pytest.param({"max_depth": -1}, ValueError, r"`max_depth` must be", id="depth"),
    ],
)
def test_bad_options(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        export_graph(Broken(), torch.randn(2, 4), **kwargs)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"No example input for Broken.*example_input_array"):
        export_graph(Broken(), None)
    with pytest.raises(TypeError, match=r"`example_input` has type ndarray"):
        export_graph(Broken(), torch.randn(2, 4).numpy())
    with pytest.raises(TypeError, match=r"must have str keys, got 0"):
        export_graph(Broken(), {0: torch.randn(2, 4)})
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module, got function"):
        export_graph(lambda x: x, torch.randn(2, 4))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- size options


@pytest.fixture(scope="module")
def encoder_graphs() -> Iterator[dict[str, GraphExport]]:
    model = stock_model(layers=4, width=32).eval()
    x = torch.randint(0, 1000, (2, 8))
    yield {
        "full": export_graph(model, x),
        "repeated": export_graph(model, x, collapse_repeated=True),
        # One scope level per module, containers included: 1/layers/0 is depth 3.
        "depth2": export_graph(model, x, max_depth=2),
        "both": export_graph(model, x, collapse_repeated=True, max_depth=3),
    }


def test_collapse_repeated_keeps_first_block(encoder_graphs: dict[str, GraphExport]) -> None:
    full, small = encoder_graphs["full"], encoder_graphs["repeated"]
    nodes = check_graph(small.graph_def)
    assert small.num_nodes < full.num_nodes / 2
    assert small.graph_def.ByteSize() < full.graph_def.ByteSize() / 2
    assert any(n.startswith("1/layers/0/self_attn/") for n in nodes), "first block expanded"
    for i in (1, 2, 3):
        block = nodes[f"1/layers/{i}"]
        assert block.op == "TransformerEncoderLayer"
        assert block.attr["same_as"].s == b"1/layers/0"
        assert shapes(block) == [[2, 8, 32]]
        assert not any(n.startswith(f"1/layers/{i}/") for n in nodes)
    assert list(nodes["1/layers/2"].input) == ["1/layers/1"]
    assert shapes(nodes["output/output"]) == [[2, 8, 1000]]


def test_max_depth_limits_scopes(encoder_graphs: dict[str, GraphExport]) -> None:
    nodes = check_graph(encoder_graphs["depth2"].graph_def)
    assert max(name.count("/") for name in nodes) == 2
    layer = nodes["1/layers/0"]
    assert layer.op == "TransformerEncoderLayer"
    assert layer.attr["collapsed"].s == b"true"
    assert int(layer.attr["collapsed_ops"].s) > 10
    assert int(layer.attr["parameters"].s) == sum(
        p.numel() for p in nn.TransformerEncoderLayer(32, 4, 64).parameters()
    )
    assert list(nodes["1/layers/1"].input) == ["1/layers/0"]
    both = check_graph(encoder_graphs["both"].graph_def)
    assert max(name.count("/") for name in both) == 3
    assert both["1/layers/3"].attr["same_as"].s == b"1/layers/0"


# ----------------------------------------------------------------------------- TensorBoard


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_tensorboard_graphs_plugin_serves_the_run_graph(
    tmp_path: Path, tensorboard: Callable[[Path], Any]
) -> None:
    logdir = tmp_path / "logs"
    model = stock_model(layers=2, width=32)
    with SummaryWriter(str(logdir / "stock")) as writer:
        write_graph(writer, model, torch.randint(0, 1000, (2, 16)))
    with SummaryWriter(str(logdir / "fallback")) as writer:
        write_graph(writer, DataDependent(), torch.randn(3, 4))

    server = tensorboard(logdir)
    server.wait_for_runs(2)
    info = server.get_json("/data/plugin/graphs/info")
    assert info["stock"]["run_graph"] is True
    assert info["fallback"]["run_graph"] is True

    def served(run: str) -> dict[str, Any]:
        text = server.get_bytes(
            "/data/plugin/graphs/graph",
            {"run": run, "limit_attr_size": 1024, "large_attrs_key": "_too_large_attrs"},
        ).decode()
        graph = text_format.Parse(text, TBGraphDef())
        return {n.name: n for n in graph.node}

    nodes = served("stock")
    assert nodes["0/embedding"].op == "aten::embedding"
    assert shapes(nodes["0/embedding"]) == [[2, 16, 32]]
    self_attn = [n for n in nodes.values() if n.name.startswith("1/layers/0/self_attn/")]
    assert {"aten::linear", "aten::scaled_dot_product_attention"} <= {n.op for n in self_attn}
    assert shapes(nodes["1/layers/1/norm2/weight"]) == [[32]]
    assert nodes["1/layers/1/norm2/weight"].op == "Parameter"
    assert shapes(nodes["output/output"]) == [[2, 16, 1000]]
    assert nodes["input/input"].op == "Input"

    fallback = served("fallback")
    assert any(k.startswith("up/") and v.op == "aten::linear" for k, v in fallback.items())
    text = server.get_json("/data/plugin/text/text", {"run": "fallback", "tag": TEXT_TAG})
    assert "torch.jit.trace" in text[0]["text"]


class Rebinding(nn.Module):
    """Forward replaces a buffer and a parameter: both bindings must come back."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("calls", torch.zeros(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1
        self.fc.bias = nn.Parameter(torch.ones(3))
        return self.fc(x) + self.calls


@pytest.mark.parametrize("method", METHODS)
def test_rebound_state_is_restored(method: str) -> None:
    model = Rebinding()
    calls, bias = model.calls, model.fc.bias
    x = torch.randn(2, 3)
    before = Snapshot.of(model)
    export_graph(model, x, methods=(method,))
    assert model.calls is calls and model.fc.bias is bias
    before.assert_same(model)


@pytest.mark.parametrize("method", ["torch.fx", "torch.jit.trace"])
@pytest.mark.parametrize("case", ZOO)
def test_zoo_fallback_methods(case: Case, method: str) -> None:
    """The fallbacks also give complete graphs where they can capture the model."""
    torch.manual_seed(0)
    model = case.build()
    model.train(case.train)
    example = case.example()
    before = Snapshot.of(model)
    try:
        result = export_graph(model, example, methods=(method,))
    except GraphExportError as err:
        before.assert_same(model)
        pytest.skip(f"{method} cannot capture this model: {err.attempts[0][1]}")
    before.assert_same(model)
    nodes = check_graph(result.graph_def)
    assert sorted(n for n in nodes if n.startswith("output/")) == sorted(case.outputs)


def test_lightning_module_with_data_dependent_flow_falls_back_to_jit() -> None:
    import lightning as L

    class Gated(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.inner = DataDependent()
            self.example_input_array = torch.randn(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    model = Gated()
    result = export_graph(model, None)
    assert result.method == "torch.jit.trace"
    assert any(n.name.startswith("inner/up/") for n in result.graph_def.node)
    assert model._jit_is_scripting is False


# ----------------------------------------------------------------------------- wrappers, kwargs, outputs


class KwargsOnly(nn.Module):
    """``forward(**kwargs)``, as LightningModules that wrap a Hugging Face model are written."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = KwargsDict()

    def forward(self, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self.inner(**kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_kwargs_only_forward_with_every_method(method: str) -> None:
    model = KwargsOnly()
    example = {"input_ids": torch.randint(0, 50, (2, 6)), "attention_mask": torch.ones(2, 6)}
    before = Snapshot.of(model)
    result = export_graph(model, example, methods=(method,))
    before.assert_same(model)
    assert result.method == method
    nodes = check_graph(result.graph_def)
    assert {"input/input_ids", "input/attention_mask"} <= set(nodes)
    assert {"output/logits", "output/hidden"} <= set(nodes)
    assert shapes(nodes["output/logits"]) == [[2, 6, 3]]
    assert any(n.startswith("inner/embed/") for n in nodes)
    assert any(n.startswith("inner/proj/") for n in nodes)


class Meta:
    """A non-tensor value a model returns next to its tensors."""


class WithMeta(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        return {"logits": self.fc(x), "meta": Meta(), "extra": None, "steps": [x.sum(), 3]}


@pytest.mark.parametrize("method", ["torch.export", "torch.jit.trace"])
def test_non_tensor_outputs_are_dropped_and_named(method: str, tmp_path: Path) -> None:
    with SummaryWriter(str(tmp_path)) as writer:
        result = write_graph(writer, WithMeta(), torch.randn(3, 4), methods=(method,))
    nodes = check_graph(result.graph_def)
    assert sorted(n for n in nodes if n.startswith("output/")) == [
        "output/logits",
        "output/steps.0",
    ]
    assert shapes(nodes["output/logits"]) == [[3, 2]]
    assert result.notes[0] == (
        "meta (Meta), steps.1 (int) dropped from the outputs: a graph shows tensors only, "
        "the other outputs are kept"
    )
    assert "meta (Meta), steps.1 (int) dropped" in text_of(read_run(tmp_path), TEXT_TAG)


def test_output_without_tensors_is_a_clear_failure() -> None:
    class NoTensor(nn.Module):
        def forward(self, x: torch.Tensor) -> Meta:
            return Meta()

    with pytest.raises(
        GraphExportError, match=r"output holds no tensor to draw \(got output \(Meta\)\)"
    ):
        export_graph(NoTensor(), torch.randn(2))


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda m: torch.compile(m), id="torch.compile"),
        pytest.param(lambda m: nn.DataParallel(m), id="DataParallel"),
        pytest.param(lambda m: torch.compile(nn.DataParallel(m)), id="compiled-DataParallel"),
    ],
)
def test_wrappers_are_skipped(wrap: Callable[[nn.Module], nn.Module]) -> None:
    model = _cnn()
    result = export_graph(wrap(model), torch.randn(2, 3, 8, 8), max_depth=0)
    assert "wrapper skipped" in result.notes[0]
    nodes = {n.name: n for n in result.graph_def.node}
    assert nodes["0"].op == "Conv2d" and nodes["6"].op == "Linear"
    full = check_graph(export_graph(wrap(model), torch.randn(2, 3, 8, 8)).graph_def)
    assert "0/conv2d" in full and not any("_orig_mod" in n or n.startswith("module/") for n in full)


def test_compiled_submodule_keeps_the_parent_scope() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.compile(nn.Sequential(nn.Linear(3, 4), nn.ReLU()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    nodes = check_graph(to_graph_def(Holder(), torch.randn(2, 3)))
    assert nodes["net/0/linear"].op == "aten::linear"
    assert nodes["net/0/weight"].op == "Parameter"
    assert not any("_orig_mod" in name for name in nodes)


class Loud(nn.Module):
    """Fails with a message holding a tensor printout, as jit.trace's own errors do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        raise ValueError(f"cannot use value {torch.arange(200.0).reshape(20, 10)} here: {h.shape}")


def test_error_texts_hold_no_tensor_printouts() -> None:
    with pytest.raises(GraphExportError) as info:
        export_graph(Loud(), torch.randn(2, 4))
    message = str(info.value)
    assert "tensor(" not in message and "190." not in message
    for method, error in info.value.attempts:
        assert "\n" not in error and len(error) <= 300, (method, error)
    assert info.value.attempts[-1][1].startswith("ValueError: cannot use value <tensor> here")
    assert "use_cache" not in message


# ----------------------------------------------------------------------------- container scopes


@pytest.mark.parametrize("method", METHODS)
def test_quickstart_cnn_keeps_containers_and_layer_types(method: str) -> None:
    from tbx_lightning.templates.digits import DigitsClassifier, DigitsCNN

    model = DigitsClassifier(net=DigitsCNN(channels=4, embed_dim=8), optimizer=torch.optim.SGD)
    result = export_graph(model, None, methods=(method,))
    nodes = check_graph(result.graph_def)
    modules = dict(model.named_modules())
    ops = [n for n in result.graph_def.node if n.op not in ("Input", "Output")]
    for node in ops:
        assert node.name.rpartition("/")[0].replace("/", ".") in modules, node.name
    layers = {n.name.split("/")[2] for n in ops if n.name.startswith("net/backbone/")}
    assert layers == {str(i) for i in range(9)}
    assert {n.name.split("/")[2] for n in ops if n.name.startswith("net/head/")} == {"0", "1"}
    # Each op names its layer: the module path and class on the node.
    conv = [n for n in ops if n.name.startswith("net/backbone/0/") and n.op not in ("Parameter",)]
    assert conv and conv[0].attr["module"].s.decode() == "net.backbone.0 (Conv2d)"
    linear = [n for n in ops if n.name.startswith("net/head/1/") and n.op != "Parameter"]
    assert linear[0].attr["module"].s.decode() == "net.head.1 (Linear)"
    if method == "torch.export":
        assert nodes["net/backbone/0/conv2d"].op == "aten::conv2d"
        assert nodes["net/backbone/7/linear"].op == "aten::linear"
    # max_depth gives one node per layer, its op the layer class, as in the stock trace.
    depth = export_graph(model, None, methods=(method,), max_depth=2).graph_def
    layer_ops = {n.name: n.op for n in depth.node if n.name.startswith("net/")}
    assert layer_ops == {
        f"net/{name.replace('.', '/')}": type(module).__name__
        for name, module in model.net.named_modules()
        if name.count(".") == 1
    }
    assert layer_ops["net/backbone/0"] == "Conv2d" and layer_ops["net/head/1"] == "Linear"
    shallow = export_graph(model, None, methods=(method,), max_depth=1).graph_def
    assert {n.name: n.op for n in shallow.node if n.name.startswith("net/")} == {
        "net/backbone": "Sequential",
        "net/head": "Sequential",
    }
