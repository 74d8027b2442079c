"""The quickstart configs driving a plain PyTorch loop through ``Accelerator(log_with="tbx")``.

Run ``python examples/accelerate_quickstart.py [key=value ...]`` (the same overrides
``tbx-lightning fit quickstart_accelerate`` takes), or read the loop below: it is the
whole integration. The runnable template with monitors, progress and checkpoints is
``tbx_lightning/templates/accelerate_loop.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from accelerate import Accelerator
from hydra.utils import instantiate

import tbx_lightning  # noqa: F401  (registers the "tbx" tracker)
from tbx_lightning.cli import compose_config
from tbx_lightning.templates.digits import sprite_images
from tbx_lightning.templates.metrics import EpochMean


def main(overrides: Sequence[str] = ()) -> str:
    """Composes configs/experiment/quickstart_accelerate.yaml and trains; returns the run dir.

    It writes the tags ``tbx-lightning fit quickstart`` writes with Lightning, at the
    same steps: ``train/loss`` every ``log_every_n_steps``, ``train/acc`` (the epoch's
    mean) and ``val/*`` at each epoch's last step, the graph
    and 32x32 digit sprites rooted at the same module (``net.backbone``, ...).
    """
    cfg = compose_config("quickstart_accelerate", list(overrides))
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.num_threads or torch.get_num_threads())
    data = instantiate(cfg.data)
    data.setup("fit")
    model = instantiate(cfg.model)  # the LightningModule, used as a plain nn.Module
    optimizer = instantiate(cfg.model.optimizer)(params=model.parameters())

    accelerator = Accelerator(log_with="tbx", project_dir=cfg.paths.runs_dir, cpu=True)
    accelerator.init_trackers("accelerate_example", config=cfg)  # DictConfig -> HParams row
    tracker = accelerator.get_tracker("tbx", unwrap=False)
    model, optimizer, train, val = accelerator.prepare(
        model, optimizer, data.train_dataloader(), data.val_dataloader()
    )
    plain = accelerator.unwrap_model(model)
    tracker.log_graph(plain, plain.example_input_array)

    step, every = 0, cfg.trainer.log_every_n_steps
    for epoch in range(cfg.trainer.max_epochs):
        epoch_mean = EpochMean()
        for images, labels in train:
            values = plain.batch_metrics(model(images), labels)  # {"loss": ..., "acc": ...}
            accelerator.backward(values["loss"])
            optimizer.step()
            optimizer.zero_grad()
            epoch_mean.add(values, len(labels))
            if (step + 1) % every == 0:  # the steps Lightning logs at
                accelerator.log({"train/loss": values["loss"].item()}, step=step)
            step += 1
        val_mean = EpochMean()
        model.eval()
        with torch.no_grad():
            for images, labels in val:
                val_mean.add(plain.batch_metrics(model(images), labels), len(labels))
        model.train()
        at_epoch = {f"train/{k}": v for k, v in epoch_mean.means().items() if k != "loss"}
        at_epoch.update({f"val/{k}": v for k, v in val_mean.means().items()})
        accelerator.log({**at_epoch, "epoch": epoch}, step=step - 1)

    model.eval()
    with torch.no_grad():  # penultimate-layer embeddings, digit labels, 32x32 sprites
        images, labels = next(iter(val))
        feats = plain.net.backbone(images)
    tracker.log_embedding(
        "embeddings/penultimate",
        feats,
        metadata=[str(int(y)) for y in labels],
        label_img=sprite_images((images, labels)),
        step=step,
    )
    log_dir = str(tracker.log_dir)
    accelerator.end_training()
    print(f"tensorboard --logdir {cfg.paths.runs_dir}")
    return log_dir


if __name__ == "__main__":
    main(sys.argv[1:])
