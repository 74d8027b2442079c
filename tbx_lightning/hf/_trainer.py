"""The one place that reaches into a running ``transformers.Trainer``.

A ``TrainerCallback`` is handed no Trainer, no loss, no batch and no moment between
the end of backward and gradient clipping (the Trainer clips before it calls
``on_pre_optimizer_step``). :class:`~tbx_lightning.TBXCallback` needs all four, so
this module finds the Trainer and wraps three of its bound methods on the instance
(never on a class, never in another module):

- ``trainer.train``: an exception out of ``train()`` marks the run failed (aborted
  for Ctrl-C), and ``resume_from_checkpoint`` says which checkpoint a resumed
  training starts from;
- ``trainer.training_step`` (documented by transformers as the method to override;
  TRL's trainers override it, the wrapper wraps theirs): each micro-batch's loss,
  its sample and token counts, the first batch (for the graph and the FLOP count);
- ``trainer.accelerator.unscale_gradients``: ``Accelerator.clip_grad_norm_`` calls it
  before clipping, and the Trainer calls ``clip_grad_norm_`` once per optimizer step
  (with ``max_grad_norm``, or with ``inf`` to measure the norm when it does not
  clip). Right after it returns, gradients are complete, unscaled (fp16) and not yet
  clipped: the moment the monitor measures and checks them.

The Trainer is found by walking the caller's frames for a local ``self`` that is a
``transformers.Trainer``: from ``on_init_end`` (called at the end of
``Trainer.__init__``) or, for a callback added later with ``trainer.add_callback``,
from ``on_train_begin`` (called from ``Trainer._inner_training_loop``).

What it relies on is checked by ``tests/test_hf_contract.py``, which fails loudly
when a transformers or accelerate release changes it: the pre-clip norm the monitor
measures equals the ``grad_norm`` the Trainer logs, on steps that clip and on steps
that do not, and the lookup finds the Trainer from both hooks.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["WRAPPED", "TrainerHooks", "find_trainer", "resume_path"]

# The bound methods wrapped on the instance, by owner.
WRAPPED = ("trainer.train", "trainer.training_step", "trainer.accelerator.unscale_gradients")
_MARK = "_tbx_lightning_wrapper"


def find_trainer(limit: int = 12) -> Any:
    """The ``transformers.Trainer`` whose method is on the stack, or None."""
    from transformers import Trainer

    frame = sys._getframe(1)
    for _ in range(limit):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None


def resume_path(trainer: Any, resume_from_checkpoint: Any) -> str | None:
    """The checkpoint folder ``train(resume_from_checkpoint=...)`` starts from, or None."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        from transformers.trainer_utils import get_last_checkpoint

        found: str | None = get_last_checkpoint(trainer.args.output_dir)
        return found
    return str(resume_from_checkpoint)


class TrainerHooks:
    """Wraps a Trainer's methods on the instance and calls back into the callback.

    Args:
        on_train_call: Called with ``resume_from_checkpoint`` when ``train()`` starts.
        on_train_error: Called with the exception when ``train()`` raises (then re-raised).
        on_train_exit: Called when ``train()`` returns or raises, last.
        on_micro_batch: Wraps each ``training_step`` call: gets ``(call, inputs)``,
            where ``call()`` runs the original and returns its loss.
        on_unscaled: Called after ``accelerator.unscale_gradients`` returned.
    """

    def __init__(
        self,
        *,
        on_train_call: Callable[[Any], None],
        on_train_error: Callable[[BaseException], None],
        on_train_exit: Callable[[], None],
        on_micro_batch: Callable[[Callable[[], Any], Any], Any],
        on_unscaled: Callable[[], None],
    ) -> None:
        self._on_train_call = on_train_call
        self._on_train_error = on_train_error
        self._on_train_exit = on_train_exit
        self._on_micro_batch = on_micro_batch
        self._on_unscaled = on_unscaled
        self.trainer: Any = None
        # (owner, name, what the instance held before: None when the class method served)
        self._step_wrapped: list[tuple[Any, str, Any]] | None = None

    def bind(self, trainer: Any) -> None:
        """Wraps ``trainer.train`` (once per Trainer): the run's status and resume point."""
        if self.trainer is trainer:
            return
        self.trainer = trainer
        original = trainer.train
        if getattr(original, _MARK, None) is self:
            return

        @functools.wraps(original)
        def train(*args: Any, **kwargs: Any) -> Any:
            resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
            self._on_train_call(resume_path(trainer, resume))
            try:
                return original(*args, **kwargs)
            except BaseException as error:
                self._on_train_error(error)
                raise
            finally:
                self._on_train_exit()

        setattr(train, _MARK, self)
        trainer.train = train

    def wrap_step(self) -> None:
        """Wraps ``training_step`` and the accelerator's ``unscale_gradients`` for one training."""
        trainer = self.trainer
        if trainer is None or self._step_wrapped is not None:
            return
        step = trainer.training_step
        accelerator = trainer.accelerator
        unscale = accelerator.unscale_gradients

        @functools.wraps(step)
        def training_step(model: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
            return self._on_micro_batch(lambda: step(model, inputs, *args, **kwargs), inputs)

        @functools.wraps(unscale)
        def unscale_gradients(*args: Any, **kwargs: Any) -> Any:
            result = unscale(*args, **kwargs)
            self._on_unscaled()
            return result

        setattr(training_step, _MARK, self)
        setattr(unscale_gradients, _MARK, self)
        self._step_wrapped = [
            (trainer, "training_step", vars(trainer).get("training_step")),
            (accelerator, "unscale_gradients", vars(accelerator).get("unscale_gradients")),
        ]
        trainer.training_step = training_step
        accelerator.unscale_gradients = unscale_gradients

    def unwrap_step(self) -> None:
        """Puts the original ``training_step`` and ``unscale_gradients`` back."""
        if self._step_wrapped is None:
            return
        wrapped, self._step_wrapped = self._step_wrapped, None
        for owner, name, before in wrapped:
            if getattr(vars(owner).get(name), _MARK, None) is not self:
                continue  # wrapped again by someone else since: leave theirs in place
            if before is None:
                delattr(owner, name)
            else:
                setattr(owner, name, before)
