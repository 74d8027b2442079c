"""Embeddings -> TensorBoard projector files: raw float32 tensors, TSV metadata, PNG sprites.

TensorBoard's projector reads one ``projector_config.pbtxt`` in a run directory;
each entry names a tensor file, an optional metadata file and an optional sprite
image, with paths relative to the config. This module writes, for every
``(tag, step)``::

    <run>/projector_config.pbtxt
    <run>/projector/<safe-tag>/<step:08d>.<random>/tensors.bin    raw little-endian float32
                                                   metadata.tsv   header, one row per point
                                                   sprite.png     thumbnails in a grid
                                                   sample.json    seed and rows of a sample

and one config entry whose ``tensor_name`` is ``"<tag>:<step:08d>"``, so every
step of a tag is a separate tensor in the projector's drop-down. Every write of
an entry goes to a new folder and the config is switched to it in one atomic
replace, so an entry and its files change together or not at all (see
:mod:`tbx_lightning.projector._files`). Every file goes through
:mod:`tbx_lightning._fs`, so remote log directories work as the event files do.

The tensor file is binary because the projector parses a tensor file as TSV text
first and only reads it as float32 when that text is not valid UTF-8. Nearly all
float matrices are invalid UTF-8 within their first bytes; for the rare matrix
that is valid UTF-8 (all zeros, or small integers only) the tensor is written as
TSV text with nine significant digits, which reads back to the same float32
values.
"""

from __future__ import annotations

import functools
import hashlib
import json
import numbers
import re
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, text_format

from tbx_lightning import _fs
from tbx_lightning._rules import check_step
from tbx_lightning.errors import ConfigError, LoggedTypeError, LoggedValueError
from tbx_lightning.projector import _files as files
from tbx_lightning.projector._metadata import metadata_columns, metadata_tsv
from tbx_lightning.projector._sprite import (
    check_image_count,
    image_tensor,
    sprite_layout,
    sprite_png,
)

__all__ = [
    "CONFIG_FILENAME",
    "LATEST_SUFFIX",
    "WARN_POINTS",
    "EmbeddingRecord",
    "log_embedding",
    "read_config",
    "safe_tag",
    "tensor_name",
]

CONFIG_FILENAME = "projector_config.pbtxt"
"""Name of the config file TensorBoard's projector looks for in a run directory."""

WARN_POINTS = 100_000
"""Above this many points (and no ``max_points``) a warning suggests sampling."""

LATEST_SUFFIX = " (latest)"
"""Added to the tag in the name of a tag's latest step once it has several.

TensorBoard's projector lists tensors sorted by name (after those with metadata
and those with more points) and opens on the first; ``" (latest):"`` sorts before
``":"``, so the latest step is listed first and opened.
"""

_SUBDIR = files.SUBDIR
_METADATA = "metadata.tsv"
_SPRITE = "sprite.png"
_SAMPLE = "sample.json"
_SAFE_TAG_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
_NAME_RE = re.compile(r"^(?P<tag>.*):(?P<step>\d{8,})\Z", re.DOTALL)


