"""What the graph capture sees: the user's model unwrapped, its inputs named, its outputs tensors.

Every capture method in :mod:`tbx_lightning.graph` runs on a :class:`Prepared`
module rather than on the model itself:

- wrappers that are not the user's model are skipped: ``torch.compile``'s
  ``OptimizedModule``, peft's ``PeftModel``/``LoraModel`` and the data-parallel
  wrappers, so scopes and ``max_depth`` count from the model the user wrote or
  loaded;
- the call gets one explicit parameter per tensor input (``forward(self,
  input_ids, attention_mask)``), so ``forward(self, **kwargs)`` modules work with
  every method; non-tensor arguments are fixed at their example values;
- ``use_cache=False`` is passed where ``forward`` takes ``use_cache`` and the
  example input does not set it;
- the outputs are reduced to their tensors: a ``ModelOutput``, dict, tuple or list
  becomes ``{"logits": ..., "hidden_states.0": ...}``, and caches
  (``DynamicCache``, ``EncoderDecoderCache``, ...) and other values a graph cannot
  hold are left out, each named in a note.

The prepared module shares the model's submodules, parameters and buffers (the
very same dicts), so module paths and parameter names are the model's own.
"""

from __future__ import annotations

import inspect
import keyword
import linecache
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from tbx_lightning.errors import LoggedTypeError

_MAX_ERROR_CHARS = 300

# The name is never a module attribute of a user's model, so it cannot shadow one.
_ROOT_ATTR = "_tbx_graph_root"


@dataclass
class Prepared:
    """The module to capture and its flat example inputs.

    Attributes:
        module: Shares the model's submodules and state; its ``forward`` takes
            ``values`` positionally and returns tensors only.
        root: The user's model after skipping wrappers.
        values: One example value per parameter of ``module.forward``.
        notes: What was switched on the way (unwrapping, ``use_cache=False``).
        dropped: Filled on each call: ``"path (Type)"`` of outputs left out.
    """

    module: torch.nn.Module
    root: torch.nn.Module
    values: tuple[Any, ...]
    notes: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def output_note(self) -> str | None:
        """The note on outputs left out by the last call, or None."""
        if not self.dropped:
            return None
        items = ", ".join(self.dropped)
        return (
            f"{items} dropped from the outputs: a graph shows tensors only, "
            "the other outputs are kept"
        )


# --------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------


def unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module, list[str]]:
    """Skips ``torch.compile``, peft and data-parallel wrappers; returns the model and notes."""
    notes: list[str] = []
    for _ in range(8):  # a compiled peft model in DDP is three levels; no model nests deeper
        inner, note = _unwrap_once(model)
        if inner is None:
            break
        notes.append(note)
        model = inner
    return model, notes


def _unwrap_once(model: torch.nn.Module) -> tuple[torch.nn.Module | None, str]:
    cls = type(model)
    orig = model.__dict__.get("_modules", {}).get("_orig_mod")
    if cls.__name__ == "OptimizedModule" and isinstance(orig, torch.nn.Module):
        return orig, (
            f"torch.compile wrapper skipped: the graph is the one of {type(orig).__name__} "
            "as written (eager), scopes start at it"
        )
    if isinstance(
        model, (torch.nn.parallel.DistributedDataParallel, torch.nn.parallel.DataParallel)
    ):
        inner = model.module
        return inner, f"{cls.__name__} wrapper skipped: scopes start at {type(inner).__name__}"
    if cls.__module__.startswith("peft.") and callable(getattr(model, "get_base_model", None)):
        config = getattr(model, "active_peft_config", None)
        if getattr(config, "is_prompt_learning", False):
            return None, ""  # prompt tuning changes the inputs in PeftModel.forward: keep it
        get_base: Callable[[], Any] = model.get_base_model  # type: ignore[assignment]
        base = get_base()
        if isinstance(base, torch.nn.Module) and base is not model:
            return base, (
                f"peft {cls.__name__} wrapper skipped: scopes and max_depth count from "
                f"{type(base).__name__}; its adapted layers show their adapters "
                "(lora_A, lora_B, ...)"
            )
    return None, ""


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def _is_tensor(value: Any) -> bool:
    """A tensor, or what stands for one while torch.fx traces."""
    return isinstance(value, (torch.Tensor, torch.fx.Proxy))


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, Mapping):
        return any(_holds_tensor(v) for v in value.values())
    return False


