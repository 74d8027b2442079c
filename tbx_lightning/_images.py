"""Images as the run writes them: any accepted value as one NCHW batch, checked first.

Tensors, NumPy arrays (float in [0, 1] or uint8) and PIL images (always HWC), one
image, a batch, or a list of images of one shape; ``dataformats`` names one image's
layout. Every route's ``log_images`` comes here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tbx_lightning.errors import LoggedTypeError, LoggedValueError

__all__ = ["image_batch"]

_PIL_FORMAT = "HWC"


def _image_array(key: str, image: Any, dataformats: str) -> tuple[np.ndarray, str]:
    """One image as an array with its format: PIL images are HWC, others use ``dataformats``."""
    if hasattr(image, "getbands") and hasattr(image, "size"):  # a PIL image, without importing PIL
        return np.asarray(image), _PIL_FORMAT
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu().numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise LoggedTypeError(
            f"Image {key!r} has type {type(image).__name__}: log a tensor, a NumPy array, a PIL "
            "image, or a list of these."
        )
    return array, dataformats


def _as_nchw(key: str, batch: np.ndarray, fmt: str) -> np.ndarray:
    """A batch in ``fmt`` (``N`` + one image's layout) as NCHW with 1, 3 or 4 channels."""
    if len(set(fmt)) != len(fmt) or set(fmt) - set("NCHW") or not {"H", "W"} <= set(fmt):
        raise LoggedValueError(
            f"dataformats={fmt[1:]!r} for image {key!r} is not a layout of H, W and optionally C: "
            "use 'CHW', 'HWC' or 'HW'."
        )
    if "C" not in fmt:
        batch, fmt = batch[:, None], "NC" + fmt[1:]
    batch = batch.transpose([fmt.index(axis) for axis in "NCHW"])
    if batch.shape[1] not in (1, 3, 4):
        raise LoggedValueError(
            f"Image {key!r} has {batch.shape[1]} channels in dataformats={fmt[1:]!r}: images have "
            "1, 3 or 4 channels; pass the dataformats that matches the array ('CHW', 'HWC', 'HW')."
        )
    return batch


def image_batch(key: str, images: Any, dataformats: str = "CHW") -> np.ndarray:
    """Any accepted image value as one NCHW batch array.

    ``images`` is one image, a batch (one more dimension than ``dataformats``) or a
    list of images of one shape: tensors, NumPy arrays (float in [0, 1] or uint8)
    or PIL images (always HWC).

    Raises:
        LoggedTypeError: a value that is not an image.
        LoggedValueError: a shape that does not fit ``dataformats``, an empty list,
            images of different shapes.
    """
    if not isinstance(dataformats, str):
        raise LoggedTypeError(f"`dataformats` must be a str such as 'CHW', got {dataformats!r}.")
    fmt = dataformats.upper()
    if isinstance(images, list | tuple):
        if not images:
            raise LoggedValueError(f"Image list {key!r} is empty: log at least one image.")
        parts = [_image_array(f"{key}[{i}]", image, fmt) for i, image in enumerate(images)]
        formats = {part_fmt for _, part_fmt in parts}
        if len(formats) > 1:
            raise LoggedValueError(
                f"Images of {key!r} mix PIL images (HWC) with arrays in {fmt}: convert them to one "
                "layout, or pass dataformats matching all of them."
            )
        (one_fmt,) = formats
        arrays = [array for array, _ in parts]
        for i, array in enumerate(arrays):
            if array.ndim != len(one_fmt):
                raise LoggedValueError(
                    f"Image {key}[{i}] has {array.ndim} dimensions, expected {len(one_fmt)} for "
                    f"dataformats={one_fmt!r}."
                )
        shapes = {array.shape for array in arrays}
        if len(shapes) > 1:
            raise LoggedValueError(
                f"Images of {key!r} have different shapes {sorted(shapes)}: resize them to one "
                "shape to log them as one batch, or log them under separate keys."
            )
        return _as_nchw(key, np.stack(arrays), "N" + one_fmt)
    array, one_fmt = _image_array(key, images, fmt)
    if array.ndim == len(one_fmt):
        return _as_nchw(key, array[None], "N" + one_fmt)
    if array.ndim == len(one_fmt) + 1:
        return _as_nchw(key, array, "N" + one_fmt)
    raise LoggedValueError(
        f"Image {key!r} has shape {tuple(array.shape)}, which fits neither one image nor a batch "
        f"in dataformats={one_fmt!r}: pass dataformats ('CHW', 'HWC' or 'HW') that matches it."
    )