@dataclass(frozen=True)
class EmbeddingRecord:
    """What one :func:`log_embedding` call wrote.

    Attributes:
        tag: The tag as given.
        step: The step the embedding was written at (resolved when ``None`` was given).
        tensor_name: The name the projector lists it under when it was written:
            ``"<tag>:<step:08d>"``, or ``"<tag> (latest):<step:08d>"`` for the latest
            of several steps (a later step takes that name over).
        folder: Path or URL of the folder holding this embedding's files.
        tensor_path: Path or URL of the tensor file.
        metadata_path: Path or URL of ``metadata.tsv``, or None without metadata.
        sprite_path: Path or URL of ``sprite.png``, or None without label images.
        config_path: Path or URL of the run's ``projector_config.pbtxt``.
        num_points: Rows written (after ``max_points`` sampling).
        total_points: Rows given.
        dim: Columns (embedding dimension).
        tensor_format: ``"float32"`` (raw little-endian) or ``"tsv"`` (text fallback).
        thumbnail_px: Side of one square sprite thumbnail in pixels, or None.
        replaced: True when an entry for this ``(tag, step)`` existed and was replaced.
        seed: The seed of the ``max_points`` sample, or None when every row was kept.
        sample_path: Path or URL of ``sample.json`` (seed and chosen rows), or None.

    Example:
        >>> import tempfile, torch
        >>> from tbx_lightning import RunWriter
        >>> from tbx_lightning.projector import log_embedding
        >>> with RunWriter(tempfile.mkdtemp()) as run:
        ...     record = log_embedding(run, "words", torch.randn(3, 4), metadata=["a", "b", "c"], step=1)
        >>> record.tensor_name, record.num_points, record.dim
        ('words:00000001', 3, 4)
    """

    tag: str
    step: int
    tensor_name: str
    folder: str
    tensor_path: str
    metadata_path: str | None
    sprite_path: str | None
    config_path: str
    num_points: int
    total_points: int
    dim: int
    tensor_format: str
    thumbnail_px: int | None
    replaced: bool
    seed: int | None = None
    sample_path: str | None = None


# ---------------------------------------------------------------------- config proto
def _build_config_class() -> Any:
    """ProjectorConfig with the same fields as TensorBoard's, in a private descriptor pool.

    tensorboardX does not ship this message, and tensorboard is not a dependency;
    the text format only uses field names, so files are interchangeable.
    """
    proto = descriptor_pb2.FileDescriptorProto(
        name="tbx_lightning/projector_config.proto", package="tbx_lightning.projector"
    )
    proto.syntax = "proto3"
    string = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
    uint32 = descriptor_pb2.FieldDescriptorProto.TYPE_UINT32
    message = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
    optional = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
    repeated = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED

    def add(msg: Any, name: str, number: int, kind: int, label: int, type_name: str = "") -> None:
        field = msg.field.add(name=name, number=number, type=kind, label=label)
        if type_name:
            field.type_name = type_name

    sprite = proto.message_type.add(name="SpriteMetadata")
    add(sprite, "image_path", 1, string, optional)
    add(sprite, "single_image_dim", 2, uint32, repeated)
    info = proto.message_type.add(name="EmbeddingInfo")
    add(info, "tensor_name", 1, string, optional)
    add(info, "metadata_path", 2, string, optional)
    add(info, "bookmarks_path", 3, string, optional)
    add(info, "tensor_shape", 4, uint32, repeated)
    add(info, "sprite", 5, message, optional, ".tbx_lightning.projector.SpriteMetadata")
    add(info, "tensor_path", 6, string, optional)
    config = proto.message_type.add(name="ProjectorConfig")
    add(config, "model_checkpoint_path", 1, string, optional)
    add(config, "embeddings", 2, message, repeated, ".tbx_lightning.projector.EmbeddingInfo")
    add(config, "model_checkpoint_dir", 3, string, optional)

    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    descriptor = pool.FindMessageTypeByName("tbx_lightning.projector.ProjectorConfig")
    try:
        from google.protobuf.message_factory import GetMessageClass
    except ImportError:  # protobuf < 4.22
        from google.protobuf.message_factory import MessageFactory

        return MessageFactory(pool).GetPrototype(descriptor)
    return GetMessageClass(descriptor)


ProjectorConfig = _build_config_class()

_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()
_PARSED: dict[str, tuple[bytes, Any]] = {}  # config URL -> (file bytes, parsed config)


def _run_lock(fs: Any, run_path: str) -> threading.Lock:
    key = f"{type(fs).__module__}.{type(fs).__name__}:{_fs.url(fs, run_path)}"
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = threading.Lock()
        return lock


