"""A short ``transformers.Trainer`` run with ``TBXCallback`` on two CPU processes (gloo).

Started by tests/test_hf.py with ``torchrun --nproc_per_node 2 tests/scripts/hf_ddp.py OUT``.
Each process writes ``OUT/done_<rank>.json`` when ``train()`` returned: what it saw of
the run (only the world process zero has one) and its monitor's stop decision.
"""

from __future__ import annotations

import json
import os
import sys

import torch

import tbx_lightning  # noqa: F401  (registers report_to="tbx")


def main(out: str) -> None:
    from transformers import Trainer, TrainingArguments

    from tbx_lightning import TBXCallback
    from tbx_lightning.templates.hf_finetune import (
        corpus_text,
        lora_llama,
        text_blocks,
        word_tokenizer,
    )

    torch.set_num_threads(1)
    text = corpus_text()
    tokenizer = word_tokenizer(text, 128)
    data = text_blocks(tokenizer, text, 16, 32)
    model = lora_llama(len(tokenizer))
    args = TrainingArguments(
        os.path.join(out, "output"),
        max_steps=4,
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
        ddp_backend="gloo",
    )
    callback = TBXCallback(
        os.path.join(out, "runs"),
        name="ddp",
        norm_every_n_steps=2,
        hist_every_n_steps=2,
        on_alert="stop",
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    report = {
        "world": trainer.args.world_size,
        "log_dir": callback.log_dir,
        "has_run": callback.run is not None,
        "steps": trainer.state.global_step,
    }
    with open(os.path.join(out, f"done_{rank}.json"), "w") as handle:
        json.dump(report, handle)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
