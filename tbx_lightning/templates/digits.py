"""The quickstart experiment: scikit-learn's 8x8 digits, a small CNN and its LightningModule.

``sklearn.datasets.load_digits`` reads 1,797 images from a file inside scikit-learn,
so nothing is downloaded. The network splits into a ``backbone`` that ends in the
penultimate-layer embedding and a ``head`` that classifies it; the projector logs the
backbone's output and the fine-tuning experiment swaps the head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tbx_lightning.errors import ConfigError
from tbx_lightning.templates.metrics import log_batch_metrics

__all__ = [
    "DigitsCNN",
    "DigitsClassifier",
    "DigitsDataModule",
    "accuracy",
    "digits_tensors",
    "split_digits",
    "sprite_images",
]

OptimizerFactory = Callable[..., torch.optim.Optimizer]


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``(images N x 1 x 8 x 8 in [0, 1], labels N)``."""
    # scikit-learn (a second or more to import) loads only when the digits are read, not
    # when a checkpoint of these models is rebuilt.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    return images, labels


def split_digits(
    val_fraction: float, seed: int, limit: int | None = None
) -> tuple[TensorDataset, TensorDataset]:
    """A seeded train/validation split of the digits; ``limit`` caps each part's size.

    Args:
        val_fraction: Share of the images held out for validation, in (0, 1).
        seed: Seed of the shuffle, so every run sees the same split.
        limit: At most this many training images (and validation images), for quick runs.

    Raises:
        ValueError: ``val_fraction`` is outside (0, 1) or ``limit`` is below 1.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(
            f"Expected data.val_fraction in (0, 1), got {val_fraction!r}: "
            "set data.val_fraction=0.2 or similar."
        )
    if limit is not None and limit < 1:
        raise ConfigError(f"Expected data.limit >= 1 or null, got {limit!r}.")
    images, labels = digits_tensors()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(len(labels) * val_fraction))
    val_idx, train_idx = order[:n_val], order[n_val:]
    if limit is not None:
        train_idx, val_idx = train_idx[:limit], val_idx[:limit]
    return (
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[val_idx], labels[val_idx]),
    )


def sprite_images(batch: tuple[torch.Tensor, torch.Tensor], scale: int = 4) -> torch.Tensor:
    """The batch's 8x8 digits scaled up ``scale`` times (nearest), as projector thumbnails."""
    return torch.nn.functional.interpolate(batch[0].float(), scale_factor=scale, mode="nearest")


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Share of rows whose arg-max equals the label."""
    return (logits.argmax(dim=-1) == labels).float().mean()


class DigitsDataModule(pl.LightningDataModule):
    """Train/validation loaders over scikit-learn's 8x8 digits (no download).

    Args:
        batch_size: Images per batch.
        val_fraction: Share of the 1,797 images held out for validation.
        limit: Cap on the number of training (and validation) images, for quick runs.
        num_workers: DataLoader worker processes; 0 loads in the main process.
        seed: Seed of the train/validation split.

    Example:
        >>> dm = DigitsDataModule(batch_size=32, limit=64)
        >>> dm.setup("fit")
        >>> images, labels = next(iter(dm.train_dataloader()))
        >>> tuple(images.shape)
        (32, 1, 8, 8)
    """

    classes: tuple[str, ...] = tuple(str(d) for d in range(10))

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        limit: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.limit = limit
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set = split_digits(self.val_fraction, self.seed, self.limit)

    def train_dataloader(self) -> DataLoader[Any]:
        self.setup("fit")
        assert self.train_set is not None  # set by setup()
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            generator=generator,
        )

    def val_dataloader(self) -> DataLoader[Any]:
        self.setup("fit")
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


class DigitsCNN(nn.Module):
    """Two conv blocks and a dense layer (the backbone, ending in the embedding) plus a head.

    Args:
        channels: Channels of the first conv block; the second has twice as many.
        embed_dim: Width of the penultimate layer, the embedding the projector shows.
        num_classes: Output classes.
        dropout: Dropout before the head.

    Example:
        >>> net = DigitsCNN(channels=8, embed_dim=16)
        >>> tuple(net(torch.zeros(2, 1, 8, 8)).shape)
        (2, 10)
    """

    def __init__(
        self, channels: int = 16, embed_dim: int = 64, num_classes: int = 10, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.backbone = nn.Sequential(
            nn.Conv2d(1, channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(channels, 2 * channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
            nn.Flatten(),
            nn.Linear(2 * channels * 4, embed_dim),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(embed_dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class DigitsClassifier(pl.LightningModule):
    """Cross-entropy training of an image classifier; logs loss and accuracy per split.

    Logged tags (see :mod:`tbx_lightning.templates.metrics`): ``train/loss`` per
    step, ``train/acc`` per epoch, and ``val/loss`` and ``val/acc`` per epoch; the Accelerate
    loop logs the same. The optimizer arrives as a partial from the config
    (``_partial_: true``), so its hyperparameters stay config keys.

    Args:
        net: The network; ``net.backbone`` gives the embeddings the projector logs.
        optimizer: Builds the optimizer from the parameters to train.
        scheduler: Optional; builds an LR scheduler from the optimizer (stepped per epoch).

    Example:
        >>> from functools import partial
        >>> model = DigitsClassifier(DigitsCNN(), partial(torch.optim.Adam, lr=1e-3))
    """

    #: When the LR scheduler steps: after every ``epoch`` (or ``step``), in both runners.
    scheduler_interval: ClassVar[str] = "epoch"

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: Callable[..., Any] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.loss_fn = nn.CrossEntropyLoss()
        self.example_input_array = torch.zeros(1, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def batch_metrics(self, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One batch's ``loss`` (cross-entropy) and ``acc``: what both runners log."""
        return {"loss": self.loss_fn(logits, labels), "acc": accuracy(logits, labels)}

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> torch.Tensor:
        images, labels = batch
        values = self.batch_metrics(self(images), labels)
        log_batch_metrics(self, split, values, batch_size=len(labels))
        return values["loss"]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> Any:
        return self._step(batch, "val")

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (all, unless a subclass freezes some)."""
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }
