"""The projector's ``sprite.png``: label images as thumbnails in one square grid, encoded here.

The projector takes one PNG whose width and height are at most :data:`MAX_SPRITE_PX`;
thumbnails are resized on the tensors' device in chunks that bound the memory, and the
PNG is written with ``zlib`` (no imaging library needed).
"""

from __future__ import annotations

import math
import struct
import zlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tbx_lightning.errors import LoggedTypeError, LoggedValueError

__all__ = ["MAX_SPRITE_PX", "check_image_count", "image_tensor", "sprite_layout", "sprite_png"]

MAX_SPRITE_PX = 8192
"""Largest sprite width and height the projector accepts (a WebGL texture limit)."""

_SPRITE_CHUNK_PX = 1 << 24  # pixels per resize chunk: bounds the float copy to ~64 MB a channel


def image_tensor(label_img: Any) -> torch.Tensor:
    if isinstance(label_img, torch.Tensor):
        images = label_img.detach()
    else:
        array = np.asarray(label_img)
        if array.dtype.kind not in "biuf":
            raise LoggedTypeError(f"`label_img` must hold numbers, got dtype {array.dtype}.")
        images = torch.from_numpy(np.ascontiguousarray(array))
    if images.is_complex():
        raise LoggedTypeError("`label_img` is complex: pass real pixel values.")
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] not in (1, 3, 4):
        hint = ""
        if images.ndim == 4 and images.shape[-1] in (1, 3, 4):
            hint = " For channels-last images pass label_img.permute(0, 3, 1, 2)."
        raise LoggedValueError(
            f"`label_img` must be (N, C, H, W) with C in 1, 3, 4, or (N, H, W); got shape "
            f"{tuple(label_img.shape)}.{hint}"
        )
    if images.shape[2] == 0 or images.shape[3] == 0:
        raise LoggedValueError(f"`label_img` has empty images: shape {tuple(images.shape)}.")
    return images


def check_image_count(label_img: Any, total: int) -> None:
    count = len(label_img)
    if count != total:
        raise LoggedValueError(
            f"`label_img` has {count} images but `mat` has {total} points: give one image per point."
        )


def _value_range(images: torch.Tensor) -> tuple[float, float]:
    """The input value that maps to 0 and the one that maps to 255."""
    if images.dtype == torch.uint8:
        return 0.0, 255.0
    if images.dtype == torch.bool:
        return 0.0, 1.0
    finite = images if not images.is_floating_point() else torch.nan_to_num(images.float())
    lo, hi = (float(v) for v in torch.aminmax(finite))
    if images.is_floating_point():
        if lo >= 0.0 and hi <= 1.0:
            return 0.0, 1.0
    elif lo >= 0 and hi <= 255:
        return 0.0, 255.0
    if hi == lo:
        return lo - 1.0, hi
    return lo, hi


def sprite_layout(n: int, height: int, width: int) -> tuple[int, int, int]:
    """Columns, rows and thumbnail size of the sprite of ``n`` images."""
    ncol = math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    thumb = min(max(height, width), MAX_SPRITE_PX // ncol)
    if thumb < 1:
        raise LoggedValueError(
            f"{n:,} label images cannot fit a {MAX_SPRITE_PX} px sprite even at 1 px each: pass "
            f"max_points <= {MAX_SPRITE_PX**2:,}."
        )
    return ncol, nrow, thumb


def sprite_png(label_img: Any, index: np.ndarray | None) -> tuple[bytes, int]:
    images = _rows_of(image_tensor(label_img), index)
    n, channels, height, width = images.shape
    side = max(height, width)
    ncol, nrow, thumb = sprite_layout(n, height, width)
    padded = height != width
    out_channels = channels + 1 if padded and channels in (1, 3) else channels
    lo, hi = _value_range(images)
    scale = 255.0 / (hi - lo)
    pad_h, pad_w = side - height, side - width
    padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
    sprite = np.zeros((nrow * thumb, ncol * thumb, out_channels), dtype=np.uint8)
    # Whole grid rows per chunk, so each chunk lands in the sprite with one reshape.
    rows_per_chunk = max(1, _SPRITE_CHUNK_PX // (ncol * side * side))
    for grid_row in range(0, nrow, rows_per_chunk):
        start = grid_row * ncol
        stop = min(n, (grid_row + rows_per_chunk) * ncol)
        x = images[start:stop].float()
        x = torch.nan_to_num(x, nan=lo).sub_(lo).mul_(scale).clamp_(0.0, 255.0)
        if padded:
            if channels in (1, 3):
                x = torch.cat([x, torch.full_like(x[:, :1], 255.0)], dim=1)
            x = F.pad(x, padding, value=0.0)
        if thumb != side:
            x = F.interpolate(x, size=(thumb, thumb), mode="area")
        tiles = x.round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        count = tiles.shape[0]
        rows_here = math.ceil(count / ncol)
        if count < rows_here * ncol:
            fill = np.zeros((rows_here * ncol - count, *tiles.shape[1:]), dtype=np.uint8)
            tiles = np.concatenate([tiles, fill])
        block = (
            tiles.reshape(rows_here, ncol, thumb, thumb, out_channels)
            .transpose(0, 2, 1, 3, 4)
            .reshape(rows_here * thumb, ncol * thumb, out_channels)
        )
        sprite[grid_row * thumb : grid_row * thumb + block.shape[0]] = block
    return _encode_png(sprite), thumb


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _encode_png(pixels: np.ndarray) -> bytes:
    """An 8-bit PNG of an (H, W, C) uint8 array, C in 1 (grey), 2 (grey+alpha), 3, 4."""
    height, width, channels = pixels.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = np.zeros((height, 1 + width * channels), dtype=np.uint8)  # filter byte 0 per row
    raw[:, 1:] = pixels.reshape(height, width * channels)
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", header),
            _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)),
            _png_chunk(b"IEND", b""),
        ]
    )


def _rows_of(value: Any, index: np.ndarray | None) -> Any:
    """Selects the sampled rows of a tensor or array on its own device."""
    if index is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.index_select(0, torch.from_numpy(index).to(value.device))
    return value[index]
