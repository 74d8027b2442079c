"""The finetune_lm experiment on Hugging Face's Trainer (``runner: hf``).

The same fine-tune as ``finetune_lm`` (LoRA adapters on a small Llama-like model, on
the shipped text), written with the Hugging Face stack a user has: a
``transformers.LlamaForCausalLM`` built from a ``LlamaConfig`` (nothing downloaded,
base weights from a fixed seed standing for a pretrained checkpoint), ``peft`` LoRA
adapters, a word-level ``tokenizers`` tokenizer trained on the text, a
``datasets.Dataset`` of token blocks, ``transformers.Trainer`` and
:class:`~tbx_lightning.TBXCallback`. The builders are also what the tests and
``examples/trl_sft.py`` use. Settings come from the composed config:

- ``model``: the builder :func:`lora_llama` and its sizes;
- ``hf_args``: ``TrainingArguments`` fields (``output_dir`` defaults to
  ``<logger.tbx.save_dir>/<task_name>/checkpoints``);
- ``data.path`` / ``data.block_size`` / ``data.limit``: the text and its blocks;
- ``logger.tbx``: the run directory (``save_dir``/``name``), ``hparams_exclude``;
- ``callbacks.training_monitor``: present turns the monitor on, with its options;
  ``callbacks.embedding_projector``: present logs the token embeddings before and after.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from tbx_lightning.errors import ConfigError
from tbx_lightning.templates.runner import (
    RunResult,
    absolute,
    cpu_threads,
    hyperparameters,
)

__all__ = [
    "build",
    "corpus_text",
    "lora_llama",
    "run",
    "text_blocks",
    "tiny_llama",
    "word_tokenizer",
]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[EOS]")


def corpus_text(path: str | os.PathLike[str] | None = None) -> str:
    """The text at ``path``, or the corpus shipped in ``tbx_lightning/templates/data``."""
    source = Path(path) if path is not None else Path(__file__).with_name("data") / "corpus.txt"
    return source.read_text(encoding="utf-8")


def word_tokenizer(text: str, vocab_size: int = 512) -> Any:
    """A word-level tokenizer trained on ``text``, as a ``PreTrainedTokenizerFast``.

    Lower-cased words and punctuation; ``[PAD]``, ``[UNK]`` and ``[EOS]`` are ids 0-2.

    Example:
        >>> tok = word_tokenizer("the keeper counted the steps. the keeper slept.", 16)
        >>> tok.convert_ids_to_tokens(tok("The keeper slept.")["input_ids"])
        ['the', 'keeper', 'slept', '.']
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    tokenizer.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )


