"""Scalar events and TFRecord framing: what a scalar may be, its fast encoder, the one reader.

Scalars are the bulk of what a training job logs. Building an ``Event`` proto per
value in Python costs tens of microseconds; the wire format of a scalar event is
simple enough to write with ``struct``, and the tag part is cached per tag. The
bytes are identical in meaning to what ``Event(summary=Summary(value=[...]))``
serialises to, and are read back by TensorBoard's own reader in the tests.

:func:`read_records` is the package's only reader of framed records (the run's
records file, the ``hparams`` table): it checks both CRCs of every record and caps
its length, so a damaged or foreign file ends with one warning naming it, never
with a crash or an allocation of whatever a garbage length says.
"""

from __future__ import annotations

import math
import struct
import time
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from crc32c import crc32c

from tbx_lightning._rules import as_number, is_scalar, is_tensor

if TYPE_CHECKING:  # neither is imported here: the hparams table reads with this module
    import torch
    from tensorboardX.proto.event_pb2 import Event

_PACK_F = struct.Struct("<f").pack
_PACK_D = struct.Struct("<d").pack
_PACK_Q = struct.Struct("<Q").pack
_PACK_I = struct.Struct("<I").pack
_HEADER = struct.Struct("<QI")
_CRC = struct.Struct("<I")

# Event field 1 (wall_time, fixed64) and field 2 (step, varint).
_WALL_TIME_KEY = b"\x09"
_STEP_KEY = b"\x10"
# Event field 5 (summary, length-delimited); Summary field 1 (value, repeated message).
_SUMMARY_KEY = b"\x2a"
_VALUE_KEY = b"\x0a"
# Event field 3 (file_version, length-delimited): the header every event file starts with.
_FILE_VERSION = b"brain.Event:2"

MAX_RECORD_BYTES = 1 << 30
"""The largest record :func:`read_records` accepts; a longer length is damage."""
_READ_PIECE = 1 << 20  # a record is read in pieces: memory follows the bytes the file holds


def varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative numbers take ten bytes, as int64 does."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame(event: bytes) -> bytes:
    """Wraps one serialised Event in TFRecord framing (length, CRCs)."""
    header = _PACK_Q(len(event))
    return header + _PACK_I(masked_crc(header)) + event + _PACK_I(masked_crc(event))


# ---------------------------------------------------------------------- scalars
def coerce_values(keys: tuple[str, ...], values: list[Any]) -> list[int] | None:
    """Converts non-float values in place; returns the positions of tensors, if any."""
    tensor_idx: list[int] | None = None
    for i, value in enumerate(values):
        kind = type(value)
        if kind is float or kind is int:
            continue
        if is_tensor(value):
            if tensor_idx is None:
                tensor_idx = []
            tensor_idx.append(i)
            continue
        values[i] = as_number(keys[i], value)
    return tensor_idx


def stack_tensors(keys: tuple[str, ...], values: list[Any], tensor_idx: list[int]) -> torch.Tensor:
    """One device-to-host transfer for all tensors of a call."""
    import torch as torch_

    parts = []
    for i in tensor_idx:
        tensor = values[i]
        is_scalar(keys[i], tensor)  # one element, not complex: the rules' own words
        parts.append(tensor.detach().reshape(()).to(torch_.float64))
    devices = {p.device for p in parts}
    if len(devices) > 1:
        parts = [p.to(parts[0].device) for p in parts]
    return torch_.stack(parts).cpu()


