"""Training-health monitors: statistics on the device, alerts, throughput and MFU.

Framework free (torch and numpy only); the Lightning callback
:class:`tbx_lightning.TrainingMonitor` and Accelerate loops route to it.

- :mod:`._binning`: the binning engine (moments and bin counts of flat tensors on
  their device), histograms;
- :mod:`._model`: :class:`ModelMonitor`, per-group model statistics and their tags;
- :mod:`._alerts`: the detectors and actions behind :class:`AlertRules`;
- :mod:`._efficiency`: FLOP counting and device peaks for MFU;
- :mod:`._sink`: what a monitor writes into (:class:`MonitorSink`).
"""

from tbx_lightning.monitor._alerts import Alert, AlertRules, TrainingAlertError
from tbx_lightning.monitor._binning import log_histograms
from tbx_lightning.monitor._model import ModelMonitor, adapter_group, group_name
from tbx_lightning.monitor._sink import MonitorSink

__all__ = [
    "Alert",
    "AlertRules",
    "ModelMonitor",
    "MonitorSink",
    "TrainingAlertError",
    "adapter_group",
    "group_name",
    "log_histograms",
]
