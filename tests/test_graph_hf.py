"""Graphs of real Hugging Face models (built from configs, random weights, nothing downloaded).

Each model is exported the way users call it: through ``write_graph``, through
``TBXLogger(log_graph=True)`` in a one-batch Lightning fit, and through the Accelerate
tracker's ``log_graph``; then read back with TensorBoard's reader, its scopes checked
against ``named_modules()``, and the model checked unchanged.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboardX import SummaryWriter
from torch import nn

from tbx_lightning.graph import TEXT_TAG, GraphExport, GraphExportError, export_graph, write_graph

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 100


# ----------------------------------------------------------------------------- models


def _ids(length: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(1))


def gpt2() -> tuple[nn.Module, dict[str, Any]]:
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32
    )
    return transformers.GPT2LMHeadModel(config), {"input_ids": _ids()}


def llama_config() -> Any:
    return transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )


def bert() -> tuple[nn.Module, dict[str, Any]]:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    types = torch.zeros(2, 8, dtype=torch.long)
    types[:, 4:] = 1
    inputs = {"input_ids": _ids(), "attention_mask": mask, "token_type_ids": types}
    return transformers.BertModel(config), inputs


def t5() -> tuple[nn.Module, dict[str, Any]]:
    config = transformers.T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        decoder_start_token_id=0,
    )
    inputs = {"input_ids": _ids(), "decoder_input_ids": _ids(4)}
    return transformers.T5ForConditionalGeneration(config), inputs


def mixtral() -> tuple[nn.Module, dict[str, Any]]:
    config = transformers.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
    )
    return transformers.MixtralForCausalLM(config), {"input_ids": _ids()}


def whisper() -> tuple[nn.Module, dict[str, Any]]:
    config = transformers.WhisperConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_mel_bins=16,
        max_source_positions=16,
        max_target_positions=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        suppress_tokens=None,
        begin_suppress_tokens=None,
    )
    features = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2))
    inputs = {"input_features": features, "decoder_input_ids": _ids(4)}
    return transformers.WhisperForConditionalGeneration(config), inputs


def wav2vec2() -> tuple[nn.Module, dict[str, Any]]:
    config = transformers.Wav2Vec2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        mask_time_length=2,
    )
    audio = torch.randn(2, 1600, generator=torch.Generator().manual_seed(3))
    return transformers.Wav2Vec2ForCTC(config), {"input_values": audio}


def lora_llama() -> tuple[nn.Module, dict[str, Any]]:
    base = transformers.LlamaForCausalLM(llama_config())
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(base, config), {"input_ids": _ids()}


@dataclasses.dataclass
class Spec:
    build: Callable[[], tuple[nn.Module, dict[str, Any]]]
    method: str  # the method that captures it in train mode
    scopes: tuple[str, ...]  # node-name prefixes that must appear
    outputs: tuple[str, ...]  # output nodes that must appear
    note: str  # text the graph/export entry must hold


SPECS = {
    "gpt2": Spec(
        gpt2,
        "torch.export",
        ("transformer/h/0/attn/c_attn/", "transformer/h/1/mlp/", "lm_head/"),
        ("output/logits",),
        "use_cache=False passed to forward",
    ),
    "bert": Spec(
        bert,
        "torch.export",
        ("embeddings/token_type_embeddings/", "encoder/layer/1/attention/", "pooler/"),
        ("output/last_hidden_state", "output/pooler_output"),
        "use_cache=False passed to forward",
    ),
    "t5": Spec(
        t5,
        "torch.export",
        ("encoder/block/0/layer/0/SelfAttention/", "decoder/block/1/layer/1/EncDecAttention/"),
        ("output/logits", "output/encoder_last_hidden_state"),
        "use_cache=False passed to forward",
    ),
    "mixtral": Spec(
        mixtral,
        "torch.export",
        ("model/layers/0/mlp/gate/", "model/layers/1/mlp/experts/", "lm_head/"),
        ("output/logits",),
        "use_cache=False passed to forward",
    ),
    "whisper": Spec(
        whisper,
        "torch.export",
        ("model/encoder/conv1/", "model/decoder/layers/1/encoder_attn/", "proj_out/"),
        ("output/logits", "output/encoder_last_hidden_state"),
        "use_cache=False passed to forward",
    ),
    "wav2vec2": Spec(
        wav2vec2,
        # SpecAugment masking in train mode is data-dependent: only jit.trace records it.
        "torch.jit.trace",
        ("wav2vec2/feature_extractor/conv_layers/0/", "wav2vec2/encoder/layers/1/", "lm_head/"),
        ("output/logits",),
        "path taken for this example input",
    ),
    "lora-llama": Spec(
        lora_llama,
        "torch.export",
        ("model/layers/0/self_attn/q_proj/lora_A/", "model/layers/1/self_attn/v_proj/lora_B/"),
        ("output/logits",),
        "peft PeftModel wrapper skipped",
    ),
}


# ----------------------------------------------------------------------------- helpers


@dataclasses.dataclass
class Before:
    """What must be the same after export: state values, modes and the forward output."""

    state: dict[str, torch.Tensor]
    modes: list[bool]
    output: list[torch.Tensor]


def forward_tensors(model: nn.Module, inputs: dict[str, Any]) -> list[torch.Tensor]:
    """The model's tensor outputs, with the random states fixed so dropout repeats."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        np.random.seed(0)
        output = model(**inputs)
    values = output.values() if isinstance(output, dict) else output
    return [v.clone() for v in values if isinstance(v, torch.Tensor)]


