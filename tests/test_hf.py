"""TBXCallback with the real transformers Trainer and TRL's SFTTrainer, read back from disk.

Tiny Llama models built from configs, a word-level tokenizer trained on the shipped
text, datasets built in memory: nothing is downloaded. Every test reads the run back
with TensorBoard's reader (EventAccumulator) and its hparams plugin data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from transformers import Trainer, TrainerCallback  # noqa: E402

import tbx_lightning  # noqa: E402
from tbx_lightning import (  # noqa: E402
    ConfigError,
    ConfigTypeError,
    TBXCallback,
    TrainingAlertError,
)
from tbx_lightning.graph import TEXT_TAG as GRAPH_TEXT_TAG  # noqa: E402
from tbx_lightning.hf import ARGS_IN_ROW  # noqa: E402
from tbx_lightning.hf._resume import RUN_FILE, read_record  # noqa: E402
from tbx_lightning.projector import read_config  # noqa: E402
from tbx_lightning.templates.hf_finetune import (  # noqa: E402
    corpus_text,
    lora_llama,
    text_blocks,
    tiny_llama,
    word_tokenizer,
)
from tests.hf import one_thread, targs  # noqa: E402, F401 (one_thread: autouse)
from tests.rows import session  # noqa: E402
from tests.tb import read, scalars  # noqa: E402
from tests.tbserver import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB = 128


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return word_tokenizer(corpus_text(), VOCAB)


@pytest.fixture(scope="module")
def blocks(tokenizer: Any) -> Any:
    return text_blocks(tokenizer, corpus_text(), 16, 48)


def same_points(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    """Equal steps, values equal to float32 precision (the event files store float32)."""
    assert [s for s, _ in got] == [s for s, _ in want], (got, want)
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), (got, want)
    return True


def texts(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [
        (e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(f"{tag}/text_summary")
    ]


def folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith("."))


class RaiseAt(TrainerCallback):
    """Raises ``error`` at the end of optimizer step ``step``."""

    def __init__(self, step: int, error: BaseException) -> None:
        self.step = step
        self.error = error

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise self.error


def nan_from(model: torch.nn.Module, trainer_box: list[Any], step: int) -> None:
    """Makes the model's logits NaN from optimizer step ``step`` on (the Trainer's numbering)."""

    def hook(module: Any, inputs: Any, output: Any) -> Any:
        trainer = trainer_box[0]
        if module.training and trainer.state.global_step + 1 >= step:
            return output * float("nan")
        return output

    model.get_output_embeddings().register_forward_hook(hook)


# ----------------------------------------------------------------------------- options
def test_options_are_checked_at_construction() -> None:
    with pytest.raises(ConfigTypeError, match="unknown option `bin`: did you mean `bins`"):
        TBXCallback(bin=32)
    with pytest.raises(ConfigError, match="monitor option `bins`"):
        TBXCallback(bins=1)
    with pytest.raises(ConfigTypeError, match="`args_in_row` of TBXCallback must be a list"):
        TBXCallback(args_in_row="learning_rate")
    with pytest.raises(ConfigTypeError, match="`monitor` of TBXCallback must be True or False"):
        TBXCallback(monitor="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="`max_completions` of TBXCallback"):
        TBXCallback(max_completions=0)
    with pytest.raises(ConfigError, match="flush_secs"):
        TBXCallback(writer_options={"flush_secs": -1})
    with pytest.raises(ConfigTypeError, match="`version` of TBXCallback"):
        TBXCallback(version=1.5)  # type: ignore[arg-type]


def test_log_keys_map_to_the_routes_tags() -> None:
    from tbx_lightning import LoggedValueError
    from tbx_lightning.hf._tags import trainer_tags

    logs = {
        "loss": 1.0,
        "epoch": 0.5,
        "eval_loss": 2.0,
        "eval_rewards/chosen": 0.1,
        "train_runtime": 3.0,
        "train_loss": 1.5,
        "total_flos": 9.0,
        "kl": 0.2,
        "reward": None,
        "val/acc": 0.9,
    }
    assert trainer_tags(logs) == {
        "train/loss": 1.0,
        "trainer/epoch": 0.5,
        "eval/loss": 2.0,
        "eval/rewards/chosen": 0.1,
        "train/runtime": 3.0,
        "train/loss_mean": 1.5,
        "train/total_flos": 9.0,
        "train/kl": 0.2,
        "val/acc": 0.9,
    }
    with pytest.raises(LoggedValueError, match="'eval_loss' and 'eval/loss' both map to"):
        trainer_tags({"eval_loss": 1.0, "eval/loss": 2.0})


def test_completion_cells_stay_one_table_row() -> None:
    from tbx_lightning.hf._completions import markdown_table

    table = markdown_table(
        {
            "prompt": [[{"role": "user", "content": "a|b"}]],
            "completion": ["line one\nline two " + "x" * 50],
            "reward": [0.123456],
        },
        max_rows=4,
        max_chars=20,
    )
    assert table is not None
    header, rule, row = table.splitlines()
    assert header == "| prompt | completion | reward |" and rule == "|---|---|---|"
    assert row == "| user: a\\|b | line one<br>line two x… | 0.1235 |"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("not json", id="damaged"),
        pytest.param('{"version": "../elsewhere", "step": 3}', id="outside-the-runs-folder"),
        pytest.param('{"version": 1, "step": -1}', id="negative-step"),
        pytest.param('{"version": true, "step": 3}', id="bool-version"),
        pytest.param("[1, 2]", id="not-an-object"),
    ],
)
def test_a_bad_run_record_is_ignored(tmp_path: Path, text: str) -> None:
    (tmp_path / RUN_FILE).write_text(text)
    assert read_record(str(tmp_path)) is None


def test_constructing_writes_nothing(tmp_path: Path) -> None:
    TBXCallback(tmp_path / "runs", name="x", on_alert="stop")
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- one run
def test_trainer_run_tags_row_config_and_status(
    tmp_path: Path, tokenizer: Any, blocks: Any
) -> None:
    model = lora_llama(len(tokenizer))
    callback = TBXCallback(
        tmp_path / "runs",
        name="lora",
        norm_every_n_steps=2,
        hist_every_n_steps=4,
        config={"data": {"block_size": 16}, "notes": "first try"},
    )
    trainer = Trainer(
        model=model,
        args=targs(tmp_path / "out", eval_strategy="steps", eval_steps=3, max_grad_norm=0.05),
        train_dataset=blocks,
        eval_dataset=blocks.select(range(8)),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    run = tmp_path / "runs" / "lora" / "version_0"
    assert callback.log_dir == str(run)
    acc = read(run)
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "eval/loss",
        "eval/runtime",
        "trainer/epoch",
        "train/loss_mean",
        "train/runtime",
        "train/total_flos",
        "vitals/grad_norm_total",
        "vitals/grad_norm_total/post_clip",
        "vitals/lr/group_0",
        "vitals/tokens_per_sec",
        "vitals/samples_per_sec",
        "vitals/update_ratio",
        "vitals/frozen_params",
    } <= tags
    assert not {"loss", "learning_rate", "grad_norm", "epoch", "train/learning_rate"} & tags
    assert "vitals_layers/grad_norm/model.layers.0.self_attn.q_proj" in tags
    assert "vitals_layers/grads/model.layers.0.self_attn.q_proj" in acc.Tags()["histograms"]
    history = trainer.state.log_history
    logged = [(h["step"], h["loss"]) for h in history if "loss" in h]
    assert same_points(scalars(acc, "train/loss"), logged)
    assert [s for s, _ in scalars(acc, "eval/loss")] == [3, 6]
    # One epoch point per step, however many log calls a step had.
    epochs = [s for s, _ in scalars(acc, "trainer/epoch")]
    assert epochs == sorted(set(epochs)) == [2, 3, 4, 6]
    # The monitor's pre-clip norm is the Trainer's own grad_norm; the clipped one is the bound.
    norms = dict(scalars(acc, "vitals/grad_norm_total"))
    for entry in history:
        if "grad_norm" in entry:
            assert norms[entry["step"]] == pytest.approx(entry["grad_norm"], rel=1e-5)
    post = [v for _, v in scalars(acc, "vitals/grad_norm_total/post_clip")]
    assert post == pytest.approx([0.05] * len(post), rel=1e-4) and post
    # The linear schedule's learning rate, written by the monitor once it changed.
    lrs = scalars(acc, "vitals/lr/group_0")
    assert [s for s, _ in lrs] == [2, 4, 6]
    assert lrs[0][1] > lrs[-1][1]

    row, status = session(acc)
    assert status == "STATUS_SUCCESS"
    assert {k for k in row if k.startswith("args.")} == {
        f"args.{name}" for name in ARGS_IN_ROW if name in trainer.args.to_dict()
    }
    assert row["args.learning_rate"] == pytest.approx(1e-2)
    assert row["args.max_grad_norm"] == pytest.approx(0.05)
    assert row["args.per_device_train_batch_size"] == 4
    assert row["model.type"] == "llama"
    assert row["model.hidden_size"] == 32
    assert row["model.num_hidden_layers"] == 2
    assert row["model.trainable_parameters"] == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    assert row["peft.r"] == 4
    assert row["peft.peft_type"] == "LORA"
    assert row["peft.target_modules"] == "['embed_tokens', 'q_proj', 'v_proj']"
    assert row["data.block_size"] == 16 and row["notes"] == "first try"
    assert not any(k.startswith(("model_config.", "args.output_dir", "args.logging")) for k in row)
    assert not any(k.startswith("peft.") and k[5:] == "task_type" for k in row)
    # config.yaml and run/config keep every field the row leaves out.
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["args"]["output_dir"] == str(tmp_path / "out")
    assert stored["model_config"]["vocab_size"] == len(tokenizer)
    assert stored["peft"]["task_type"] == "CAUSAL_LM"
    ((_, config_text),) = texts(acc, "run/config")
    assert "output_dir:" in config_text
    # The run is closed: no writer thread or file handle is left behind.
    assert callback.run is not None and not callback.run.is_open


def test_report_to_tbx_writes_under_output_dir_runs(
    tmp_path: Path, tokenizer: Any, blocks: Any
) -> None:
    args = targs(tmp_path / "out", report_to="tbx", max_steps=2, logging_steps=1)
    trainer = Trainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=blocks)
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, TBXCallback)]
    trainer.train()
    trainer.train()  # a second training is a new run
    root = tmp_path / "out" / "runs"
    assert folders(root) == ["version_0", "version_1"]
    for version in ("version_0", "version_1"):
        acc = read(root / version)
        assert [s for s, _ in scalars(acc, "train/loss")] == [1, 2]
        assert session(acc)[1] == "STATUS_SUCCESS"
    assert callback.log_dir == str(root / "version_1")


def test_run_name_and_env_choose_the_folder(
    tmp_path: Path, tokenizer: Any, blocks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    args = targs(tmp_path / "out", max_steps=1, run_name="sweep-a")
    callback = TBXCallback(monitor=False)
    Trainer(
        model=tiny_llama(len(tokenizer)), args=args, train_dataset=blocks, callbacks=[callback]
    ).train()
    assert callback.log_dir == str(tmp_path / "tb" / "sweep-a" / "version_0")


def test_without_monitor_the_trainers_lr_and_grad_norm_are_the_vitals(
    tmp_path: Path, tokenizer: Any, blocks: Any
) -> None:
    callback = TBXCallback(tmp_path / "runs", monitor=False)
    trainer = Trainer(
        model=tiny_llama(len(tokenizer)),
        args=targs(tmp_path / "out"),
        train_dataset=blocks,
        callbacks=[callback],
    )
    trainer.train()
    acc = read(callback.log_dir or "")
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert same_points(
        scalars(acc, "vitals/lr/group_0"), [(h["step"], h["learning_rate"]) for h in history]
    )
    assert same_points(
        scalars(acc, "vitals/grad_norm_total"), [(h["step"], h["grad_norm"]) for h in history]
    )
    assert not any(t.startswith("vitals_layers/") for t in acc.Tags()["scalars"])


def test_evaluate_before_and_after_train_is_the_same_run(
    tmp_path: Path, tokenizer: Any, blocks: Any
) -> None:
    callback = TBXCallback(tmp_path / "runs", monitor=False)
    trainer = Trainer(
        model=tiny_llama(len(tokenizer)),
        args=targs(tmp_path / "out", max_steps=2),
        train_dataset=blocks,
        eval_dataset=blocks.select(range(4)),
        callbacks=[callback],
    )
    trainer.evaluate()
    trainer.train()
    trainer.evaluate()
    assert folders(tmp_path / "runs") == ["version_0"]
    acc = read(tmp_path / "runs" / "version_0")
    assert [s for s, _ in scalars(acc, "eval/loss")] == [0, 2]
    row, status = session(acc)
    assert status == "STATUS_SUCCESS" and row["args.max_steps"] == 2


def test_graph_and_token_embeddings_at_start_and_end(
    tmp_path: Path, tokenizer: Any, blocks: Any
) -> None:
    callback = TBXCallback(
        tmp_path / "runs", log_graph=True, log_embeddings=True, embedding_points=50
    )
    Trainer(
        model=lora_llama(len(tokenizer)),
        args=targs(tmp_path / "out", max_steps=3),
        train_dataset=blocks,
        processing_class=tokenizer,
        callbacks=[callback],
    ).train()
    run = Path(callback.log_dir or "")
    acc = read(run)
    assert acc.Graph() is not None
    assert [e.step for e in acc.Tensors(GRAPH_TEXT_TAG)] == [0]
    config = read_config(fsspec.filesystem("file"), str(run))
    entries = {e.tensor_name: e for e in config.embeddings}
    assert sorted(entries) == ["embeddings/tokens (latest):00000003", "embeddings/tokens:00000000"]
    for entry in entries.values():
        assert list(entry.tensor_shape) == [50, 32]
        labels = (run / entry.metadata_path).read_text().splitlines()
        assert labels[0] == "label\tindex" and len(labels) == 51
        assert {line.split("\t")[0] for line in labels[1:]} <= set(tokenizer.get_vocab())


# ----------------------------------------------------------------------------- statuses
@pytest.mark.parametrize(
    ("error", "status", "label"),
    [
        pytest.param(RuntimeError("boom"), "STATUS_FAILURE", "failed", id="exception"),
        pytest.param(KeyboardInterrupt(), "STATUS_FAILURE", "aborted", id="ctrl-c"),
    ],
)
def test_an_exception_in_train_marks_the_run(
    tmp_path: Path, tokenizer: Any, blocks: Any, error: BaseException, status: str, label: str
) -> None:
    callback = TBXCallback(tmp_path / "runs", norm_every_n_steps=1)
    trainer = Trainer(
        model=tiny_llama(len(tokenizer)),
        args=targs(tmp_path / "out", logging_steps=1),
        train_dataset=blocks,
        callbacks=[callback, RaiseAt(3, error)],
    )
    with pytest.raises(type(error)):
        trainer.train()
    acc = read(callback.log_dir or "")
    assert [s for s, _ in scalars(acc, "train/loss")] == [1, 2]
    assert session(acc)[1] == status
    assert callback.monitor is None  # released with the run
    assert "training_step" not in vars(trainer)  # the Trainer is as it was
    assert "unscale_gradients" not in vars(trainer.accelerator)
    start = session_row(callback.log_dir or "")
    assert start["run.status"] == label


def session_row(path: str) -> dict[str, Any]:
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(path)
    acc.Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


# ----------------------------------------------------------------------------- alerts
def test_nan_loss_hidden_by_the_trainer_stops_after_a_finite_checkpoint(
    tmp_path: Path, tokenizer: Any, blocks: Any
) -> None:
    from safetensors.torch import load_file

    model = lora_llama(len(tokenizer))
    box: list[Any] = []
    nan_from(model, box, step=4)
    callback = TBXCallback(tmp_path / "runs", on_alert="stop", norm_every_n_steps=2)
    trainer = Trainer(
        model=model,
        # logging_nan_inf_filter (on by default) keeps the NaN out of the logged loss.
        args=targs(tmp_path / "out", max_steps=10, logging_steps=1, save_strategy="no"),
        train_dataset=blocks,
        callbacks=[callback],
    )
    box.append(trainer)
    trainer.train()
    assert trainer.state.global_step == 4
    assert callback.stop_checkpoint == str(tmp_path / "out" / "checkpoint-4")
    weights = load_file(os.path.join(callback.stop_checkpoint, "adapter_model.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    record = read_record(callback.stop_checkpoint)
    assert record is not None and record.version == 0 and record.step == 4
    acc = read(callback.log_dir or "")
    losses = scalars(acc, "train/loss")
    assert [s for s, _ in losses] == [1, 2, 3, 4]
    assert all(v == v for _, v in losses)  # the Trainer's filter hid the NaN
    _row, status = session(acc)
    assert status == "STATUS_FAILURE"
    assert session_row(callback.log_dir or "")["run.status"] == "alert: nonfinite_grads"
    ((step, note),) = texts(acc, "run/status")
    assert step == 4 and "stopped by the alert nonfinite_grads at step 4" in note
    alerts = texts(acc, "alerts")
    assert alerts and alerts[0][0] == 4 and "nonfinite" in alerts[0][1]


def test_on_alert_raise_raises_before_the_update(
    tmp_path: Path, tokenizer: Any, blocks: Any
) -> None:
    model = lora_llama(len(tokenizer))
    box: list[Any] = []
    nan_from(model, box, step=3)
    callback = TBXCallback(tmp_path / "runs", on_alert="raise")
    trainer = Trainer(
        model=model,
        args=targs(tmp_path / "out", logging_steps=1),
        train_dataset=blocks,
        callbacks=[callback],
    )
    box.append(trainer)
    with pytest.raises(TrainingAlertError, match=r"non-finite grad values in .* at step 3"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    _row, status = session(callback.log_dir or "")
    assert status == "STATUS_FAILURE"
    assert session_row(callback.log_dir or "")["run.status"] == "alert: nonfinite_grads"


# ----------------------------------------------------------------------------- resume
def test_resume_goes_on_in_the_same_run_with_one_curve(
    tmp_path: Path, tokenizer: Any, blocks: Any
) -> None:
    out = tmp_path / "out"

    def trainer_for(*extra: TrainerCallback) -> tuple[Trainer, TBXCallback]:
        callback = TBXCallback(tmp_path / "runs", norm_every_n_steps=1, hist_every_n_steps=2)
        args = targs(out, max_steps=8, logging_steps=1, save_steps=3, save_strategy="steps")
        model = lora_llama(len(tokenizer))
        trainer = Trainer(
            model=model, args=args, train_dataset=blocks, callbacks=[callback, *extra]
        )
        return trainer, callback

    first, callback = trainer_for(RaiseAt(5, RuntimeError("preempted")))
    with pytest.raises(RuntimeError, match="preempted"):
        first.train()
    assert json.loads((out / "checkpoint-3" / RUN_FILE).read_text())["version"] == 0
    assert session(callback.log_dir or "")[1] == "STATUS_FAILURE"

    second, resumed = trainer_for()
    second.train(resume_from_checkpoint=True)  # the latest checkpoint: checkpoint-3
    assert folders(tmp_path / "runs") == ["version_0"]
    assert resumed.log_dir == callback.log_dir
    acc = read(tmp_path / "runs" / "version_0")
    for tag in ("train/loss", "vitals/grad_norm_total", "trainer/epoch"):
        steps = [s for s, _ in scalars(acc, tag)]
        assert steps == list(range(1, 9)), (tag, steps)
    hist = [e.step for e in acc.Histograms("vitals_layers/grads/model.layers.0.self_attn.q_proj")]
    assert hist == [2, 4, 6, 8]
    row, status = session(acc)
    assert status == "STATUS_SUCCESS" and row["args.max_steps"] == 8
    assert read_record(str(out / "checkpoint-6")) is not None


def test_a_checkpoint_without_a_record_starts_a_new_run(
    tmp_path: Path, tokenizer: Any, blocks: Any
) -> None:
    out = tmp_path / "out"
    args = targs(out, max_steps=2, logging_steps=1, save_steps=2, save_strategy="steps")
    Trainer(model=tiny_llama(len(tokenizer)), args=args, train_dataset=blocks).train()
    callback = TBXCallback(tmp_path / "runs", monitor=False)
    args = targs(out, max_steps=4, logging_steps=1, save_steps=2, save_strategy="no")
    Trainer(
        model=tiny_llama(len(tokenizer)), args=args, train_dataset=blocks, callbacks=[callback]
    ).train(resume_from_checkpoint=str(out / "checkpoint-2"))
    acc = read(callback.log_dir or "")
    assert [s for s, _ in scalars(acc, "train/loss")] == [3, 4]


# ----------------------------------------------------------------------------- TRL
def test_sft_trainer_metrics_under_train_and_eval(tmp_path: Path, tokenizer: Any) -> None:
    trl = pytest.importorskip("trl")
    import datasets

    lines = [line for line in corpus_text().splitlines() if len(line.split()) > 6][:24]
    data = datasets.Dataset.from_dict({"text": lines})
    config = trl.SFTConfig(
        str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=4,
        max_length=24,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        report_to="tbx",
        learning_rate=1e-2,
    )
    trainer = trl.SFTTrainer(
        model=lora_llama(len(tokenizer)),
        args=config,
        train_dataset=data,
        eval_dataset=data.select(range(8)),
        processing_class=tokenizer,
    )
    trainer.train()
    acc = read(tmp_path / "out" / "runs" / "version_0")
    tags = set(acc.Tags()["scalars"])
    assert {
        "train/loss",
        "train/entropy",
        "train/mean_token_accuracy",
        "train/num_tokens",
        "eval/loss",
        "eval/mean_token_accuracy",
        "eval/entropy",
    } <= tags
    assert not any(t.startswith(("train/eval", "train/train")) for t in tags)
    row, status = session(acc)
    assert status == "STATUS_SUCCESS"
    assert row["args.max_length"] == 24 and row["args.packing"] is False


def test_grpo_completions_are_a_bounded_text_table(tmp_path: Path, tokenizer: Any) -> None:
    trl = pytest.importorskip("trl")
    import datasets

    prompts = datasets.Dataset.from_dict({"prompt": ["the keeper", "the light", "a ship"] * 4})

    def short(completions: list[str], **kwargs: Any) -> list[float]:
        return [-float(len(c)) for c in completions]

    config = trl.GRPOConfig(
        str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
        log_completions=True,
        learning_rate=1e-2,
    )
    callback = TBXCallback(tmp_path / "runs", max_completions=3)
    trainer = trl.GRPOTrainer(
        model=lora_llama(len(tokenizer)),
        reward_funcs=short,
        args=config,
        train_dataset=prompts,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.train()
    acc = read(callback.log_dir or "")
    tables = texts(acc, "completions")
    assert [s for s, _ in tables] == [1, 2]
    header, _rule, *rows = tables[0][1].splitlines()
    assert header == "| prompt | completion | short | advantage |"
    assert rows[:3] and len([r for r in rows if r.startswith("|")]) == 3
    assert rows[-1] == "3 of 4 rows"
    tags = set(acc.Tags()["scalars"])
    assert {"train/reward", "train/rewards/short/mean", "train/completions/mean_length"} <= tags
    row, _ = session(acc)
    assert row["args.num_generations"] == 2


def test_dpo_metrics_and_log_completions_callback_table(tmp_path: Path, tokenizer: Any) -> None:
    trl = pytest.importorskip("trl")
    import datasets
    from transformers import GenerationConfig
    from trl.trainer.callbacks import LogCompletionsCallback

    pairs = {
        "prompt": ["the keeper", "the light", "a ship", "the sea"] * 2,
        "chosen": [" counted the steps", " burned all night", " passed by", " was grey"] * 2,
        "rejected": [" the the the", " of of", " a a a", " and and"] * 2,
    }
    data = datasets.Dataset.from_dict(pairs)
    config = trl.DPOConfig(
        str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        max_length=16,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
    )
    callback = TBXCallback(tmp_path / "runs", max_completions=2)
    trainer = trl.DPOTrainer(
        model=lora_llama(len(tokenizer)),
        args=config,
        train_dataset=data,
        eval_dataset=data.select(range(4)),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    generation = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0)
    trainer.add_callback(LogCompletionsCallback(trainer, generation, num_prompts=2, freq=1))
    trainer.train()
    acc = read(callback.log_dir or "")
    tags = set(acc.Tags()["scalars"])
    for split in ("train", "eval"):
        assert {
            f"{split}/rewards/chosen",
            f"{split}/rewards/margins",
            f"{split}/logps/chosen",
        } <= tags
    tables = texts(acc, "completions")
    assert [s for s, _ in tables] == [1, 2]
    lines = tables[-1][1].splitlines()
    assert lines[0] == "| prompt | completion |"
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| the keeper", "| the light"]
    row, _ = session(acc)
    assert row["args.beta"] == pytest.approx(0.1) and row["args.loss_type"] == "['sigmoid']"


# ----------------------------------------------------------------------------- processes
@pytest.mark.slow
def test_two_processes_only_world_process_zero_writes(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "scripts" / "hf_ddp.py"),
        str(tmp_path),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    zero = json.loads((tmp_path / "done_0.json").read_text())
    one = json.loads((tmp_path / "done_1.json").read_text())
    assert zero["world"] == one["world"] == 2
    assert zero["has_run"] and not one["has_run"] and one["log_dir"] is None
    assert folders(tmp_path / "runs") == ["ddp"]
    assert folders(tmp_path / "runs" / "ddp") == ["version_0"]
    run = tmp_path / "runs" / "ddp" / "version_0"
    assert len([p for p in run.iterdir() if p.name.startswith("events.out.tfevents.1")]) == 1
    acc = read(run)
    assert [s for s, _ in scalars(acc, "train/loss")] == [1, 2, 3, 4]
    assert [s for s, _ in scalars(acc, "vitals/grad_norm_total")] == [1, 2, 3, 4]
    assert session(acc)[1] == "STATUS_SUCCESS"


def test_import_tbx_lightning_stays_light() -> None:
    code = (
        "import sys, tbx_lightning\n"
        "heavy = [m for m in ('transformers', 'trl', 'peft', 'torch') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert "TBXCallback" in tbx_lightning.__all__


# ----------------------------------------------------------------------------- example
def test_trl_sft_example_runs_and_resumes_in_one_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("trl")
    import importlib.util

    spec = importlib.util.spec_from_file_location("trl_sft", REPO / "examples" / "trl_sft.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.chdir(tmp_path)
    budget = [
        "args.logging_steps=1",
        "args.eval_steps=3",
        "args.save_steps=3",
        "model.vocab_size=128",
    ]
    first = example.main([*budget, "args.max_steps=3"])
    second = example.main([*budget, "args.max_steps=5", "ckpt_path=true"])
    assert first == second == str(tmp_path / "runs" / "trl-sft" / "version_0")
    acc = read(first)
    assert [s for s, _ in scalars(acc, "train/loss")] == [1, 2, 3, 4, 5]
    assert [s for s, _ in scalars(acc, "train/mean_token_accuracy")] == [1, 2, 3, 4, 5]
    assert [s for s, _ in scalars(acc, "eval/loss")] == [3, 5]  # and at the end
    row, status = session(acc)
    assert status == "STATUS_SUCCESS"
    assert row["args.max_steps"] == 5 and row["args.learning_rate"] == pytest.approx(3e-3)
    assert row["peft.r"] == 8 and row["model.hidden_size"] == 64
    assert not any(k.startswith(("paths.", "callbacks.")) for k in row)
    assert not {"task_name", "num_threads", "ckpt_path"} & set(row)
    entries = read_config(fsspec.filesystem("file"), first).embeddings
    assert len(entries) == 3  # before the first training, and at the end of each


# ----------------------------------------------------------------------------- template
def test_finetune_lm_hf_experiment_runs_through_the_cli(tmp_path: Path) -> None:
    from tbx_lightning import cli

    code = cli.main(
        [
            "fit",
            "finetune_lm_hf",
            f"paths.runs_dir={tmp_path}",
            "data.limit=48",
            "hf_args.max_steps=4",
            "hf_args.logging_steps=1",
            "hf_args.eval_steps=4",
            "hf_args.save_steps=4",
            "callbacks.training_monitor.norm_every_n_steps=2",
        ]
    )
    assert code == 0
    run = tmp_path / "finetune_lm_hf" / "version_0"
    acc = read(run)
    assert [s for s, _ in scalars(acc, "train/loss")] == [1, 2, 3, 4]
    assert [s for s, _ in scalars(acc, "eval/loss")] == [4]
    assert [s for s, _ in scalars(acc, "vitals/grad_norm_total")] == [1, 2, 3, 4]
    row, status = session(acc)
    assert status == "STATUS_SUCCESS"
    assert row["args.lr_scheduler_type"] == "cosine" and row["peft.r"] == 4
    assert (
        row["data.block_size"] == 32 and row["tags"] == "['text', 'llama', 'lora', 'transformers']"
    )
    assert not any(k.startswith(("trainer.", "hf_args.", "callbacks.", "paths.")) for k in row)
    assert (tmp_path / "finetune_lm_hf" / "checkpoints" / "checkpoint-4" / RUN_FILE).is_file()
    assert len(read_config(fsspec.filesystem("file"), str(run)).embeddings) == 2


def test_without_the_trainer_the_callback_says_what_it_cannot_do(
    tmp_path: Path, tokenizer: Any, blocks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tbx_lightning.hf._callback as callback_module

    monkeypatch.setattr(callback_module, "find_trainer", lambda: None)
    callback = TBXCallback(tmp_path / "runs", norm_every_n_steps=1)
    trainer = Trainer(
        model=tiny_llama(len(tokenizer)),
        args=targs(tmp_path / "out", max_steps=2, logging_steps=1, max_grad_norm=1e-3),
        train_dataset=blocks,
        callbacks=[callback],
    )
    with pytest.warns(UserWarning) as caught:
        trainer.train()
    messages = [str(w.message) for w in caught]
    assert any("could not find the Trainer" in m for m in messages)
    assert any("measured gradients after clipping" in m for m in messages)
    acc = read(callback.log_dir or "")
    # Measured in on_pre_optimizer_step: the clipped norm, as the warning says.
    assert [v for _, v in scalars(acc, "vitals/grad_norm_total")] == pytest.approx(
        [1e-3, 1e-3], rel=1e-3
    )
    assert session(acc)[1] == "STATUS_SUCCESS"


# ----------------------------------------------------------------------------- TensorBoard
@pytest.mark.slow
def test_hparams_tab_compares_two_trainings(
    tmp_path: Path, tokenizer: Any, blocks: Any, tensorboard: Any
) -> None:
    for lr in (1e-2, 1e-3):
        callback = TBXCallback(tmp_path / "runs", name="sweep", norm_every_n_steps=2)
        Trainer(
            model=lora_llama(len(tokenizer)),
            args=targs(
                tmp_path / "out", learning_rate=lr, max_steps=4, eval_strategy="steps", eval_steps=4
            ),
            train_dataset=blocks,
            eval_dataset=blocks.select(range(4)),
            callbacks=[callback],
        ).train()
    server = tensorboard(tmp_path / "runs")
    assert sorted(server.wait_for_runs(2)) == ["sweep/version_0", "sweep/version_1"]
    experiment = server.hparams_experiment()
    names = {h["name"] for h in experiment["hparamInfos"]}
    assert {
        "args.learning_rate",
        "args.per_device_train_batch_size",
        "peft.r",
        "model.type",
    } <= names
    assert not any(
        n.startswith(("args.output_dir", "args.logging", "model_config.")) for n in names
    )
    assert len(names) < 60  # the fields that tell runs apart, not 100+ of them
    metrics = [m["name"]["tag"] for m in experiment["metricInfos"]]
    assert {"train/loss", "eval/loss", "vitals/grad_norm_total"} <= set(metrics)
    groups = {g["name"]: g for g in server.session_groups(slice_size=10)}
    lrs = {name: g["hparams"]["args.learning_rate"] for name, g in groups.items()}
    assert lrs == {"sweep/version_0": pytest.approx(1e-2), "sweep/version_1": pytest.approx(1e-3)}
    assert {g["sessions"][0]["status"] for g in groups.values()} == {"STATUS_SUCCESS"}
