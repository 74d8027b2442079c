"""``tbx-lightning``, the command line: compose a config, fit, sweep, read the HParams table.

- :mod:`._compose`: Hydra's compose API over ``configs/``, with checked overrides.
- :mod:`._main`: the commands (``fit``, ``sweep``, ``hparams``, ``list``) and ``main``.
- :mod:`._sweep`: grids and searches through Hydra's multirun, launchers and sweepers.
- :mod:`._table`: one row per run, read from each run's summary (events as a fallback).
"""

from tbx_lightning.cli._compose import (
    DEFAULT_EXPERIMENT,
    ROOT_CONFIG,
    RUNNERS,
    compose_config,
    expand_grid,
    find_config_dir,
    hydra_options,
    list_options,
    parse_hydra_overrides,
)
from tbx_lightning.cli._main import main
from tbx_lightning.errors import ConfigError

__all__ = [
    "DEFAULT_EXPERIMENT",
    "ROOT_CONFIG",
    "RUNNERS",
    "ConfigError",
    "compose_config",
    "expand_grid",
    "find_config_dir",
    "hydra_options",
    "list_options",
    "main",
    "parse_hydra_overrides",
]