def read_config(fs: Any, run_path: str) -> Any:
    """Parses ``<run_path>/projector_config.pbtxt``; an empty config when there is none.

    Args:
        fs: The run's fsspec file system.
        run_path: The run directory on ``fs``.

    Raises:
        ConfigError: The file exists but is not a valid projector config; it is
            left untouched. (A ``ValueError``.)
    """
    path = _fs.join(fs, run_path, CONFIG_FILENAME)
    config = ProjectorConfig()
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return config
    key = _fs.url(fs, path)
    cached = _PARSED.get(key)
    if cached is not None and cached[0] == data:  # parsing text is slow; bytes compare is not
        config.CopyFrom(cached[1])
        return config
    try:
        text_format.Parse(data.decode("utf-8"), config)
    except (text_format.ParseError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"{_fs.url(fs, path)} is not a valid projector config ({error}); it was left as it "
            "is. Fix or remove it, then log the embedding again."
        ) from error
    _remember(key, data, config)
    return config


def _remember(key: str, data: bytes, config: Any) -> None:
    kept = ProjectorConfig()
    kept.CopyFrom(config)
    with _LOCKS_GUARD:
        if len(_PARSED) >= 64:
            _PARSED.clear()
        _PARSED[key] = (data, kept)


def tensor_name(tag: str, step: int) -> str:
    """The projector's name for ``tag`` at ``step``: ``"<tag>:<step:08d>"``.

    The zero padding keeps steps in order when names are sorted, and means a name
    never ends in ``":0"``, which TensorBoard would strip. The latest of several
    steps of a tag is listed as ``"<tag> (latest):<step:08d>"`` instead (see
    :data:`LATEST_SUFFIX`).

    Args:
        tag: The embedding's tag.
        step: The step it was logged at.
    """
    return f"{tag}:{step:08d}"


def safe_tag(tag: str) -> str:
    """A folder name for ``tag``: readable, portable, and distinct for distinct tags.

    Characters outside ``[A-Za-z0-9_.-]`` become ``_`` and a short hash of the
    full tag is appended, so ``"a/b"``, ``"a b"`` and ``"A/B"`` get different
    folders even on case-insensitive file systems.

    Args:
        tag: The embedding's tag.
    """
    slug = _SAFE_TAG_CHARS.sub("_", tag).strip("._")[:48] or "tag"
    digest = hashlib.sha1(tag.encode("utf-8")).hexdigest()[:8]
    return f"{slug}-{digest}"


