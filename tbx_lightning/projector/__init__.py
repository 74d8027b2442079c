"""Embeddings for TensorBoard's projector: tensors, labels, sprites.

- :mod:`._embedding`: :func:`log_embedding` and the projector config;
- :mod:`._metadata`: ``metadata.tsv``, labels escaped;
- :mod:`._sprite`: ``sprite.png``, label images as thumbnails;
- :mod:`._files`: the files of one entry, written zero-copy into a new folder and
  switched in one atomic replace;
- :mod:`._collect`: framework-free collection (forward hooks, pooling, gathering
  across processes) that the Lightning callback and Accelerate loops share; a
  hand-written loop takes a submodule's output with :func:`capture_outputs` and makes
  one row per sample of it with :func:`as_embeddings`, as the callback does.
"""

from tbx_lightning.projector._collect import as_embeddings, capture_outputs
from tbx_lightning.projector._embedding import (
    CONFIG_FILENAME,
    LATEST_SUFFIX,
    WARN_POINTS,
    EmbeddingRecord,
    log_embedding,
    read_config,
    safe_tag,
    tensor_name,
)
from tbx_lightning.projector._sprite import MAX_SPRITE_PX

__all__ = [
    "CONFIG_FILENAME",
    "LATEST_SUFFIX",
    "MAX_SPRITE_PX",
    "WARN_POINTS",
    "EmbeddingRecord",
    "as_embeddings",
    "capture_outputs",
    "log_embedding",
    "read_config",
    "safe_tag",
    "tensor_name",
]
