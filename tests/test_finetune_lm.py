"""The finetune_lm template and its alerts_demo override, on a reduced budget, on both runners."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from google.protobuf import text_format
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

from tbx_lightning import cli
from tbx_lightning.templates.finetune_lm import TinyLlama, token_embeddings

QUICK = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=12",
    "trainer.limit_val_batches=2",
    "data.limit=256",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "callbacks.training_monitor.norm_every_n_steps=2",
    "callbacks.training_monitor.hist_every_n_steps=4",
]

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers.*",
    "ignore:.*log_every_n_steps.*",
    "ignore:.*isinstance.treespec, LeafSpec.*",
)


def _fit(tmp: Path, experiment: str, *overrides: str) -> EventAccumulator:
    code = cli.main(["fit", experiment, f"paths.runs_dir={tmp}", *QUICK, *overrides])
    assert code == 0
    (run,) = sorted((tmp / experiment).glob("version_*"))
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_only_adapters_train() -> None:
    net = TinyLlama(block_size=8)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {
        "tok_emb.lora_A",
        "tok_emb.lora_B",
        *(f"layers.{i}.self_attn.{p}_proj.lora_{f}" for i in range(2) for p in "qv" for f in "AB"),
    }
    again = TinyLlama(block_size=8)
    assert torch.equal(net.lm_head.weight, again.lm_head.weight)  # the same frozen base
    ids = torch.arange(8)
    assert token_embeddings(net, (ids, None)).shape == (8, 64)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory: pytest.TempPathFactory) -> dict[str, EventAccumulator]:
    """One reduced finetune_lm run of each runner."""
    return {
        runner: _fit(tmp_path_factory.mktemp(runner), "finetune_lm", f"runner={runner}")
        for runner in ("lightning", "accelerate")
    }


def test_both_runners_write_the_same_tags_and_graph(
    finetuned: dict[str, EventAccumulator],
) -> None:
    lightning, accelerate = finetuned["lightning"], finetuned["accelerate"]
    for kind in ("scalars", "histograms"):
        assert set(lightning.Tags()[kind]) == set(accelerate.Tags()[kind]), kind
    for tag in ("train/loss", "train/perplexity", "val/perplexity", "vitals/tokens_per_sec"):
        steps = [[e.step for e in acc.Scalars(tag)] for acc in (lightning, accelerate)]
        assert steps[0] == steps[1], tag
    graphs = [{n.name for n in acc.Graph().node} for acc in (lightning, accelerate)]
    assert graphs[0] == graphs[1]


@pytest.mark.parametrize("runner", ["lightning", "accelerate"])
def test_finetune_lm_watches_adapters_and_logs_embeddings_twice(
    finetuned: dict[str, EventAccumulator], runner: str
) -> None:
    acc = finetuned[runner]
    tags = set(acc.Tags()["scalars"])
    groups = {t.removeprefix("vitals_layers/grad_norm/") for t in tags if "grad_norm/" in t}
    # Both runners name groups from the same root module, so both land in the same cards.
    assert groups == {
        "net.tok_emb",
        *(f"net.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"),
    }
    assert {"train/loss", "train/perplexity", "val/loss", "val/perplexity"} <= tags
    assert "vitals/frozen_params" in tags
    assert "vitals/tokens_per_sec" in tags
    assert not any("mlp" in t or "lm_head" in t or "gate_proj" in t for t in tags)
    assert "vitals/alerts" not in tags  # a healthy run raises nothing
    # One projector tag at two steps, before and after fine-tuning, with different rows.
    text = (Path(acc.path) / "projector_config.pbtxt").read_text(encoding="utf-8")
    config = text_format.Parse(text, ProjectorConfig())
    names = sorted(e.tensor_name for e in config.embeddings)
    assert all(n.startswith("embeddings/tokens") for n in names), names
    steps = sorted(int(n.rsplit(":", 1)[1]) for n in names)
    assert len(steps) == 2 and steps[0] == 0 and steps[1] > 0, names
    before, after = (
        Path(acc.path, e.tensor_path).read_bytes()
        for e in sorted(config.embeddings, key=lambda e: int(e.tensor_name.rsplit(":", 1)[1]))
    )
    assert before != after  # the embedding adapter trained


@pytest.mark.parametrize("runner", ["lightning", "accelerate"])
def test_alerts_demo_shows_spike_and_nan(tmp_path: Path, runner: str) -> None:
    # The NaN reaches the adapters, so the final token embeddings are NaN too: the
    # projector says so, and the run still ends.
    with pytest.warns(UserWarning, match="has NaN or Inf in 96 of 96 rows"):
        acc = _fit(
            tmp_path,
            "alerts_demo",
            f"runner={runner}",
            "trainer.max_epochs=3",  # 8 batches an epoch: 24 steps
            "model.net.inject_spike_at=14",
            "model.net.inject_nan_from=18",
        )
    texts = "".join(
        e.tensor_proto.string_val[0].decode() for e in acc.Tensors("alerts/text_summary")
    )
    assert "| 14 | loss_spike | model |" in texts
    assert "| 18 | nonfinite_loss | model |" in texts
    assert "nonfinite_grads" in texts
    assert acc.Scalars("vitals/alerts")[-1].value >= 3