# ---------------------------------------------------------------------- main entry
def log_embedding(
    run: Any,
    tag: str,
    mat: Any,
    *,
    metadata: Any = None,
    metadata_header: Sequence[str] | None = None,
    label_img: Any = None,
    step: int | None = None,
    max_points: int | None = None,
    seed: int = 0,
) -> EmbeddingRecord:
    """Writes an embedding matrix (and labels, and thumbnails) for TensorBoard's projector.

    The matrix is streamed to the file from its own memory: a C-contiguous float32
    CPU tensor or array is written without any copy, other dtypes, layouts and
    devices are converted in chunks of about 8 MiB, so a 500 MiB matrix adds only
    a few MiB to peak memory.

    Args:
        run: The :class:`~tbx_lightning.RunWriter` of the run (its ``fs`` and path are used).
        tag: Name of the embedding; ``/``, spaces and any Unicode are fine.
        mat: Tensor (any dtype that converts to float, any device) or array of shape ``(N, D)``.
        metadata: Labels, one per point: a sequence of values (one column); a
            sequence of rows with ``metadata_header`` (several columns); a mapping
            of column name to values; or a 1-D / 2-D tensor or array. One column
            is written as the columns ``label`` (or its one-name header) and
            ``index`` (the row's position in ``mat``), so TensorBoard offers
            "Label by" and "Color by" choices. Tabs, newlines and carriage
            returns inside labels are written as ``\\t``, ``\\n``, ``\\r``; a row
            that would be blank (TensorBoard skips those) is written with its
            cells quoted, e.g. ``""``.
        metadata_header: Column names, one per column (one name for one column).
        label_img: Thumbnails, ``(N, C, H, W)`` with C in 1, 3, 4, or ``(N, H, W)``;
            uint8, bool, integer or float. Floats in [0, 1] map to 0..255; other
            ranges are scaled by the batch's min and max. Non-square images are
            centred on a transparent square; thumbnails shrink so the sprite fits
            TensorBoard's 8192 px limit.
        step: Step of this embedding. ``None`` takes the next free step of the tag
            in this run (0 for a new tag). Logging the same ``(tag, step)`` again
            replaces that entry and its files, atomically.
        max_points: Keep at most this many rows, chosen by a seeded random sample
            (in their original order); metadata and images follow the same rows.
            The seed and the chosen rows are written to the entry's
            ``sample.json``. ``None`` keeps all and warns above 100,000 points.
        seed: Seed of that sample.

    Returns:
        An :class:`EmbeddingRecord` describing what was written.

    Raises:
        LoggedTypeError: ``tag``, ``step``, ``mat`` or ``max_points`` has the wrong
            type (a ``TypeError``).
        LoggedValueError: Shapes or lengths do not fit (the message names both), or
            a sprite cannot fit even at 1 px per image (a ``ValueError``).
        ConfigError: The run's projector config exists but does not parse.
    """
    if not isinstance(tag, str):
        raise LoggedTypeError(f"`tag` must be a str, got {type(tag).__name__} {tag!r}.")
    if not tag:
        raise LoggedValueError("`tag` must not be empty: give the embedding a name.")
    if step is not None:
        step = check_step(step, minimum=0)
    if max_points is not None and (
        isinstance(max_points, bool) or not isinstance(max_points, numbers.Integral)
    ):
        raise LoggedTypeError(f"`max_points` must be an int or None, got {max_points!r}.")
    if max_points is not None and max_points < 1:
        raise LoggedValueError(f"`max_points` must be >= 1 or None, got {max_points}.")

    total = _num_rows(mat)
    source = files.check_matrix(mat)
    index = _sample_index(total, max_points, seed)
    if index is None and max_points is None and total > WARN_POINTS:
        warnings.warn(
            f"Embedding {tag!r} has {total:,} points; the projector gets slow above "
            f"{WARN_POINTS:,}. Pass max_points= to keep a seeded sample.",
            UserWarning,
            stacklevel=2,
        )
    header, columns = (
        (None, None) if metadata is None else metadata_columns(metadata, metadata_header, total)
    )
    if label_img is not None:
        check_image_count(label_img, total)
        # Checked here, before any file is touched; the sprite is drawn on the helper.
        label_img = image_tensor(label_img)
        sprite_layout(total if index is None else len(index), *label_img.shape[2:])

    # The side files (labels, sprite, sample) are built on the writer's helper thread
    # while the tensor streams: building them is Python work, the write is the kernel's
    # copy into the page cache, so on two cores they overlap. Both finish before the
    # config names the entry: an error in either leaves none.
    side = functools.partial(
        _side_files, header, columns, label_img, index, seed, max_points, total
    )
    fs = run.fs
    run_path: str = getattr(run, "path", None) or run._path
    with _run_lock(fs, run_path):
        config = read_config(fs, run_path)
        if step is None:
            step = _next_step(config, tag)
        tag_dir = f"{_SUBDIR}/{safe_tag(tag)}"
        rel_folder = f"{tag_dir}/{files.new_folder_name(step)}"
        folder = _fs.join(fs, run_path, *rel_folder.split("/"))
        written: dict[str, str] = {}
        try:
            files.make_folder(fs, folder)
            tensor_path, stats, side_bytes = files.write_matrix(
                fs, folder, source, index, beside=side
            )
            metadata_bytes, sprite_bytes, thumb, sample_bytes = side_bytes
            for filename, data in (
                (_METADATA, metadata_bytes),
                (_SPRITE, sprite_bytes),
                (_SAMPLE, sample_bytes),
            ):
                if data is not None:
                    path = _fs.join(fs, folder, filename)
                    files.write_new(fs, path, data)
                    written[filename] = path
        except BaseException:
            files.remove_folder(fs, folder)  # never named by the config: nothing changes
            raise
        tensor_file = "tensors.tsv" if stats.tensor_format == "tsv" else "tensors.bin"
        entry = ProjectorConfig().embeddings.add()
        entry.tensor_name = tensor_name(tag, step)
        entry.tensor_path = f"{rel_folder}/{tensor_file}"
        entry.tensor_shape.extend([stats.rows, stats.dim])
        if metadata_bytes is not None:
            entry.metadata_path = f"{rel_folder}/{_METADATA}"
        if sprite_bytes is not None and thumb is not None:
            entry.sprite.image_path = f"{rel_folder}/{_SPRITE}"
            entry.sprite.single_image_dim.extend([thumb, thumb])
        config, old = _put_entry(config, tag, step, entry)
        name = next(e.tensor_name for e in config.embeddings if e.tensor_path == entry.tensor_path)
        config_path = _fs.join(fs, run_path, CONFIG_FILENAME)
        # The switch: readers see the old entry and its files, or the new ones.
        config_bytes = text_format.MessageToString(config, as_utf8=True).encode("utf-8")
        _fs.write_bytes_atomic(fs, config_path, config_bytes)
        _remember(_fs.url(fs, config_path), config_bytes, config)
        _remove_unused(fs, run_path, config, old, tag_dir, step)

    if stats.bad_rows:
        warnings.warn(
            f"Embedding {tag!r} has NaN or Inf in {stats.bad_rows} of {stats.rows} rows; they "
            "are written as they are, but the projector's PCA and t-SNE break on them.",
            UserWarning,
            stacklevel=2,
        )

    def url(key: str) -> str | None:
        return _fs.url(fs, written[key]) if key in written else None

    return EmbeddingRecord(
        tag=tag,
        step=step,
        tensor_name=name,
        folder=_fs.url(fs, folder),
        tensor_path=_fs.url(fs, tensor_path),
        metadata_path=url(_METADATA),
        sprite_path=url(_SPRITE),
        config_path=_fs.url(fs, config_path),
        num_points=stats.rows,
        total_points=total,
        dim=stats.dim,
        tensor_format=stats.tensor_format,
        thumbnail_px=thumb,
        replaced=old is not None,
        seed=seed if index is not None else None,
        sample_path=url(_SAMPLE),
    )


