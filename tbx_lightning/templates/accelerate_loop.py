"""The quickstart configs driving a plain PyTorch loop through ``Accelerator(log_with="tbx")``.

What Lightning's Trainer does for the other experiments is written out here by hand:
the same ``data``, ``model.net`` and ``model.optimizer`` configs, the same tags
(``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``), the graph, weight and
gradient monitors and the penultimate-layer embeddings, all through the tracker.
Settings come from the composed config:

- ``trainer.max_epochs``, ``trainer.limit_train_batches`` (an int caps batches per
  epoch), ``trainer.log_every_n_steps``, ``trainer.accelerator`` (``cpu`` forces the CPU);
- ``logger.tbx.save_dir`` / ``logger.tbx.name``: the run directory;
- ``callbacks.training_monitor`` / ``callbacks.embedding_projector``: present turns them on;
  the monitor's arguments that :class:`~tbx_lightning.ModelMonitor` takes are passed on.
"""

from __future__ import annotations

import inspect
import os
import time
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from tbx_lightning.templates.runner import (
    CONFIG_KEY,
    BuildError,
    RunResult,
    absolute,
    cpu_threads,
    hyperparameters,
    instantiate_node,
)

__all__ = ["penultimate", "run"]


def penultimate(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The input of the network's last layer: ``net.backbone(x)`` when there is a backbone."""
    backbone = getattr(net, "backbone", None)
    if isinstance(backbone, nn.Module):
        return backbone(images)
    raise BuildError(
        f"{type(net).__name__} has no `backbone` submodule to take embeddings from: "
        "remove callbacks.embedding_projector or give the network a backbone."
    )


def _logger_node(cfg: DictConfig) -> DictConfig:
    for node in (cfg.get("logger") or {}).values():
        if isinstance(node, DictConfig) and "save_dir" in node:
            return node
    raise BuildError("The accelerate runner needs logger.tbx.save_dir and logger.tbx.name.")


def _monitor_options(node: Any) -> dict[str, Any]:
    from tbx_lightning.monitor import ModelMonitor

    accepted = set(inspect.signature(ModelMonitor.__init__).parameters) - {"self", "model", "sink"}
    options = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else {}
    return {k: v for k, v in (options or {}).items() if k in accepted}  # type: ignore[union-attr]


def _batch_cap(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None  # a float share of 1.0 means every batch


def _flat(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classification ``(B, C), (B,)`` and language modelling ``(B, T, V), (B, T)`` alike."""
    return logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)


def _evaluate(net: nn.Module, loader: Any, accelerator: Any) -> tuple[float, float]:
    net.eval()
    total_loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in loader:
            logits = net(images)
            logits, labels = accelerator.gather_for_metrics((logits, labels))
            logits, labels = _flat(logits, labels)
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            count += int(labels.numel())
    net.train()
    return total_loss / max(1, count), correct / max(1, count)


def run(cfg: DictConfig) -> RunResult:
    """Trains ``cfg.model.net`` with ``cfg.model.optimizer`` on ``cfg.data`` via Accelerate.

    Raises:
        BuildError: A part of the config cannot be built; nothing has been written.
    """
    with cpu_threads(cfg.get("num_threads")):
        return _run(cfg)


def _run(cfg: DictConfig) -> RunResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    import tbx_lightning  # noqa: F401  (registers the "tbx" tracker)

    set_seed(int(cfg.seed))
    datamodule = instantiate_node(cfg, "data")
    datamodule.setup("fit")
    net = instantiate_node(cfg, "model.net")
    optimizer = instantiate_node(cfg, "model.optimizer")(params=net.parameters())
    trainer_cfg = cfg.trainer
    logger_cfg = _logger_node(cfg)
    accelerator = Accelerator(
        log_with="tbx",
        project_dir=str(logger_cfg.save_dir),
        cpu=str(trainer_cfg.get("accelerator", "auto")) == "cpu",
    )
    accelerator.init_trackers(str(logger_cfg.name), config=hyperparameters(cfg))
    tracker = accelerator.get_tracker("tbx", unwrap=False)
    log_dir = absolute(str(tracker.log_dir))
    started = time.time()
    metrics: dict[str, float] = {}
    error: BaseException | None = None
    try:
        metrics = _train(cfg, accelerator, tracker, datamodule, net, optimizer)
    except Exception as exc:  # recorded as a failed run; the caller decides what to do
        error = exc
        tracker.finish("failed")
    finally:
        accelerator.end_training()
    return RunResult(
        log_dir=log_dir,
        experiment_dir=os.path.dirname(log_dir.rstrip("/")),
        status="failed" if error is not None else "success",
        seconds=time.time() - started,
        metrics=metrics,
        checkpoint=os.path.join(log_dir, "checkpoints", "last.pt") if error is None else None,
        error=error,
    )


def _train(
    cfg: DictConfig,
    accelerator: Any,
    tracker: Any,
    datamodule: Any,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> dict[str, float]:
    from tbx_lightning.monitor import ModelMonitor

    trainer_cfg = cfg.trainer
    callbacks: Any = cfg.get("callbacks") or {}
    train_loader, val_loader = datamodule.train_dataloader(), datamodule.val_dataloader()
    net, optimizer, train_loader, val_loader = accelerator.prepare(
        net, optimizer, train_loader, val_loader
    )
    plain = accelerator.unwrap_model(net)
    example = next(iter(val_loader))[0][:1]
    tracker.log_graph(plain, example, step=0)
    monitor = None
    if "training_monitor" in callbacks:
        sink = tracker.run_writer if accelerator.is_main_process else None
        monitor = ModelMonitor(plain, sink, **_monitor_options(callbacks.training_monitor))
        monitor.attach(optimizer)

    projector = callbacks.get("embedding_projector") if "embedding_projector" in callbacks else None
    # As the Lightning callback does: before fit if asked, every n epochs, and at fit end.
    every_n_epochs = int(projector.get("every_n_epochs") or 0) if projector is not None else 0
    logged_at: int | None = None
    if projector is not None and projector.get("log_before_fit"):
        _log_embeddings(cfg, plain, val_loader, accelerator, tracker, 0)
        logged_at = 0
    max_epochs = int(trainer_cfg.get("max_epochs") or 1)
    cap = _batch_cap(trainer_cfg.get("limit_train_batches"))
    every = max(1, int(trainer_cfg.get("log_every_n_steps") or 1))
    step = 0
    metrics: dict[str, float] = {}
    try:
        for epoch in range(max_epochs):
            for index, (images, labels) in enumerate(train_loader):
                if cap is not None and index >= cap:
                    break
                if monitor is not None:
                    monitor.start_flop_count()  # the first step only
                if hasattr(plain, "train_step"):
                    plain.train_step = step  # the step a network with fault injection sees
                logits, targets = _flat(net(images), labels)
                loss = F.cross_entropy(logits, targets)
                accelerator.backward(loss)
                if monitor is not None:
                    monitor.after_backward(step)
                optimizer.step()
                optimizer.zero_grad()
                if hasattr(plain, "train_step"):
                    plain.train_step = None
                if monitor is not None:
                    monitor.stop_flop_count()
                    monitor.observe_loss(step, loss)
                    if labels.dim() > 1:  # tokens
                        monitor.log_throughput(step, tokens=int(labels.numel()))
                    else:
                        monitor.log_throughput(step, samples=int(labels.numel()))
                if step % every == 0:
                    acc = (logits.argmax(-1) == targets).float().mean()
                    accelerator.log({"train/loss": loss.detach(), "train/acc": acc}, step=step)
                step += 1
                if monitor is not None and monitor.should_stop:
                    break  # an alert with on_alert="stop": end cleanly, keep the checkpoint
            if monitor is not None and monitor.should_stop:
                break
            val_loss, val_acc = _evaluate(net, val_loader, accelerator)
            metrics = {"val/loss": val_loss, "val/acc": val_acc, "epoch": float(epoch)}
            accelerator.log(metrics, step=step)
            if projector is not None and every_n_epochs and (epoch + 1) % every_n_epochs == 0:
                _log_embeddings(cfg, plain, val_loader, accelerator, tracker, step)
                logged_at = step
        at_end = projector is not None and projector.get("log_at_fit_end", True)
        if at_end and logged_at != step:
            _log_embeddings(cfg, plain, val_loader, accelerator, tracker, step)
        if accelerator.is_main_process:
            _save_checkpoint(cfg, plain, str(tracker.log_dir))
    finally:
        if monitor is not None:
            monitor.stop_flop_count()
            monitor.detach()
    return metrics


def _log_embeddings(
    cfg: DictConfig, net: nn.Module, loader: Any, accelerator: Any, tracker: Any, step: int
) -> None:
    node = cfg.callbacks.embedding_projector
    tag = str(node.get("tag") or "embeddings/penultimate")
    if node.get("embed_fn") is not None:
        _log_custom_embeddings(node, tag, net, tracker, step)
        return
    from hydra.utils import instantiate

    limit = node.get("max_points") or 1000
    # The same thumbnails as the Lightning callback (e.g. the digits scaled up to 32x32).
    image_fn = instantiate(node.image_fn) if node.get("image_fn") is not None else None
    feats, labels, images = [], [], []
    net.eval()
    with torch.no_grad():
        for batch_images, batch_labels in loader:
            feats.append(accelerator.gather_for_metrics(penultimate(net, batch_images)).cpu())
            labels.append(accelerator.gather_for_metrics(batch_labels).cpu())
            thumbs = image_fn((batch_images, batch_labels)) if image_fn else batch_images
            images.append(accelerator.gather_for_metrics(thumbs).cpu())
            if sum(len(x) for x in labels) >= limit:
                break
    net.train()
    mat = torch.cat(feats)[:limit]
    classes = [str(int(y)) for y in torch.cat(labels)[:limit]]
    tracker.log_embedding(
        tag, mat, metadata=classes, label_img=torch.cat(images)[:limit], step=step
    )


def _log_custom_embeddings(node: Any, tag: str, net: nn.Module, tracker: Any, step: int) -> None:
    """The projector config's own ``embed_fn``/``label_fn`` over its ``dataloader`` batches."""
    from hydra.utils import instantiate

    embed_fn = instantiate(node.embed_fn)
    label_fn = instantiate(node.label_fn) if node.get("label_fn") is not None else None
    batches = instantiate(node.dataloader)
    feats: list[torch.Tensor] = []
    labels: list[str] = []
    net.eval()
    with torch.no_grad():
        for batch in batches:
            feats.append(embed_fn(net, batch).detach().cpu())
            if label_fn is not None:
                labels.extend(str(v) for v in label_fn(batch))
    net.train()
    tracker.log_embedding(tag, torch.cat(feats), metadata=labels or None, step=step)


def _save_checkpoint(cfg: DictConfig, net: nn.Module, log_dir: str) -> None:
    folder = os.path.join(log_dir, "checkpoints")
    os.makedirs(folder, exist_ok=True)
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save(
        {"state_dict": state, CONFIG_KEY: OmegaConf.to_container(cfg, resolve=True)},
        os.path.join(folder, "last.pt"),
    )
