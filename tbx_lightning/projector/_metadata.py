"""The projector's ``metadata.tsv``: labels (one or several columns per point), escaped.

TensorBoard's projector reads a header line, then one line per point, tab-separated;
it skips lines JavaScript's ``trim()`` leaves empty, which would shift every later row,
so blank cells are written visibly and tabs and newlines inside cells are escaped.
"""

from __future__ import annotations

import functools
import json
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tbx_lightning.errors import LoggedTypeError, LoggedValueError

__all__ = ["metadata_columns", "metadata_tsv"]

_INDEX_COLUMN = "index"

# Characters JavaScript's String.prototype.trim() removes: the projector skips
# metadata lines made only of these, which would shift every later row.
_JS_BLANK_LINE = re.compile(
    "[\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]*\\Z"
)
_BLANK_CHARS = frozenset(
    "\t\n\v\f\r \u00a0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff"
    + "".join(chr(c) for c in range(0x2000, 0x200B))
)
_CELL_ESCAPES = str.maketrans({"\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    return str(value)


def _text_column(values: list[Any]) -> list[str]:
    """Values as text with tabs and line breaks escaped, in one pass when none needs it."""
    texts = [v if type(v) is str else _text(v) for v in values]
    joined = "".join(texts)
    if "\t" in joined or "\n" in joined or "\r" in joined:
        texts = [t.translate(_CELL_ESCAPES) for t in texts]
    return texts


def _is_row(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or (
        isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 1
    )


def metadata_columns(
    metadata: Any, header: Sequence[str] | None, total: int
) -> tuple[list[str] | None, list[list[Any]]]:
    """Normalises every accepted metadata form to (header or None, columns of raw values)."""
    if isinstance(header, str):
        raise LoggedTypeError(
            f"`metadata_header` must be a sequence of column names, got the str {header!r}: "
            f"pass [{header!r}]."
        )
    if header is not None:
        header = [_text(h) for h in header]
        if not header:
            raise LoggedValueError("`metadata_header` is empty: give one name per column.")
        if len(set(header)) != len(header):
            raise LoggedValueError(
                f"`metadata_header` repeats a name: {header}; names must be unique."
            )
    if isinstance(metadata, Mapping):
        names = [_text(k) for k in metadata]
        if header is not None and header != names:
            raise LoggedValueError(
                f"`metadata` is a mapping with columns {names} but `metadata_header` is "
                f"{header}: pass one of them."
            )
        if not names:
            raise LoggedValueError("`metadata` is an empty mapping: give at least one column.")
        columns = [_as_list(v, f"metadata[{k!r}]") for k, v in metadata.items()]
        for name, column in zip(names, columns, strict=True):
            if len(column) != total:
                raise LoggedValueError(
                    f"`metadata` column {name!r} has {len(column)} rows but `mat` has {total} "
                    "points: give one value per point."
                )
        return names, columns
    values = _as_list(metadata, "metadata")
    if len(values) != total:
        raise LoggedValueError(
            f"`metadata` has {len(values)} rows but `mat` has {total} points: give one "
            "label (or row) per point."
        )
    ncols = len(header) if header is not None else 1
    if not _is_row(values[0]):
        if ncols != 1:
            raise LoggedValueError(
                f"`metadata` is one column but `metadata_header` has {ncols} names: pass one "
                "row per point with one value per column."
            )
        return header, [values]
    rows = [_as_list(r, "metadata row") for r in values]
    for i, row in enumerate(rows):
        if len(row) != ncols:
            if header is None:
                raise LoggedValueError(
                    f"`metadata` row {i} has {len(row)} values: pass `metadata_header` with "
                    "one name per column, or a flat list for a single column."
                )
            raise LoggedValueError(
                f"`metadata` row {i} has {len(row)} values but `metadata_header` has {ncols} "
                "names: every row needs one value per column."
            )
    columns = [list(c) for c in zip(*rows, strict=True)]
    return header, columns


def _as_list(value: Any, what: str) -> list[Any]:
    if isinstance(value, torch.Tensor):
        return list(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return list(value.tolist())
    if isinstance(value, (str, bytes)):
        raise LoggedTypeError(f"`{what}` is a single string: pass a list with one label per point.")
    if isinstance(value, Iterable):
        return list(value)
    raise LoggedTypeError(f"`{what}` must be a sequence, got {type(value).__name__}.")


@functools.lru_cache(maxsize=4)
def _index_cells(count: int) -> list[str]:
    """``"\\t<i>\\n"`` for every row: the same for every step of a tag, so made once."""
    return [f"\t{i}\n" for i in range(count)]


def _unblank(cells: Sequence[str]) -> str:
    """A line the projector would skip as blank, with its cells quoted so it is kept."""
    return "\t".join(json.dumps(c, ensure_ascii=False) for c in cells)


def metadata_tsv(
    header: list[str] | None, columns: list[list[Any]], index: np.ndarray | None
) -> bytes:
    """The metadata file: a header line, then one line per (sampled) point.

    TensorBoard reads a file without a tab in its first line as one unnamed
    column and then offers no "Label by" / "Color by" choice, so one column is
    written with a second one, ``index``: each point's row in the given matrix
    (which also records which rows a sample kept).
    """
    picks = index.tolist() if index is not None else None
    if picks is not None:
        columns = [[column[i] for i in picks] for column in columns]
    texts = [_text_column(column) for column in columns]
    if len(texts) == 1:
        name = header[0] if header else "label"
        names = [name, _INDEX_COLUMN if name != _INDEX_COLUMN else "row"]
        ends = _index_cells(len(texts[0])) if picks is None else [f"\t{i}\n" for i in picks]
        # Never blank: the index column always holds digits.
        body = "".join(map(operator.add, texts[0], ends))
        return ("\t".join(_text_column(names)) + "\n" + body).encode("utf-8")
    lines = ["\t".join(row) for row in zip(*texts, strict=True)]
    if header is None:  # unreachable from the public forms; kept for safety
        header = [f"column_{i}" for i in range(len(texts))]
    lines = ["\t".join(_text_column(list(header))), *lines]
    for i, line in enumerate(lines):
        if (not line or line[0] in _BLANK_CHARS) and _JS_BLANK_LINE.match(line):
            lines[i] = _unblank(line.split("\t"))
    return ("\n".join(lines) + "\n").encode("utf-8")
