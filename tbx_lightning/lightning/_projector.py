"""``EmbeddingProjector``: a Lightning callback that dumps embeddings for TensorBoard's projector.

Every ``every_n_epochs`` epochs (and, optionally, before training and at its end)
the callback runs the model in eval mode over a dataloader, collects the output
of a named submodule (through a forward hook) or of a user function, with labels
and optional thumbnails from each batch, gathers the pieces of all processes to
global rank 0 and writes them through the logger's ``log_embedding`` (see
:func:`tbx_lightning.projector.log_embedding`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from tbx_lightning.errors import ConfigError, LoggedValueError, MissingDependencyError, UsageError
from tbx_lightning.projector._collect import (
    POOLS,
    as_embeddings,
    as_images,
    as_labels,
    capture_outputs,
    gather,
    pick,
)

try:
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import Callback
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "tbx_lightning.EmbeddingProjector needs Lightning: pip install 'tbx-lightning[lightning]'"
    ) from error

__all__ = ["EmbeddingProjector"]

_LOADERS = ("val", "train")


class EmbeddingProjector(Callback):
    """Logs embeddings of a dataloader to TensorBoard's projector during ``fit``.

    Each logging point runs one extra pass in eval mode under ``torch.no_grad``
    over the chosen dataloader (at most ``max_batches`` batches per process) and
    writes the embeddings at the current ``trainer.global_step``. Steps of one tag
    appear in the projector as separate tensors, ``"<tag>:<step:08d>"``, so
    ``log_before_fit=True`` puts the embeddings before and after fine-tuning side
    by side.

    Under DDP every process embeds its shard (the trainer's loaders are already
    sharded by Lightning's sampler, which may repeat up to ``world_size - 1``
    samples to even out shards; a loader passed in is sharded by batch index),
    the pieces are gathered to global rank 0 in rank order, and rank 0 writes.

    Args:
        module_name: Dotted name of the submodule whose output is the embedding
            (``"encoder.pooler"``; ``""`` for the LightningModule itself). The
            batch goes through ``forward_fn``; a hook captures the output. If the
            submodule runs several times in one forward, the last call counts.
        embed_fn: ``embed_fn(pl_module, batch) -> Tensor (B, D)``, instead of
            ``module_name``. Give exactly one of the two.
        forward_fn: ``forward_fn(pl_module, batch)`` runs the model for
            ``module_name``; default ``pl_module(batch[input_key])`` (the batch
            itself when it is a tensor).
        input_key: Index or key of the model input in the batch, for the default
            ``forward_fn``.
        pool: How an output with more than two dimensions becomes (B, D):
            ``"flatten"`` (all but the batch dimension), ``"mean"`` (average over
            the middle dimensions, e.g. tokens), ``"first"`` (first position, e.g.
            a CLS token).
        label_key: Index or key of the labels in the batch (``1`` for ``(x, y)``
            batches); tensors become one value per row.
        label_fn: ``label_fn(batch)`` returns the labels (one value, or one row of
            values with ``metadata_header``, per sample), instead of ``label_key``.
        metadata_header: Column names when ``label_fn`` returns rows.
        image_key: Index or key of images in the batch, shown as thumbnails.
        image_fn: ``image_fn(batch) -> Tensor (B, C, H, W) or (B, H, W)``, instead
            of ``image_key``. Images go to host memory batch by batch.
        every_n_epochs: Log after every n-th training epoch; 0 turns periodic
            logging off.
        log_before_fit: Also log at the start of training (step 0 in a new fit).
        log_at_fit_end: Also log at the end of training, unless this step was
            just logged.
        dataloader: ``"val"`` (the trainer's first validation loader by default),
            ``"train"``, or any iterable of batches.
        dataloader_idx: Which loader when the trainer has several.
        max_batches: At most this many batches per process and logging point;
            None for all. Bounds the time and memory of each pass.
        max_points: Points kept in the projector (a seeded sample, the same at
            every step); None keeps all.
        tag: Name of the embedding in the projector.

    Raises:
        ConfigError: At construction, for an inconsistent choice of options (a ``ValueError``).
        RuntimeError: At the start of ``fit``, when no logger of the trainer has
            ``log_embedding`` (use :class:`~tbx_lightning.TBXLogger`), or the
            submodule does not exist.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from tbx_lightning import EmbeddingProjector, TBXLogger
        >>> projector = EmbeddingProjector(
        ...     "encoder", label_key=1, image_key=0, log_before_fit=True, every_n_epochs=0
        ... )
        >>> trainer = Trainer(logger=TBXLogger("runs"), callbacks=[projector])  # doctest: +SKIP
    """

    def __init__(
        self,
        module_name: str | None = None,
        embed_fn: Callable[[LightningModule, Any], torch.Tensor] | None = None,
        *,
        forward_fn: Callable[[LightningModule, Any], Any] | None = None,
        input_key: str | int = 0,
        pool: str = "flatten",
        label_key: str | int | None = None,
        label_fn: Callable[[Any], Any] | None = None,
        metadata_header: Sequence[str] | None = None,
        image_key: str | int | None = None,
        image_fn: Callable[[Any], Any] | None = None,
        every_n_epochs: int = 1,
        log_before_fit: bool = False,
        log_at_fit_end: bool = True,
        dataloader: str | Iterable[Any] = "val",
        dataloader_idx: int = 0,
        max_batches: int | None = None,
        max_points: int | None = 10_000,
        tag: str = "embeddings",
    ) -> None:
        if (module_name is None) == (embed_fn is None):
            raise ConfigError(
                "EmbeddingProjector needs exactly one of `module_name` (a submodule whose "
                "output is hooked; '' for the whole model) and `embed_fn` (a function of "
                "(pl_module, batch))."
            )
        if embed_fn is not None and forward_fn is not None:
            raise ConfigError(
                "`forward_fn` is used with `module_name` only; `embed_fn` runs the model itself."
            )
        if pool not in POOLS:
            raise ConfigError(f"`pool` must be one of {POOLS}, got {pool!r}.")
        if label_key is not None and label_fn is not None:
            raise ConfigError("Pass `label_key` or `label_fn`, not both.")
        if image_key is not None and image_fn is not None:
            raise ConfigError("Pass `image_key` or `image_fn`, not both.")
        if isinstance(dataloader, str) and dataloader not in _LOADERS:
            raise ConfigError(
                f"`dataloader` must be one of {_LOADERS} or an iterable of batches, got {dataloader!r}."
            )
        if every_n_epochs < 0:
            raise ConfigError(
                f"`every_n_epochs` must be >= 0 (0 turns it off), got {every_n_epochs}."
            )
        if max_batches is not None and max_batches < 1:
            raise ConfigError(f"`max_batches` must be >= 1 or None, got {max_batches}.")
        if max_points is not None and max_points < 1:
            raise ConfigError(f"`max_points` must be >= 1 or None, got {max_points}.")
        if not isinstance(tag, str) or not tag:
            raise ConfigError(f"`tag` must be a non-empty str, got {tag!r}.")
        self.module_name = module_name
        self.embed_fn = embed_fn
        self.forward_fn = forward_fn
        self.input_key = input_key
        self.pool = pool
        self.label_key = label_key
        self.label_fn = label_fn
        self.metadata_header = metadata_header
        self.image_key = image_key
        self.image_fn = image_fn
        self.every_n_epochs = every_n_epochs
        self.log_before_fit = log_before_fit
        self.log_at_fit_end = log_at_fit_end
        self.dataloader = dataloader
        self.dataloader_idx = dataloader_idx
        self.max_batches = max_batches
        self.max_points = max_points
        self.tag = tag
        self._last_step: int | None = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._logger(trainer)
        if self.module_name is not None:
            self._submodule(pl_module)
        self._last_step = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.log_before_fit:
            self.log_now(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.log_now(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.log_at_fit_end and self._last_step != trainer.global_step:
            self.log_now(trainer, pl_module)

    # ------------------------------------------------------------------ the pass
    def log_now(self, trainer: Trainer, pl_module: LightningModule) -> Any:
        """Collects and logs the embeddings at ``trainer.global_step``; all processes must call it.

        Returns the logger's result on global rank 0 (an
        :class:`~tbx_lightning.projector.EmbeddingRecord` with ``TBXLogger``), None elsewhere
        or when the dataloader yielded nothing on every process.
        """
        logger = self._logger(trainer)
        step = trainer.global_step
        embeddings, labels, images = self._collect(trainer, pl_module)
        if trainer.world_size > 1:
            embeddings, labels, images = gather(
                embeddings, labels, images, device=trainer.strategy.root_device
            )
        self._last_step = step
        if embeddings is None or not trainer.is_global_zero:
            return None
        return logger.log_embedding(
            self.tag,
            embeddings,
            metadata=labels,
            metadata_header=self.metadata_header if labels is not None else None,
            label_img=images,
            step=step,
            max_points=self.max_points,
        )

    def _collect(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> tuple[torch.Tensor | None, list[Any] | None, torch.Tensor | None]:
        loader, shard = self._loader(trainer)
        rank, world = trainer.global_rank, trainer.world_size
        hooked = self._submodule(pl_module) if self.module_name is not None else None
        parts: list[torch.Tensor] = []
        labels: list[Any] | None = [] if self._wants_labels else None
        images: list[torch.Tensor] | None = [] if self._wants_images else None
        was_training = pl_module.training
        pl_module.eval()
        try:
            with (
                capture_outputs(hooked) as captured,
                torch.no_grad(),
                trainer.precision_plugin.val_step_context(),
            ):
                taken = 0
                for i, batch in enumerate(loader):
                    if shard and world > 1 and i % world != rank:
                        continue
                    if self.max_batches is not None and taken >= self.max_batches:
                        break
                    taken += 1
                    batch = trainer.strategy.batch_to_device(batch)
                    captured.clear()
                    emb = self._embed(pl_module, batch, captured)
                    parts.append(emb)
                    if labels is not None:
                        labels.extend(self._labels(batch, emb.shape[0], i))
                    if images is not None:
                        images.append(self._images(batch, emb.shape[0], i))
        finally:
            pl_module.train(was_training)
        if not parts:
            return None, None, None
        return (
            torch.cat(parts),
            labels,
            torch.cat(images) if images else None,
        )

    @property
    def _wants_labels(self) -> bool:
        return self.label_key is not None or self.label_fn is not None

    @property
    def _wants_images(self) -> bool:
        return self.image_key is not None or self.image_fn is not None

    def _embed(self, pl_module: LightningModule, batch: Any, captured: list[Any]) -> torch.Tensor:
        if self.embed_fn is not None:
            return as_embeddings(self.embed_fn(pl_module, batch), "embed_fn", self.pool)
        if self.forward_fn is not None:
            self.forward_fn(pl_module, batch)
        else:
            pl_module(
                batch
                if isinstance(batch, torch.Tensor)
                else pick(batch, self.input_key, "input_key")
            )
        if not captured:
            raise UsageError(
                f"Submodule {self.module_name!r} did not run in the forward pass: pass a "
                "`forward_fn` that calls it, or another `module_name`."
            )
        return as_embeddings(captured[-1], f"submodule {self.module_name!r}", self.pool)

    def _labels(self, batch: Any, rows: int, index: int) -> list[Any]:
        value = (
            self.label_fn(batch)
            if self.label_fn is not None
            else pick(batch, self.label_key, "label_key")
        )
        return as_labels(value, rows, index)

    def _images(self, batch: Any, rows: int, index: int) -> torch.Tensor:
        value = (
            self.image_fn(batch)
            if self.image_fn is not None
            else pick(batch, self.image_key, "image_key")
        )
        return as_images(value, rows, index)

    # ------------------------------------------------------------------ lookups
    def _logger(self, trainer: Trainer) -> Any:
        for logger in trainer.loggers:
            if callable(getattr(logger, "log_embedding", None)):
                return logger
        names = [type(lg).__name__ for lg in trainer.loggers] or ["no logger"]
        raise UsageError(
            "EmbeddingProjector writes through a logger with `log_embedding`, but the trainer has "
            f"{', '.join(names)}: use Trainer(logger=tbx_lightning.TBXLogger(...))."
        )

    def _submodule(self, pl_module: LightningModule) -> torch.nn.Module:
        name = self.module_name or ""
        try:
            return pl_module.get_submodule(name)
        except AttributeError:
            known = [n for n, _ in pl_module.named_modules() if n][:12]
            raise UsageError(
                f"EmbeddingProjector: {type(pl_module).__name__} has no submodule {name!r}; "
                f"some that exist: {known}."
            ) from None

    def _loader(self, trainer: Trainer) -> tuple[Iterable[Any], bool]:
        source = self.dataloader
        if not isinstance(source, str):
            return source, True
        if source == "train":
            loaders = trainer.train_dataloader
        else:
            loaders = trainer.val_dataloaders
            if loaders is None:
                # Not built yet (before the first validation): build them as the fit loop would.
                trainer.fit_loop.epoch_loop.val_loop.setup_data()
                loaders = trainer.val_dataloaders
        if loaders is None:
            raise UsageError(
                f"EmbeddingProjector: the trainer has no {source!r} dataloader (no "
                f"{'validation_step, or limit_val_batches=0' if source == 'val' else 'training data'}"
                "); pass dataloader='train' or a DataLoader."
            )
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        if isinstance(loaders, (list, tuple)):
            if not 0 <= self.dataloader_idx < len(loaders):
                raise LoggedValueError(
                    f"`dataloader_idx` is {self.dataloader_idx} but the trainer has "
                    f"{len(loaders)} {source} dataloaders."
                )
            return loaders[self.dataloader_idx], False
        return loaders, False
