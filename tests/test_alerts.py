from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tbx_lightning import RunWriter, TBXLogger, TrainingAlertError, TrainingMonitor
from tbx_lightning.errors import TBXError
from tbx_lightning.monitor import Alert, AlertRules, ModelMonitor
from tbx_lightning.monitor._alerts import AlertEngine, robust_threshold
from tests.tb import read


def alert_texts(acc: EventAccumulator) -> dict[int, str]:
    out: dict[int, str] = {}
    for event in acc.Tensors("alerts/text_summary"):
        out[event.step] = out.get(event.step, "") + event.tensor_proto.string_val[0].decode()
    return out


def alert_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tbx_lightning.alerts"]


class Sick(LightningModule):
    """A regression whose loss spikes 50x at step 40 and turns NaN from step 60."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.global_step == 40:
            loss = loss * 50
        if self.global_step >= 60:
            loss = loss * math.nan
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    data = TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(64, 1, generator=gen))
    return DataLoader(data, batch_size=8)


def fit(tmp_path: Path, callback: TrainingMonitor, max_steps: int = 80) -> tuple[Trainer, str]:
    logger = TBXLogger(str(tmp_path), name="sick")
    trainer = Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=logger,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    torch.manual_seed(0)
    trainer.fit(Sick(), loader())
    return trainer, logger.log_dir


def test_default_monitor_reports_spike_and_nan_once_per_kind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tbx_lightning.alerts")
    callback = TrainingMonitor()
    trainer, log_dir = fit(tmp_path, callback)
    assert trainer.global_step == 80  # "warn" never stops training

    acc = read(log_dir)
    texts = alert_texts(acc)
    kinds = {
        (a.kind, a.where, a.step)
        for a in callback.monitor.alerts  # type: ignore[union-attr]
    }
    assert ("loss_spike", "", 40) in kinds
    assert ("nonfinite_loss", "", 60) in kinds
    assert {(k, w) for k, w, _ in kinds} >= {
        ("nonfinite_grads", "net.0"),
        ("nonfinite_grads", "net.2"),
        ("nonfinite_weights", "net.0"),
        ("nonfinite_weights", "net.2"),
    }
    # Each alert's first occurrence is written once into the run, at the step of the
    # check that found it (here the step it belongs to: the step's loss is checked at
    # the end of its step), so the entries of the tag never go back in steps.
    assert "| 40 | loss_spike | model |" in texts[40]
    assert "| 60 | nonfinite_grads | net.0 |" in texts[60]
    assert "| 60 | nonfinite_loss | model |" in texts[60]
    assert "| 70 | nonfinite_weights | net.2 |" in texts[70]
    for kind, where, _ in kinds:
        row = f"| {kind} | {where or 'model'} |"
        assert sum(row in t for t in texts.values()) == 1

    counts = {e.step: e.value for e in acc.Scalars("vitals/alerts")}
    assert counts[min(counts)] == 1.0 and min(counts) <= 50  # the spike, at the next check
    assert counts[max(counts)] > len(kinds)  # repeats after step 60 are counted

    steps = [e.step for e in acc.Tensors("alerts/text_summary")]
    assert steps == sorted(steps)

    # The terminal shows one line per kind, naming its layers, however often it repeats.
    lines = alert_records(caplog)
    assert len(lines) == len({k for k, _, _ in kinds}) == 4
    assert sum("loss_spike" in line for line in lines) == 1
    assert sum("nonfinite_loss" in line for line in lines) == 1
    grads = next(line for line in lines if "nonfinite_grads" in line)
    assert "in 2 layers (net.0, net.2)" in grads
    assert any("loss 1" in line or "above" in line for line in lines)


def test_on_alert_stop_saves_a_checkpoint_and_stops(tmp_path: Path) -> None:
    callback = TrainingMonitor(on_alert="stop")
    trainer, _ = fit(tmp_path, callback, max_steps=200)
    # The spike of step 40 is judged with the statistics of step 40, so the fit
    # ends after that batch or the next (the loss reaches the host with the next check).
    assert 40 < trainer.global_step <= 51
    assert callback.stop_checkpoint is not None
    assert Path(callback.stop_checkpoint).is_file()
    state = torch.load(callback.stop_checkpoint, weights_only=False)
    assert state["global_step"] == trainer.global_step


# ---------------------------------------------------------------------------- plain loop
def plain_loop(
    tmp_path: Path, steps: int, *, nan_from: int = 10**9, **options: Any
) -> tuple[ModelMonitor, RunWriter]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    run = RunWriter(tmp_path)
    monitor = ModelMonitor(model, run, norm_every_n_steps=2, hist_every_n_steps=0, **options)
    monitor.attach(opt)
    for step in range(steps):
        if monitor.should_stop:
            break
        loss = model(torch.randn(8, 4)).pow(2).mean()
        if step >= nan_from:
            loss = loss * math.nan
        loss.backward()
        monitor.after_backward(step)
        opt.step()
        opt.zero_grad()
        monitor.observe_loss(step, loss)
        monitor.log_throughput(step, samples=8)
    monitor.detach()
    return monitor, run


def test_accelerate_style_loop_stop_flag(tmp_path: Path) -> None:
    monitor, run = plain_loop(tmp_path, 40, nan_from=10, on_alert="stop")
    run.close()
    assert monitor.should_stop
    assert monitor.alerts[0].kind in {"nonfinite_grads", "nonfinite_loss"}
    assert monitor.alerts[0].step == 10
    acc = read(tmp_path)
    assert max(e.step for e in acc.Scalars("vitals/alerts")) <= 12  # the loop ended there


def test_on_alert_raise_and_callable(tmp_path: Path) -> None:
    with pytest.raises(TrainingAlertError, match="non-finite grad values in 0 at step 10") as info:
        plain_loop(tmp_path / "raise", 40, nan_from=10, on_alert="raise")
    assert isinstance(info.value, TBXError) and isinstance(info.value, RuntimeError)
    assert info.value.alert.step == 10
    seen: list[Alert] = []
    monitor, run = plain_loop(tmp_path / "call", 16, nan_from=10, on_alert=seen.append)
    run.close()
    assert seen == monitor.alerts
    assert {a.kind for a in seen} >= {"nonfinite_grads", "nonfinite_loss", "nonfinite_weights"}


def test_alerts_can_be_turned_off(tmp_path: Path) -> None:
    monitor, run = plain_loop(tmp_path, 16, nan_from=4, alerts=False)
    run.close()
    assert monitor.alerts == []
    assert "vitals/alerts" not in read(tmp_path).Tags()["scalars"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"on_alert": "shout"}, ValueError, "on_alert", id="on-alert"),
        pytest.param({"alerts": "yes"}, TypeError, "alerts", id="alerts-type"),
        pytest.param({"peak_flops": -1}, ValueError, "peak_flops", id="peak"),
    ],
)
def test_option_errors(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ModelMonitor(nn.Linear(2, 2), None, **kwargs)


def test_rules_errors() -> None:
    with pytest.raises(ValueError, match=r"AlertRules\.patience"):
        AlertRules(patience=0)
    with pytest.raises(ValueError, match=r"AlertRules\.loss_spike_k"):
        AlertRules(loss_spike_k=-1.0)


# ---------------------------------------------------------------------------- detectors
def engine(**rules: Any) -> AlertEngine:
    return AlertEngine(AlertRules(**rules), "warn", None, None)


def test_robust_threshold_ignores_one_outlier() -> None:
    median, limit = robust_threshold([1.0, 1.0, 1.1, 0.9, 100.0], k=8.0)
    assert median == 1.0
    assert limit == pytest.approx(1.0 + 8 * 1.4826 * 0.1)


def test_loss_spike_needs_history_and_ignores_noise() -> None:
    checks = engine()
    gen = torch.Generator().manual_seed(0)
    noisy = (2.0 + 0.1 * torch.randn(200, generator=gen)).tolist()
    checks.check_losses(list(enumerate(noisy)))
    assert checks.alerts == []
    checks.check_losses([(200, 30.0)])
    (alert,) = checks.alerts
    assert (alert.kind, alert.step, alert.value) == ("loss_spike", 200, 30.0)
    assert 2.0 < alert.threshold < 5.0
    fresh = engine()
    fresh.check_losses([(0, 1.0), (1, 50.0)])  # too little history to judge
    assert fresh.alerts == []


def test_grad_explosion_vanishing_not_training_lr() -> None:
    checks = engine(patience=2)
    for step in range(5):
        checks.check_grad_norm(step, 1.0 + 0.01 * step)
    checks.check_grad_norm(5, 50.0)
    for step in range(6, 9):
        checks.check_update_ratios(step, {"a": 1e-3, "b": 2e-3, "c": 1e-9, "frozen": 0.0})
    checks.check_lr(9, {"group_0": 0.1})
    checks.check_lr(10, {"group_0": 5.0})
    checks.check_lr(11, {"group_1": 0.0})
    checks.check_lr(12, {"group_1": 0.0})
    found = {(a.kind, a.where, a.step) for a in checks.alerts}
    assert found == {
        ("grad_explosion", "", 5),
        ("vanishing_update", "c", 7),
        ("not_training", "frozen", 7),
        ("lr_jump", "group_0", 10),
        ("lr_zero", "group_1", 12),
    }
    assert checks.counts[("vanishing_update", "c")] == 2  # repeated, reported once


def test_straggler_named_after_consistent_slowness() -> None:
    checks = engine(patience=3)
    checks.check_step_times(0, [0.10, 0.10, 0.30, 0.10])  # once: no alert
    checks.check_step_times(1, [0.10, 0.10, 0.10, 0.10])
    assert checks.alerts == []
    for step in range(2, 5):
        checks.check_step_times(step, [0.10, 0.11, 0.20, 0.10])
    (alert,) = checks.alerts
    assert (alert.kind, alert.where, alert.step) == ("straggler", "rank 2", 4)
    assert "rank 2 takes 200.0 ms per step" in alert.message
