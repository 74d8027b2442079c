"""The template configs driving a plain PyTorch loop through ``Accelerator(log_with="tbx")``.

What Lightning's Trainer does for the other experiments is written out here by hand,
over the same configs, so that a run of either runner lands in the same TensorBoard
cards: the ``data`` config, the ``model`` config's module (used as a plain
``nn.Module``: its network, its ``batch_metrics`` and its scheduler interval) and
``model.optimizer`` / ``model.scheduler``. Tags and steps are those of
:mod:`tbx_lightning.templates.metrics` (``train/loss`` per step, ``train/acc`` per
epoch, ``val/loss``, ...); the graph, the monitor's groups (``net.backbone.0``) and the
projector's entries are rooted at the module, as Lightning's are. Settings come from
the composed config:

- ``trainer.max_epochs``, ``trainer.limit_train_batches`` / ``limit_val_batches`` (an
  int caps batches per epoch), ``trainer.log_every_n_steps``,
  ``trainer.gradient_clip_val`` (clips the gradient norm), ``trainer.accelerator``
  (``cpu`` forces the CPU), ``trainer.enable_progress_bar``;
- ``logger.tbx.save_dir`` / ``logger.tbx.name``: the run directory;
- ``callbacks.training_monitor`` / ``callbacks.embedding_projector``: present turns them on;
  the monitor's arguments that :class:`~tbx_lightning.monitor.ModelMonitor` takes are passed on.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

import tbx_lightning  # noqa: F401  (registers the "tbx" tracker with accelerate)
from tbx_lightning.projector import as_embeddings, capture_outputs
from tbx_lightning.templates.metrics import STEP_METRIC, EpochMean, train_tag, val_tag
from tbx_lightning.templates.progress import LoopProgress
from tbx_lightning.templates.runner import (
    CONFIG_KEY,
    ConfigError,
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
    raise ConfigError(
        f"{type(net).__name__} has no `backbone` submodule to take embeddings from: "
        "remove callbacks.embedding_projector or give the network a backbone."
    )


# Options of the logger config that the tracker takes too, under the same names.
# Where Lightning's `epoch` goes with TBXLogger's default `epoch_tag`: the same run on both runners.
EPOCH_TAG = "trainer/epoch"
_SHARED_OPTIONS = ("hparams_exclude", "mask_secrets", "flush_secs", "max_queue")


def _tracker_options(node: DictConfig) -> dict[str, Any]:
    """The logger config's options that mean the same for ``TBXTracker``."""
    options = {}
    for key in _SHARED_OPTIONS:
        value = node.get(key)
        if value is not None:
            options[key] = OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
    return options


def _logger_node(cfg: DictConfig) -> DictConfig:
    for node in (cfg.get("logger") or {}).values():
        if isinstance(node, DictConfig) and "save_dir" in node:
            return node
    raise ConfigError("The accelerate runner needs logger.tbx.save_dir and logger.tbx.name.")


def _monitor_options(node: Any) -> dict[str, Any]:
    from tbx_lightning.monitor import MonitorOptions

    accepted = {field.name for field in dataclasses.fields(MonitorOptions)}
    options = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else {}
    return {k: v for k, v in (options or {}).items() if k in accepted}  # type: ignore[union-attr]