def _side_files(
    header: list[str] | None,
    columns: list[list[Any]] | None,
    label_img: Any,
    index: np.ndarray | None,
    seed: int,
    max_points: int | None,
    total: int,
) -> tuple[bytes | None, bytes | None, int | None, bytes | None]:
    """The bytes of ``metadata.tsv``, ``sprite.png`` (and its thumbnail size), ``sample.json``."""
    metadata_bytes = None if columns is None else metadata_tsv(header, columns, index)
    sprite_bytes = thumb = None
    if label_img is not None:
        sprite_bytes, thumb = sprite_png(label_img, index)
    sample_bytes = None
    if index is not None:
        sample_bytes = _sample_json(seed, max_points, total, index)
    return metadata_bytes, sprite_bytes, thumb, sample_bytes


# ---------------------------------------------------------------------- config entries
def _entry_folder(entry: Any) -> str | None:
    """``projector/<safe-tag>/<folder>`` of an entry this module wrote, else None."""
    parts = entry.tensor_path.split("/")
    if len(parts) != 4 or parts[0] != _SUBDIR or files.folder_step(parts[2]) is None:
        return None
    return "/".join(parts[:3])


def _entry_key(entry: Any) -> tuple[str, int] | None:
    """``(tag, step)`` of an entry this module wrote (either name form), else None."""
    folder = _entry_folder(entry)
    match = _NAME_RE.match(entry.tensor_name)
    if folder is None or match is None:
        return None
    _, slug, name = folder.split("/")
    step = int(match.group("step"))
    if files.folder_step(name) != step:
        return None
    tag = match.group("tag")
    if safe_tag(tag) == slug:
        return tag, step
    if tag.endswith(LATEST_SUFFIX) and safe_tag(tag[: -len(LATEST_SUFFIX)]) == slug:
        return tag[: -len(LATEST_SUFFIX)], step
    return None


def _next_step(config: Any, tag: str) -> int:
    steps = [key[1] for key in map(_entry_key, config.embeddings) if key and key[0] == tag]
    return max(steps) + 1 if steps else 0