def snapshot(model: nn.Module, inputs: dict[str, Any]) -> Before:
    return Before(
        state={k: v.detach().clone() for k, v in model.state_dict().items()},
        modes=[m.training for m in model.modules()],
        output=forward_tensors(model, inputs),
    )


def assert_unchanged(model: nn.Module, inputs: dict[str, Any], before: Before) -> None:
    state = model.state_dict()
    assert state.keys() == before.state.keys()
    assert all(torch.equal(state[k], v) for k, v in before.state.items())
    assert [m.training for m in model.modules()] == before.modes
    after = forward_tensors(model, inputs)
    assert len(after) == len(before.output) > 0
    assert all(torch.equal(a, b) for a, b in zip(after, before.output, strict=True))


def user_model(model: nn.Module) -> nn.Module:
    """The model scopes count from: the transformers model under a peft wrapper."""
    return model.get_base_model() if isinstance(model, peft.PeftModel) else model


def assert_scopes_are_modules(graph: Any, model: nn.Module, prefix: str = "") -> None:
    """Every node sits in the scope of a module of ``model`` (``/`` for ``.``)."""
    modules = {name for name, _ in model.named_modules()}
    assert not any(n.name.startswith(("base_model/", "_orig_mod/")) for n in graph.node)
    for node in graph.node:
        if node.op in ("Input", "Output"):
            assert node.name.startswith((f"{prefix}input/", f"{prefix}output/")), node.name
            continue
        scope = node.name.rpartition("/")[0].replace("/", ".")
        assert scope in modules, f"{node.name}: {scope!r} is not a module path"


def read_run(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def export_text(acc: EventAccumulator) -> str:
    events = acc.Tensors(TEXT_TAG)
    assert len(events) == 1
    return str(events[0].tensor_proto.string_val[0].decode())


def check_written(acc: EventAccumulator, spec: Spec, model: nn.Module) -> dict[str, Any]:
    graph = acc.Graph()
    nodes = {n.name: n for n in graph.node}
    assert len(nodes) == len(graph.node)
    for node in graph.node:
        for ref in node.input:
            assert ref.split(":")[0] in nodes, f"{node.name} reads missing {ref}"
    for scope in spec.scopes:
        assert any(name.startswith(scope) for name in nodes), scope
    assert set(spec.outputs) <= {n for n in nodes if n.startswith("output/")}
    assert_scopes_are_modules(graph, model)
    text = export_text(acc)
    assert f"**{spec.method}**" in text
    assert spec.note in text
    assert "tensor(" not in text
    return nodes


@pytest.fixture(scope="module", params=list(SPECS))
def hf_model(request: pytest.FixtureRequest) -> Iterator[tuple[str, nn.Module, dict[str, Any]]]:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, inputs = SPECS[request.param].build()
    model.train()
    yield request.param, model, inputs


# ----------------------------------------------------------------------------- core


@pytest.mark.slow
def test_write_graph_on_hugging_face_models(
    hf_model: tuple[str, nn.Module, dict[str, Any]], tmp_path: Path
) -> None:
    name, model, inputs = hf_model
    spec = SPECS[name]
    before = snapshot(model, inputs)
    with SummaryWriter(str(tmp_path)) as writer:
        result = write_graph(writer, model, inputs, step=2)
    assert_unchanged(model, inputs, before)
    assert result.method == spec.method
    acc = read_run(tmp_path)
    assert acc.Tensors(TEXT_TAG)[0].step == 2
    check_written(acc, spec, user_model(model))
    assert all("tensor(" not in error for _, error in result.attempts)


@pytest.fixture(scope="module")
def llama_cached() -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(llama_config()).train(), {"input_ids": _ids()}


@pytest.mark.slow
def test_cache_asked_for_is_dropped_and_named(llama_cached: tuple[nn.Module, Any]) -> None:
    model, inputs = llama_cached
    result = export_graph(model, {**inputs, "use_cache": True})
    assert result.method == "torch.export"
    outputs = sorted(n.name for n in result.graph_def.node if n.op == "Output")
    assert outputs == ["output/logits"]
    (note,) = [n for n in result.notes if "dropped from the outputs" in n]
    cache_key = next(
        k for k, v in model(**inputs, use_cache=True).items() if "Cache" in str(type(v))
    )
    assert note.startswith(f"{cache_key} (DynamicCache) dropped from the outputs")
    assert not any("use_cache=False" in n for n in result.notes)


@pytest.mark.slow
def test_collapse_repeated_relates_only_repeated_layers(
    llama_cached: tuple[nn.Module, Any],
) -> None:
    model, inputs = llama_cached
    nodes = {n.name: n for n in export_graph(model, inputs, collapse_repeated=True).graph_def.node}
    same_as = {
        name: n.attr["same_as"].s.decode() for name, n in nodes.items() if "same_as" in n.attr
    }
    assert same_as == {"model/layers/1": "model/layers/0"}
    assert nodes["model/layers/1"].op == "LlamaDecoderLayer"
    first = [n for n in nodes if n.startswith("model/layers/0/")]
    assert any(n.startswith("model/layers/0/input_layernorm/") for n in first), "expanded"
    assert any(n.startswith("model/layers/0/post_attention_layernorm/") for n in first)
    assert any(n.startswith("model/norm/") for n in nodes)


@pytest.mark.slow
def test_compiled_model_scopes_start_at_the_model(llama_cached: tuple[nn.Module, Any]) -> None:
    model, inputs = llama_cached
    compiled = torch.compile(model)
    result = export_graph(compiled, inputs, max_depth=2)
    assert "torch.compile wrapper skipped" in result.notes[0]
    nodes = {n.name: n for n in result.graph_def.node}
    assert nodes["model/layers/0"].op == "LlamaDecoderLayer"
    assert_scopes_are_modules(result.graph_def, model)


@pytest.mark.slow
def test_peft_max_depth_counts_from_the_wrapped_model() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, inputs = lora_llama()
    result = export_graph(model, inputs, max_depth=2)
    nodes = {n.name: n for n in result.graph_def.node}
    assert nodes["model/layers/0"].op == "LlamaDecoderLayer"
    assert nodes["model/layers/1"].op == "LlamaDecoderLayer"
    assert nodes["model/embed_tokens/embedding"].op == "aten::embedding"
    assert result.num_nodes > 15
    assert_scopes_are_modules(result.graph_def, model.get_base_model())


# ----------------------------------------------------------------------------- Lightning


def lightning_wrapper(model: nn.Module, inputs: dict[str, Any]) -> Any:
    """How many LightningModules wrap a Hugging Face model: ``forward(**kwargs)``."""
    import lightning as L

    class HFModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.example_input_array = inputs

        def forward(self, **kwargs: Any) -> Any:
            return self.model(**kwargs)

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
            output = self(**batch)
            logits = output["logits"]
            return logits.float().pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    return HFModule()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["wav2vec2", "lora-llama", "gpt2"])
