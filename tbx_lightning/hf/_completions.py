"""TRL's generated completions as a bounded Text table per logging step.

TRL sends its samples to W&B and Trackio only. Two sources are read here:

- GRPO-style trainers with ``log_completions=True`` keep the last generation batch in
  ``trainer._logs`` (``prompt``, ``completion``, one column per reward function,
  ``advantages``), filled before ``Trainer.log`` calls the callbacks;
- TRL's ``LogCompletionsCallback`` (for SFT and DPO trainers, on the eval prompts)
  keeps its rows in ``callback.table`` as ``(step, prompt, completion)``.

Each logging step gets one markdown table under the tag ``completions``, at most
``max_rows`` rows, each cell cut to ``max_chars`` characters, so a long run of long
completions stays small.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["COMPLETIONS_TAG", "callback_rows", "grpo_rows", "has_sources", "markdown_table"]

COMPLETIONS_TAG = "completions"


def has_sources(trainer: Any) -> bool:
    """Whether ``trainer`` generates samples a completions table is written from."""
    if trainer is None:
        return False
    if getattr(trainer, "log_completions", False):
        return True
    callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", ())
    return any(type(c).__name__ == "LogCompletionsCallback" for c in callbacks)


def _text(value: Any) -> str:
    """A prompt or completion as text: chat messages become ``role: content`` lines."""
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence) and all(isinstance(m, Mapping) for m in value):
        parts = []
        for message in value:
            content = message.get("content", "")
            if isinstance(content, list):  # multimodal parts: keep the text ones
                content = " ".join(
                    str(p.get("text", "")) for p in content if isinstance(p, Mapping)
                )
            parts.append(f"{message.get('role', '?')}: {content}")
        return "\n".join(parts)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell(value: Any, max_chars: int) -> str:
    text = _text(value)
    if len(text) > max_chars:
        text = text[: max(0, max_chars - 1)] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def markdown_table(
    columns: Mapping[str, Sequence[Any]], *, max_rows: int, max_chars: int
) -> str | None:
    """A markdown table of the first ``max_rows`` rows of ``columns`` (None when empty).

    Example:
        >>> print(markdown_table({"prompt": ["2+2=", "1+1="], "completion": ["4", "2|3"]},
        ...                      max_rows=1, max_chars=10))
        | prompt | completion |
        |---|---|
        | 2+2= | 4 |
        <BLANKLINE>
        1 of 2 rows
    """
    names = [name for name, values in columns.items() if len(values)]
    if not names:
        return None
    total = max(len(columns[name]) for name in names)
    shown = min(total, max_rows)
    lines = [
        "| " + " | ".join(_cell(name, max_chars) for name in names) + " |",
        "|" + "---|" * len(names),
    ]
    for i in range(shown):
        row = [
            _cell(columns[name][i], max_chars) if i < len(columns[name]) else "" for name in names
        ]
        lines.append("| " + " | ".join(row) + " |")
    if shown < total:
        lines += ["", f"{shown} of {total} rows"]
    return "\n".join(lines)


def grpo_rows(trainer: Any) -> dict[str, list[Any]] | None:
    """The last generation batch of a trainer with ``log_completions``, as columns."""
    if not getattr(trainer, "log_completions", False):
        return None
    logs = getattr(trainer, "_logs", None)
    if not isinstance(logs, Mapping) or "completion" not in logs:
        return None
    completions = list(logs.get("completion") or ())
    if not completions:
        return None
    columns: dict[str, list[Any]] = {
        "prompt": list(logs.get("prompt") or ()),
        "completion": completions,
    }
    rewards = logs.get("rewards")
    if isinstance(rewards, Mapping):
        for name, values in rewards.items():
            columns[str(name)] = list(values)
    extra = logs.get("extra")
    if isinstance(extra, Mapping):
        for name, values in extra.items():
            columns.setdefault(str(name), list(values))
    advantages = logs.get("advantages")
    if advantages:
        columns["advantage"] = list(advantages)
    return columns


def callback_rows(callbacks: Sequence[Any], after: int) -> tuple[int, dict[str, list[Any]]] | None:
    """The newest rows of TRL's ``LogCompletionsCallback`` logged at a step past ``after``.

    Returns ``(step, columns)`` of the newest step, or None.
    """
    newest: tuple[int, dict[str, list[Any]]] | None = None
    for callback in callbacks:
        if type(callback).__name__ != "LogCompletionsCallback":
            continue
        table = getattr(callback, "table", None)
        if not isinstance(table, list) or not table:
            continue
        try:
            last = int(table[-1][0])
        except (TypeError, ValueError, IndexError):
            continue
        if last <= after or (newest is not None and last <= newest[0]):
            continue
        rows = [row for row in table if len(row) >= 3 and str(row[0]) == str(table[-1][0])]
        newest = (
            last,
            {"prompt": [row[1] for row in rows], "completion": [row[2] for row in rows]},
        )
    return newest
