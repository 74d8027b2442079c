"""What TBXCallback relies on in transformers and accelerate: fails loudly when a release changes it.

- ``report_to`` names are looked up in
  ``transformers.integrations.integration_utils.INTEGRATION_TO_CALLBACK`` and the class
  found there is instantiated without arguments; ``TrainingArguments`` accepts any name.
- The Trainer clips gradients before ``on_pre_optimizer_step`` (why the callback cannot
  measure there), through ``accelerator.clip_grad_norm_``, which calls
  ``accelerator.unscale_gradients`` first, once per optimizer step, also when it does
  not clip (``max_grad_norm=0`` measures the norm with ``inf``).
- The Trainer calls ``self.training_step`` and ``self.train`` through the instance, and a
  callback finds the Trainer as ``self`` a few frames up from ``on_init_end`` and
  ``on_train_begin`` (see tbx_lightning/hf/_trainer.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.integrations import integration_utils  # noqa: E402

import tbx_lightning  # noqa: E402
from tbx_lightning import TBXCallback  # noqa: E402
from tbx_lightning.templates.hf_finetune import (  # noqa: E402
    corpus_text,
    lora_llama,
    text_blocks,
    word_tokenizer,
)
from tests.hf import one_thread  # noqa: E402, F401 (autouse)
from tests.hf import targs as shared_targs  # noqa: E402
from tests.tb import read  # noqa: E402
from tests.tb import scalars as points  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return word_tokenizer(corpus_text(), 96)


@pytest.fixture(scope="module")
def blocks(tokenizer: Any) -> Any:
    return text_blocks(tokenizer, corpus_text(), 16, 32)


def targs(out: Path, **kwargs: Any) -> TrainingArguments:
    """Four optimizer steps, each logged."""
    return shared_targs(out, **{"max_steps": 4, "logging_steps": 1, **kwargs})


def scalars(path: str, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of a scalar tag of the run at ``path``; none if it was not written."""
    acc = read(path)
    return points(acc, tag) if tag in acc.Tags()["scalars"] else []


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=180,
    )


# ----------------------------------------------------------------------------- report_to
def test_registry_holds_tbx_and_the_trainer_builds_it_without_arguments(tmp_path: Path) -> None:
    assert isinstance(integration_utils.INTEGRATION_TO_CALLBACK, dict)
    assert integration_utils.INTEGRATION_TO_CALLBACK["tbx"] is TBXCallback
    assert integration_utils.get_reporting_integration_callbacks("tbx") == [TBXCallback]
    args = TrainingArguments(str(tmp_path), report_to="tbx", use_cpu=True)
    assert args.report_to == ["tbx"]
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=args)
    found = [c for c in trainer.callback_handler.callbacks if isinstance(c, TBXCallback)]
    assert len(found) == 1
    assert found[0]._hooks.trainer is trainer  # found from on_init_end
    assert not tmp_path.joinpath("runs").exists()  # nothing written before training


@pytest.mark.parametrize(
    "imports",
    [
        pytest.param("import tbx_lightning\nimport transformers.trainer", id="tbx-first"),
        pytest.param("import transformers.trainer\nimport tbx_lightning", id="transformers-first"),
        pytest.param(
            "import tbx_lightning, importlib\n"
            "import transformers.integrations.integration_utils as iu\n"
            "importlib.reload(iu)",
            id="reloaded",
        ),
    ],
)
def test_report_to_tbx_after_import_in_any_order(imports: str) -> None:
    result = run_python(
        imports
        + "\nfrom transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK\n"
        "print(INTEGRATION_TO_CALLBACK['tbx'].__qualname__)\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "TBXCallback"


def test_without_import_report_to_tbx_names_the_choices() -> None:
    result = run_python(
        """
        from transformers.integrations import get_reporting_integration_callbacks
        try:
            get_reporting_integration_callbacks("tbx")
        except ValueError as error:
            print("refused:", error)
        """
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused: tbx is not supported" in result.stdout


# ----------------------------------------------------------------------------- clipping
class ClippedAtPreOptimizerStep(TrainerCallback):
    """Records the gradient norm a callback sees in ``on_pre_optimizer_step``."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        grads = [p.grad for p in kwargs["model"].parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


def test_the_trainer_clips_before_on_pre_optimizer_step(
    tmp_path: Path, tokenizer: Any, blocks: Any
) -> None:
    seen = ClippedAtPreOptimizerStep()
    trainer = Trainer(
        model=lora_llama(len(tokenizer)),
        args=targs(tmp_path, max_grad_norm=1e-3),
        train_dataset=blocks,
        callbacks=[seen],
    )
    trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert seen.norms == pytest.approx([1e-3] * 4, rel=1e-3)
    assert min(logged) > 1e-2  # the Trainer logs the norm before clipping


@pytest.mark.parametrize(
    ("max_grad_norm", "accumulation"),
    [
        pytest.param(1e-3, 1, id="clipping"),
        pytest.param(1e-3, 2, id="clipping-accumulated"),
        pytest.param(0.0, 1, id="no-clipping"),
    ],
)
def test_monitor_sees_the_gradients_before_clipping(
    tmp_path: Path, tokenizer: Any, blocks: Any, max_grad_norm: float, accumulation: int
) -> None:
    callback = TBXCallback(tmp_path / "runs", norm_every_n_steps=1)
    trainer = Trainer(
        model=lora_llama(len(tokenizer)),
        args=targs(
            tmp_path / "out",
            max_grad_norm=max_grad_norm,
            gradient_accumulation_steps=accumulation,
            per_device_train_batch_size=4 // accumulation,
        ),
        train_dataset=blocks,
        callbacks=[callback],
    )
    calls: list[int] = []
    unscale = trainer.accelerator.unscale_gradients
    trainer.accelerator.unscale_gradients = lambda *a, **k: (calls.append(1), unscale(*a, **k))[1]
    trainer.train()
    assert len(calls) == 4  # once per optimizer step, clipping or not
    logged = [(h["step"], h["grad_norm"]) for h in trainer.state.log_history if "grad_norm" in h]
    measured = scalars(callback.log_dir or "", "vitals/grad_norm_total")
    assert [s for s, _ in measured] == [s for s, _ in logged] == [1, 2, 3, 4]
    assert [v for _, v in measured] == pytest.approx([v for _, v in logged], rel=1e-5)
    post = scalars(callback.log_dir or "", "vitals/grad_norm_total/post_clip")
    if max_grad_norm:
        assert [v for _, v in post] == pytest.approx([max_grad_norm] * 4, rel=1e-3)
    else:
        assert post == []


# ----------------------------------------------------------------------------- the Trainer
def test_a_callback_added_later_finds_the_trainer_and_leaves_it_as_it_was(
    tmp_path: Path, tokenizer: Any, blocks: Any
) -> None:
    trainer = Trainer(
        model=lora_llama(len(tokenizer)), args=targs(tmp_path / "out"), train_dataset=blocks
    )
    callback = TBXCallback(tmp_path / "runs", norm_every_n_steps=1)
    trainer.add_callback(callback)
    trainer.train()
    assert callback._hooks.trainer is trainer  # found from on_train_begin
    assert len(scalars(callback.log_dir or "", "vitals/grad_norm_total")) == 4
    assert "training_step" not in vars(trainer)
    assert "unscale_gradients" not in vars(trainer.accelerator)
    assert getattr(vars(trainer).get("train"), "__wrapped__", None) is not None  # for later calls
    assert tbx_lightning.TBXCallback is TBXCallback
