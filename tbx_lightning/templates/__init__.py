"""Ready-to-run experiment pieces that the YAML files under ``configs/`` build by ``_target_``.

- :mod:`tbx_lightning.templates.digits`: the 8x8 handwritten digits that ship with
  scikit-learn, a small CNN and its LightningModule (the ``quickstart`` experiment).
- :mod:`tbx_lightning.templates.tiny_lm`: a character-level transformer language model
  on the text in ``templates/data/corpus.txt`` (the ``tiny_lm`` experiment).
- :mod:`tbx_lightning.templates.finetune`: loads a classifier checkpoint, freezes its
  backbone and trains a new head (the ``finetune`` experiment).
- :mod:`tbx_lightning.templates.accelerate_loop`: the same configs driving a plain
  PyTorch loop with ``Accelerator(log_with="tbx")`` (``quickstart_accelerate``).
- :mod:`tbx_lightning.templates.lightning_cli`: a LightningCLI config callback that
  logs the whole CLI config as the run's hyperparameters.

Nothing here downloads anything: every dataset ships in an installed package or in
this package.
"""

from __future__ import annotations

__all__: list[str] = []
