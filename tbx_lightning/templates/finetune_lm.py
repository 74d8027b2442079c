"""The finetune_lm experiment: low-rank adapters on a small Llama-like model.

The model is defined here (nothing is downloaded): RMSNorm, causal self-attention,
a SwiGLU feed-forward block and an untied output layer, as in the Llama family. Its
base weights stand for a pretrained checkpoint: they are drawn from a fixed seed and
frozen; only the low-rank adapters train (``lora_A``/``lora_B`` on the attention's
query and value projections and on the token embedding). The monitor therefore
watches the adapters, grouped by the module each wraps, and reports one frozen count.

The projector shows the effective token embeddings (``W + scale * A @ B``) before and
after fine-tuning. ``inject_spike_at`` / ``inject_nan_from`` make the network scale
its logits at one training step, and turn them NaN from another, so that a user sees
what the monitor's alerts look like (the ``alerts_demo`` experiment).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tbx_lightning.errors import ConfigError, ConfigTypeError
from tbx_lightning.templates.tiny_lm import TinyLM

__all__ = [
    "FinetuneLM",
    "LoRAEmbedding",
    "LoRALinear",
    "TinyLlama",
    "lm_flops",
    "token_embeddings",
]


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``scale * B(A(x))``.

    Example:
        >>> layer = LoRALinear(nn.Linear(8, 8, bias=False), rank=2)
        >>> [n for n, p in layer.named_parameters() if p.requires_grad]
        ['lora_A', 'lora_B']
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 16.0) -> None:
        super().__init__()
        if rank < 1:
            raise ConfigError(f"Expected model.net.lora_rank >= 1, got {rank!r}.")
        self.base = base
        base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))  # starts as a no-op
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


class LoRAEmbedding(nn.Module):
    """A frozen embedding table plus a trainable low-rank update ``scale * A @ B``."""

    def __init__(self, num: int, dim: int, rank: int, alpha: float = 16.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num, dim) * 0.02, requires_grad=False)
        self.lora_A = nn.Parameter(torch.zeros(num, rank))
        self.lora_B = nn.Parameter(torch.randn(rank, dim) * 0.02)
        self.scale = alpha / rank

    def table(self) -> torch.Tensor:
        """The effective embedding matrix."""
        return self.weight + self.scale * self.lora_A @ self.lora_B

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight) + self.scale * F.embedding(ids, self.lora_A) @ (
            self.lora_B
        )


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int, rank: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = LoRALinear(nn.Linear(dim, dim, bias=False), rank)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = LoRALinear(nn.Linear(dim, dim, bias=False), rank)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (
            proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, d))


class _Layer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, rank: int) -> None:
        super().__init__()
        self.input_norm = _RMSNorm(dim)
        self.self_attn = _Attention(dim, heads, rank)
        self.post_norm = _RMSNorm(dim)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_norm(x))
        h = self.post_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyLlama(nn.Module):
    """A small Llama-like causal language model with LoRA adapters; base weights frozen.

    Args:
        vocab_size: Token ids (96 for the shipped character vocabulary).
        block_size: Longest input.
        d_model: Width.
        n_heads: Attention heads (``d_model`` must divide by it).
        n_layers: Decoder layers.
        hidden: Width of the SwiGLU feed-forward block.
        lora_rank: Rank of the adapters.
        base_seed: Seed of the frozen base weights (the stand-in "pretrained" model).
        inject_spike_at: Training step whose logits are scaled by 50 (a loss spike).
        inject_nan_from: First training step whose logits are NaN. Both act only while
            the training loop sets :attr:`train_step` to the step it trains.

    Example:
        >>> net = TinyLlama(block_size=16)
        >>> net(torch.zeros(2, 16, dtype=torch.long)).shape
        torch.Size([2, 16, 96])
    """

    def __init__(
        self,
        vocab_size: int = 96,
        block_size: int = 64,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        hidden: int = 172,
        lora_rank: int = 4,
        base_seed: int = 1234,
        inject_spike_at: int | None = None,
        inject_nan_from: int | None = None,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(
                f"Expected model.net.d_model ({d_model}) to be a multiple of "
                f"model.net.n_heads ({n_heads})."
            )
        self.block_size = block_size
        state = torch.random.get_rng_state()
        torch.manual_seed(base_seed)  # the same "pretrained" base for every run
        self.tok_emb = LoRAEmbedding(vocab_size, d_model, lora_rank)
        self.layers = nn.ModuleList(
            _Layer(d_model, n_heads, hidden, lora_rank) for _ in range(n_layers)
        )
        self.norm = _RMSNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        torch.random.set_rng_state(state)
        for name, param in self.named_parameters():
            if "lora_" not in name:
                param.requires_grad_(False)
        self.inject_spike_at = inject_spike_at
        self.inject_nan_from = inject_nan_from
        # The optimizer step being trained, set by the loop; None outside training steps
        # (graph export, validation), where no fault is injected.
        self.train_step: int | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(self.norm(x))
        step = self.train_step
        if step is not None:
            if self.inject_spike_at is not None and step == self.inject_spike_at:
                logits = logits * 50.0
            if self.inject_nan_from is not None and step >= self.inject_nan_from:
                logits = logits * math.nan
        return logits


def lm_flops(net: nn.Module, tokens: int) -> float:
    """``6 * N * tokens``: the usual estimate of a training step's FLOPs (N: all parameters)."""
    return 6.0 * sum(p.numel() for p in net.parameters()) * tokens


def token_embeddings(pl_module: nn.Module, batch: tuple[torch.Tensor, Any]) -> torch.Tensor:
    """Rows of the effective (base + adapter) token-embedding table for ``batch[0]``."""
    net = getattr(pl_module, "net", pl_module)
    table = getattr(net, "tok_emb", None)
    if not isinstance(table, LoRAEmbedding):
        raise ConfigTypeError(
            f"Expected net.tok_emb to be a LoRAEmbedding, got {type(table).__name__}."
        )
    return table.table()[batch[0].to(table.weight.device)]


class FinetuneLM(TinyLM):
    """Next-character fine-tuning of the adapters of a :class:`TinyLlama`.

    Logs what :class:`~tbx_lightning.templates.tiny_lm.TinyLM` logs; the optimizer
    receives the trainable (adapter) parameters only.

    Example:
        >>> from functools import partial
        >>> lm = FinetuneLM(TinyLlama(block_size=16), partial(torch.optim.AdamW, lr=1e-3))
    """

    def __init__(
        self,
        net: TinyLlama,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__(net, self._adapters_only, scheduler)  # type: ignore[arg-type]
        self._build_optimizer = optimizer

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.net.train_step = self.global_step  # type: ignore[assignment]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.net.train_step = None  # type: ignore[assignment]

    def _adapters_only(self, params: Any) -> torch.optim.Optimizer:
        return self._build_optimizer(params=[p for p in params if p.requires_grad])
