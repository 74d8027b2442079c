"""The quickstart configs driving a plain PyTorch loop through ``Accelerator(log_with="tbx")``.

Run ``python examples/accelerate_quickstart.py [key=value ...]`` (the same overrides
``tbx-lightning fit quickstart_accelerate`` takes), or read the loop below: it is the
whole integration. The runnable template with monitors and checkpoints is
``tbx_lightning/templates/accelerate_loop.py``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from hydra.utils import instantiate

import tbx_lightning  # noqa: F401  (registers the "tbx" tracker)
from tbx_lightning.cli import compose_config


def main(overrides: Sequence[str] = ()) -> str:
    """Composes configs/experiment/quickstart_accelerate.yaml and trains; returns the run dir."""
    cfg = compose_config("quickstart_accelerate", list(overrides))
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.num_threads or torch.get_num_threads())
    data = instantiate(cfg.data)
    data.setup("fit")
    net = instantiate(cfg.model.net)
    optimizer = instantiate(cfg.model.optimizer)(params=net.parameters())

    accelerator = Accelerator(log_with="tbx", project_dir=cfg.paths.runs_dir, cpu=True)
    accelerator.init_trackers("accelerate_example", config=cfg)  # DictConfig -> HParams row
    tracker = accelerator.get_tracker("tbx", unwrap=False)
    net, optimizer, train, val = accelerator.prepare(
        net, optimizer, data.train_dataloader(), data.val_dataloader()
    )
    tracker.log_graph(accelerator.unwrap_model(net), next(iter(val))[0][:1])

    step = 0
    for _epoch in range(cfg.trainer.max_epochs):
        for images, labels in train:
            loss = F.cross_entropy(net(images), labels)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            accelerator.log({"train/loss": loss.item()}, step=step)
            step += 1
        with torch.no_grad():
            images, labels = next(iter(val))
            acc = (net(images).argmax(-1) == labels).float().mean().item()
        accelerator.log({"val/acc": acc}, step=step)

    with torch.no_grad():  # penultimate-layer embeddings, digit labels, image sprites
        images, labels = next(iter(val))
        feats = accelerator.unwrap_model(net).backbone(images)
    tracker.log_embedding(
        "embeddings/penultimate",
        feats,
        metadata=[str(int(y)) for y in labels],
        label_img=images,
        step=step,
    )
    log_dir = str(tracker.log_dir)
    accelerator.end_training()
    print(f"tensorboard --logdir {cfg.paths.runs_dir}")
    return log_dir


if __name__ == "__main__":
    main(sys.argv[1:])