def tiny_llama(
    vocab_size: int,
    *,
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 128,
    seed: int = 1234,
) -> Any:
    """A ``LlamaForCausalLM`` built from a config, its weights drawn from ``seed``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def lora_llama(
    vocab_size: int,
    *,
    r: int = 4,
    lora_alpha: int = 16,
    lora_dropout: float = 0.0,
    target_modules: Sequence[str] = ("q_proj", "v_proj", "embed_tokens"),
    **sizes: Any,
) -> Any:
    """:func:`tiny_llama` with ``peft`` LoRA adapters; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=list(target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(tiny_llama(vocab_size, **sizes), config)


def text_blocks(tokenizer: Any, text: str, block_size: int = 32, limit: int | None = None) -> Any:
    """Consecutive blocks of ``block_size`` tokens of ``text`` as a ``datasets.Dataset``
    (``input_ids``, ``attention_mask``, ``labels``); at most ``limit`` blocks."""
    import datasets

    if block_size < 2:
        raise ConfigError(f"Expected data.block_size >= 2, got {block_size!r}.")
    ids: list[int] = tokenizer(re.sub(r"\s+", " ", text))["input_ids"]
    count = len(ids) // block_size
    if limit is not None:
        count = min(count, limit)
    blocks = [ids[i * block_size : (i + 1) * block_size] for i in range(count)]
    if not blocks:
        raise ConfigError(f"The text has fewer than data.block_size={block_size} tokens.")
    return datasets.Dataset.from_dict(
        {"input_ids": blocks, "attention_mask": [[1] * block_size] * count, "labels": blocks}
    )


# ---------------------------------------------------------------------- the runner
def _node(cfg: DictConfig, key: str) -> dict[str, Any]:
    node = OmegaConf.select(cfg, key)
    if node is None:
        return {}
    value = OmegaConf.to_container(node, resolve=True)
    if not isinstance(value, dict):
        raise ConfigError(f"Expected `{key}` to be a mapping, got {type(value).__name__}.")
    return {str(k): v for k, v in value.items()}


def _monitor_options(node: dict[str, Any]) -> dict[str, Any]:
    from tbx_lightning.monitor import MonitorOptions

    accepted = {field.name for field in dataclasses.fields(MonitorOptions)}
    return {k: v for k, v in node.items() if k in accepted}


def run(cfg: DictConfig) -> RunResult:
    """Trains the config's LoRA Llama with ``transformers.Trainer`` and ``TBXCallback``.

    Raises:
        ConfigError: A part of the config cannot be built; nothing has been written.
    """
    with cpu_threads(cfg.get("num_threads")):
        trainer, callback = build(cfg)
        return _train(cfg, trainer, callback)


def build(cfg: DictConfig) -> tuple[Any, Any]:
    """The ``(Trainer, TBXCallback)`` the config describes; nothing is written yet.

    Raises:
        ConfigError: A part of the config cannot be built.
    """
    from transformers import Trainer, TrainingArguments, set_seed

    from tbx_lightning import TBXCallback

    logger = _node(cfg, "logger.tbx")
    if "save_dir" not in logger:
        raise ConfigError("The hf runner needs logger.tbx.save_dir and logger.tbx.name.")
    data = _node(cfg, "data")
    model_node = _node(cfg, "model")
    builder = model_node.pop("_target_", None)
    if builder != f"{__name__}.lora_llama":
        raise ConfigError(
            f"The hf runner builds models with {__name__}.lora_llama, got model._target_="
            f"{builder!r}: use `model: llama_lora`."
        )
    set_seed(int(cfg.seed))
    text = corpus_text(data.get("path"))
    tokenizer = word_tokenizer(text, int(model_node.pop("vocab_size", 512)))
    blocks = text_blocks(tokenizer, text, int(data.get("block_size", 32)), data.get("limit"))
    split = blocks.train_test_split(test_size=0.1, seed=int(cfg.seed))
    try:
        model = lora_llama(len(tokenizer), **model_node)
    except TypeError as bad:
        raise ConfigError(f"Cannot build `model` from the config: {bad}") from bad
    args_node = _node(cfg, "hf_args")
    args_node.setdefault(
        "output_dir", os.path.join(str(logger["save_dir"]), str(cfg.task_name), "checkpoints")
    )
    args_node.setdefault("seed", int(cfg.seed))
    try:
        args = TrainingArguments(**args_node)
    except (TypeError, ValueError) as bad:
        raise ConfigError(f"Cannot build `hf_args` (TrainingArguments): {bad}") from bad
    callbacks_node = _node(cfg, "callbacks")
    monitor_node = callbacks_node.get("training_monitor")
    options = _monitor_options(monitor_node) if isinstance(monitor_node, dict) else {}
    # The route records the Trainer's arguments, the model's sizes and the LoRA config
    # itself (as args.*, model.*, peft.*); Lightning's trainer group is not used here.
    config = cast(dict[str, Any], OmegaConf.to_container(hyperparameters(cfg), resolve=True))
    for key in ("model", "trainer", "hf_args"):
        config.pop(key, None)
    callback = TBXCallback(
        logger["save_dir"],
        name=logger.get("name"),
        config=config,
        monitor=isinstance(monitor_node, dict),
        log_embeddings="embedding_projector" in callbacks_node,
        log_graph=bool(logger.get("log_graph", False)),
        hparams_exclude=logger.get("hparams_exclude"),
        **options,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=split["train"],
        eval_dataset=split["test"],
        processing_class=tokenizer,
        callbacks=[callback],
    )
    return trainer, callback


def _train(cfg: DictConfig, trainer: Any, callback: Any) -> RunResult:
    from tbx_lightning.hf import tag_of

    started = time.time()
    error: BaseException | None = None
    try:
        trainer.train(resume_from_checkpoint=cfg.get("ckpt_path"))
    except Exception as exc:  # recorded as a failed run; the caller decides what to do
        error = exc
    log_dir = absolute(callback.log_dir or str(trainer.args.output_dir))
    metrics = {
        tag_of(key): float(value)
        for entry in trainer.state.log_history
        for key, value in entry.items()
        if isinstance(value, int | float) and key not in ("step", "epoch")
    }
    from transformers.trainer_utils import get_last_checkpoint

    stopped = callback.stop_checkpoint
    output_dir = str(trainer.args.output_dir)
    last = stopped or (get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None)
    return RunResult(
        log_dir=log_dir,
        experiment_dir=os.path.dirname(log_dir),
        status="failed" if error is not None or stopped is not None else "success",
        seconds=time.time() - started,
        metrics=metrics,
        checkpoint=absolute(last) if last else None,
        error=error,
    )
