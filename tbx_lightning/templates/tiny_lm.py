"""The tiny_lm experiment: a character-level transformer language model on a shipped text.

The text is ``templates/data/corpus.txt`` (original prose written for this package);
``data.path`` points it at any UTF-8 file instead. The vocabulary is fixed (newline
plus printable ASCII) so a model config never depends on which text is loaded;
other characters map to ``?``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tbx_lightning.errors import ConfigError, ConfigTypeError, UsageError
from tbx_lightning.templates.metrics import log_batch_metrics

__all__ = [
    "VOCAB",
    "CharDataModule",
    "CharWindows",
    "TinyLM",
    "TinyTransformer",
    "batch_tokens",
    "char_labels",
    "decode",
    "default_corpus",
    "encode",
    "token_embeddings",
    "token_labels",
    "vocab_batches",
    "warmup_cosine",
]

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
_INDEX = {ch: i for i, ch in enumerate(VOCAB)}
_UNKNOWN = _INDEX["?"]


def default_corpus() -> Path:
    """The text that ships with the package."""
    return Path(__file__).with_name("data") / "corpus.txt"


def encode(text: str) -> torch.Tensor:
    """Character ids of ``text``; characters outside :data:`VOCAB` become ``?``."""
    return torch.tensor([_INDEX.get(ch, _UNKNOWN) for ch in text], dtype=torch.long)


def decode(ids: torch.Tensor | list[int]) -> str:
    """The text of a sequence of character ids."""
    return "".join(VOCAB[int(i)] for i in ids)


def char_labels() -> list[str]:
    """One readable projector label per vocabulary entry (``\\n`` and ``space`` spelled out)."""
    names = {"\n": "\\n", " ": "space", "\t": "\\t"}
    return [names.get(ch, ch) for ch in VOCAB]


def batch_tokens(batch: Any) -> int:
    """Characters in a ``(inputs, targets)`` batch: the monitor's ``tokens_fn``."""
    return int(batch[0].numel())


def vocab_batches() -> list[tuple[torch.Tensor, list[str]]]:
    """One batch holding every token id and its label: what the token projector embeds."""
    return [(torch.arange(len(VOCAB)), char_labels())]


def token_embeddings(pl_module: nn.Module, batch: tuple[torch.Tensor, Any]) -> torch.Tensor:
    """Rows of the model's token-embedding table for the ids in ``batch[0]``."""
    net = getattr(pl_module, "net", pl_module)
    table = net.tok_emb
    if not isinstance(table, nn.Embedding):
        raise ConfigTypeError(
            f"Expected net.tok_emb to be an nn.Embedding, got {type(table).__name__}."
        )
    return table(batch[0].to(table.weight.device))


def token_labels(batch: tuple[torch.Tensor, list[str]]) -> list[str]:
    """The characters of a :func:`vocab_batches` batch, as projector labels."""
    return list(batch[1])


