"""TensorBoard runs for PyTorch Lightning, Hugging Face Accelerate and Trainer, through tensorboardX.

``import tbx_lightning`` stays light: it imports neither lightning nor accelerate nor
transformers (nor torch). Every public name is listed once, in ``__init__.pyi``, and
loads on first use (``tbx_lightning.TBXLogger``, ``tbx_lightning.TBXTracker``,
``tbx_lightning.TBXCallback``). ``Accelerator(log_with="tbx")`` and
``TrainingArguments(report_to="tbx")`` work after a plain ``import tbx_lightning``
because the tracker and the callback register themselves the moment their host's
registry module is imported (:mod:`tbx_lightning._hooks`).
"""

import lazy_loader as _lazy

from tbx_lightning.accelerate._registration import (
    install_accelerate_hook as _install_accelerate_hook,
)
from tbx_lightning.hf._registration import (
    install_transformers_hook as _install_transformers_hook,
)

# Only public names are bound without an underscore: tests/test_public_api.py checks
# that ``__all__`` (the stub's) is exactly that set.
__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)

_install_accelerate_hook()
_install_transformers_hook()
