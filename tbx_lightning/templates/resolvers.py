"""OmegaConf resolvers the shipped configs use, registered before a config is composed."""

from __future__ import annotations

import os
import re
from pathlib import Path

from omegaconf import OmegaConf

from tbx_lightning.errors import ConfigError

__all__ = ["latest_checkpoint", "register_resolvers"]

_VERSION = re.compile(r"^version_(\d+)$")


def latest_checkpoint(experiment_dir: str, filename: str = "last.ckpt") -> str:
    """The newest ``version_N/checkpoints/<filename>`` under an experiment directory.

    Used as ``${tbx_latest_ckpt:${paths.runs_dir}/quickstart}`` so that a fine-tuning
    config finds the checkpoint the other experiment left, whatever its version.
    A path to a file is returned as it is.

    Raises:
        FileNotFoundError: No such checkpoint; the message says which run to start first.
    """
    path = Path(os.path.expanduser(experiment_dir))
    if path.is_file():
        return str(path)
    found: list[tuple[int, Path]] = []
    if path.is_dir():
        for child in path.iterdir():
            match = _VERSION.match(child.name)
            candidate = child / "checkpoints" / filename
            if match and candidate.is_file():
                found.append((int(match.group(1)), candidate))
    if not found:
        raise ConfigError(
            f"No checkpoint {filename!r} under {str(path)!r}/version_*/checkpoints: run that "
            f"experiment first (e.g. `tbx-lightning fit {path.name}`) or set model.ckpt_path=PATH."
        )
    return str(max(found)[1].resolve())


def register_resolvers() -> None:
    """Registers ``tbx_latest_ckpt`` (idempotent)."""
    if not OmegaConf.has_resolver("tbx_latest_ckpt"):
        OmegaConf.register_new_resolver("tbx_latest_ckpt", latest_checkpoint)
