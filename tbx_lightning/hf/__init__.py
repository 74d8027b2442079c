"""The Hugging Face Trainer route: ``TBXCallback`` and ``report_to="tbx"``.

- :mod:`._callback`: :class:`TBXCallback` (the ``TrainerCallback`` contract, routed to
  the shared :class:`~tbx_lightning.run.Run` and :class:`~tbx_lightning.monitor.ModelMonitor`);
- :mod:`._trainer`: the one place that reaches into a running Trainer (the Trainer
  itself, the loss, the moment before clipping);
- :mod:`._tags`: the Trainer's log keys as the other routes' tag names;
- :mod:`._config`: TrainingArguments, model and PEFT config as config and HParams row;
- :mod:`._resume`: the run a checkpoint belongs to, in the checkpoint folder;
- :mod:`._completions`: TRL's generated completions as a bounded Text table;
- :mod:`._registration`: the import hook behind ``report_to="tbx"``.

This package module stays light: transformers loads on first use of ``TBXCallback``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tbx_lightning.hf._callback import TBXCallback
    from tbx_lightning.hf._config import ARGS_IN_ROW, PEFT_IN_ROW
    from tbx_lightning.hf._registration import register
    from tbx_lightning.hf._tags import tag_of

__all__ = ["ARGS_IN_ROW", "PEFT_IN_ROW", "TBXCallback", "register", "tag_of"]

_LAZY = {
    "ARGS_IN_ROW": "tbx_lightning.hf._config",
    "PEFT_IN_ROW": "tbx_lightning.hf._config",
    "TBXCallback": "tbx_lightning.hf._callback",
    "register": "tbx_lightning.hf._registration",
    "tag_of": "tbx_lightning.hf._tags",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tbx_lightning.hf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
