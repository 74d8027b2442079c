"""The HParams table in the terminal: one row per run, or per config over seeds.

Runs are read by :mod:`tbx_lightning.runs` (from each run's summary, its HParams
records and its lease); this module picks the columns (config keys that differ,
last and best of the main metrics, status, duration), groups rows for ``--over``
(mean, standard deviation and count of each metric per remaining config, see
:mod:`._spread`), sorts, and renders them as an aligned table, CSV, Markdown or JSON.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import Any

from tbx_lightning.cli._spread import OWN_COLUMNS, differing, group_runs, spread
from tbx_lightning.errors import ConfigError
from tbx_lightning.runs import RunRecord, minimizes, read_runs

__all__ = [
    "DEFAULT_EXCLUDE",
    "DEFAULT_WIDTH",
    "FORMATS",
    "hparams",
    "main_metrics",
    "patterns",
    "render",
    "select_metrics",
    "spread_rows",
    "table_rows",
]

DEFAULT_EXCLUDE = (
    "vitals/*",
    "vitals_layers/*",
    "by_tokens/*",
    "by_samples/*",
    "hp_metric",
    "epoch",
    "trainer/epoch",
    "_hparams_/*",
)
"""Scalar tags left out unless ``--metrics`` names them: the monitor's, its copies over
tokens and samples, the epoch (``hparams`` and ``aggregate`` both)."""
FORMATS = ("table", "csv", "markdown", "json")
STALLED_COLUMN = "stalled_since"


def select_metrics(records: Sequence[RunRecord], patterns: Sequence[str] | None) -> list[str]:
    """The scalar tags of ``records`` that match ``patterns``; without any, all but
    :data:`DEFAULT_EXCLUDE`."""
    tags = sorted({tag for record in records for tag in record.stats})
    if patterns:
        return [t for t in tags if any(fnmatch.fnmatchcase(t, p) for p in patterns)]
    return [t for t in tags if not any(fnmatch.fnmatchcase(t, p) for p in DEFAULT_EXCLUDE)]


def main_metrics(records: Sequence[RunRecord]) -> list[str]:
    """The default metrics: every ``val/*`` tag and the training loss, epoch mean if logged.

    Per-step copies (Lightning's ``*_step``) are left out; the training loss is
    ``train/loss_epoch`` when the runs log it, else ``train/loss``.
    """
    tags = set(select_metrics(records, None))
    chosen = sorted(t for t in tags if t.startswith("val/") and not t.endswith("_step"))
    for loss in ("train/loss_epoch", "train/loss"):
        if loss in tags:
            return [*chosen, loss]
    return chosen


def _metric_columns(
    records: Sequence[RunRecord],
    *,
    sort: str | None,
    metrics: Sequence[str] | None,
    best: bool,
    all_metrics: bool,
) -> list[tuple[str, str, bool]]:
    """``(column, tag, is_best)`` of each metric column, in order."""
    every = metrics or all_metrics
    chosen = select_metrics(records, metrics) if every else main_metrics(records)
    # By default the val/* metrics show their best too: what a sweep or a search picks by.
    with_best = {m for m in chosen if best or (not every and m.startswith("val/"))}
    all_tags = sorted({tag for record in records for tag in record.stats})
    if sort is not None and sort not in all_tags:
        raise ConfigError(
            f"--sort {sort!r} is not a metric of these runs; choose one of: "
            + ", ".join(chosen or all_tags)
        )
    if sort is not None and sort not in chosen:
        chosen = [sort, *chosen]
    columns = []
    for metric in chosen:
        columns.append((metric, metric, False))
        if metric in with_best or metric == sort:
            columns.append((f"{metric} best", metric, True))
    return columns


def _key_columns(
    records: Sequence[RunRecord], *, all_keys: bool, keys: Sequence[str] | None
) -> list[str]:
    every_key = sorted({k for r in records for k in r.hparams} - set(OWN_COLUMNS))
    if keys:
        return [k for k in every_key if any(fnmatch.fnmatchcase(k, p) for p in keys)]
    return every_key if all_keys else differing(records)


def _value(record: RunRecord, tag: str, is_best: bool) -> float | None:
    stats = record.stats.get(tag)
    if stats is None:
        return None
    return stats.best(tag) if is_best else stats.last


def _since(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _sort_rows(rows: list[dict[str, Any]], column: str, metric: str) -> list[dict[str, Any]]:
    """Best first (lowest for loss-like names); rows without a number, or NaN, last."""
    present = [r for r in rows if isinstance(r[column], int | float) and not math.isnan(r[column])]
    absent = [r for r in rows if r not in present]
    present.sort(key=lambda r: r[column], reverse=not minimizes(metric))
    return present + absent


def table_rows(
    records: Sequence[RunRecord],
    *,
    sort: str | None = None,
    all_keys: bool = False,
    metrics: Sequence[str] | None = None,
    keys: Sequence[str] | None = None,
    best: bool = False,
    all_metrics: bool = False,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows of the table: run, keys, metrics, status, seconds.

    A metric's column, named by its tag, holds its last value; ``<tag> best`` its
    best (lowest for names with loss, perplexity, error; highest otherwise), shown by
    default for the ``val/*`` metrics. When a run is ``stalled``, a
    ``stalled_since`` column (UTC, ISO 8601) says since when its writer gave no sign of
    life.

    Args:
        records: The runs, as :func:`read_runs` returns them.
        sort: A metric to sort by, best first; its ``best`` column is shown.
        all_keys: Show every config key, not only those that differ between runs.
        metrics: fnmatch patterns of the metrics to show (last values; ``best`` adds
            the best); default :func:`main_metrics`.
        keys: fnmatch patterns of the config keys to show (instead of the differing ones).
        best: Show a ``best`` column after every metric.
        all_metrics: Show every metric but the monitor's (``vitals/*``, ``vitals_layers/*``)
            (when ``metrics`` is not given).

    Raises:
        ConfigError: ``sort`` names no metric of these runs.
    """
    metric_columns = _metric_columns(
        records, sort=sort, metrics=metrics, best=best, all_metrics=all_metrics
    )
    shown_keys = _key_columns(records, all_keys=all_keys, keys=keys)
    columns = ["run", *shown_keys, *(column for column, _, _ in metric_columns), "status"]
    stalled = any(record.status == "stalled" for record in records)
    if stalled:
        columns.append(STALLED_COLUMN)
    columns.append("seconds")
    rows = []
    for record in records:
        row: dict[str, Any] = {"run": record.run}
        for key in shown_keys:
            row[key] = record.hparams.get(key)
        for column, tag, is_best in metric_columns:
            row[column] = _value(record, tag, is_best)
        row["status"] = record.status
        if stalled:
            row[STALLED_COLUMN] = _since(record.stalled_since)
        duration = record.duration
        row["seconds"] = None if duration is None else round(duration, 1)
        rows.append(row)
    if sort is not None:
        rows = _sort_rows(rows, f"{sort} best", sort)
    return columns, rows


_STAT_SUFFIXES = (" mean", " std", " n")


def _status_counts(records: Sequence[RunRecord]) -> str:
    counts = Counter(record.status for record in records)
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{n} {status}" for status, n in counts.most_common())


def spread_rows(
    records: Sequence[RunRecord],
    over: Sequence[str],
    *,
    sort: str | None = None,
    all_keys: bool = False,
    metrics: Sequence[str] | None = None,
    keys: Sequence[str] | None = None,
    best: bool = False,
    all_metrics: bool = False,
) -> tuple[list[str], list[dict[str, Any]], list[str]]:
    """One row per config left when the ``over`` keys are taken out: the spread of each metric.

    Each metric column of :func:`table_rows` becomes three: ``<column> mean``,
    ``<column> std`` (sample standard deviation, None for one run) and ``<column> n``
    (the runs that logged it); ``runs`` lists the group's runs, ``status`` counts their
    statuses and ``seconds`` is their mean duration. The work is one pass over the runs.

    Args:
        records: The runs, as :func:`read_runs` returns them.
        over: Config keys or fnmatch patterns to group over (see :mod:`._spread`).
        sort: A metric to sort the groups by, the mean of its best values first.
        all_keys: Show every config key left, not only those that differ between groups.
        metrics: As for :func:`table_rows`.
        keys: As for :func:`table_rows` (keys grouped over are never shown).
        best: As for :func:`table_rows`.
        all_metrics: As for :func:`table_rows`.

    Returns:
        The columns, the rows, and the keys the runs were grouped over (with copies).

    Raises:
        ConfigError: ``over`` matches no config key, or ``sort`` names no metric.
    """
    grouping = group_runs(records, over)
    metric_columns = _metric_columns(
        records, sort=sort, metrics=metrics, best=best, all_metrics=all_metrics
    )
    if keys or all_keys:
        left_out = {*grouping.over, *grouping.copies}
        shown_keys = [
            k for k in _key_columns(records, all_keys=all_keys, keys=keys) if k not in left_out
        ]
    else:
        configs = [RunRecord(run="", hparams=group.config) for group in grouping.groups]
        shown_keys = differing(configs) if len(configs) > 1 else []
    columns = ["runs", *shown_keys]
    for column, _, _ in metric_columns:
        columns += [f"{column}{suffix}" for suffix in _STAT_SUFFIXES]
    columns += ["status", "seconds"]
    rows = []
    for group in grouping.groups:
        members = group.records
        row: dict[str, Any] = {"runs": [record.run for record in members]}
        for key in shown_keys:
            row[key] = group.config.get(key)
        for column, tag, is_best in metric_columns:
            mean, std, n = spread(_value(record, tag, is_best) for record in members)
            row[f"{column} mean"], row[f"{column} std"], row[f"{column} n"] = mean, std, n
        row["status"] = _status_counts(members)
        seconds, _, _ = spread(record.duration for record in members)
        row["seconds"] = None if seconds is None else round(seconds, 1)
        rows.append(row)
    if sort is not None:
        rows = _sort_rows(rows, f"{sort} best mean", sort)
    return columns, rows, [*grouping.over, *grouping.copies]


def cell_text(value: Any) -> str:
    """A value as the table and Markdown show it: ``-`` for none, 4 significant digits."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):  # the runs of a group
        return " ".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _json_safe(value: Any) -> Any:
    """Non-finite numbers as ``"nan"``, ``"inf"``, ``"-inf"``: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(map(str, value))
    return value


def _spread_cell(mean: Any, std: Any, n: Any) -> str:
    if mean is None:
        return "-"
    text = cell_text(mean)
    if std is not None:
        text += f" ± {std:.2g}"
    return f"{text} ({n})"


def _combine_spread(
    columns: Sequence[str], rows: Sequence[dict[str, Any]]
) -> tuple[list[str], list[dict[str, Any]], set[str]]:
    """For people: ``X mean``, ``X std``, ``X n`` as one column ``X`` of ``mean ± std (n)``.

    Returns the columns, the rows and the names of the combined columns.
    """
    names = set(columns)
    bases = [
        c[: -len(" mean")]
        for c in columns
        if c.endswith(" mean") and {c[:-5] + " std", c[:-5] + " n"} <= names
    ]
    if not bases:
        return list(columns), list(rows), set()
    parts = {f"{b}{suffix}" for b in bases for suffix in (" mean", " std", " n")}
    out_columns = []
    for column in columns:
        if column.endswith(" mean") and column[:-5] in bases:
            out_columns.append(column[:-5])
        elif column not in parts:
            out_columns.append(column)
    out_rows = []
    for row in rows:
        out = {c: row.get(c) for c in out_columns if c not in bases}
        for base in bases:
            out[base] = _spread_cell(
                row.get(f"{base} mean"), row.get(f"{base} std"), row.get(f"{base} n")
            )
        out_rows.append(out)
    return out_columns, out_rows, set(bases)


DEFAULT_WIDTH = 120
"""Characters a line of the table format (``hparams --width``, the sweep's closing table)."""
_CELL_WIDTH = 24
_FIXED = ("run", "runs", "status", STALLED_COLUMN, "seconds")


def clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, with an ellipsis when cut."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _table_width(headers: Sequence[str], cells: Sequence[Sequence[str]]) -> int:
    widths = [max([len(h), *(len(line[i]) for line in cells)]) for i, h in enumerate(headers)]
    return sum(widths) + 2 * (len(widths) - 1)


def _short_headers(columns: Sequence[str], parts: int) -> list[str]:
    """Config keys cut to their last ``parts`` dotted parts, where that stays unique."""
    short = [c if c in _FIXED or "/" in c else ".".join(c.split(".")[-parts:]) for c in columns]
    return [
        name if short.count(name) == 1 and (name == full or name not in columns) else full
        for name, full in zip(short, columns, strict=True)
    ]


def _fit(
    columns: Sequence[str],
    cells: list[list[str]],
    width: int,
    whole: AbstractSet[str] = frozenset(),
) -> tuple[list[str], list[list[str]], int]:
    """Headers and cells narrowed to ``width`` characters a line.

    Long cells are clipped first, then config keys shortened (``model.optimizer.lr``
    to ``optimizer.lr``, then ``lr``), long cells clipped shorter, then columns left
    out from the right: ``best`` columns, then metrics but the first, then config keys
    but the first (never run, status or seconds). Columns named in ``whole`` (``mean ±
    std (n)`` cells) are left out rather than clipped. Returns the headers, the cells
    and how many columns were left out.
    """
    keep = [column in whole for column in columns]
    cells = [
        [cell if k else clip(cell, _CELL_WIDTH) for cell, k in zip(line, keep, strict=True)]
        for line in cells
    ]
    headers = list(columns)
    for parts in (2, 1):
        if _table_width(headers, cells) <= width:
            break
        headers = _short_headers(columns, parts)
    if _table_width(headers, cells) > width:
        cells = [
            [
                cell if k else clip(cell, _CELL_WIDTH // 2)
                for cell, k in zip(line, keep, strict=True)
            ]
            for line in cells
        ]
    kept = list(range(len(headers)))

    def width_of(indices: list[int]) -> int:
        return _table_width(
            [headers[i] for i in indices], [[ln[i] for i in indices] for ln in cells]
        )

    while width_of(kept) > width:
        keys = [i for i in kept if columns[i] not in _FIXED and "/" not in columns[i]]
        tags = [i for i in kept if "/" in columns[i]]
        bests = [i for i in tags if columns[i].endswith(" best")]
        # Right to left: best values, then metrics but the first, then keys but the first.
        droppable = bests or tags[1:] or keys[1:] or keys or tags
        if not droppable:
            break
        kept.remove(droppable[-1])
    return (
        [headers[i] for i in kept],
        [[line[i] for i in kept] for line in cells],
        len(headers) - len(kept),
    )


def render(
    columns: Sequence[str],
    rows: Sequence[dict[str, Any]],
    fmt: str = "table",
    width: int | None = DEFAULT_WIDTH,
) -> str:
    """The table as aligned text, CSV, a Markdown table or JSON (a list of row objects).

    Args:
        columns: Column names, as :func:`table_rows` returns them.
        rows: One mapping per run.
        fmt: ``table``, ``csv``, ``markdown`` or ``json``.
        width: For ``table``: at most this many characters a line (long cells clipped,
            config keys shortened, right-most columns left out, with a note saying how
            many); ``None`` or 0: no limit. The other formats always hold every column.

    Spread columns (``X mean``, ``X std``, ``X n`` of :func:`spread_rows`) are one
    column ``X`` of ``mean ± std (n)`` in the table and Markdown; CSV and JSON keep
    the three numbers. JSON writes NaN and infinities as ``"nan"``, ``"inf"``,
    ``"-inf"``, which strict parsers accept.

    Raises:
        ConfigError: Unknown ``fmt``.
    """
    if fmt == "json":
        safe = [{c: _json_safe(row.get(c)) for c in columns} for row in rows]
        return json.dumps(safe, indent=2, default=str)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_value(row.get(c)) for c in columns])
        return buffer.getvalue().rstrip("\n")
    columns, rows, combined = _combine_spread(columns, rows)
    cells = [[cell_text(row.get(c)) for c in columns] for row in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in cells]
        return "\n".join(lines)
    if fmt != "table":
        raise ConfigError(f"--format {fmt!r} is not one of: {', '.join(FORMATS)}")
    headers, left_out = list(columns), 0
    if width:
        headers, cells, left_out = _fit(columns, cells, width, combined)
    widths = [max([len(c), *(len(line[i]) for line in cells)]) for i, c in enumerate(headers)]
    out = ["  ".join(c.ljust(w) for c, w in zip(headers, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    for line in cells:
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    if left_out:
        out.append(
            f"({left_out} more column{'s' if left_out > 1 else ''} left out to fit {width} "
            "characters: --width 0 shows them, --format csv or json holds everything)"
        )
    return "\n".join(out)


def patterns(given: Sequence[str] | None) -> list[str] | None:
    """Comma-separated and repeated options as one list (``--over a,b --over c``)."""
    return [p.strip() for part in given for p in part.split(",") if p.strip()] if given else None


def hparams(args: argparse.Namespace) -> int:
    """``tbx-lightning hparams RUNS_DIR``: one row per run, or per config with ``--over``."""
    width = 0 if args.all else args.width
    options: dict[str, Any] = {
        "sort": args.sort,
        "all_keys": args.all_keys or args.all,
        "metrics": patterns(args.metrics),
        "keys": patterns(args.keys),
        "best": args.best or args.all,
        "all_metrics": args.all,
    }
    over = patterns(args.over)
    records = read_runs(args.runs_dir, stalled_after=args.stalled_after)
    if over:
        columns, rows, grouped = spread_rows(records, over, **options)
    else:
        columns, rows = table_rows(records, **options)
    print(render(columns, rows, args.format, width=width))
    if over and args.format == "table":
        print(
            f"(mean ± sample standard deviation (number of runs) over {', '.join(grouped)}; "
            "--format csv or json gives the numbers apart)"
        )
    return 0
