"""Registers the "tbx" tracker with Accelerate without importing Accelerate eagerly.

``import tbx_lightning`` must make ``Accelerator(log_with="tbx")`` work, yet must not
pay for importing accelerate (and torch.distributed set-up with it) in programs that
never use it. If ``accelerate.tracking`` is already imported, the tracker registers
at once; otherwise a tiny import hook waits for that module to finish loading and
registers then. Accelerate's ``Accelerator`` imports ``accelerate.tracking`` itself,
so the registration is in place before any ``log_with`` is read.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

_TARGET = "accelerate.tracking"


def _register_now() -> None:
    loading = sys.modules.get("tbx_lightning.accelerate._tracker")
    if loading is not None and not hasattr(loading, "register"):
        # The integration module itself is being imported (it imports accelerate.tracking
        # first); it registers the tracker at the end of its own import.
        return
    from tbx_lightning.accelerate._tracker import register

    register()


class _LoaderWrapper(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _register_now()


class _AccelerateTrackingFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of ``accelerate.tracking`` so registration runs right after it loads."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _LoaderWrapper(spec.loader)
                return spec
        return None


def install_accelerate_hook() -> None:
    """Registers now if accelerate.tracking is loaded, and again whenever it is (re)loaded.

    The finder stays installed after the first registration: ``importlib.reload`` of
    ``accelerate.tracking`` builds a fresh registry, and the tracker must be in it.
    The finder looks at that one module name only and wraps nothing else. Idempotent.
    """
    if _TARGET in sys.modules:
        _register_now()
    if not any(isinstance(f, _AccelerateTrackingFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AccelerateTrackingFinder())
