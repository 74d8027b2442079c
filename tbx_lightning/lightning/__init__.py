"""The Lightning integration: the drop-in logger, its callbacks, and the resume glue.

- :mod:`._logger`: :class:`TBXLogger` (Lightning's ``Logger`` contract, routed to the
  shared :class:`~tbx_lightning.run.Run`) and :class:`RunStateCallback`.
- :mod:`._trainer`: the one place that finds the Trainer, which Lightning never hands
  to a logger.
- :mod:`._monitor`, :mod:`._projector`: thin callbacks over :mod:`tbx_lightning.monitor`
  and :mod:`tbx_lightning.projector`.
"""

from tbx_lightning.lightning._logger import RunStateCallback, TBXLogger, cli_hparams
from tbx_lightning.lightning._monitor import TrainingMonitor
from tbx_lightning.lightning._projector import EmbeddingProjector

__all__ = ["EmbeddingProjector", "RunStateCallback", "TBXLogger", "TrainingMonitor", "cli_hparams"]
