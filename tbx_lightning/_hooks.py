"""Run a function right after a named module is imported, without importing it first.

``import tbx_lightning`` must make ``Accelerator(log_with="tbx")`` and
``TrainingArguments(report_to="tbx")`` work, yet must not import accelerate or
transformers (seconds of start-up) in programs that never use them. Each integration
asks for a call after the one module that holds its host's registry loads; if the
module is loaded already, the call happens at once. One finder on ``sys.meta_path``
watches the names asked for and wraps nothing else; it stays installed, because
``importlib.reload`` of a registry module builds a fresh registry that must be filled
again. This is the package's only import hook.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

__all__ = ["after_import"]

_CALLS: dict[str, list[Callable[[], None]]] = {}


class _Loader(importlib.abc.Loader):
    """The module's own loader, followed by the calls asked for that module."""

    def __init__(self, loader: Any, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        for call in _CALLS.get(self._name, ()):
            call()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in _CALLS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


def after_import(module: str, call: Callable[[], None]) -> None:
    """Calls ``call`` now if ``module`` is loaded, and after every (re)load of it. Idempotent.

    Args:
        module: The full name of the module to wait for.
        call: What to run once it has loaded (no arguments).
    """
    calls = _CALLS.setdefault(module, [])
    if call not in calls:
        calls.append(call)
    if module in sys.modules:
        call()
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
