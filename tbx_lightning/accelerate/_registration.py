"""Registers the "tbx" tracker with Accelerate without importing Accelerate eagerly.

Accelerate's ``Accelerator`` imports ``accelerate.tracking`` itself, so a registration
made right after that module loads (:func:`tbx_lightning._hooks.after_import`) is in
place before any ``log_with`` is read.
"""

from __future__ import annotations

import sys

from tbx_lightning._hooks import after_import

__all__ = ["install_accelerate_hook"]

_TARGET = "accelerate.tracking"


def _register_now() -> None:
    loading = sys.modules.get("tbx_lightning.accelerate._tracker")
    if loading is not None and not hasattr(loading, "register"):
        # The integration module itself is being imported (it imports accelerate.tracking
        # first); it registers the tracker at the end of its own import.
        return
    from tbx_lightning.accelerate._tracker import register

    register()


def install_accelerate_hook() -> None:
    """Registers now if ``accelerate.tracking`` is loaded, and again whenever it is (re)loaded."""
    after_import(_TARGET, _register_now)
