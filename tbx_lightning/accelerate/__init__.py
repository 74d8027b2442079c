"""The Accelerate integration: the ``"tbx"`` tracker and its registration.

- :mod:`._tracker`: :class:`TBXTracker` (Accelerate's ``GeneralTracker`` contract, routed
  to the shared :class:`~tbx_lightning.run.Run`) and :func:`register`.
- :mod:`._registration`: the import hook that registers the tracker as soon as
  ``accelerate.tracking`` loads, without importing accelerate eagerly.

This package module stays light: the tracker (and accelerate with it) loads on first
use of its names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tbx_lightning.accelerate._tracker import TBXTracker, register

__all__ = ["TBXTracker", "register"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'tbx_lightning.accelerate' has no attribute {name!r}")
    value = getattr(importlib.import_module("tbx_lightning.accelerate._tracker"), name)
    globals()[name] = value
    return value
