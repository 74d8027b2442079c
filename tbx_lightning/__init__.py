"""TensorBoard runs for PyTorch Lightning, Hugging Face Accelerate and Trainer, through tensorboardX.

``import tbx_lightning`` stays light: it imports neither lightning nor accelerate nor
transformers. The integrations load on first use of their names (``tbx_lightning.TBXLogger``,
``tbx_lightning.TBXTracker``, ``tbx_lightning.TBXCallback``), and ``Accelerator(log_with="tbx")``
and ``TrainingArguments(report_to="tbx")`` work after a plain ``import tbx_lightning``
because the tracker and the callback register themselves the moment their host's registry
module is imported (see :mod:`tbx_lightning.accelerate._registration` and
:mod:`tbx_lightning.hf._registration`).
"""

# Only public names are bound here without an underscore: tests/test_public_api.py
# checks that ``__all__`` is exactly that set.
import importlib as _importlib
import typing as _typing

from tbx_lightning._version import __version__
from tbx_lightning.accelerate._registration import (
    install_accelerate_hook as _install_accelerate_hook,
)
from tbx_lightning.hf._registration import (
    install_transformers_hook as _install_transformers_hook,
)

if _typing.TYPE_CHECKING:
    from tbx_lightning._writer import RunWriter
    from tbx_lightning.accelerate import TBXTracker
    from tbx_lightning.errors import (
        BuildError,
        ConfigError,
        ConfigTypeError,
        GraphExportError,
        HParamsError,
        LoggedTypeError,
        LoggedValueError,
        MissingDependencyError,
        RunInUseError,
        RunNotStartedError,
        RunWriterError,
        TableError,
        TBXError,
        TrainingAlertError,
        UsageError,
    )
    from tbx_lightning.hf import TBXCallback
    from tbx_lightning.lightning import RunStateCallback, TBXLogger
    from tbx_lightning.lightning._monitor import TrainingMonitor
    from tbx_lightning.lightning._projector import EmbeddingProjector
    from tbx_lightning.monitor import ModelMonitor, MonitorOptions
    from tbx_lightning.monitor._alerts import Alert, AlertRules

__all__ = [
    "Alert",
    "AlertRules",
    "BuildError",
    "ConfigError",
    "ConfigTypeError",
    "EmbeddingProjector",
    "GraphExportError",
    "HParamsError",
    "LoggedTypeError",
    "LoggedValueError",
    "MissingDependencyError",
    "ModelMonitor",
    "MonitorOptions",
    "RunInUseError",
    "RunNotStartedError",
    "RunStateCallback",
    "RunWriter",
    "RunWriterError",
    "TBXCallback",
    "TBXError",
    "TBXLogger",
    "TBXTracker",
    "TableError",
    "TrainingAlertError",
    "TrainingMonitor",
    "UsageError",
    "__version__",
]

# name -> module that defines it; modules load on first attribute access.
_LAZY = {
    "Alert": "tbx_lightning.monitor._alerts",
    "AlertRules": "tbx_lightning.monitor._alerts",
    "BuildError": "tbx_lightning.errors",
    "ConfigError": "tbx_lightning.errors",
    "ConfigTypeError": "tbx_lightning.errors",
    "EmbeddingProjector": "tbx_lightning.lightning._projector",
    "GraphExportError": "tbx_lightning.errors",
    "HParamsError": "tbx_lightning.errors",
    "LoggedTypeError": "tbx_lightning.errors",
    "LoggedValueError": "tbx_lightning.errors",
    "MissingDependencyError": "tbx_lightning.errors",
    "ModelMonitor": "tbx_lightning.monitor",
    "MonitorOptions": "tbx_lightning.monitor",
    "RunInUseError": "tbx_lightning.errors",
    "RunNotStartedError": "tbx_lightning.errors",
    "RunStateCallback": "tbx_lightning.lightning",
    "RunWriter": "tbx_lightning._writer",
    "RunWriterError": "tbx_lightning.errors",
    "TBXCallback": "tbx_lightning.hf",
    "TBXError": "tbx_lightning.errors",
    "TableError": "tbx_lightning.errors",
    "TBXLogger": "tbx_lightning.lightning",
    "TBXTracker": "tbx_lightning.accelerate",
    "TrainingAlertError": "tbx_lightning.errors",
    "TrainingMonitor": "tbx_lightning.lightning._monitor",
    "UsageError": "tbx_lightning.errors",
}


def __getattr__(name: str) -> _typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tbx_lightning' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


_install_accelerate_hook()
_install_transformers_hook()