def _identifier(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name) or "arg"
    if base[0].isdigit() or keyword.iskeyword(base) or base == "self":
        base = f"arg_{base}"
    candidate = base
    while candidate in taken:
        candidate += "_"
    taken.add(candidate)
    return candidate


@dataclass
class _Slot:
    """Where one value goes in the real call: a positional index or a keyword."""

    keyword: str | None
    value: Any
    dynamic: bool
    name: str = ""


def _slots(
    root: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], notes: list[str]
) -> list[_Slot]:
    try:
        signature = inspect.signature(root.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        # The call fails the same way inside each method, which reports it.
        slots = [_Slot(None, v, _holds_tensor(v), f"arg{i}") for i, v in enumerate(args)]
        slots += [_Slot(k, v, _holds_tensor(v), k) for k, v in kwargs.items()]
        return slots
    params = signature.parameters
    slots = []
    positional = True
    for name, param in params.items():
        if name not in bound.arguments:
            if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
                positional = False
            continue
        value = bound.arguments[name]
        if param.kind == param.VAR_POSITIONAL:
            slots += [_Slot(None, v, _holds_tensor(v), f"{name}_{i}") for i, v in enumerate(value)]
        elif param.kind == param.VAR_KEYWORD:
            slots += [_Slot(k, v, _holds_tensor(v), k) for k, v in value.items()]
        elif param.kind == param.KEYWORD_ONLY or not positional:
            slots.append(_Slot(name, value, _holds_tensor(value), name))
        else:
            slots.append(_Slot(None, value, _holds_tensor(value), name))
    if "use_cache" in params and "use_cache" not in bound.arguments:
        slots.append(_Slot("use_cache", False, False, "use_cache"))
        notes.append(
            "use_cache=False passed to forward: the graph is the forward pass without "
            "building a key/value cache (pass use_cache=True in the example input to "
            "graph it with the cache; the cache itself is not drawn)"
        )
    return slots


# --------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------


def is_cache(value: Any) -> bool:
    """Whether ``value`` is a key/value cache (transformers' ``Cache`` types), by duck typing."""
    if _is_tensor(value):
        return False
    if any(c.__name__.endswith("Cache") for c in type(value).__mro__):
        return True
    return callable(getattr(value, "get_seq_length", None)) and callable(
        getattr(value, "update", None)
    )


def _plain(value: Any) -> bool:
    """A tensor or a built-in tuple/list/dict of them: every method represents it as is."""
    if _is_tensor(value):
        return True
    if type(value) in (tuple, list) or (isinstance(value, tuple) and hasattr(value, "_fields")):
        return len(value) > 0 and all(_plain(v) for v in value)
    if type(value) is dict:
        return len(value) > 0 and all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _leaves(value: Any, path: str, tensors: dict[str, Any], dropped: list[str]) -> None:
    where = path or "output"
    if _is_tensor(value):
        tensors[path] = value
    elif value is None:
        return
    elif is_cache(value):
        dropped.append(f"{where} ({type(value).__name__})")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _leaves(item, f"{path}.{key}" if path else str(key), tensors, dropped)
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            _leaves(item, f"{path}.{index}" if path else str(index), tensors, dropped)
    else:
        dropped.append(f"{where} ({type(value).__name__})")


def tensor_outputs(output: Any, dropped: list[str]) -> Any:
    """``output`` if every method can represent it, else ``{path: tensor}`` of its tensors."""
    dropped.clear()
    if _plain(output):
        return output
    tensors: dict[str, Any] = {}
    _leaves(output, "", tensors, dropped)
    if not tensors:
        kinds = ", ".join(dropped) or type(output).__name__
        raise LoggedTypeError(f"the model's output holds no tensor to draw (got {kinds})")
    if list(tensors) == [""]:
        return tensors[""]
    return tensors


# --------------------------------------------------------------------------------------
# The prepared module
# --------------------------------------------------------------------------------------


class _Shared(torch.nn.Module):
    """Holds a model's submodules and state without owning them: the root of a capture."""

    def __init__(self, root: torch.nn.Module) -> None:
        super().__init__()
        # Share, not copy: the capture sees the model's own module paths and tensors.
        for name in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            object.__setattr__(self, name, getattr(root, name))
        object.__setattr__(self, "training", root.training)


def prepare(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Prepared:
    """The module every capture method runs on; see the module docstring."""
    root, notes = unwrap(model)
    slots = _slots(root, args, kwargs, notes)
    taken: set[str] = set()
    for slot in slots:
        if slot.dynamic:
            slot.name = _identifier(slot.name, taken)
    dynamic = [slot for slot in slots if slot.dynamic]
    prepared = Prepared(module=root, root=root, values=tuple(s.value for s in dynamic), notes=notes)
    forward = root.forward

    def run(*values: Any) -> Any:
        given = iter(values)
        call_args: list[Any] = []
        call_kwargs: dict[str, Any] = {}
        for slot in slots:
            value = next(given) if slot.dynamic else slot.value
            if slot.keyword is None:
                call_args.append(value)
            else:
                call_kwargs[slot.keyword] = value
        return tensor_outputs(forward(*call_args, **call_kwargs), prepared.dropped)

    params = ", ".join(slot.name for slot in dynamic)
    source = f"def forward(self{', ' if params else ''}{params}):\n    return _run({params})\n"
    namespace: dict[str, Callable[..., Any]] = {}
    # A fixed template filled with checked identifiers: fx and jit.trace read the
    # parameter names from real code, which a ``*args`` signature would not give them.
    # Its source goes into linecache: torch.export records a stack trace per node,
    # and a file linecache cannot find is looked up again on every line.
    filename = f"<tbx_lightning graph capture of {type(root).__name__}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    exec(compile(source, filename, "exec"), {"_run": run}, namespace)
    cls = type(
        type(root).__name__,
        (_Shared,),
        {"forward": namespace["forward"], _ROOT_ATTR: root, "__module__": __name__},
    )
    prepared.module = cls(root)
    return prepared


def capture_root(module: torch.nn.Module) -> torch.nn.Module:
    """The user's model behind a prepared module (``module`` itself otherwise)."""
    root = getattr(type(module), _ROOT_ATTR, None)
    return root if isinstance(root, torch.nn.Module) else module


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------

_TENSOR_REPR = re.compile(r"(?:Parameter containing:\s*)?\b(?:tensor|array)\(")


def _strip_reprs(text: str) -> str:
    """Replaces every ``tensor(...)``/``array(...)`` printout by ``<tensor>``."""
    parts: list[str] = []
    start = 0
    while (match := _TENSOR_REPR.search(text, start)) is not None:
        parts.append(text[start : match.start()])
        depth, index = 1, match.end()
        while index < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[index], 0)
            index += 1
        parts.append("<tensor>")
        start = index
    parts.append(text[start:])
    return "".join(parts)


def one_line(err: BaseException) -> str:
    """``Type: first line`` of an error, without tensor printouts, at most 300 characters."""
    text = _strip_reprs(str(err))
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = re.sub(r"\s+", " ", first)
    line = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return line if len(line) <= _MAX_ERROR_CHARS else line[: _MAX_ERROR_CHARS - 3] + "..."


_CACHE_WORDS = re.compile(r"Cache\b|past_key_values|use_cache")

CACHE_HINT = (
    "The model returns or takes a key/value cache: pass use_cache=False in the example "
    "input (e.g. {'input_ids': ids, 'use_cache': False}). "
)


def mentions_cache(errors: list[str]) -> bool:
    """Whether any error is about a key/value cache."""
    return any(_CACHE_WORDS.search(error) for error in errors)
