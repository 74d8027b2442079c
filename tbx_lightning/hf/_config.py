"""What a Trainer run is configured with, as the run's config and HParams row.

The config (``config.yaml`` and the ``run/config`` text) keeps everything:

- ``args``: every field of the ``TrainingArguments`` (or TRL config) as
  ``args.to_dict()`` gives them (tokens masked);
- ``model``: the model's key sizes (``type``, ``hidden_size``, ``num_hidden_layers``,
  ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``,
  ``vocab_size``, ``max_position_embeddings``) and its parameter counts;
- ``model_config``: the model config's non-default values (``to_diff_dict()``);
- ``peft``: the active adapter's config, for a PEFT model;
- the user's own config, when one is passed (an OmegaConf config, a dict, a dataclass).

The HParams row leaves most of it out through the same ``hparams_exclude`` patterns
as the other routes: :func:`row_exclusions` gives one pattern per ``args`` field not
in ``args_in_row`` (:data:`ARGS_IN_ROW` by default), per ``peft`` key not in
:data:`PEFT_IN_ROW`, and ``model_config.*``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from tbx_lightning.errors import ConfigTypeError

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "ARGS_IN_ROW",
    "MODEL_SIZES",
    "PEFT_IN_ROW",
    "check_args_in_row",
    "row_exclusions",
    "run_config",
]

# TrainingArguments fields that tell runs apart: what is learned and how fast, not where
# files go or how the run is shown. TRL's fields (beta, num_generations, ...) where present.
ARGS_IN_ROW: tuple[str, ...] = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "bf16",
    "fp16",
    "max_steps",
    "num_train_epochs",
    "seed",
    # TRL
    "beta",
    "loss_type",
    "max_length",
    "max_prompt_length",
    "max_completion_length",
    "num_generations",
    "temperature",
    "packing",
)
# The model config's key sizes, read from the text config of multimodal models.
MODEL_SIZES: tuple[str, ...] = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "max_position_embeddings",
)
# The adapter's settings that differ between fine-tunes.
PEFT_IN_ROW: tuple[str, ...] = (
    "peft_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "modules_to_save",
    "bias",
    "use_rslora",
    "use_dora",
    "init_lora_weights",
)


def check_args_in_row(value: Any) -> tuple[str, ...]:
    """``args_in_row`` as a tuple of field names (``None``: :data:`ARGS_IN_ROW`).

    Example:
        >>> check_args_in_row(["learning_rate", "seed"])
        ('learning_rate', 'seed')
        >>> check_args_in_row("seed")
        Traceback (most recent call last):
        ...
        tbx_lightning.errors.ConfigTypeError: `args_in_row` of TBXCallback must be a list of TrainingArguments field names such as ['learning_rate', 'seed'], got 'seed'.
    """
    if value is None:
        return ARGS_IN_ROW
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigTypeError(
            "`args_in_row` of TBXCallback must be a list of TrainingArguments field names such "
            f"as ['learning_rate', 'seed'], got {value!r}."
        )
    names = tuple(value)
    bad = [name for name in names if not isinstance(name, str) or not name]
    if bad:
        raise ConfigTypeError(
            f"`args_in_row` of TBXCallback holds {bad[0]!r}, which is not a field name: pass "
            "TrainingArguments field names such as 'learning_rate'."
        )
    return names


def _plain(value: Any) -> Any:
    """Sets (PEFT's target_modules) as sorted lists, enums as their values, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((_plain(v) for v in value), key=str)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _active_peft_config(model: Any) -> dict[str, Any] | None:
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, Mapping) or not configs:
        return None
    active = getattr(model, "active_adapter", None)
    if isinstance(active, list | tuple):
        active = active[0] if active else None
    config = configs.get(active) if active in configs else next(iter(configs.values()))
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return None
    plain = _plain(to_dict())
    return plain if isinstance(plain, dict) else None


def _model_part(model: nn.Module | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(key sizes and parameter counts, the config's non-default values)``."""
    if model is None:
        return {}, {}
    config = getattr(model, "config", None)
    sizes: dict[str, Any] = {}
    diff: dict[str, Any] = {}
    if config is not None:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        model_type = getattr(config, "model_type", None)
        if model_type:
            sizes["type"] = model_type
        name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
        if name:
            sizes["name_or_path"] = str(name)
        for key in MODEL_SIZES:
            value = getattr(text, key, None)
            if isinstance(value, int | float) and not isinstance(value, bool):
                sizes[key] = value
        to_diff = getattr(config, "to_diff_dict", None)
        if callable(to_diff):
            diff = _plain(to_diff())
    params = list(model.parameters())
    sizes["parameters"] = sum(p.numel() for p in params)
    sizes["trainable_parameters"] = sum(p.numel() for p in params if p.requires_grad)
    return sizes, diff


def run_config(args: Any, model: nn.Module | None) -> dict[str, Any]:
    """The Trainer's part of the run's config: ``args``, ``model``, ``model_config``, ``peft``."""
    to_dict = getattr(args, "to_dict", None)
    if not callable(to_dict):
        raise ConfigTypeError(
            f"TBXCallback got {type(args).__name__} as the Trainer's args: it works with a "
            "transformers.TrainingArguments (or a TRL config)."
        )
    sizes, diff = _model_part(model)
    config: dict[str, Any] = {"args": _plain(to_dict())}
    if sizes:
        config["model"] = sizes
    if diff:
        config["model_config"] = diff
    peft = _active_peft_config(model)
    if peft is not None:
        config["peft"] = peft
    return config


def row_exclusions(config: Mapping[str, Any], args_in_row: Iterable[str]) -> list[str]:
    """``hparams_exclude`` patterns that keep the row to the fields that tell runs apart.

    Example:
        >>> row_exclusions({"args": {"learning_rate": 0.1, "output_dir": "out"}}, ["learning_rate"])
        ['args.output_dir', 'args.output_dir.*', 'model_config', 'model_config.*']
    """
    keep = set(args_in_row)
    patterns: list[str] = []
    for part, kept in (("args", keep), ("peft", set(PEFT_IN_ROW))):
        values = config.get(part)
        if not isinstance(values, Mapping):
            continue
        for key in values:
            if key not in kept:
                patterns += [f"{part}.{key}", f"{part}.{key}.*"]
    return [*patterns, "model_config", "model_config.*"]
