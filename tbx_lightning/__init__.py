"""TensorBoard runs for PyTorch Lightning, Hugging Face Accelerate and the Trainer, through tensorboardX.

``import tbx_lightning`` stays light: it imports neither lightning nor accelerate (nor
torch). Every public name is listed once, in ``__init__.pyi``; it loads on first use
(``tbx_lightning.TBXLogger``, ``tbx_lightning.TBXTracker``). ``Accelerator(log_with="tbx")``
works after a plain ``import tbx_lightning`` because the tracker registers itself the
moment accelerate's tracking module is imported (see
:mod:`tbx_lightning.accelerate._registration`).
"""

import lazy_loader as _lazy

from tbx_lightning.accelerate._registration import (
    install_accelerate_hook as _install_accelerate_hook,
)

# Only public names are bound without an underscore: tests/test_public_api.py checks
# that ``__all__`` (the stub's) is exactly that set.
__getattr__, __dir__, __all__ = _lazy.attach_stub(__name__, __file__)

_install_accelerate_hook()
