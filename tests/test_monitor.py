from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tbx_lightning import RunWriter, TBXLogger, TrainingMonitor
from tbx_lightning.monitor import ModelMonitor, group_name, log_histograms
from tbx_lightning.monitor._binning import _Binner
from tests.tb import read


# ---------------------------------------------------------------------------- helpers
class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width)
        )
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.mlp(x + self.attn(x)))


class Net(nn.Module):
    def __init__(self, width: int = 8, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(Block(width) for _ in range(layers))
        self.head = nn.Linear(width, 1)
        self.unused = nn.Linear(width, width)  # never in forward: grad stays None
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.encoder.layers:
            h = layer(h)
        return self.head(h) * self.scale


def scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def group_numel(model: nn.Module, depth: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        g = group_name(name, depth)
        out[g] = out.get(g, 0) + p.numel()
    return out


def train(
    model: nn.Module,
    run: RunWriter,
    steps: int,
    *,
    clip: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    **options: Any,
) -> ModelMonitor:
    torch.manual_seed(0)
    opt = optimizer or torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9
    )
    monitor = ModelMonitor(model, run, **options)
    monitor.attach(opt)
    for step in range(steps):
        model(torch.randn(16, 4)).pow(2).mean().backward()
        monitor.after_backward(step)
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad()
        monitor.log_throughput(step, samples=16, tokens=16 * 32)
        monitor.log_memory(step)
    return monitor


# ---------------------------------------------------------------------------- grouping
@pytest.mark.parametrize(
    ("name", "depth", "group"),
    [
        pytest.param("encoder.layers.3.attn.weight", 2, "encoder.layers.3", id="layer-index-kept"),
        pytest.param("encoder.layers.3.attn.weight", 1, "encoder", id="depth-1"),
        pytest.param("encoder.layers.3.attn.weight", 4, "encoder.layers.3.attn", id="deep"),
        pytest.param("layers.11.mlp.0.weight", 1, "layers.11", id="root-list"),
        pytest.param("0.layers.0.self_attn.in_proj_weight", 2, "0.layers.0", id="sequential"),
        pytest.param("head.weight", 2, "head", id="shallow"),
        pytest.param("scale", 2, "root", id="root-param"),
        pytest.param("head.weight", 0, "all", id="depth-0"),
        pytest.param(
            "_fsdp_wrapped_module.model.layers.2._checkpoint_wrapped_module.mlp.w",
            2,
            "model.layers.2",
            id="wrappers-dropped",
        ),
        pytest.param("_orig_mod.head.bias", 2, "head", id="compiled"),
    ],
)
def test_group_name(name: str, depth: int, group: str) -> None:
    assert group_name(name, depth) == group


def test_groups_of_a_deep_model_are_one_per_layer() -> None:
    model = Net(layers=48)
    monitor = ModelMonitor(model)
    assert monitor.groups == [
        "root",  # named_parameters() yields the root's own parameters first
        "embed",
        *[f"encoder.layers.{i}" for i in range(48)],
        "head",
        "unused",
    ]


# ---------------------------------------------------------------------------- round trip
def test_tags_counts_norms_and_ratios_round_trip(tmp_path: Path) -> None:
    model = Net()
    model.embed.requires_grad_(False)  # frozen group
    run = RunWriter(tmp_path)
    train(model, run, 2, clip=0.05, hist_every_n_steps=1, norm_every_n_steps=1)
    run.close()
    acc = read(tmp_path)
    groups = ["embed", "encoder.layers.0", "encoder.layers.1", "encoder.layers.2", "head"]
    groups += ["unused", "root"]
    trained = ["encoder.layers.0", "encoder.layers.1", "encoder.layers.2", "head", "root"]
    watched = [g for g in groups if g != "embed"]  # a frozen group gets no statistics
    assert set(acc.Tags()["histograms"]) == {f"vitals_layers/weights/{g}" for g in watched} | {
        f"vitals_layers/grads/{g}" for g in trained
    }
    expected = {f"vitals_layers/weight_norm/{g}" for g in watched}
    # No gradient scalars for the frozen group, nor for `unused` (every grad is None).
    expected |= {f"vitals_layers/grad_norm/{g}" for g in trained}
    expected |= {f"vitals_layers/update_ratio/{g}" for g in watched}
    # One count per kind instead of a zero per layer; no constant lr or momentum curve.
    expected |= {
        "vitals/nonfinite/weights",
        "vitals/nonfinite/grads",
        "vitals/frozen_params",
        "vitals/grad_norm_total",
        "vitals/grad_norm_total/post_clip",  # clipping changed the norm
        "vitals/update_ratio",  # the median over layers
        "vitals/samples_per_sec",
        "vitals/tokens_per_sec",
    }
    assert set(acc.Tags()["scalars"]) == expected  # no peak memory on the CPU

    numel = group_numel(model, 2)
    for g in watched:
        for event in acc.Histograms(f"vitals_layers/weights/{g}"):
            h = event.histogram_value
            assert sum(h.bucket) == h.num == numel[g]
            assert len(h.bucket) == len(h.bucket_limit) == 64
    # `unused` never gets a gradient; the frozen group has none either.
    trainable = {g: n for g, n in numel.items() if g in trained}
    for g in trained:
        h = acc.Histograms(f"vitals_layers/grads/{g}")[0].histogram_value
        assert sum(h.bucket) == h.num == trainable[g]

    assert scalars(acc, "vitals/frozen_params") == {0: float(numel["embed"])}
    assert scalars(acc, "vitals/nonfinite/weights") == {0: 0.0, 1: 0.0}
    assert scalars(acc, "vitals/nonfinite/grads") == {0: 0.0, 1: 0.0}
    assert scalars(acc, "vitals_layers/update_ratio/unused") == {0: 0.0, 1: 0.0}
    assert set(scalars(acc, "vitals/samples_per_sec")) == {1}  # step 0 starts the clock
    assert scalars(acc, "vitals/samples_per_sec")[1] > 0
    post = scalars(acc, "vitals/grad_norm_total/post_clip")
    pre = scalars(acc, "vitals/grad_norm_total")
    for step in (0, 1):
        assert pre[step] > 0.05
        assert post[step] == pytest.approx(0.05, rel=1e-3)


def test_unclipped_norm_and_constant_schedules_write_one_curve(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 2 else 0.5)
    run = RunWriter(tmp_path)
    monitor = ModelMonitor(model, run, group_depth=1, hist_every_n_steps=0, norm_every_n_steps=1)
    monitor.attach(opt)
    for step in range(4):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        monitor.after_backward(step)
        opt.step()
        opt.zero_grad()
        sched.step()
    monitor.detach()
    run.close()
    acc = read(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert "vitals/grad_norm_total" in tags
    assert "vitals/grad_norm_total/post_clip" not in tags  # equal to the pre-clip norm
    assert not any(t.startswith("vitals/momentum/") for t in tags)  # constant 0.9
    # The lr changes at step 2: its curve starts at the first step with its first value.
    assert scalars(acc, "vitals/lr/group_0") == {
        0: pytest.approx(0.1),
        2: pytest.approx(0.05),
        3: pytest.approx(0.05),
    }


def test_values_match_torch(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 3))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    run = RunWriter(tmp_path)
    monitor = ModelMonitor(model, run, group_depth=1, hist_every_n_steps=1, norm_every_n_steps=1)
    monitor.attach(opt)
    model(torch.randn(8, 4)).pow(2).sum().backward()
    monitor.after_backward(0)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    pre = float(nn.utils.clip_grad_norm_(model.parameters(), 1e9))
    opt.step()
    run.close()
    acc = read(tmp_path)
    assert scalars(acc, "vitals/grad_norm_total")[0] == pytest.approx(pre, rel=1e-5)
    for g in ("0", "2"):
        w = torch.cat([before[f"{g}.weight"].flatten(), before[f"{g}.bias"].flatten()])
        gr = torch.cat([grads[f"{g}.weight"].flatten(), grads[f"{g}.bias"].flatten()])
        upd = 0.5 * gr
        assert scalars(acc, f"vitals_layers/weight_norm/{g}")[0] == pytest.approx(
            float(w.norm()), 1e-5
        )
        assert scalars(acc, f"vitals_layers/grad_norm/{g}")[0] == pytest.approx(
            float(gr.norm()), 1e-5
        )
        ratio = float(upd.norm() / w.norm())
        assert scalars(acc, f"vitals_layers/update_ratio/{g}")[0] == pytest.approx(ratio, rel=1e-4)
        for kind, values in (("weights", w), ("grads", gr)):
            h = acc.Histograms(f"vitals_layers/{kind}/{g}")[0].histogram_value
            assert h.min == pytest.approx(float(values.min()))
            assert h.max == pytest.approx(float(values.max()))
            assert h.sum == pytest.approx(float(values.sum()), abs=1e-5)
            assert h.sum_squares == pytest.approx(float(values.pow(2).sum()), rel=1e-5)
            ref, _ = np.histogram(values.numpy(), bins=64, range=(h.min, h.max))
            # Same bins as numpy's, up to float rounding of a value on a bin edge.
            assert np.abs(np.asarray(h.bucket) - ref).sum() <= 2
            assert h.bucket_limit[-1] == pytest.approx(h.max)


def test_periods_are_separate(tmp_path: Path) -> None:
    run = RunWriter(tmp_path)
    train(Net(), run, 7, hist_every_n_steps=3, norm_every_n_steps=2, group_depth=1)
    run.close()
    acc = read(tmp_path)
    assert [e.step for e in acc.Histograms("vitals_layers/weights/head")] == [0, 3, 6]
    assert [e.step for e in acc.Histograms("vitals_layers/grads/head")] == [0, 3, 6]
    assert set(scalars(acc, "vitals_layers/weight_norm/head")) == {0, 2, 4, 6}
    assert set(scalars(acc, "vitals_layers/update_ratio/head")) == {0, 2, 4, 6}
    assert set(scalars(acc, "vitals/grad_norm_total")) == {0, 2, 4, 6}
    assert set(scalars(acc, "vitals/nonfinite/grads")) == {0, 2, 4, 6}
    assert set(scalars(acc, "vitals/samples_per_sec")) == {2, 4, 6}


def test_histograms_only_weights_only(tmp_path: Path) -> None:
    run = RunWriter(tmp_path)
    train(Net(), run, 2, hist_every_n_steps=1, norm_every_n_steps=0, log_grads=False, group_depth=0)
    run.close()
    acc = read(tmp_path)
    assert acc.Tags()["histograms"] == ["vitals_layers/weights/all"]
    assert acc.Tags()["scalars"] == []


def test_nonfinite_values_are_counted_not_fatal(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 1))
    model(torch.randn(8, 4)).sum().backward()
    with torch.no_grad():
        model[0].weight[0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
        model[1].weight.grad[0, 0] = math.nan
    run = RunWriter(tmp_path)
    monitor = ModelMonitor(model, run, group_depth=1, hist_every_n_steps=1, norm_every_n_steps=1)
    monitor.after_backward(0)
    run.close()
    acc = read(tmp_path)
    assert scalars(acc, "vitals/nonfinite/weights") == {0: 3.0}
    assert scalars(acc, "vitals/nonfinite/grads") == {0: 1.0}
    assert math.isnan(scalars(acc, "vitals_layers/weight_norm/0")[0])
    assert math.isnan(scalars(acc, "vitals/grad_norm_total")[0])
    # The layers where it appeared are named in the alerts.
    assert {(a.kind, a.where) for a in monitor.alerts} == {
        ("nonfinite_weights", "0"),
        ("nonfinite_grads", "1"),
    }
    h = acc.Histograms("vitals_layers/weights/0")[0].histogram_value
    assert h.num == sum(h.bucket) == 64 + 16 - 3
    finite = model[0].weight.detach().flatten()[3:]
    assert h.min == pytest.approx(min(float(finite.min()), float(model[0].bias.detach().min())))
    g = acc.Histograms("vitals_layers/grads/1")[0].histogram_value
    assert g.num == sum(g.bucket) == 16 + 1 - 1


def test_all_nan_group_writes_no_histogram(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    with torch.no_grad():
        model[1].weight.fill_(math.nan)
        model[1].bias.fill_(math.nan)
    run = RunWriter(tmp_path)
    ModelMonitor(model, run, hist_every_n_steps=1, log_grads=False).after_backward(0)
    run.close()
    acc = read(tmp_path)
    assert acc.Tags()["histograms"] == ["vitals_layers/weights/0"]
    assert scalars(acc, "vitals/nonfinite/weights") == {0: 3.0}


def test_sampled_histograms_sum_to_numel_and_stay_close(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 400), nn.Linear(400, 10))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(400, 300).pow(3))  # heavy tails
    model(torch.randn(4, 300)).sum().backward()
    exact_dir, sampled_dir = tmp_path / "exact", tmp_path / "sampled"
    for path, sample in ((exact_dir, None), (sampled_dir, 4096)):
        run = RunWriter(path)
        ModelMonitor(
            model, run, group_depth=1, hist_every_n_steps=1, norm_every_n_steps=1, sample=sample
        ).after_backward(0)
        run.close()
    exact, sampled = read(exact_dir), read(sampled_dir)
    n = 300 * 400 + 400
    h_s = sampled.Histograms("vitals_layers/weights/0")[0].histogram_value
    h_e = exact.Histograms("vitals_layers/weights/0")[0].histogram_value
    assert sum(h_s.bucket) == h_s.num == n
    # Documented bound: sqrt(ln(2 * bins / delta) / (2 * k)) per bin share, delta = 1e-3.
    eps = math.sqrt(math.log(2 * 64 / 1e-3) / (2 * 4096))
    shares_s = np.asarray(h_s.bucket) / n
    ref, _ = np.histogram(
        model[0].weight.detach().numpy().ravel().tolist() + model[0].bias.tolist(),
        bins=64,
        range=(h_s.min, h_s.max),
    )
    assert np.abs(shares_s - ref / n).max() <= eps
    assert h_s.max <= h_e.max and h_s.min >= h_e.min
    # Norms stay exact in sampled mode.
    for tag in (
        "vitals_layers/weight_norm/0",
        "vitals_layers/grad_norm/0",
        "vitals_layers/weight_norm/1",
    ):
        assert scalars(sampled, tag)[0] == pytest.approx(scalars(exact, tag)[0], rel=1e-6)
    # The second group is small (4010 elements <= 4096): binned exactly.
    small_s = sampled.Histograms("vitals_layers/weights/1")[0].histogram_value
    small_e = exact.Histograms("vitals_layers/weights/1")[0].histogram_value
    assert list(small_s.bucket) == list(small_e.bucket)


