"""Runs read back as TensorBoard reads them: one reader for every test module.

``read`` keeps every event of every kind (TensorBoard's own defaults keep a sample of
some), so tests can compare exact steps and values.
"""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

__all__ = ["alert_text", "read", "scalars", "text_entries"]

_EVERYTHING = {"scalars": 0, "tensors": 0, "histograms": 0, "images": 0}


def read(path: str | Path) -> EventAccumulator:
    """The run directory's events, every one kept, as TensorBoard's reader loads them."""
    acc = EventAccumulator(str(path), size_guidance=_EVERYTHING)
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of a scalar tag, in the order written."""
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def text_entries(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    """``(step, text)`` of a Text tag (TensorBoard lists it as ``<tag>/text_summary``)."""
    name = f"{tag}/text_summary"
    if name not in acc.Tags()["tensors"]:
        return []
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(name)]


def alert_text(acc: EventAccumulator) -> str:
    """Every entry of the monitor's alerts table, joined."""
    return "".join(text for _, text in text_entries(acc, "alerts"))