def _put_entry(config: Any, tag: str, step: int, entry: Any) -> tuple[Any, Any | None]:
    """The config with ``entry`` in place of ``(tag, step)``, and the entry it replaced.

    Entries of other tools come first, as they were. Then this module's entries,
    tags in the order they first appeared, each tag's steps latest first; the
    latest of several steps is named ``"<tag> (latest):<step>"`` so that the
    projector, which sorts names, lists and opens it first.
    """
    foreign: list[Any] = []
    by_tag: dict[str, list[tuple[int, Any]]] = {}
    old = None
    for existing in config.embeddings:
        key = _entry_key(existing)
        if key is None:
            foreign.append(existing)
        elif key == (tag, step):
            if old is None:
                old = existing
                by_tag.setdefault(tag, []).append((step, entry))
        else:
            by_tag.setdefault(key[0], []).append((key[1], existing))
    if old is None:
        by_tag.setdefault(tag, []).append((step, entry))

    taken = {e.tensor_name for e in foreign}
    for t, items in by_tag.items():
        taken.update(tensor_name(t, s) for s, _ in items)
    arranged = ProjectorConfig()
    arranged.CopyFrom(config)
    del arranged.embeddings[:]
    for item in foreign:
        arranged.embeddings.add().CopyFrom(item)
    for t, items in by_tag.items():
        items.sort(key=lambda pair: pair[0], reverse=True)
        for position, (s, item) in enumerate(items):
            added = arranged.embeddings.add()
            added.CopyFrom(item)
            name = tensor_name(t, s)
            latest = f"{t}{LATEST_SUFFIX}:{s:08d}"
            if position == 0 and len(items) > 1 and latest not in taken:
                name = latest
            added.tensor_name = name
    return arranged, old


def _remove_unused(
    fs: Any, run_path: str, config: Any, old: Any | None, tag_dir: str, step: int
) -> None:
    """Deletes the replaced entry's folder and folders of killed writes of this step.

    Runs after the config no longer names them; a failure leaves files behind
    (with a warning) but never touches what the config names.
    """
    used = {_entry_folder(e) for e in config.embeddings}
    stale = set()
    if old is not None:
        stale.add(_entry_folder(old))
    parent = _fs.join(fs, run_path, *tag_dir.split("/"))
    for name in files.list_folders(fs, parent):
        if files.folder_step(name) == step:
            stale.add(f"{tag_dir}/{name}")
    for rel in sorted(f for f in stale - used if f):
        try:
            files.remove_folder(fs, _fs.join(fs, run_path, *rel.split("/")))
        except OSError as error:
            warnings.warn(
                f"Could not delete the projector files of a replaced entry, {rel!r} ({error}); "
                "the config no longer names them, so they can be deleted by hand.",
                UserWarning,
                stacklevel=3,
            )


# ---------------------------------------------------------------------- rows and samples
def _num_rows(mat: Any) -> int:
    shape = tuple(mat.shape) if hasattr(mat, "shape") else np.shape(mat)
    if len(shape) != 2:
        hint = " (use mat.reshape(-1, 1) for one value per point)" if len(shape) == 1 else ""
        raise LoggedValueError(f"`mat` must be 2-D (N, D), got shape {tuple(shape)}{hint}.")
    if shape[0] == 0 or shape[1] == 0:
        raise LoggedValueError(
            f"`mat` must have at least one row and one column, got shape {tuple(shape)}."
        )
    return int(shape[0])


def _sample_index(total: int, max_points: int | None, seed: int) -> np.ndarray | None:
    if max_points is None or total <= max_points:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=max_points, replace=False))


def _sample_json(seed: int, max_points: int | None, total: int, index: np.ndarray) -> bytes:
    record = {
        "seed": int(seed),
        "max_points": max_points,
        "total_points": total,
        "method": (
            "numpy.sort(numpy.random.default_rng(seed).choice(total_points, "
            "size=max_points, replace=False))"
        ),
        "rows": index.tolist(),
    }
    return (json.dumps(record, separators=(",", ":")) + "\n").encode("ascii")
