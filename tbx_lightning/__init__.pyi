# The one list of tbx_lightning's public names: type checkers read it as the package's
# interface, and __init__.py loads each name from here on first use (lazy_loader's
# attach_stub), so `import tbx_lightning` imports no framework.
from ._version import __version__
from ._writer import RunWriter
from .accelerate import TBXTracker
from .errors import (
    ConfigError,
    ConfigTypeError,
    GraphExportError,
    HParamsError,
    LoggedDataError,
    LoggedTypeError,
    LoggedValueError,
    MissingDependencyError,
    RunInUseError,
    RunNotStartedError,
    RunWriterError,
    TBXError,
    TrainingAlertError,
    UsageError,
)
from .hf import TBXCallback
from .lightning import RunStateCallback, TBXLogger
from .lightning._monitor import TrainingMonitor
from .lightning._projector import EmbeddingProjector

# The monitor's own names (ModelMonitor, MonitorOptions, AlertRules, Alert) have one home:
# tbx_lightning.monitor.

__all__ = [
    "ConfigError",
    "ConfigTypeError",
    "EmbeddingProjector",
    "GraphExportError",
    "HParamsError",
    "LoggedDataError",
    "LoggedTypeError",
    "LoggedValueError",
    "MissingDependencyError",
    "RunInUseError",
    "RunNotStartedError",
    "RunStateCallback",
    "RunWriter",
    "RunWriterError",
    "TBXCallback",
    "TBXError",
    "TBXLogger",
    "TBXTracker",
    "TrainingAlertError",
    "TrainingMonitor",
    "UsageError",
    "__version__",
]
