"""The smallest Accelerate loop with the "tbx" tracker, driven by an OmegaConf config.

Run it on one process, or on several with ``accelerate launch``::

    python examples/accelerate_minimal.py
    python examples/accelerate_minimal.py optim.lr=0.05 train.steps=200
    accelerate launch --num_processes 2 examples/accelerate_minimal.py

then ``tensorboard --logdir runs``. Each run lands in ``runs/accelerate-minimal/version_N``
with its config as HParams columns and in ``config.yaml``; a run that crashes is
marked as failed in the HParams table.
"""

from __future__ import annotations

from typing import cast

import torch
from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf

import tbx_lightning  # noqa: F401  (registers log_with="tbx")

DEFAULTS = """
project: accelerate-minimal
project_dir: runs
seed: 0
model:
  hidden: 16
  activation: tanh
optim:
  lr: 0.01
  betas: [0.9, 0.999]
train:
  steps: 100
  batch_size: 32
  log_every: 10
  histogram_every: 50
"""


def make_config() -> DictConfig:
    """Defaults above, overridden by ``key=value`` pairs on the command line."""
    return cast(DictConfig, OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.from_cli()))


def train(cfg: DictConfig, accelerator: Accelerator) -> None:
    torch.manual_seed(cfg.seed)
    activation = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}[cfg.model.activation]
    model = torch.nn.Sequential(
        torch.nn.Linear(2, cfg.model.hidden), activation(), torch.nn.Linear(cfg.model.hidden, 1)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    model, optimizer = accelerator.prepare(model, optimizer)

    for step in range(cfg.train.steps):
        x = torch.rand(cfg.train.batch_size, 2, device=accelerator.device) * 4 - 2
        target = (x[:, :1] * x[:, 1:]).sin()
        loss = torch.nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        accelerator.backward(loss)
        optimizer.step()

        if step % cfg.train.log_every == 0 or step == cfg.train.steps - 1:
            # Tensors are fine: one device-to-host transfer for the whole dict.
            accelerator.log(
                {"train": {"loss": loss.detach(), "lr": optimizer.param_groups[0]["lr"]}},
                step=step,
            )
        if step % cfg.train.histogram_every == 0 and accelerator.is_main_process:
            weights = accelerator.unwrap_model(model)[0].weight
            accelerator.get_tracker("tbx").log_histograms({"weights/layer0": weights}, step=step)


def main() -> None:
    cfg = make_config()
    accelerator = Accelerator(log_with="tbx", project_dir=cfg.project_dir)
    accelerator.init_trackers(cfg.project, config=cfg)
    try:
        train(cfg, accelerator)
    except BaseException:
        # Without this the run would stay "running"; end_training() below keeps "failed".
        if accelerator.is_main_process:
            accelerator.get_tracker("tbx").finish(status="failed")
        raise
    finally:
        accelerator.end_training()
    if accelerator.is_main_process:
        print(f"TensorBoard run: {accelerator.get_tracker('tbx').log_dir}")


if __name__ == "__main__":
    main()