def test_lightning_fit_logs_the_graph(name: str, tmp_path: Path) -> None:
    import lightning as L

    from tbx_lightning import TBXLogger

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, inputs = SPECS[name].build()
    module = lightning_wrapper(model, inputs)
    logger = TBXLogger(tmp_path, name="hf", log_graph=True)
    trainer = L.Trainer(
        logger=logger,
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    loader = torch.utils.data.DataLoader([inputs], batch_size=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")
        trainer.fit(module, loader)
    module.train()
    before = snapshot(module, inputs)

    acc = read_run(Path(logger.log_dir))
    graph = acc.Graph()
    names = {n.name for n in graph.node}
    spec = SPECS[name]
    prefix = "model/" if name != "lora-llama" else "model/base_model/model/"
    for scope in spec.scopes:
        assert any(n.startswith(prefix + scope) for n in names), scope
    assert "output/logits" in names
    assert_scopes_are_modules(graph, module)
    text = export_text(acc)
    assert f"**{spec.method}**" in text
    # forward(**kwargs) hides use_cache: the cache is computed and left out, and said so.
    if name != "wav2vec2":
        assert "(DynamicCache) dropped from the outputs" in text
    assert "tensor(" not in text

    logger.log_graph(module, inputs)  # an explicit call, as users make it, leaves it as it was
    assert_unchanged(module, inputs, before)


# ----------------------------------------------------------------------------- Accelerate


@pytest.fixture
def _fresh_accelerate_state() -> Iterator[None]:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.slow
@pytest.mark.usefixtures("_fresh_accelerate_state")
@pytest.mark.parametrize("name", ["gpt2", "t5", "mixtral", "lora-llama"])
def test_accelerate_tracker_logs_the_graph(name: str, tmp_path: Path) -> None:
    from accelerate import Accelerator

    import tbx_lightning  # noqa: F401  (registers log_with="tbx")

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, inputs = SPECS[name].build()
    model.train()
    before = snapshot(model, inputs)
    accelerator = Accelerator(log_with="tbx", project_dir=tmp_path, cpu=True)
    accelerator.init_trackers("hf")
    tracker = accelerator.get_tracker("tbx", unwrap=False)
    export = tracker.log_graph(model, inputs)
    log_dir = Path(tracker.log_dir)
    accelerator.end_training()

    assert isinstance(export, GraphExport)
    assert_unchanged(model, inputs, before)
    check_written(read_run(log_dir), SPECS[name], user_model(model))


def test_cache_only_output_fails_with_the_cache_hint() -> None:
    class CacheOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> Any:
            cache = transformers.DynamicCache()
            self.fc(x)
            return cache

    with pytest.raises(GraphExportError, match=r"got output \(DynamicCache\)") as info:
        export_graph(CacheOnly(), torch.randn(2, 4))
    assert "pass use_cache=False in the example input" in str(info.value)
    assert all("tensor(" not in error for _, error in info.value.attempts)
