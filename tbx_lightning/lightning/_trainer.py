"""The one place that finds the running Trainer, which Lightning never hands to loggers.

A Lightning ``Logger`` gets no reference to the Trainer that uses it, yet
``TBXLogger`` needs one: to attach its :class:`~tbx_lightning.RunStateCallback`
(resume into the checkpoint's run, failure status) and to read LightningCLI's
parsed config. This module finds it by walking the caller's frames for a local
named ``trainer`` or ``self`` that is a ``Trainer``.

What it relies on (``tests/test_lightning.py::test_trainer_lookup_contract`` fails
loudly when a Lightning release changes it): Lightning reads ``logger.experiment``
at the start of every ``fit``/``validate``/``test``/``predict`` from
``lightning.pytorch.trainer.call._call_setup_hook``, a function whose ``trainer``
argument is a local of the calling frame, a few frames above the property.

Users who prefer no frame walking pass ``TBXLogger(find_trainer=False)`` and add
``logger.callback()`` to the Trainer's callbacks; the callback's ``setup`` hook
then gives the logger its Trainer.
"""

from __future__ import annotations

import sys

from lightning.pytorch import Trainer

__all__ = ["SETUP_HOOK", "find_trainer"]

# The Lightning function that reads ``logger.experiment`` with ``trainer`` as a local.
SETUP_HOOK = "lightning.pytorch.trainer.call._call_setup_hook"


def find_trainer(limit: int = 40) -> Trainer | None:
    """The Trainer whose call is on the stack, or None (looks ``limit`` frames up)."""
    frame = sys._getframe(1)
    for _ in range(limit):
        if frame is None:
            return None
        for name in ("trainer", "self"):
            candidate = frame.f_locals.get(name)
            if isinstance(candidate, Trainer):
                return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None
