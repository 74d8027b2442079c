"""Makes ``report_to="tbx"`` name :class:`~tbx_lightning.TBXCallback`, without importing transformers.

transformers turns ``TrainingArguments.report_to`` into callbacks through one dict,
``transformers.integrations.integration_utils.INTEGRATION_TO_CALLBACK`` (name ->
callback class, instantiated without arguments by the Trainer); ``TrainingArguments``
itself does not check the names. ``import tbx_lightning`` must make ``"tbx"`` one of
them yet must not import transformers (seconds of start-up) in programs that never
use it. If ``integration_utils`` is already imported, the callback registers at once;
otherwise a tiny import hook waits for that one module to finish loading (the Trainer
imports it before it reads ``report_to``) and registers then.

``tests/test_hf_contract.py`` fails loudly when a transformers release moves the dict
or stops reading it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType
from typing import Any

__all__ = ["REGISTRY_MODULE", "REPORT_TO", "install_transformers_hook", "register"]

REGISTRY_MODULE = "transformers.integrations.integration_utils"
REPORT_TO = "tbx"


def register() -> None:
    """Adds ``"tbx"`` to transformers' ``report_to`` registry; safe to call repeatedly.

    Runs by itself when transformers' integrations load after ``import tbx_lightning``.
    """
    module = sys.modules.get(REGISTRY_MODULE)
    if module is None:
        import importlib

        module = importlib.import_module(REGISTRY_MODULE)
    registry = getattr(module, "INTEGRATION_TO_CALLBACK", None)
    if not isinstance(registry, dict):
        return  # a release without the registry: pass callbacks=[TBXCallback()] instead
    from tbx_lightning.hf._callback import TBXCallback

    registry[REPORT_TO] = TBXCallback


class _LoaderWrapper(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        register()


class _IntegrationsFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of transformers' integration registry so registration follows it."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != REGISTRY_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _LoaderWrapper(spec.loader)
                return spec
        return None


def install_transformers_hook() -> None:
    """Registers now if the registry is loaded, and again whenever it is (re)loaded. Idempotent."""
    if REGISTRY_MODULE in sys.modules:
        register()
    if not any(isinstance(f, _IntegrationsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _IntegrationsFinder())
