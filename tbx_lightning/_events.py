"""Hand-rolled encoding of TFRecord-framed ``Event`` protos for the scalar fast path.

Scalars are the bulk of what a training job logs. Building an ``Event`` proto per
value in Python costs tens of microseconds; the wire format of a scalar event is
simple enough to write with ``struct``, and the tag part is cached per tag. The
bytes are identical in meaning to what ``Event(summary=Summary(value=[...]))``
serialises to, and are read back by TensorBoard's own reader in the tests.
"""

from __future__ import annotations

import math
import struct

from crc32c import crc32c

from tbx_lightning.errors import LoggedValueError

_PACK_F = struct.Struct("<f").pack
_PACK_D = struct.Struct("<d").pack
_PACK_Q = struct.Struct("<Q").pack
_PACK_I = struct.Struct("<I").pack

# Event field 1 (wall_time, fixed64) and field 2 (step, varint).
_WALL_TIME_KEY = b"\x09"
_STEP_KEY = b"\x10"
# Event field 5 (summary, length-delimited); Summary field 1 (value, repeated message).
_SUMMARY_KEY = b"\x2a"
_VALUE_KEY = b"\x0a"
# A field number no Event proto uses, for the padding of patchable records.
# Parsers keep it as an unknown field and otherwise ignore it.
_PAD_FIELD_KEY = b"\xc2\x3e"  # field 1000, wire type 2


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


def padded(event: bytes, total: int) -> bytes:
    """Appends an unknown padding field so the serialised event is exactly ``total`` bytes."""
    if len(event) == total:
        return event
    room = total - len(event) - len(_PAD_FIELD_KEY)
    if room < 1:
        raise LoggedValueError(f"event of {len(event)} bytes does not fit in {total} bytes")
    # The length prefix of the padding takes 1-5 bytes; find the split that fits exactly.
    for prefix_len in (1, 2, 3, 4, 5):
        body = room - prefix_len
        if body >= 0 and len(varint(body)) == prefix_len:
            return event + _PAD_FIELD_KEY + varint(body) + b"\x00" * body
    # No single split fits (e.g. 129 bytes of room): spend three on an empty field first.
    return padded(event + _PAD_FIELD_KEY + b"\x00", total)