class CharWindows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Windows of ``block_size`` characters and the same window shifted by one.

    Args:
        ids: The encoded text.
        block_size: Characters per window.
        stride: Characters between window starts.
    """

    def __init__(self, ids: torch.Tensor, block_size: int, stride: int) -> None:
        if len(ids) <= block_size:
            raise ConfigError(
                f"The text has {len(ids)} characters, fewer than data.block_size + 1 = "
                f"{block_size + 1}: lower data.block_size or use a longer text (data.path)."
            )
        self.ids = ids
        self.block_size = block_size
        self.starts = list(range(0, len(ids) - block_size - 1, max(1, stride)))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.starts[index]
        chunk = self.ids[start : start + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class CharDataModule(pl.LightningDataModule):
    """Character windows over a text: the first part trains, the last part validates.

    Args:
        path: A UTF-8 text file; ``None`` uses the corpus that ships with the package.
        block_size: Context length in characters.
        batch_size: Windows per batch.
        stride: Characters between training window starts (validation uses ``block_size``).
        val_fraction: Share of the text, taken from its end, used for validation.
        limit: At most this many training windows (and validation windows).
        num_workers: DataLoader worker processes.
        seed: Seed of the training shuffle.

    Example:
        >>> dm = CharDataModule(block_size=16, batch_size=4)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape)
        (4, 16)
    """

    def __init__(
        self,
        path: str | None = None,
        block_size: int = 64,
        batch_size: int = 32,
        stride: int = 8,
        val_fraction: float = 0.1,
        limit: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"Expected data.val_fraction in (0, 1), got {val_fraction!r}.")
        self.path = Path(path) if path else default_corpus()
        self.block_size = block_size
        self.batch_size = batch_size
        self.stride = stride
        self.val_fraction = val_fraction
        self.limit = limit
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: CharWindows | None = None
        self.val_set: CharWindows | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if not self.path.is_file():
            raise ConfigError(f"data.path={str(self.path)!r} is not a file.")
        ids = encode(self.path.read_text(encoding="utf-8"))
        cut = int(len(ids) * (1.0 - self.val_fraction))
        self.train_set = CharWindows(ids[:cut], self.block_size, self.stride)
        self.val_set = CharWindows(ids[cut:], self.block_size, self.block_size)
        if self.limit is not None:
            self.train_set.starts = self.train_set.starts[: self.limit]
            self.val_set.starts = self.val_set.starts[: self.limit]

    def _sets(self) -> tuple[CharWindows, CharWindows]:
        self.setup("fit")
        if self.train_set is None or self.val_set is None:
            raise UsageError("CharDataModule.setup() did not build the datasets.")
        return self.train_set, self.val_set

    def train_dataloader(self) -> DataLoader[Any]:
        train, _ = self._sets()
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            train,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            generator=generator,
            drop_last=len(train) > self.batch_size,
        )

    def val_dataloader(self) -> DataLoader[Any]:
        _, val = self._sets()
        return DataLoader(val, batch_size=self.batch_size, num_workers=self.num_workers)


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP, both residual."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        shape = (b, t, self.n_heads, c // self.n_heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.mlp(self.ln2(x)))


class TinyTransformer(nn.Module):
    """A GPT-style character model: token and position embeddings, blocks, a tied-free head.

    Args:
        vocab_size: Number of token ids (``len(VOCAB)`` for the shipped tokenizer).
        block_size: Longest context the position embedding covers.
        d_model: Embedding width; must be divisible by ``n_heads``.
        n_heads: Attention heads per block.
        n_layers: Transformer blocks.
        dropout: Dropout on attention output, MLP output and embeddings.

    Example:
        >>> net = TinyTransformer(vocab_size=96, block_size=16, d_model=32, n_heads=4, n_layers=1)
        >>> tuple(net(torch.zeros(2, 16, dtype=torch.long)).shape)
        (2, 16, 96)
    """

    def __init__(
        self,
        vocab_size: int = len(VOCAB),
        block_size: int = 64,
        d_model: int = 64,
        n_heads: int = 4,
        n_layers: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(
                f"model.net.d_model={d_model} is not divisible by model.net.n_heads={n_heads}."
            )
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(_Block(d_model, n_heads, dropout) for _ in range(n_layers)))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        positions = torch.arange(t, device=ids.device)
        x = self.drop(self.tok_emb(ids) + self.pos_emb(positions))
        return self.lm_head(self.ln_f(self.blocks(x)))


class TinyLM(pl.LightningModule):
    """Next-character training; logs loss and perplexity.

    Logged tags (see :mod:`tbx_lightning.templates.metrics`): ``train/loss`` per step,
    ``train/perplexity`` per epoch, and ``val/loss`` and ``val/perplexity`` per epoch;
    the Accelerate loop logs the same. Learning rate and tokens per second come from
    the training monitor (``vitals/lr/...``, ``vitals/tokens_per_sec``).

    Args:
        net: The language model, e.g. :class:`TinyTransformer`.
        optimizer: Builds the optimizer from the parameters (a config partial).
        scheduler: Optional; builds an LR scheduler from the optimizer, stepped every step.

    Example:
        >>> from functools import partial
        >>> lm = TinyLM(TinyTransformer(block_size=16), partial(torch.optim.AdamW, lr=3e-3))
    """

    #: When the LR scheduler steps: after every optimizer ``step``, in both runners.
    scheduler_interval: ClassVar[str] = "step"

    def __init__(
        self,
        net: TinyTransformer,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.example_input_array = torch.zeros(1, net.block_size, dtype=torch.long)
        self._batch_started = 0.0
        self._step_lr = 0.0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net(ids)

    def batch_metrics(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """One batch's ``loss`` (next-character cross-entropy) and ``perplexity``."""
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return {"loss": loss, "perplexity": torch.exp(loss.detach())}

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        ids, targets = batch
        values = self.batch_metrics(self(ids), targets)
        log_batch_metrics(self, split, values, batch_size=len(ids))
        return values["loss"]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        return self._step(batch, "val")

    @torch.no_grad()
    def sample(self, prompt: str, length: int = 200, temperature: float = 1.0) -> str:
        """Continues ``prompt`` by ``length`` characters, sampling from the model."""
        ids = encode(prompt).unsqueeze(0).to(self.device)
        for _ in range(length):
            logits = self(ids[:, -self.net.block_size :])[:, -1] / max(temperature, 1e-6)
            ids = torch.cat([ids, torch.multinomial(F.softmax(logits, -1), 1)], dim=1)
        return decode(ids[0].tolist())

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        kwargs: dict[str, Any] = {"optimizer": optimizer}
        keywords = getattr(self.scheduler_factory, "keywords", {})
        if "total_steps" in keywords and keywords["total_steps"] is None:
            kwargs["total_steps"] = int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(**kwargs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }


def warmup_cosine(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int | None
) -> Any:
    """Linear warm-up to the base LR, then cosine decay to a tenth of it, per step.

    Args:
        optimizer: The optimizer whose LR is scheduled.
        warmup_steps: Steps of linear warm-up from ``1/warmup_steps`` of the base LR.
        total_steps: Steps until the end of the decay; ``None`` is filled in by
            :class:`TinyLM` with the trainer's estimated number of steps.
    """
    if total_steps is None:
        raise ConfigError(
            "model.scheduler.total_steps is null and no trainer filled it in: set a number."
        )
    end = total_steps

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, end - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
