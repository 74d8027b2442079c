"""A LoRA fine-tune as people run one: a small Llama-like model built from a config (no
download), PEFT adapters on the attention's query and value projections, AdamW.

Shared by the tests of every route, so that they train the same model and can compare
their runs tag by tag.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import LightningModule
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 128
SEQ = 16
# Where PEFT puts the embedding table of a wrapped Llama, from the LightningModule.
EMBED_MODULE = "model.base_model.model.model.embed_tokens"
ADAPTED = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def lora_llama(seed: int = 0) -> nn.Module:
    """The tiny Llama with rank-4 adapters; the same base weights for a given seed."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2 * SEQ,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(LlamaForCausalLM(config), lora)


def token_batches(n: int = 96, batch_size: int = 4, seed: int = 1) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randint(0, VOCAB, (n, SEQ), generator=gen)), batch_size)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss  # type: ignore[no-any-return]


class LoRAModule(LightningModule):
    """The fine-tune as a LightningModule; ``nan_from`` turns the loss NaN from that step."""

    def __init__(self, lr: float = 3e-3, nan_from: int | None = None) -> None:
        super().__init__()
        self.model = lora_llama()
        self.lr = lr
        self.nan_from = nan_from

    def forward(self, ids: torch.Tensor) -> Any:
        return self.model(input_ids=ids)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = lm_loss(self.model, batch[0])
        if self.nan_from is not None and self.global_step >= self.nan_from:
            loss = loss * math.nan
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", lm_loss(self.model, batch[0]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.lr)


def adapters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a state dict."""
    return {k: v for k, v in state.items() if "lora_" in k}
