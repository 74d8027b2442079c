"""The finetune experiment: a classifier checkpoint's backbone, frozen, under a new head.

Checkpoints written by ``tbx-lightning fit`` carry the composed config
(``checkpoint["tbx_lightning_config"]``), so the backbone is rebuilt from the
checkpoint alone: no second copy of the network's settings in the fine-tuning config.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from tbx_lightning.errors import ConfigError
from tbx_lightning.templates.digits import DigitsClassifier, OptimizerFactory
from tbx_lightning.templates.runner import CONFIG_KEY

__all__ = ["FinetuneClassifier", "FinetuneNet", "load_backbone"]


def load_backbone(ckpt_path: str) -> tuple[nn.Module, int]:
    """Rebuilds ``net.backbone`` of a classifier checkpoint; returns it and its output width.

    Raises:
        ValueError: The checkpoint was not written by ``tbx-lightning fit`` for a model
            with a ``net.backbone`` (e.g. the quickstart classifier).
    """
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    config = checkpoint.get(CONFIG_KEY)
    net_cfg = (config or {}).get("model", {}).get("net")
    if net_cfg is None:
        raise ConfigError(
            f"model.ckpt_path={ckpt_path!r} has no model.net config: fine-tune a checkpoint "
            "that `tbx-lightning fit quickstart` wrote (its runs/.../checkpoints/last.ckpt)."
        )
    net = instantiate(net_cfg)
    prefix = "net."
    state = {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }
    net.load_state_dict(state)
    backbone = getattr(net, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ConfigError(
            f"The network in {ckpt_path!r} ({type(net).__name__}) has no `backbone` submodule."
        )
    return backbone, int(getattr(net, "embed_dim", net_cfg.get("embed_dim", 0)))


class FinetuneNet(nn.Module):
    """A pretrained backbone and a new two-layer head; ``head.1`` outputs the new embedding."""

    def __init__(
        self, backbone: nn.Module, embed_dim: int, hidden: int, num_classes: int, dropout: float
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(
            nn.Linear(embed_dim, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class FinetuneClassifier(DigitsClassifier):
    """Loads a classifier checkpoint, optionally freezes its backbone, trains a new head.

    The new head's hidden layer (``net.head.1``) is the network's penultimate layer; the
    projector logs it before fine-tuning (step 0, a random projection of the frozen
    features) and after, as two steps of one tag.

    Args:
        ckpt_path: A checkpoint written by ``tbx-lightning fit quickstart``.
        optimizer: Builds the optimizer from the trainable parameters (a config partial).
        freeze_backbone: Keep the backbone's weights fixed (and in eval mode).
        head_hidden: Width of the new head's hidden layer.
        num_classes: Output classes of the new head.
        dropout: Dropout inside the new head.
        scheduler: Optional LR scheduler factory.

    Example:
        >>> # after `tbx-lightning fit quickstart`:
        >>> # FinetuneClassifier("runs/quickstart/version_0/checkpoints/last.ckpt", partial(Adam))
    """

    def __init__(
        self,
        ckpt_path: str,
        optimizer: OptimizerFactory,
        freeze_backbone: bool = True,
        head_hidden: int = 32,
        num_classes: int = 10,
        dropout: float = 0.1,
        scheduler: Callable[..., Any] | None = None,
    ) -> None:
        backbone, embed_dim = load_backbone(ckpt_path)
        net = FinetuneNet(backbone, embed_dim, head_hidden, num_classes, dropout)
        super().__init__(net, optimizer, scheduler)
        self.ckpt_path = ckpt_path
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            for parameter in backbone.parameters():
                parameter.requires_grad_(False)

    def on_train_epoch_start(self) -> None:
        if self.freeze_backbone:
            self.net.backbone.eval()  # type: ignore[union-attr]
