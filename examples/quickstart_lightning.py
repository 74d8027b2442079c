"""The quickstart without configs: TBXLogger, the projector and the monitor in plain Python.

Run ``python examples/quickstart_lightning.py`` (about 10 s on two CPU cores), then
``tensorboard --logdir runs/quickstart_python``. ``tbx-lightning fit`` builds the same
objects from configs/experiment/quickstart.yaml.
"""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import torch
from omegaconf import OmegaConf

from tbx_lightning import EmbeddingProjector, TBXLogger, TrainingMonitor
from tbx_lightning.templates.digits import (
    DigitsClassifier,
    DigitsCNN,
    DigitsDataModule,
    sprite_images,
)


def main(max_epochs: int = 10, save_dir: str = "runs") -> str:
    """Trains the digits CNN; returns the run directory."""
    torch.set_num_threads(1)  # tiny model: one thread is fastest on a shared CPU
    config = OmegaConf.create(
        {
            "model": {"channels": 16, "embed_dim": 64, "lr": 3e-3},
            "data": {"batch_size": 64, "val_fraction": 0.2},
            "trainer": {"max_epochs": max_epochs},
        }
    )
    pl.seed_everything(42, verbose=False)
    net = DigitsCNN(channels=config.model.channels, embed_dim=config.model.embed_dim)
    model = DigitsClassifier(net, partial(torch.optim.Adam, lr=config.model.lr))
    data = DigitsDataModule(**config.data)
    logger = TBXLogger(save_dir, name="quickstart_python", log_graph=True)
    logger.log_hyperparams(config)  # HParams columns: model.lr, data.batch_size, ...
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=config.trainer.max_epochs,
        logger=logger,
        log_every_n_steps=5,
        enable_progress_bar=False,
        callbacks=[
            EmbeddingProjector(
                "net.backbone",
                label_key=1,
                image_fn=sprite_images,
                tag="embeddings/penultimate",
                every_n_epochs=5,
            ),
            TrainingMonitor(group_depth=3, hist_every_n_steps=25, norm_every_n_steps=5),
        ],
    )
    trainer.fit(model, datamodule=data)
    print(f"tensorboard --logdir {logger.root_dir}")
    return str(logger.log_dir)


if __name__ == "__main__":
    main()
