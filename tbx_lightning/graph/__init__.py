"""Model graphs for TensorBoard's Graphs dashboard.

One reason to change per module:

- :mod:`._export`: the public functions (:func:`export_graph`, :func:`write_graph`,
  :func:`to_graph_def`), input handling, and leaving the model exactly as it was;
- :mod:`._prepare`: what the capture sees (wrappers skipped, caches dropped and named);
- capture backends, tried in order: :mod:`._capture_export` (``torch.export``),
  :mod:`._capture_fx` (``torch.fx``), :mod:`._capture_jit` (``torch.jit.trace``);
- :mod:`._ir`: the intermediate graph every backend produces, and its transforms
  (module scopes, ``max_depth``, ``collapse_repeated``);
- :mod:`._graphdef`: the intermediate graph as a TensorFlow ``GraphDef``.
"""

from tbx_lightning.errors import GraphExportError
from tbx_lightning.graph._export import (
    METHODS,
    TEXT_TAG,
    GraphExport,
    export_graph,
    to_graph_def,
    write_graph,
)

__all__ = [
    "METHODS",
    "TEXT_TAG",
    "GraphExport",
    "GraphExportError",
    "export_graph",
    "to_graph_def",
    "write_graph",
]