def update_ratio_run(tmp_path: Path, ratio_sample: int | None) -> tuple[EventAccumulator, dict]:
    """One Adam step of a 600 x 600 layer (360,600 weights, over a few fused chunks)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(600, 600))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    run = RunWriter(tmp_path / str(ratio_sample))
    monitor = ModelMonitor(model, run, ratio_sample=ratio_sample, hist_every_n_steps=0)
    monitor.attach(opt)
    model(torch.randn(4, 600)).pow(2).sum().backward()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    monitor.after_backward(0)
    opt.step()
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    run.close()
    truth = {
        "ratio": float((after - before).double().norm() / before.double().norm()),
        "weight_norm": float(before.double().norm()),
    }
    return read(tmp_path / str(ratio_sample)), truth


def test_exact_update_ratio_matches_a_copy_by_hand(tmp_path: Path) -> None:
    acc, truth = update_ratio_run(tmp_path, None)
    # Adam's beta1 stays 0.9: a constant gets no curve.
    assert "vitals/momentum/group_0" not in acc.Tags()["scalars"]
    # The copy measures the weight norm in the same pass; both match float64 by hand.
    assert scalars(acc, "vitals_layers/weight_norm/0")[0] == pytest.approx(
        truth["weight_norm"], rel=1e-5
    )
    assert scalars(acc, "vitals_layers/update_ratio/0")[0] == pytest.approx(
        truth["ratio"], rel=1e-4
    )


@pytest.mark.parametrize("size", [65536, 8192])
def test_sampled_update_ratio_of_a_large_group(tmp_path: Path, size: int) -> None:
    acc, truth = update_ratio_run(tmp_path, size)
    assert ModelMonitor(nn.Linear(600, 600)).options.ratio_sample == 65536  # the default
    # size / 16 runs of 16 positions out of 360,600: within a few percent of the truth.
    assert scalars(acc, "vitals_layers/update_ratio/0")[0] == pytest.approx(
        truth["ratio"], rel=0.03
    )
    # The weight norm stays exact.
    assert scalars(acc, "vitals_layers/weight_norm/0")[0] == pytest.approx(
        truth["weight_norm"], rel=1e-5
    )


@pytest.mark.parametrize("bad", [0, 1000, True, 2.5, "all"])
def test_ratio_sample_is_checked(bad: Any) -> None:
    with pytest.raises(ValueError, match="ratio_sample"):
        ModelMonitor(nn.Linear(2, 2), ratio_sample=bad)


class Sparse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20_000, 64)  # one row trains per step
        self.lin = nn.Linear(64, 2048)  # has gradients, but is left out of the optimizer
        self.head = nn.Linear(2048, 1)  # trains densely

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin(self.emb(ids))).sum()


def sparse_fit(tmp_path: Path, steps: int, lr: float = 0.1) -> tuple[ModelMonitor, dict]:
    torch.manual_seed(0)
    model = Sparse()
    params = [*model.emb.parameters(), *model.head.parameters()]
    opt = torch.optim.SGD(params, lr=lr)
    run = RunWriter(tmp_path)
    monitor = ModelMonitor(model, run, hist_every_n_steps=0, norm_every_n_steps=1)
    monitor.attach(opt)
    for step in range(steps):
        model(torch.tensor([step * 997])).backward()
        monitor.after_backward(step)
        opt.step()
        opt.zero_grad()
    run.close()
    acc = read(tmp_path)
    return monitor, {
        g: scalars(acc, f"vitals_layers/update_ratio/{g}") for g in ("emb", "lin", "head")
    }


def test_sampled_ratio_missing_a_sparse_update_is_not_called_stuck(tmp_path: Path) -> None:
    monitor, ratios = sparse_fit(tmp_path, 8)
    # 64 of 1.28 M embedding weights change per step: the sample misses them at most
    # checks (each misses a given row with probability 0.78). The check after the first
    # miss compares the embedding whole, finds it moving, and keeps comparing it whole:
    # its curve shows its true ratio from then on.
    missed = [step for step, r in sorted(ratios["emb"].items()) if r == 0.0]
    assert missed, ratios["emb"]
    assert all(r > 0.0 for step, r in ratios["emb"].items() if step > missed[0]), ratios["emb"]
    assert monitor._ratio.sparse == {0}
    # Only the layer outside the optimizer is stuck. Its 133,120 weights are sampled too:
    # the sampled 0 at step 0 is confirmed whole at steps 1-3 (patience 3).
    stuck = [(a.where, a.step) for a in monitor.alerts if a.kind == "not_training"]
    assert stuck == [("lin", 3)]
    assert 1 not in monitor._ratio.sparse


def test_a_confirmed_stuck_layer_goes_back_to_its_sample(tmp_path: Path) -> None:
    # Compared whole at steps 1-3, sampled again at step 4: its copy is given back.
    monitor, _ = sparse_fit(tmp_path, 5)
    model = monitor.model
    assert isinstance(model, Sparse)
    assert id(model.lin.weight) not in monitor._ratio.buffers
    assert id(model.head.weight) in monitor._ratio.buffers  # small: always compared whole


def test_a_step_that_moved_nothing_copies_nothing_whole(tmp_path: Path) -> None:
    # lr=0 (a warm-up's first step, a skipped step): every ratio is 0, and no sampled
    # group is compared whole for it. The small head, compared whole anyway, is named
    # beside the zero learning rate; the sampled layers are not.
    monitor, ratios = sparse_fit(tmp_path, 3, lr=0.0)
    assert all(v == 0.0 for r in ratios.values() for v in r.values())
    assert monitor._ratio.whole == {} and monitor._ratio.sparse == set()
    fired = {(a.kind, a.where) for a in monitor.alerts}
    assert fired == {("not_training", "head"), ("lr_zero", "group_0")}


def test_device_path_matches_cpu_path() -> None:
    """The accelerator code path (tensor bounds, no host sync) run on CPU tensors."""
    torch.manual_seed(0)
    x = torch.randn(100_003)
    x[[5, 17, 99]] = torch.tensor([math.nan, math.inf, -math.inf])
    binner = _Binner(64)
    cpu_row = binner.row_cpu(x, full=True)
    dev_row = binner.row_device(x, full=True)
    assert dev_row[:6].tolist() == pytest.approx(cpu_row[:6].tolist(), rel=1e-5)
    assert math.isnan(float(dev_row[6])) and math.isnan(float(cpu_row[6]))
    lo, hi = float(cpu_row[4]), float(cpu_row[5])
    counts = torch.zeros(64, dtype=torch.int64)
    binner.bin_cpu(x, lo, hi, counts, dirty=True)
    dev_counts = binner.bin_device(x, dev_row[4], dev_row[5])
    assert int(counts.sum()) == int(dev_counts.sum()) == 100_000
    assert (counts.double() - dev_counts).abs().sum() <= 2


@pytest.mark.parametrize("bad", [None, 900_000])
def test_cpu_row_over_several_chunks(bad: int | None) -> None:
    # 1.2 M values: the CPU path reduces them in chunks; a NaN in a later chunk is found.
    torch.manual_seed(1)
    x = torch.randn(1_200_000) * 3 + 0.5
    if bad is not None:
        x[bad] = math.nan
    row = _Binner(64).row_cpu(x, full=True).tolist()
    finite = x[torch.isfinite(x)].double()
    assert row[:2] == [finite.numel(), 0 if bad is None else 1]
    assert row[2] == pytest.approx(float(finite.sum()), rel=1e-6)
    assert row[3] == pytest.approx(float(finite.square().sum()), rel=1e-6)
    assert row[6] == (row[3] if bad is None else pytest.approx(math.nan, nan_ok=True))
    assert row[4:6] == [float(finite.min()), float(finite.max())]


def test_bf16_parameters(tmp_path: Path) -> None:
    model = nn.Linear(64, 64).to(torch.bfloat16)
    model(torch.randn(2, 64, dtype=torch.bfloat16)).float().sum().backward()
    run = RunWriter(tmp_path)
    ModelMonitor(model, run, hist_every_n_steps=1).after_backward(0)
    run.close()
    h = read(tmp_path).Histograms("vitals_layers/grads/root")[0].histogram_value
    assert h.num == sum(h.bucket) == 64 * 64 + 64


def test_no_sink_computes_nothing_and_repeated_step_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Net()
    model(torch.randn(4, 4)).sum().backward()
    monitor = ModelMonitor(model, None, hist_every_n_steps=1)
    calls: list[str] = []
    for name in ("histograms", "norms"):
        original = getattr(monitor._stats, name)
        monkeypatch.setattr(
            monitor._stats,
            name,
            lambda *a, _o=original, _n=name, **k: calls.append(_n) or _o(*a, **k),
        )
    assert monitor.after_backward(0)  # a rank that writes nothing and holds no shard
    assert calls == []
    run = RunWriter(tmp_path)
    monitor = ModelMonitor(model, run, hist_every_n_steps=1, norm_every_n_steps=0)
    monitor.after_backward(0)
    monitor.after_backward(0)
    run.close()
    assert len(read(tmp_path).Histograms("vitals_layers/weights/head")) == 1


def test_a_tracker_not_yet_started_is_refused_with_what_to_do(tmp_path: Path) -> None:
    from tbx_lightning import ConfigTypeError, TBXTracker

    with pytest.raises(
        ConfigTypeError, match=r"TBXTracker whose run has not started.*init_trackers"
    ):
        ModelMonitor(Net(), TBXTracker("r", str(tmp_path)))
    assert not any(tmp_path.iterdir())  # nothing opened


@pytest.mark.parametrize(
    ("strategy", "world", "sharded"),
    [
        ("FSDPStrategy", 2, True),
        ("ModelParallelStrategy", 2, True),
        ("DeepSpeedStrategy", 2, None),  # ZeRO-1/2: every rank holds every weight
        ("DeepSpeedStrategy+zero3", 2, True),
        ("DDPStrategy", 2, None),
        ("FSDPStrategy", 1, None),
    ],
)
def test_lightning_strategies_that_shard_parameters(
    strategy: str, world: int, sharded: bool | None
) -> None:
    from types import SimpleNamespace

    from tbx_lightning.lightning._monitor import _strategy_shards

    name, _, zero = strategy.partition("+")
    instance = type(name, (), {"zero_stage_3": zero == "zero3"})()
    assert _strategy_shards(SimpleNamespace(strategy=instance, world_size=world)) is sharded


# ---------------------------------------------------------------------------- log_histograms
def test_log_histograms_function(tmp_path: Path) -> None:
    run = RunWriter(tmp_path)
    log_histograms(
        run,
        {"acts/a": torch.randn(10, 10), "acts/b": np.arange(7), "acts/c": torch.ones(3)},
        step=4,
        bins=16,
    )
    run.close()
    acc = read(tmp_path)
    a = acc.Histograms("acts/a")[0]
    assert a.step == 4 and a.histogram_value.num == sum(a.histogram_value.bucket) == 100
    b = acc.Histograms("acts/b")[0].histogram_value
    assert (b.min, b.max, b.num, b.sum) == (0, 6, 7, 21)
    c = acc.Histograms("acts/c")[0].histogram_value
    assert sum(c.bucket) == 3 and c.min == c.max == 1


@pytest.mark.parametrize(
    ("values", "error", "match"),
    [
        pytest.param({"x": [1, 2]}, TypeError, "Histogram 'x' has type list", id="list"),
        pytest.param({"x": torch.zeros(0)}, ValueError, "Histogram 'x' is empty", id="empty"),
        pytest.param({"x": torch.zeros(2, dtype=torch.complex64)}, TypeError, "complex", id="cx"),
        pytest.param({"x": np.array(["a"])}, TypeError, "dtype <U1", id="str-array"),
    ],
)
def test_log_histograms_errors(
    tmp_path: Path, values: dict[str, Any], error: type[Exception], match: str
) -> None:
    with RunWriter(tmp_path) as run, pytest.raises(error, match=match):
        log_histograms(run, values, step=0)


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param(
            {"bins": 1},
            ValueError,
            r"Expected monitor option `bins` to be an int in \[2, 1024\]",
            id="bins",
        ),
        pytest.param(
            {"sample": 10}, ValueError, "Expected monitor option `sample` to be None", id="sample"
        ),
        pytest.param(
            {"group_depth": -1}, ValueError, "`group_depth` to be an int >= 0", id="depth"
        ),
        pytest.param({"hist_every_n_steps": 1.5}, ValueError, "`hist_every_n_steps`", id="period"),
        pytest.param({"sink": object()}, TypeError, "`sink` must be a RunWriter", id="sink"),
        pytest.param({"group_fn": lambda n: ""}, ValueError, "`group_fn` returned ''", id="fn"),
        pytest.param({"sharded": True}, RuntimeError, "needs an initialised", id="sharded"),
    ],
)
def test_option_errors(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    sink = kwargs.pop("sink", None)
    with pytest.raises(error, match=match):
        ModelMonitor(nn.Linear(2, 2), sink, **kwargs)


def test_model_and_optimizer_errors() -> None:
    with pytest.raises(TypeError, match=r"`model` must be a torch\.nn\.Module, got str"):
        ModelMonitor("net")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`optimizer` must be a torch\.optim\.Optimizer"):
        ModelMonitor(nn.Linear(2, 2)).attach(object())


def test_wrapped_optimizer_is_unwrapped(tmp_path: Path) -> None:
    class Wrapper:
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer

    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    run = RunWriter(tmp_path)
    monitor = ModelMonitor(model, run, hist_every_n_steps=0, norm_every_n_steps=1)
    monitor.attach(Wrapper(opt), name="main")
    for step, lr in ((5, 0.3), (6, 0.6)):
        opt.param_groups[0]["lr"] = lr
        model(torch.randn(3, 2)).sum().backward()
        monitor.after_backward(step)
        opt.step()
    monitor.detach()
    opt.param_groups[0]["lr"] = 0.9
    model(torch.randn(3, 2)).sum().backward()
    opt.step()  # no hook any more
    run.close()
    lrs = scalars(read(tmp_path), "vitals/lr/main/group_0")
    assert lrs == {5: pytest.approx(0.3), 6: pytest.approx(0.6)}


# ---------------------------------------------------------------------------- sharded
_SHARDED_WORKER = """
import math, sys, torch
from torch import nn
from tbx_lightning._writer import RunWriter
from tbx_lightning.monitor import ModelMonitor

