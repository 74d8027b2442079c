"""The model and data of the LoRA examples: a small Llama-like model built from a config
(random base weights stand for a pretrained checkpoint; nothing is downloaded), PEFT
adapters on the attention's query and value projections and on the token embedding,
and next-character prediction on the text that ships with tbx_lightning.
"""

from __future__ import annotations

from importlib import resources

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

BLOCK = 32


def corpus() -> tuple[torch.Tensor, list[str]]:
    """The bundled text as character ids, and the characters (the vocabulary)."""
    text = (resources.files("tbx_lightning.templates") / "data" / "corpus.txt").read_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text]), chars


def loaders(batch_size: int = 8) -> tuple[DataLoader, DataLoader, list[str]]:
    """Train and validation windows of ``BLOCK`` characters, and the vocabulary."""
    ids, chars = corpus()
    windows = ids[: len(ids) // BLOCK * BLOCK].reshape(-1, BLOCK)
    cut = len(windows) * 9 // 10
    train = DataLoader(TensorDataset(windows[:cut]), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(windows[cut:]), batch_size=batch_size)
    return train, val, chars


def lora_model(vocab: int, seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama with rank-8 adapters; only the adapters train."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=BLOCK,
    )
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "embed_tokens"])
    return get_peft_model(LlamaForCausalLM(config), lora)


def token_table(model: torch.nn.Module, vocab: int) -> torch.Tensor:
    """The effective token embeddings (base plus adapter), one row per character."""
    with torch.no_grad():
        return model.get_input_embeddings()(torch.arange(vocab))  # type: ignore[operator]
