"""A LoRA fine-tune with every feature on, as long runs combine them, on each route.

Lightning: ``TBXLogger`` + ``TrainingMonitor`` + ``EmbeddingProjector`` + ``ModelCheckpoint``
with bf16-mixed precision, gradient accumulation and clipping; resumed from
``last.ckpt``; stopped by an alert and resumed again. Accelerate: the same model in a
plain loop with ``ModelMonitor.from_accelerator``. Runs are read back with TensorBoard's
reader and its HParams plugin.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import tbx_lightning  # noqa: F401 - registers log_with="tbx"
from tbx_lightning import EmbeddingProjector, TBXLogger, TrainingAlertError, TrainingMonitor
from tbx_lightning.monitor import ModelMonitor
from tests.lora import (
    ADAPTED,
    EMBED_MODULE,
    LoRAModule,
    adapters,
    lm_loss,
    lora_llama,
    token_batches,
)
from tests.rows import session
from tests.tb import read
from tests.test_dashboards import Dashboards

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def fit(
    root: Path,
    module: LoRAModule,
    max_steps: int,
    *,
    ckpt_path: str | None = None,
    **monitor: Any,
) -> tuple[Trainer, TrainingMonitor]:
    callback = TrainingMonitor(norm_every_n_steps=5, hist_every_n_steps=5, **monitor)
    trainer = Trainer(
        logger=TBXLogger(str(root), name="lora"),
        max_steps=max_steps,
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        callbacks=[
            ModelCheckpoint(save_last=True, every_n_train_steps=5),
            callback,
            EmbeddingProjector(
                EMBED_MODULE,
                pool="mean",
                log_before_fit=True,
                every_n_epochs=0,
                max_batches=2,
            ),
        ],
        limit_val_batches=2,
        val_check_interval=10,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, token_batches(), token_batches(16), ckpt_path=ckpt_path)
    return trainer, callback


def test_a_resumed_fit_with_every_callback_is_one_run(tmp_path: Path) -> None:
    fit(tmp_path, LoRAModule(), 10)
    last = tmp_path / "lora" / "version_0" / "checkpoints" / "last.ckpt"
    trainer, _ = fit(tmp_path, LoRAModule(), 20, ckpt_path=str(last))
    assert trainer.global_step == 20
    # One run folder: the monitor followed the logger to the checkpoint's run.
    runs = sorted(p.name for p in (tmp_path / "lora").iterdir() if not p.name.startswith("."))
    assert runs == ["version_0"]
    acc = read(tmp_path / "lora" / "version_0")
    loss = steps(acc, "train/loss")
    assert loss == sorted(set(loss)) and loss[0] == 0 and loss[-1] == 19
    # The monitor wrote in both processes, at the steps of each; layers as in the model.
    assert steps(acc, "vitals/grad_norm_total") == [0, 5, 10, 15]
    tags = set(acc.Tags()["scalars"])
    assert {f"vitals_layers/grad_norm/{g}" for g in ADAPTED} <= tags
    assert not any("base_model" in t for t in tags)
    _, status = session(acc)
    assert status == "STATUS_SUCCESS"
    projector = (tmp_path / "lora" / "version_0" / "projector_config.pbtxt").read_text()
    assert projector.count("tensor_name") >= 3  # before and after each fit


def test_an_alert_stop_keeps_finite_weights_marks_the_run_failed_and_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tbx_lightning")
    trainer, callback = fit(tmp_path, LoRAModule(nan_from=12), 40, on_alert="stop")
    # The NaN of step 12 was found before that optimizer step, which was skipped.
    assert trainer.global_step == 13
    folder = tmp_path / "lora" / "version_0"
    checkpoints = {p.name for p in (folder / "checkpoints").iterdir()}
    assert {"alert-step=13.ckpt", "last.ckpt"} <= checkpoints
    for name in ("alert-step=13.ckpt", "last.ckpt"):
        state = torch.load(folder / "checkpoints" / name, weights_only=False)["state_dict"]
        lora = adapters(state)
        assert len(lora) == 8 and all(torch.isfinite(v).all() for v in lora.values()), name
    kinds = {(a.kind, a.step) for a in callback.monitor.alerts}  # type: ignore[union-attr]
    assert ("nonfinite_grads", 12) in kinds
    # One terminal line per kind: the four adapted layers in one line.
    lines = [r.getMessage() for r in caplog.records if r.name == "tbx_lightning.alerts"]
    grads = [line for line in lines if line.startswith("alert nonfinite_grads")]
    assert len(grads) == 1 and "in 4 layers" in grads[0]

    _, status = session(folder)
    assert status == "STATUS_FAILURE"
    dashboards = Dashboards(tmp_path / "lora")
    assert dashboards.sessions()["version_0"]["hparams"]["run.status"] == "alert: nonfinite_grads"
    (reason,) = read(folder).Tensors("run/status/text_summary")
    assert (
        "stopped by the alert nonfinite_grads at step 12"
        in reason.tensor_proto.string_val[0].decode()
    )

    # The alert checkpoint resumes: the same run goes on, and now succeeds.
    resumed, _ = fit(
        tmp_path, LoRAModule(), 20, ckpt_path=str(folder / "checkpoints" / "alert-step=13.ckpt")
    )
    assert resumed.global_step == 20
    acc = read(folder)
    loss = steps(acc, "train/loss")
    assert loss == sorted(set(loss)) and loss[-1] == 19
    assert session(acc)[1] == "STATUS_SUCCESS"


def test_a_learning_rate_100x_too_high_fires_and_a_sane_one_does_not(tmp_path: Path) -> None:
    found = {}
    for lr in (0.3, 3e-3):
        _, callback = fit(tmp_path / str(lr), LoRAModule(lr=lr), 20)
        found[lr] = {a.kind for a in callback.monitor.alerts}  # type: ignore[union-attr]
    assert {"update_ratio_high", "lr_out_of_range"} <= found[0.3]
    assert found[3e-3] == set()


def test_the_first_screens_of_a_fine_tune_open_on_its_own_metrics(tmp_path: Path) -> None:
    fit(tmp_path, LoRAModule(), 10)
    dashboards = Dashboards(tmp_path / "lora")
    _, metrics = dashboards.shown_columns()
    # The run's own metrics first, then run-level vitals; no per-layer column is shown.
    assert metrics[:3] == ["train/loss", "trainer/epoch", "val/loss"], metrics
    assert all(m.startswith("vitals/") for m in metrics[3:]), metrics
    # Time Series groups tags by their first part, in order: the losses come first.
    tags = read(tmp_path / "lora" / "version_0").Tags()["scalars"]
    groups = sorted({t.split("/")[0] for t in tags})
    assert groups == ["train", "trainer", "val", "vitals", "vitals_layers"]


# ---------------------------------------------------------------------- Accelerate
@pytest.fixture
def fresh_accelerate() -> Any:
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def accelerate_fit(
    root: Path, steps_: int, *, nan_from: int | None = None, **monitor: Any
) -> tuple[ModelMonitor, Any, str]:
    """The same fine-tune in the loop the docs show (docs/accelerate.md)."""
    accelerator = Accelerator(log_with="tbx", project_dir=str(root))
    accelerator.init_trackers("lora", config={"lr": 3e-3})
    model = lora_llama()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, token_batches())
    monitor = ModelMonitor.from_accelerator(
        accelerator, model, norm_every_n_steps=5, hist_every_n_steps=5, **monitor
    )
    monitor.attach(optimizer)
    for step, (ids,) in enumerate(loader):
        if step == steps_:
            break
        loss = lm_loss(model, ids)
        if nan_from is not None and step >= nan_from:
            loss = loss * float("nan")
        accelerator.backward(loss)
        if monitor.after_backward(step, loss=loss):
            accelerator.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.log({"train/loss": loss.item()}, step=step)
        monitor.log_throughput(step, samples=len(ids))
        if monitor.should_stop:
            break
    monitor.detach()
    log_dir = accelerator.get_tracker("tbx").log_dir
    accelerator.end_training()
    return monitor, model, log_dir


@pytest.mark.usefixtures("fresh_accelerate")
def test_accelerate_loop_skips_the_poisoned_update_and_records_failure(tmp_path: Path) -> None:
    monitor, model, log_dir = accelerate_fit(tmp_path, 40, nan_from=7, on_alert="stop")
    # The NaN of step 7 was found before that step's update, not at the next check.
    assert monitor.should_stop and monitor.stop_alert is not None
    assert (monitor.stop_alert.kind, monitor.stop_alert.step) in {
        ("nonfinite_grads", 7),
        ("nonfinite_loss", 7),
    }
    assert all(torch.isfinite(p).all() for p in model.parameters())
    acc = read(log_dir)
    assert steps(acc, "train/loss")[-1] == 7
    assert session(acc)[1] == "STATUS_FAILURE"


@pytest.mark.usefixtures("fresh_accelerate")
def test_accelerate_loop_raise_mode_raises_before_the_update(tmp_path: Path) -> None:
    with pytest.raises(TrainingAlertError, match="at step 3"):
        accelerate_fit(tmp_path, 40, nan_from=3, on_alert="raise")


@pytest.mark.usefixtures("fresh_accelerate")
def test_both_routes_name_the_layers_of_one_model_alike(tmp_path: Path) -> None:
    _, _, log_dir = accelerate_fit(tmp_path / "accelerate", 6)
    fit(tmp_path / "lightning", LoRAModule(), 6)
    per_layer = [
        {t for t in read(d).Tags()["scalars"] if t.startswith("vitals_layers/")}
        for d in (log_dir, tmp_path / "lightning" / "lora" / "version_0")
    ]
    assert per_layer[0] == per_layer[1]
    assert {f"vitals_layers/update_ratio/{g}" for g in ADAPTED} <= per_layer[0]


# ---------------------------------------------------------------------- the examples
def _example(name: str) -> Any:
    import importlib.util
    import sys

    folder = Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(folder))  # the examples import their shared lora_common
    try:
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(folder))


@pytest.mark.usefixtures("fresh_accelerate")
def test_the_lora_examples_run_resume_and_stop(tmp_path: Path) -> None:
    lightning = _example("lora_lightning")
    first = lightning.main(["--runs", str(tmp_path), "--max-steps", "6"])
    again = lightning.main(["--runs", str(tmp_path), "--max-steps", "10", "--resume"])
    assert first == again  # resumed into the same run
    acc = read(again)
    loss = steps(acc, "train/loss")
    assert loss == sorted(set(loss)) and loss[-1] == 9
    assert session(acc)[1] == "STATUS_SUCCESS"
    assert "token_embeddings" in (Path(again) / "projector_config.pbtxt").read_text()

    log_dir = _example("lora_accelerate").main(
        ["--runs", str(tmp_path), "--max-steps", "20", "--nan-from", "4"]
    )
    acc = read(log_dir)
    assert steps(acc, "train/loss") == [0]  # logged every 5 steps; stopped after step 4
    assert session(acc)[1] == "STATUS_FAILURE"
