"""Training-health monitors: statistics on the device, alerts, throughput and MFU.

Framework free (torch and numpy only); the Lightning callback
:class:`tbx_lightning.TrainingMonitor`, the Hugging Face Trainer callback and plain
or Accelerate loops route to it, with one set of options (:class:`MonitorOptions`).

- :mod:`._options`: :class:`MonitorOptions`, every option, checked once;
- :mod:`._model`: :class:`ModelMonitor`, the hooks and their order in a step;
- :mod:`._groups`: parameter groups and layer names (wrappers stripped);
- :mod:`._stats`: per-group histograms, norms and moments, packed for one transfer;
- :mod:`._binning`: the binning engine (moments and bin counts of flat tensors on
  their device) and :func:`log_histograms`;
- :mod:`._ratio`: the update/weight ratio and the fixed samples;
- :mod:`._readout`: the one transfer per step read back into tags and detector input;
- :mod:`._lr`: learning rates and momenta of the optimizer;
- :mod:`._guard`: the non-finite check before ``optimizer.step()``;
- :mod:`._pace`: throughput, MFU, memory and the step-time share across ranks;
- :mod:`._ranks`: what ranks agree on (a stop, a raise, non-finite values);
- :mod:`._alerts`: the detectors and the record of what they found;
- :mod:`._efficiency`: FLOP counting and device peaks for MFU;
- :mod:`._sink`: what a monitor writes into (:class:`MonitorSink`), webhooks and axes.
"""

from tbx_lightning.monitor._alerts import Alert, AlertRules
from tbx_lightning.monitor._binning import log_histograms
from tbx_lightning.monitor._groups import adapter_group, group_name
from tbx_lightning.monitor._model import ModelMonitor
from tbx_lightning.monitor._options import MonitorOptions
from tbx_lightning.monitor._sink import MonitorSink

__all__ = [
    "Alert",
    "AlertRules",
    "ModelMonitor",
    "MonitorOptions",
    "MonitorSink",
    "adapter_group",
    "group_name",
    "log_histograms",
]
