"""Framework-free collection of embeddings: hooks, pooling, labels, images, gathering.

The Lightning callback (:class:`tbx_lightning.EmbeddingProjector`) and Accelerate
loops share these pieces; none of them imports a training framework. Errors name the
option the user set (``input_key``, ``label_fn``, ...), whichever route called them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from tbx_lightning.errors import LoggedTypeError, LoggedValueError, UsageError

__all__ = [
    "POOLS",
    "as_embeddings",
    "as_images",
    "as_labels",
    "capture_outputs",
    "first_tensor",
    "gather",
    "pick",
]

POOLS = ("flatten", "mean", "first")
"""How outputs of more than two dimensions become one row per sample."""


def pick(batch: Any, key: str | int | None, what: str) -> Any:
    """``batch[key]``, or a :class:`LoggedValueError` naming the option ``what``."""
    try:
        return batch[key]
    except (KeyError, IndexError, TypeError) as error:
        raise LoggedValueError(
            f"`{what}`={key!r} does not select anything in a batch of type "
            f"{type(batch).__name__} ({error}); set `{what}` or pass a function instead."
        ) from None


def first_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor in ``output`` (a tensor, or mappings and sequences of them)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        values: Iterable[Any] = output.values()
    elif isinstance(output, (list, tuple)):
        values = output
    else:
        return None
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


@contextlib.contextmanager
def capture_outputs(module: torch.nn.Module | None) -> Iterator[list[Any]]:
    """Yields a list that collects ``module``'s forward outputs; the hook goes on exit.

    Args:
        module: The module whose outputs to collect; ``None`` collects nothing.

    Example:
        >>> layer = torch.nn.Linear(3, 2)
        >>> with capture_outputs(layer) as outputs:
        ...     _ = layer(torch.zeros(4, 3))
        >>> outputs[0].shape
        torch.Size([4, 2])
    """
    captured: list[Any] = []
    handle = (
        None
        if module is None
        else module.register_forward_hook(lambda _m, _args, output: captured.append(output))
    )
    try:
        yield captured
    finally:
        if handle is not None:
            handle.remove()


def as_embeddings(output: Any, source: str, pool: str) -> torch.Tensor:
    """One detached ``(B, D)`` row per sample from a model or submodule output.

    Args:
        output: what ran (a tensor, or a structure holding one first).
        source: how the user chose it, for errors (``"embed_fn"``, ``"submodule 'x'"``).
        pool: one of :data:`POOLS`, for outputs of more than two dimensions.
    """
    tensor = first_tensor(output)
    if tensor is None:
        raise LoggedTypeError(
            f"The output of {source} holds no tensor (got {type(output).__name__}): "
            "embeddings must be a (B, D) tensor."
        )
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(1)
    elif tensor.ndim > 2:
        if pool == "mean":
            tensor = tensor.flatten(1, -2).float().mean(dim=1)
        elif pool == "first":
            tensor = tensor.flatten(1, -2)[:, 0]
        else:
            tensor = tensor.flatten(1)
    return tensor.detach()


def as_labels(value: Any, rows: int, index: int) -> list[Any]:
    """One label per embedding row of batch ``index`` (tensors become Python values)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist() if value.ndim else [value.item()]
    elif not isinstance(value, list):
        value = list(value)
    if len(value) != rows:
        raise LoggedValueError(
            f"Batch {index} has {rows} embeddings but {len(value)} labels: `label_key` / "
            "`label_fn` must give one label per sample."
        )
    return value


def as_images(value: Any, rows: int, index: int) -> torch.Tensor:
    """One thumbnail per embedding row of batch ``index``, on the CPU."""
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value)
    if value.shape[0] != rows:
        raise LoggedValueError(
            f"Batch {index} has {rows} embeddings but {value.shape[0]} images: `image_key` / "
            "`image_fn` must give one image per sample."
        )
    return value.detach().cpu()


def gather(
    embeddings: torch.Tensor | None,
    labels: list[Any] | None,
    images: torch.Tensor | None,
    *,
    device: torch.device,
) -> tuple[torch.Tensor | None, list[Any] | None, torch.Tensor | None]:
    """Every process's pieces concatenated in rank order, on every process.

    Collective: every process of the default group must call it. Embeddings stay on
    ``device`` (the collective's device), images come back on the CPU.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise UsageError(
            "Gathering embeddings needs torch.distributed to be initialised (world size > 1); "
            "run under a DDP strategy or `accelerate launch`."
        )
    embeddings = _gather_rows(embeddings, device)
    gathered_images = _gather_rows(images, device)
    images = None if gathered_images is None else gathered_images.cpu()
    if labels is not None:
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, labels)
        labels = [label for part in parts for label in part]
    return embeddings, labels, images


def _gather_rows(local: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """All-gathers tensors whose first dimension differs between processes (padded)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    meta = (
        (0, None, None)
        if local is None
        else (int(local.shape[0]), tuple(local.shape[1:]), local.dtype)
    )
    metas: list[Any] = [None] * world
    dist.all_gather_object(metas, meta)
    sizes = [m[0] for m in metas]
    shapes = {(m[1], m[2]) for m in metas if m[0] > 0}
    if not shapes:
        return None
    if len(shapes) > 1:
        raise UsageError(
            "Processes produced embeddings or images of different shapes or dtypes: "
            f"{sorted(map(str, shapes))}."
        )
    trailing, dtype = shapes.pop()
    padded = torch.zeros((max(sizes), *trailing), dtype=dtype, device=device)
    if local is not None and local.shape[0]:
        padded[: local.shape[0]] = local.to(device)
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded)
    return torch.cat([pieces[r][: sizes[r]] for r in range(world)])