rank, init, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
torch.manual_seed(0)
full = torch.randn(1000)
full[7] = math.nan
model = nn.Module()
model.layer = nn.Module()
# Each rank holds a different, uneven piece of the same logical parameter.
piece = full[:300] if rank == 0 else full[300:]
model.layer.w = nn.Parameter(piece.clone())
model.layer.w.grad = torch.ones_like(model.layer.w) * (rank + 1)
run = RunWriter(out) if rank == 0 else None
monitor = ModelMonitor(model, run, sharded=True, hist_every_n_steps=1, norm_every_n_steps=1)
monitor.after_backward(0)
if run is not None:
    run.close()
torch.distributed.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sharded_counts_are_summed_over_ranks(tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'rendezvous'}"
    out = str(tmp_path / "run")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SHARDED_WORKER, str(rank), init, out],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    try:
        logs = [p.communicate(timeout=100)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs
    acc = read(out)
    torch.manual_seed(0)
    full = torch.randn(1000)
    finite = torch.cat([full[:7], full[8:]])
    h = acc.Histograms("vitals_layers/weights/layer")[0].histogram_value
    assert h.num == sum(h.bucket) == 999
    assert (h.min, h.max) == (
        pytest.approx(float(finite.min())),
        pytest.approx(float(finite.max())),
    )
    ref, _ = np.histogram(finite.numpy(), bins=64, range=(h.min, h.max))
    assert np.abs(np.asarray(h.bucket) - ref).sum() <= 2
    assert scalars(acc, "vitals/nonfinite/weights") == {0: 1.0}
    g = acc.Histograms("vitals_layers/grads/layer")[0].histogram_value
    assert g.num == 1000 and g.sum == pytest.approx(300 * 1 + 700 * 2)
    norm = math.sqrt(300 * 1 + 700 * 4)
    assert scalars(acc, "vitals_layers/grad_norm/layer")[0] == pytest.approx(norm)


# ---------------------------------------------------------------------------- Lightning
class TinyLM(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = Net(width=8, layers=2)
        self.net.embed.requires_grad_(False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 4, generator=gen), torch.randn(64, 1, generator=gen))
    return DataLoader(data, batch_size=8)


def trainer(tmp_path: Path, callback: TrainingMonitor, **kwargs: Any) -> Trainer:
    return Trainer(
        max_steps=4,
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[callback],
        **kwargs,
    )


def test_lightning_callback_round_trip(tmp_path: Path) -> None:
    logger = TBXLogger(str(tmp_path), name="lm")
    callback = TrainingMonitor(
        group_depth=3,  # the LightningModule's attribute `net` is one level
        hist_every_n_steps=2,
        norm_every_n_steps=1,
        tokens_fn=lambda batch: batch[0].shape[0] * 10,
    )
    trainer(tmp_path, callback, logger=logger, gradient_clip_val=0.01, log_every_n_steps=1).fit(
        TinyLM(), loader()
    )
    acc = read(logger.log_dir)
    hists = acc.Tags()["histograms"]
    assert "vitals_layers/weights/net.encoder.layers.1" in hists
    assert "vitals_layers/grads/net.encoder.layers.1" in hists
    assert "vitals_layers/grads/net.embed" not in hists  # frozen
    h = acc.Histograms("vitals_layers/weights/net.encoder.layers.0")
    assert [e.step for e in h] == [0, 2]
    block = sum(p.numel() for p in Block(8).parameters())
    assert all(e.histogram_value.num == sum(e.histogram_value.bucket) == block for e in h)
    assert scalars(acc, "vitals/frozen_params") == {0: 4.0 * 8 + 8}
    assert set(scalars(acc, "vitals_layers/update_ratio/net.head")) == {0, 1, 2, 3}
    assert "vitals/lr/group_0" not in acc.Tags()["scalars"]  # constant: in the hparams
    post = scalars(acc, "vitals/grad_norm_total/post_clip")
    assert post == {s: pytest.approx(0.01, rel=1e-3) for s in range(4)}
    assert set(scalars(acc, "vitals/samples_per_sec")) == {1, 2, 3}
    assert set(scalars(acc, "vitals/tokens_per_sec")) == {1, 2, 3}
    assert "train/loss" in acc.Tags()["scalars"]


def test_lightning_callback_needs_tbx_logger(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="TrainingMonitor writes through a TBXLogger"):
        trainer(tmp_path, TrainingMonitor(), logger=False).fit(TinyLM(), loader())


def test_lightning_callback_validates_options() -> None:
    with pytest.raises(ValueError, match="Expected monitor option `bins`"):
        TrainingMonitor(bins=5000)


# ---------------------------------------------------------------------------- TensorBoard
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_histograms_in_tensorboard(tmp_path: Path, tensorboard: Any) -> None:
    model = Net(layers=1)
    run = RunWriter(tmp_path / "run")
    train(model, run, 2, hist_every_n_steps=1, norm_every_n_steps=1)
    run.close()
    server = tensorboard(tmp_path)
    assert server.wait_for_runs(1) == ["run"]
    data = server.get_json(
        "/data/plugin/histograms/histograms", {"run": "run", "tag": "vitals_layers/weights/head"}
    )
    assert [step for _, step, _ in data] == [0, 1]
    buckets = data[0][2]
    assert sum(count for _, _, count in buckets) == pytest.approx(9)
    scalars_json = server.get_json(
        "/data/plugin/scalars/scalars", {"run": "run", "tag": "vitals_layers/update_ratio/head"}
    )
    assert [step for _, step, _ in scalars_json] == [0, 1]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(torch.arange(10, dtype=torch.float64), id="tensor-float64"),
        pytest.param(np.arange(10.0), id="numpy-float64"),
        pytest.param(torch.arange(10, dtype=torch.int64), id="tensor-int64"),
    ],
)
def test_log_histograms_takes_double_and_integer_inputs(tmp_path: Path, value: Any) -> None:
    with RunWriter(tmp_path) as run:
        log_histograms(run, {"h": value}, step=2)
    (event,) = read(tmp_path).Histograms("h")
    assert event.step == 2
    assert event.histogram_value.num == 10
    assert event.histogram_value.min == 0 and event.histogram_value.max == 9
    assert event.histogram_value.sum == 45


