"""Makes ``report_to="tbx"`` name :class:`~tbx_lightning.TBXCallback`, without importing transformers.

transformers turns ``TrainingArguments.report_to`` into callbacks through one dict,
``transformers.integrations.integration_utils.INTEGRATION_TO_CALLBACK`` (name ->
callback class, instantiated without arguments by the Trainer); ``TrainingArguments``
itself does not check the names. ``import tbx_lightning`` must make ``"tbx"`` one of
them yet must not import transformers (seconds of start-up) in programs that never
use it. If ``integration_utils`` is already imported, the callback registers at once;
otherwise the package's one import hook (:mod:`tbx_lightning._hooks`) waits for that
module to finish loading (the Trainer imports it before it reads ``report_to``) and
registers then.

``tests/test_hf_contract.py`` fails loudly when a transformers release moves the dict
or stops reading it.
"""

from __future__ import annotations

import sys

from tbx_lightning._hooks import after_import

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


def install_transformers_hook() -> None:
    """Registers now if the registry is loaded, and again whenever it is (re)loaded."""
    after_import(REGISTRY_MODULE, register)
