"""``tbx-lightning``, the command line: compose, fit, sweep, and read runs back.

- :mod:`._main`: the parser, ``main`` and the command table (each command loads on use).
- :mod:`._compose`: Hydra's compose API over ``configs/``, with checked overrides; ``list``.
- :mod:`._train`: training one composed config (``fit``, and each run of a sweep).
- :mod:`._sweep`: grids and searches through Hydra's multirun, launchers and sweepers.
- :mod:`._table`: the HParams table (``hparams``), one row per run or per config.
- :mod:`._spread`: runs grouped over seeds (``--over``): mean, deviation, count.
- :mod:`._aggregate`: band runs for TensorBoard (``aggregate``).
- :mod:`._alerts`: every alert of a sweep (``alerts``).

Runs are read through the public :mod:`tbx_lightning.runs`. The composing names below
load Hydra on first use, so ``tbx-lightning hparams`` starts without it.
"""

import importlib as _importlib
import typing as _typing

from tbx_lightning.cli._main import main

if _typing.TYPE_CHECKING:
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

__all__ = [
    "DEFAULT_EXPERIMENT",
    "ROOT_CONFIG",
    "RUNNERS",
    "compose_config",
    "expand_grid",
    "find_config_dir",
    "hydra_options",
    "list_options",
    "main",
    "parse_hydra_overrides",
]


def __getattr__(name: str) -> _typing.Any:
    if name not in __all__:
        raise AttributeError(f"module 'tbx_lightning.cli' has no attribute {name!r}")
    value = getattr(_importlib.import_module("tbx_lightning.cli._compose"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