def test_group_without_any_gradient_gets_no_gradient_scalars(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1))
    with RunWriter(tmp_path) as run:
        monitor = ModelMonitor(
            model, run, group_depth=1, hist_every_n_steps=1, norm_every_n_steps=1
        )
        model(torch.randn(3, 4)).sum().backward()
        for param in model[1].parameters():
            param.grad = None  # e.g. a branch the loss did not reach this step
        monitor.after_backward(0)
    tags = read(tmp_path).Tags()
    assert "vitals_layers/grad_norm/1" not in tags["scalars"]
    assert "vitals_layers/grads/1" not in tags["histograms"]
    assert {"vitals_layers/grad_norm/0", "vitals_layers/grad_norm/2"} <= set(tags["scalars"])
    assert "vitals_layers/weight_norm/1" in tags["scalars"]


# ---------------------------------------------------------------------------- adapters
def tiny_lora_llama() -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    base = LlamaForCausalLM(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(base, lora)


def test_lora_statistics_cover_adapters_only(tmp_path: Path) -> None:
    model = tiny_lora_llama()
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    run = RunWriter(tmp_path)
    monitor = ModelMonitor(model, run, hist_every_n_steps=1, norm_every_n_steps=1)
    assert monitor.trainable_only  # most elements are frozen
    monitor.attach(opt)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    for step in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        monitor.after_backward(step)
        opt.step()
        opt.zero_grad()
    monitor.detach()
    run.close()
    acc = read(tmp_path)
    adapters = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert set(acc.Tags()["histograms"]) == {
        f"vitals_layers/{kind}/{g}" for kind in ("weights", "grads") for g in adapters
    }
    expected = {
        f"vitals_layers/{k}/{g}"
        for k in ("weight_norm", "grad_norm", "update_ratio")
        for g in adapters
    }
    expected |= {
        "vitals/nonfinite/weights",
        "vitals/nonfinite/grads",
        "vitals/grad_norm_total",
        "vitals/frozen_params",
        "vitals/update_ratio",
    }
    assert set(acc.Tags()["scalars"]) == expected
    assert scalars(acc, "vitals/frozen_params") == {0: float(frozen)}
    # A group holds the two LoRA factors of one projection, not its frozen base weight.
    per_group = sum(n for name, n in trainable.items() if "layers.0.self_attn.q_proj" in name)
    h = acc.Histograms("vitals_layers/weights/model.layers.0.self_attn.q_proj")[0].histogram_value
    assert h.num == sum(h.bucket) == per_group
    lora_b = [p for n, p in model.named_parameters() if "layers.1.self_attn.v_proj.lora_B" in n]
    # lora_B starts at zero: its norm after one step is the update itself.
    assert scalars(acc, "vitals_layers/weight_norm/model.layers.1.self_attn.v_proj")[0] > 0
    assert lora_b and lora_b[0].requires_grad


def test_frozen_backbone_watches_the_head_only(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 64), nn.Linear(64, 64), nn.Linear(64, 2))
    for layer in model[:2]:
        layer.requires_grad_(False)
    run = RunWriter(tmp_path)
    train(model, run, 1, hist_every_n_steps=1, norm_every_n_steps=1, group_depth=1)
    run.close()
    acc = read(tmp_path)
    assert set(acc.Tags()["histograms"]) == {"vitals_layers/grads/2", "vitals_layers/weights/2"}
    assert scalars(acc, "vitals/frozen_params") == {0: 4.0 * 64 + 64 + 64 * 64 + 64}
    assert not any(t.endswith(("/0", "/1")) for t in acc.Tags()["scalars"])