def _batch_cap(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None  # null or a float share of 1.0 means every batch


def _metrics_of(module: nn.Module) -> Any:
    batch_metrics = getattr(module, "batch_metrics", None)
    if not callable(batch_metrics):
        raise ConfigError(
            f"{type(module).__name__} (model._target_) has no `batch_metrics(logits, targets)` "
            "method: the accelerate runner logs what it returns (see "
            "tbx_lightning.templates.metrics)."
        )
    return batch_metrics


def _evaluate(
    module: nn.Module, loader: Any, accelerator: Any, cap: int | None
) -> dict[str, float]:
    """``val/<name>``: batch-size-weighted means of the module's metrics, as Lightning logs."""
    batch_metrics = _metrics_of(accelerator.unwrap_model(module))
    mean = EpochMean()
    module.eval()
    with torch.no_grad():
        for index, (inputs, targets) in enumerate(loader):
            if cap is not None and index >= cap:
                break
            logits = module(inputs)
            logits, targets = accelerator.gather_for_metrics((logits, targets))
            mean.add(batch_metrics(logits, targets), len(targets))
    module.train()
    return {val_tag(name): value for name, value in mean.means().items()}


def run(cfg: DictConfig) -> RunResult:
    """Trains ``cfg.model`` with ``cfg.model.optimizer`` on ``cfg.data`` via Accelerate.

    Raises:
        ConfigError: A part of the config cannot be built; nothing has been written.
    """
    with cpu_threads(cfg.get("num_threads")):
        return _run(cfg)


def _run(cfg: DictConfig) -> RunResult:
    set_seed(int(cfg.seed))
    datamodule = instantiate_node(cfg, "data")
    datamodule.setup("fit")
    module = instantiate_node(cfg, "model")
    _metrics_of(module)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = instantiate_node(cfg, "model.optimizer")(params=trainable)
    trainer_cfg = cfg.trainer
    logger_cfg = _logger_node(cfg)
    accelerator = Accelerator(
        log_with="tbx",
        project_dir=str(logger_cfg.save_dir),
        cpu=str(trainer_cfg.get("accelerator", "auto")) == "cpu",
    )
    accelerator.init_trackers(
        str(logger_cfg.name),
        config=hyperparameters(cfg),
        init_kwargs={"tbx": _tracker_options(logger_cfg)},
    )
    tracker = accelerator.get_tracker("tbx", unwrap=False)
    log_dir = absolute(str(tracker.log_dir))
    started = time.time()
    metrics: dict[str, float] = {}
    error: BaseException | None = None
    try:
        _train(cfg, accelerator, tracker, datamodule, module, optimizer, metrics)
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


def _scheduler(module: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """The module's LR scheduler, as its ``configure_optimizers`` builds it for Lightning."""
    factory = getattr(module, "scheduler_factory", None)
    if factory is None:
        return None
    kwargs: dict[str, Any] = {"optimizer": optimizer}
    keywords = getattr(factory, "keywords", {})
    if "total_steps" in keywords and keywords["total_steps"] is None:
        kwargs["total_steps"] = total_steps
    return factory(**kwargs)


def _train(
    cfg: DictConfig,
    accelerator: Any,
    tracker: Any,
    datamodule: Any,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    metrics: dict[str, float],
) -> None:
    """The training loop; ``metrics`` receives the latest value of every logged tag."""
    from tbx_lightning.monitor import ModelMonitor

    trainer_cfg = cfg.trainer
    callbacks: Any = cfg.get("callbacks") or {}
    train_loader, val_loader = datamodule.train_dataloader(), datamodule.val_dataloader()
    module, optimizer, train_loader, val_loader = accelerator.prepare(
        module, optimizer, train_loader, val_loader
    )
    plain = accelerator.unwrap_model(module)
    net = getattr(plain, "net", plain)
    batch_metrics = _metrics_of(plain)
    example = getattr(plain, "example_input_array", None)
    if example is None:
        example = next(iter(val_loader))[0][:1]
    tracker.log_graph(plain, example, step=0)
    monitor = None
    tokens_fn = None
    if "training_monitor" in callbacks:
        if callbacks.training_monitor.get("tokens_fn") is not None:
            from hydra.utils import instantiate

            tokens_fn = instantiate(callbacks.training_monitor.tokens_fn)
        sink = tracker if accelerator.is_main_process else None
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
    val_cap = _batch_cap(trainer_cfg.get("limit_val_batches"))
    every = max(1, int(trainer_cfg.get("log_every_n_steps") or 1))
    clip = float(trainer_cfg.get("gradient_clip_val") or 0.0)
    trainable = [p for p in plain.parameters() if p.requires_grad]
    batches = len(train_loader) if cap is None else min(cap, len(train_loader))
    scheduler = _scheduler(plain, optimizer, max_epochs * batches)
    interval = str(getattr(plain, "scheduler_interval", "epoch"))
    progress = LoopProgress(
        max_epochs,
        batches,
        enabled=bool(trainer_cfg.get("enable_progress_bar", True)) and accelerator.is_main_process,
    )
    step = 0
    module.train()
    try:
        for epoch in range(max_epochs):
            epoch_mean = EpochMean()
            for index, (inputs, targets) in enumerate(train_loader):
                if cap is not None and index >= cap:
                    break
                if monitor is not None:
                    monitor.start_flop_count()  # the first step only
                if hasattr(net, "train_step"):
                    net.train_step = step  # the step a network with fault injection sees
                values = batch_metrics(module(inputs), targets)
                loss = values["loss"]
                accelerator.backward(loss)
                if monitor is not None and not monitor.after_backward(step, loss=loss):
                    # A non-finite step (on_alert "stop"/"raise"): the monitor cleared the
                    # gradients, so the optimizer leaves the weights as they are.
                    pass
                if clip:
                    accelerator.clip_grad_norm_(trainable, clip)
                optimizer.step()
                optimizer.zero_grad()
                if scheduler is not None and interval == "step":
                    scheduler.step()
                if hasattr(net, "train_step"):
                    net.train_step = None
                if monitor is not None:
                    monitor.stop_flop_count()
                    # As the Lightning callback counts: samples, and tokens with a tokens_fn.
                    tokens = None if tokens_fn is None else float(tokens_fn((inputs, targets)))
                    monitor.log_throughput(step, samples=len(inputs), tokens=tokens)
                epoch_mean.add(values, len(inputs))
                latest = {train_tag(STEP_METRIC): float(values[STEP_METRIC].detach())}
                metrics.update(latest)
                if (step + 1) % every == 0:  # the steps Lightning logs at
                    accelerator.log({**latest, EPOCH_TAG: epoch}, step=step)
                step += 1
                progress.batch_end(epoch, index, step, metrics)
                if monitor is not None and monitor.should_stop:
                    break  # an alert with on_alert="stop": end cleanly, keep the checkpoint
            if monitor is not None and monitor.should_stop:
                break
            at_epoch = {
                train_tag(name): value
                for name, value in epoch_mean.means().items()
                if name != STEP_METRIC
            }
            at_epoch.update(_evaluate(module, val_loader, accelerator, val_cap))
            metrics.update(at_epoch)
            # At the epoch's last training step, where Lightning writes epoch-level values.
            accelerator.log({**at_epoch, EPOCH_TAG: epoch}, step=max(0, step - 1))
            if scheduler is not None and interval == "epoch":
                scheduler.step()
            progress.epoch_end(epoch, step, metrics)
            if projector is not None and every_n_epochs and (epoch + 1) % every_n_epochs == 0:
                _log_embeddings(cfg, plain, val_loader, accelerator, tracker, step)
                logged_at = step
        at_end = projector is not None and projector.get("log_at_fit_end", True)
        if at_end and logged_at != step:
            _log_embeddings(cfg, plain, val_loader, accelerator, tracker, step)
        if accelerator.is_main_process:
            _save_checkpoint(cfg, plain, str(tracker.log_dir))
    finally:
        progress.close()
        if monitor is not None:
            monitor.stop_flop_count()
            monitor.detach()


def _embedding_source(node: Any, module: nn.Module) -> Any:
    """How to embed a batch: the output of ``module_name`` (relative to the module, as the
    Lightning callback reads it), else the network's ``backbone``."""
    name = node.get("module_name")
    if not name:
        net = getattr(module, "net", module)
        return lambda images: penultimate(net, images)
    try:
        submodule = module.get_submodule(str(name))
    except AttributeError as error:
        raise ConfigError(
            f"callbacks.embedding_projector.module_name={name!r} names no submodule of "
            f"{type(module).__name__}: {error}"
        ) from None

    def embed(images: torch.Tensor) -> torch.Tensor:
        with capture_outputs(submodule) as captured:
            module(images)
        if not captured:
            raise ConfigError(f"Submodule {name!r} did not run in the forward pass.")
        return as_embeddings(
            captured[-1], f"submodule {name!r}", str(node.get("pool") or "flatten")
        )

    return embed


def _log_embeddings(
    cfg: DictConfig, module: nn.Module, loader: Any, accelerator: Any, tracker: Any, step: int
) -> None:
    node = cfg.callbacks.embedding_projector
    tag = str(node.get("tag") or "embeddings/penultimate")
    if node.get("embed_fn") is not None:
        _log_custom_embeddings(node, tag, module, tracker, step)
        return
    limit = node.get("max_points") or 1000
    embed = _embedding_source(node, module)
    # The same thumbnails as the Lightning callback (e.g. the digits scaled up to 32x32).
    image_fn = instantiate(node.image_fn) if node.get("image_fn") is not None else None
    feats, labels, images = [], [], []
    module.eval()
    with torch.no_grad():
        for batch_images, batch_labels in loader:
            feats.append(accelerator.gather_for_metrics(embed(batch_images)).cpu())
            labels.append(accelerator.gather_for_metrics(batch_labels).cpu())
            thumbs = image_fn((batch_images, batch_labels)) if image_fn else batch_images
            images.append(accelerator.gather_for_metrics(thumbs).cpu())
            if sum(len(x) for x in labels) >= limit:
                break
    module.train()
    mat = torch.cat(feats)[:limit]
    classes = [str(int(y)) for y in torch.cat(labels)[:limit]]
    tracker.log_embedding(
        tag, mat, metadata=classes, label_img=torch.cat(images)[:limit], step=step
    )


def _log_custom_embeddings(node: Any, tag: str, net: nn.Module, tracker: Any, step: int) -> None:
    """The projector config's own ``embed_fn``/``label_fn`` over its ``dataloader`` batches."""
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


def _save_checkpoint(cfg: DictConfig, module: nn.Module, log_dir: str) -> None:
    """``checkpoints/last.pt``: the module's state dict (keys as in a Lightning checkpoint)."""
    folder = os.path.join(log_dir, "checkpoints")
    os.makedirs(folder, exist_ok=True)
    state = module.state_dict()
    torch.save(
        {"state_dict": state, CONFIG_KEY: OmegaConf.to_container(cfg, resolve=True)},
        os.path.join(folder, "last.pt"),
    )
