"""Parameter groups: which layer a parameter belongs to, under one name on every route.

A layer's name is its path in the user's model. What wrappers insert is dropped
wherever it appears: FSDP's and activation checkpointing's wrapper modules,
``torch.compile``'s ``_orig_mod``, and PEFT's ``base_model.model`` (with everything
above it, such as the attribute of a LightningModule that holds the PEFT model). So
``model.layers.0.self_attn.q_proj`` is the same tag from Lightning, Accelerate and the
Hugging Face Trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from tbx_lightning.errors import ConfigError

__all__ = ["Group", "GroupedParam", "adapter_group", "build_groups", "group_name", "layer_path"]

# Module-tree components that wrappers insert and users never wrote.
_WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
_ADAPTER_PREFIXES = ("lora_", "hada_", "lokr_", "ia3_")


def layer_path(param_name: str) -> list[str]:
    """The module path of a parameter in the user's model, wrapper parts dropped.

    Example:
        >>> layer_path("net.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
        ['model', 'layers', '0', 'self_attn', 'q_proj', 'lora_A', 'default']
        >>> layer_path("_orig_mod.encoder.0._fsdp_wrapped_module.weight")
        ['encoder', '0']
    """
    parts = [p for p in param_name.split(".") if p not in _WRAPPER_PARTS][:-1]
    for i in range(len(parts) - 1):
        if parts[i] == "base_model" and parts[i + 1] == "model":
            return parts[i + 2 :]
    return parts


def group_name(param_name: str, depth: int) -> str:
    """The monitor group of a parameter: the first ``depth`` parts of its module path.

    A numeric part that follows the cut (an index into a ``ModuleList`` or
    ``Sequential``) is kept, so ``depth=2`` turns ``encoder.layers.3.linear1.weight``
    into ``encoder.layers.3``: one group per layer. Wrapper parts (FSDP, activation
    checkpointing, ``torch.compile``, PEFT's ``base_model.model``) are dropped first.
    Parameters that sit directly on the root module form the group ``root``;
    ``depth=0`` puts every parameter into the group ``all``.

    Args:
        param_name: The parameter's name in ``model.named_parameters()``.
        depth: Parts of the module path kept.

    Example:
        >>> group_name("encoder.layers.3.self_attn.out_proj.weight", 2)
        'encoder.layers.3'
        >>> group_name("head.weight", 2)
        'head'
    """
    if depth == 0:
        return "all"
    parts = layer_path(param_name)
    if not parts:
        return "root"
    cut = min(depth, len(parts))
    while cut < len(parts) and parts[cut].isdigit():
        cut += 1
    return ".".join(parts[:cut])


def adapter_group(param_name: str) -> str:
    """The monitor group of a parameter in an adapter model: the module the adapter wraps.

    PEFT's wrapper parts (``base_model.model`` and what holds it, ``lora_A``/``lora_B``
    and the adapter's name, ``base_layer``) are dropped, so the two LoRA factors of one
    projection and its frozen base weight share a group.

    Args:
        param_name: The parameter's name in ``model.named_parameters()``.

    Example:
        >>> adapter_group("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
        'model.layers.0.self_attn.q_proj'
        >>> adapter_group("net.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
        'model.layers.0.self_attn.q_proj'
    """
    parts = layer_path(param_name)
    for i, part in enumerate(parts):
        if part.startswith(_ADAPTER_PREFIXES) or part == "base_layer":
            parts = parts[:i]
            break
    return ".".join(parts) or "root"


def has_adapters(names: list[str]) -> bool:
    """Whether parameter names show low-rank adapters (PEFT's or the same naming)."""
    return any(".lora_" in n or n.startswith("lora_") for n in names)


@dataclass
class GroupedParam:
    """One parameter with its name and the index of its group."""

    name: str
    param: nn.Parameter
    group: int


@dataclass
class Group:
    """A named set of parameters whose statistics are logged together."""

    name: str
    params: list[GroupedParam] = field(default_factory=list)


def build_groups(
    named: list[tuple[str, nn.Parameter]],
    *,
    depth: int,
    group_fn: Callable[[str], str] | None,
    trainable_only: bool,
) -> tuple[list[Group], list[GroupedParam]]:
    """Groups ``named`` parameters, in their order; frozen ones apart in ``trainable_only``."""
    adapters = has_adapters([n for n, _ in named])
    namer: Callable[[str], str]
    if group_fn is not None:
        namer = group_fn
    elif adapters:
        namer = adapter_group
    else:
        namer = lambda n: group_name(n, depth)  # noqa: E731
    groups: list[Group] = []
    params: list[GroupedParam] = []
    index: dict[str, int] = {}
    for name, param in named:
        if trainable_only and not param.requires_grad and not (adapters or group_fn is not None):
            gname = "frozen"
        else:
            gname = namer(name)
        if not isinstance(gname, str) or not gname:
            raise ConfigError(
                f"`group_fn` returned {gname!r} for parameter {name!r}: return a non-empty str."
            )
        if gname not in index:
            index[gname] = len(groups)
            groups.append(Group(gname))
        entry = GroupedParam(name, param, index[gname])
        groups[index[gname]].params.append(entry)
        params.append(entry)
    return groups, params