# ---------------------------------------------------------------------------- efficiency
def test_mfu_from_counted_flops_and_given_peak(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 32), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    run = RunWriter(tmp_path)
    monitor = ModelMonitor(model, run, hist_every_n_steps=0, norm_every_n_steps=2, peak_flops=1e9)
    monitor.attach(opt)
    for step in range(7):
        monitor.start_flop_count()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        monitor.after_backward(step)
        opt.step()
        opt.zero_grad()
        monitor.stop_flop_count()
        monitor.log_throughput(step, samples=16)
    monitor.detach()
    run.close()
    # forward 2*16*(4*32 + 32*1); backward: weight grads of both layers, input grad of the second
    forward = 2 * 16 * (4 * 32 + 32)
    assert monitor.flops_per_step == forward + 2 * 16 * (4 * 32 + 32) + 2 * 16 * 32
    acc = read(tmp_path)
    mfu, rate = scalars(acc, "vitals/mfu"), scalars(acc, "vitals/samples_per_sec")
    assert set(mfu) == set(rate) == {2, 4, 6}
    for step, value in mfu.items():
        # MFU = flops / (step_time * peak) and samples_per_sec = 16 / step_time
        expected = monitor.flops_per_step * rate[step] / 16 / 1e9
        assert value == pytest.approx(expected, rel=1e-6)
    assert "vitals/step_time_ms" not in acc.Tags()["scalars"]  # the rate says it