class ScalarEncoder:
    """Encodes ``{tag: float}`` at one step into one framed Event with one value per tag."""

    def __init__(self) -> None:
        self._prefix: dict[str, bytes] = {}

    def _tag_prefix(self, tag: str) -> bytes:
        prefix = self._prefix.get(tag)
        if prefix is None:
            raw = tag.encode("utf-8")
            tag_field = b"\x0a" + varint(len(raw)) + raw
            # Value = tag field + simple_value (field 2, fixed32: key 0x15 + 4 bytes).
            prefix = _VALUE_KEY + varint(len(tag_field) + 5) + tag_field + b"\x15"
            self._prefix[tag] = prefix
        return prefix

    def encode(
        self, step: int, wall_time: float, tags: tuple[str, ...], values: list[float]
    ) -> bytes:
        parts = []
        tag_prefix = self._tag_prefix
        for tag, value in zip(tags, values, strict=True):
            try:
                packed = _PACK_F(value)
            except (OverflowError, struct.error):
                # Numbers beyond float32's range (doubles, huge ints) become +/-inf, as a
                # cast would.
                packed = _PACK_F(math.inf if value > 0 else -math.inf)
            parts.append(tag_prefix(tag) + packed)
        summary = b"".join(parts)
        event = (
            _WALL_TIME_KEY
            + _PACK_D(wall_time)
            + _STEP_KEY
            + varint(step)
            + _SUMMARY_KEY
            + varint(len(summary))
            + summary
        )
        return frame(event)


def header(wall_time: float | None = None) -> bytes:
    """The framed header event (``file_version``) that starts every event file."""
    stamp = time.time() if wall_time is None else wall_time
    return frame(
        _WALL_TIME_KEY + _PACK_D(stamp) + b"\x1a" + varint(len(_FILE_VERSION)) + _FILE_VERSION
    )


def read_records(source: Any, name: str) -> Iterator[bytes]:
    """The serialised events of a TFRecord stream, checked, up to its end or its first damage.

    Args:
        source: A binary file object (read from its position) or the bytes themselves.
        name: The file, for the warning.

    A record cut short by the end of the stream (a writer killed or still writing)
    ends it quietly. A record whose length or data fails its CRC, or whose length
    passes :data:`MAX_RECORD_BYTES`, ends it with one ``UserWarning`` naming the file
    and the offset: what came before it is used, nothing after it.
    """
    read = source.read if hasattr(source, "read") else _BytesReader(source).read
    offset = 0
    while True:
        head = read(12)
        if len(head) < 12:
            return
        length, head_crc = _HEADER.unpack(head)
        if head_crc != masked_crc(head[:8]):
            _damaged(name, offset, "its length fails its CRC")
            return
        if length > MAX_RECORD_BYTES:
            _damaged(name, offset, f"its length {length} passes {MAX_RECORD_BYTES} bytes")
            return
        data = _read_exact(read, length + 4)
        if len(data) < length + 4:
            return  # cut short: the end of what was written
        body = data[:length]
        if _CRC.unpack(data[length:])[0] != masked_crc(body):
            _damaged(name, offset, "its data fails its CRC")
            return
        yield body
        offset += 12 + length + 4


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def read(self, size: int) -> bytes:
        start, self._pos = self._pos, min(len(self._view), self._pos + size)
        return bytes(self._view[start : self._pos])


def _read_exact(read: Any, size: int) -> bytes:
    if size <= _READ_PIECE:
        return bytes(read(size))
    parts = []
    left = size
    while left:
        part = read(min(left, _READ_PIECE))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def _damaged(name: str, offset: int, why: str) -> None:
    warnings.warn(
        f"tbx_lightning: skipped {name!r} from byte {offset} on: the record there is damaged "
        f"({why}). What comes before it is used; the file was not written by a complete "
        "TFRecord writer, or was changed since.",
        UserWarning,
        stacklevel=3,
    )


# ---------------------------------------------------------------------- the records file
def record_key(event: Event) -> str:
    """A record's key in a run's records file: its summary tag (one record per tag)."""
    for value in event.summary.value:
        return str(value.tag)
    return f"#{event.step}:{event.file_version}"


def records_content(records: dict[str, bytes]) -> bytes:
    """A records file holding ``records`` (serialised events), after its header."""
    return header() + b"".join(frame(data) for data in records.values())
