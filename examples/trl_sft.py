"""Supervised fine-tuning with TRL's ``SFTTrainer`` and ``TBXCallback``, driven by an OmegaConf config.

A LoRA fine-tune of a small Llama-like model on the text that ships with the package.
Nothing is downloaded: the tokenizer is trained on the text and the model is built from
a config (swap in ``AutoTokenizer.from_pretrained(...)`` and
``AutoModelForCausalLM.from_pretrained(...)`` for a real checkpoint). Run it::

    python examples/trl_sft.py
    python examples/trl_sft.py sft.learning_rate=3e-4 lora.r=16 sft.max_steps=200

then ``tensorboard --logdir runs``. Each run lands in ``runs/trl-sft/version_N``: the
loss, TRL's metrics (``train/mean_token_accuracy``, ``train/entropy``, ...),
``eval/*``, the monitor's ``vitals/*`` and alerts, the token embeddings before and
after in the projector, and one HParams row with the learning rate, batch size, LoRA
rank and this config. Stop it and run it again with ``ckpt_path=true``: it goes on from
the last checkpoint in the same run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import cast

import datasets
import torch
from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

from tbx_lightning import TBXCallback
from tbx_lightning.templates.hf_finetune import corpus_text, tiny_llama, word_tokenizer

# The sections `model`, `peft` and `args` are named as TBXCallback names the Trainer's own
# config, so each value is one HParams column; `paths.*`, `callbacks.*`, `task_name`,
# `num_threads` and `ckpt_path` are plumbing, left out of the row (they stay in config.yaml).
DEFAULTS = """
task_name: trl-sft
num_threads: 1
# null: start fresh; true: the latest checkpoint in paths.output_dir; or a checkpoint folder.
ckpt_path: null
paths:
  runs_dir: runs
  output_dir: outputs/trl-sft
model:
  vocab_size: 512
  hidden_size: 64
  num_hidden_layers: 2
  num_attention_heads: 4
  num_key_value_heads: 2
  intermediate_size: 172
peft:
  r: 8
  lora_alpha: 16
  target_modules: [q_proj, v_proj, embed_tokens]
args:
  learning_rate: 3e-3
  per_device_train_batch_size: 8
  gradient_accumulation_steps: 2
  max_steps: 60
  max_length: 48
  logging_steps: 5
  eval_steps: 20
  save_steps: 20
  warmup_steps: 5
  max_grad_norm: 1.0
  seed: 0
callbacks:
  monitor:
    norm_every_n_steps: 5
    hist_every_n_steps: 20
    on_alert: stop
"""


def _plain(node: object) -> dict[str, object]:
    return cast(dict[str, object], OmegaConf.to_container(node, resolve=True))


def main(argv: Sequence[str]) -> str:
    """Trains with the config's overrides (``key=value``); returns the run directory."""
    cfg = cast(
        DictConfig, OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.from_dotlist(list(argv)))
    )
    torch.set_num_threads(int(cfg.num_threads))

    text = corpus_text()
    model_cfg = _plain(cfg.model)
    tokenizer = word_tokenizer(text, int(cast(int, model_cfg.pop("vocab_size"))))
    lines = [line for line in text.splitlines() if len(line.split()) >= 8]
    data = datasets.Dataset.from_dict({"text": lines}).train_test_split(test_size=0.1, seed=0)
    model = tiny_llama(len(tokenizer), **model_cfg)  # type: ignore[arg-type]

    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(cfg.paths.output_dir),
            eval_strategy="steps",
            save_strategy="steps",
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            report_to="none",
            **_plain(cfg.args),  # type: ignore[arg-type]
        ),
        train_dataset=data["train"],
        eval_dataset=data["test"],
        processing_class=tokenizer,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **_plain(cfg.peft)),  # type: ignore[arg-type]
        callbacks=[
            TBXCallback(
                cfg.paths.runs_dir,
                name=str(cfg.task_name),
                config=cfg,
                # This config's own plumbing stays in config.yaml, out of the row.
                hparams_exclude=["paths.*", "callbacks.*", "task_name", "num_threads", "ckpt_path"],
                log_embeddings=True,
                **_plain(cfg.callbacks.monitor),  # type: ignore[arg-type]
            )
        ],
    )
    trainer.train(resume_from_checkpoint=cfg.ckpt_path)
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, TBXCallback))
    print(f"run: {callback.log_dir}\ntensorboard --logdir {cfg.paths.runs_dir}")
    return str(callback.log_dir)


if __name__ == "__main__":
    main(sys.argv[1:])