def test_step_time_without_counts_and_no_mfu_on_cpu(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tbx_lightning.monitor")
    model = nn.Linear(4, 1)
    run = RunWriter(tmp_path)
    monitor = ModelMonitor(model, run, hist_every_n_steps=0, norm_every_n_steps=1)
    monitor.flops_per_step = 1000.0
    for step in range(4):
        monitor.log_throughput(step)
    run.close()
    acc = read(tmp_path)
    assert set(scalars(acc, "vitals/step_time_ms")) == {1, 2, 3}
    assert "vitals/mfu" not in acc.Tags()["scalars"]
    notes = [r.getMessage() for r in caplog.records if "vitals/mfu is not written" in r.message]
    assert len(notes) == 1 and "peak_flops" in notes[0]


def test_quickstart_monitor_has_at_most_17_tags_and_2_constants(tmp_path: Path) -> None:
    from tbx_lightning.templates.digits import DigitsClassifier, DigitsCNN

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(256, 1, 8, 8, generator=gen)
    labels = torch.randint(0, 10, (256,), generator=gen)
    data = DataLoader(TensorDataset(images, labels), batch_size=32)
    logger = TBXLogger(str(tmp_path), name="qs")
    # The options of configs/callbacks/training_monitor.yaml.
    callback = TrainingMonitor(group_depth=3, hist_every_n_steps=25, norm_every_n_steps=5)
    model = DigitsClassifier(DigitsCNN(), lambda params: torch.optim.Adam(params, lr=3e-3))
    Trainer(
        max_steps=40,
        accelerator="cpu",
        logger=logger,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=5,
    ).fit(model, data)
    acc = read(logger.log_dir)
    tags = [t for t in acc.Tags()["scalars"] if t.startswith(("vitals/", "vitals_layers/"))]
    assert 0 < len(tags) <= 17, tags
    constant = [t for t in tags if len({e.value for e in acc.Scalars(t)}) == 1]
    assert sorted(constant) == ["vitals/nonfinite/grads", "vitals/nonfinite/weights"]


def test_tags_are_also_written_against_tokens_and_samples_seen(tmp_path: Path) -> None:
    # Runs with different batch sizes compare at equal data: by_tokens/<tag> is written
    # at the number of tokens seen by the end of the step the tag was logged at, on the
    # logger's tags and the monitor's own, whether the loop logs before or after counting.
    from tbx_lightning.run import Run

    run = Run(lambda: str(tmp_path), owner="test")
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = ModelMonitor(
        model,
        run,
        norm_every_n_steps=2,
        by_tokens=["train/*", "vitals/grad_norm_total"],
        by_samples=["train/loss"],
    )
    monitor.attach(opt)
    for step in range(6):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        monitor.after_backward(step)
        opt.step()
        opt.zero_grad()
        if step % 2:
            run.log({"train/loss": float(step)}, step=step)  # before the count
        monitor.log_throughput(step, samples=8, tokens=8 * 16)
        if not step % 2:
            run.log({"train/loss": float(step)}, step=step)  # after it
    monitor.detach()
    run.finish("success")
    run.release()
    acc = read(tmp_path)
    by_tokens = scalars(acc, "by_tokens/train/loss")
    assert by_tokens == {128 * (s + 1): float(s) for s in range(6)}
    assert scalars(acc, "by_samples/train/loss") == {8 * (s + 1): float(s) for s in range(6)}
    grad = scalars(acc, "by_tokens/vitals/grad_norm_total")
    assert set(grad) == {128 * (s + 1) for s in (0, 2, 4)}
    assert list(grad.values()) == list(scalars(acc, "vitals/grad_norm_total").values())


def test_each_axis_waits_for_its_own_count(tmp_path: Path) -> None:
    # A count of samples but none of tokens: the samples copies are written at once, not
    # held back with the tokens ones; one that waited is written once, not again.
    from tbx_lightning.run import Run

    run = Run(lambda: str(tmp_path / "a"), owner="test")
    run.mirror_by("tokens", ["loss"])
    run.mirror_by("samples", ["loss"])
    for step in range(5):
        run.log({"loss": float(step)}, step=step)
        run.count_seen(step, samples=8 * (step + 1))
    run.writer.flush()
    assert [e.step for e in read(tmp_path / "a").Scalars("by_samples/loss")] == [8, 16, 24, 32, 40]
    run.finish("success")
    run.release()

    run = Run(lambda: str(tmp_path / "b"), owner="test")
    run.mirror_by("samples", ["loss"])
    run.mirror_by("tokens", ["loss"])
    run.count_seen(0, samples=8)
    run.log({"loss": 1.0}, step=0)  # samples known, tokens not yet: only tokens wait
    run.count_seen(0, samples=8, tokens=128)
    run.finish("success")
    run.release()
    acc = read(tmp_path / "b")
    assert [e.step for e in acc.Scalars("by_samples/loss")] == [8]
    assert [e.step for e in acc.Scalars("by_tokens/loss")] == [128]


@pytest.mark.parametrize("on_alert", ["warn", "stop"])
def test_a_gradient_scalers_overflows_are_not_alerts(tmp_path: Path, on_alert: str) -> None:
    # fp16 mixed precision: the scaler starts at a scale that overflows the gradients and
    # halves it, skipping those steps, until it settles. Expected, so no alert and no stop;
    # a NaN loss later is still one.
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    run = RunWriter(tmp_path)
    monitor = ModelMonitor(model, run, norm_every_n_steps=2, on_alert=on_alert)
    monitor.grad_scaler = scaler
    monitor.attach(opt)
    skipped = 0
    for step in range(40):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(torch.randn(8, 4)).pow(2).mean()
        if step == 35:
            loss = loss * float("nan")
        scaler.scale(loss).backward()
        allowed = monitor.after_backward(step, loss=loss)
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped += scaler.get_scale() < scale
        opt.zero_grad()
        monitor.log_throughput(step, samples=8)
        if monitor.should_stop:
            break
    monitor.detach()
    run.close()
    assert skipped >= 3  # the scale came down from 2**24 step by step
    kinds = {(a.kind, a.step) for a in monitor.alerts}
    assert not any(kind == "nonfinite_grads" and s < 35 for kind, s in kinds), kinds
    assert ("nonfinite_loss", 35) in kinds
    if on_alert == "stop":
        assert not allowed and step == 35
    assert all(torch.isfinite(p).all() for p in model.parameters())
