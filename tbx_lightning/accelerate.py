"""Accelerate integration: ``TBXTracker``, a ``GeneralTracker`` named ``"tbx"``.

``import tbx_lightning`` is enough for ``Accelerator(log_with="tbx")``: the package
installs an import hook (:mod:`tbx_lightning._registration`) that calls
:func:`register` the moment ``accelerate.tracking`` finishes loading, so accelerate is
never imported eagerly. This module is the only one that imports accelerate.

A run lives in ``<logging_dir>/<project_name>/version_N``, versioned like
``TBXLogger`` runs, and shares the HParams and status code with it
(:class:`tbx_lightning.hparams.RunHParams`).
"""

from __future__ import annotations

import functools
import numbers
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

try:
    from accelerate.tracking import GeneralTracker, on_main_process
except ImportError as error:  # pragma: no cover - exercised in a subprocess without accelerate
    raise ImportError(
        "tbx_lightning.TBXTracker needs Accelerate: pip install 'tbx-lightning[accelerate]'"
    ) from error

from tbx_lightning import _fs
from tbx_lightning._writer import RunWriter
from tbx_lightning.hparams import STATUSES, RunHParams

if TYPE_CHECKING:
    from tensorboardX import SummaryWriter

__all__ = ["TBXTracker", "register"]

_PIL_FORMAT = "HWC"


def _not_started(tracker: TBXTracker) -> RuntimeError:
    return RuntimeError(
        f"TBXTracker({tracker.run_name!r}) has no run yet: the run starts in "
        "`accelerator.init_trackers(...)` on the main process (or call `tracker.start()` when "
        "using the tracker without an Accelerator). Other processes never get a run: guard "
        "direct tracker calls with `if accelerator.is_main_process:`."
    )


def _coerce_step(step: Any) -> int:
    if isinstance(step, torch.Tensor) and step.numel() == 1:
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise TypeError(f"`step` must be an int or None, got {type(step).__name__} {step!r}.")
    return int(step)


def _is_scalar(key: str, value: Any) -> bool:
    """True for values that become one scalar point; TypeError for tensors that cannot."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(
                f"Value {key!r} is a tensor of shape {tuple(value.shape)}: log one-element tensors "
                "as scalars, or the whole tensor with `tracker.log_histograms({key: tensor})`."
            )
        if value.is_complex():
            raise TypeError(f"Value {key!r} is a complex tensor: log its real part or abs value.")
        return True
    if isinstance(value, bool | np.bool_ | numbers.Real):
        return True
    return isinstance(value, np.ndarray) and value.size == 1 and value.dtype.kind in "biuf"


def _flatten_values(
    values: Mapping[Any, Any], prefix: str, scalars: dict[str, Any], texts: dict[str, str]
) -> None:
    for key, value in values.items():
        if not isinstance(key, str):
            raise TypeError(
                f"Logged names must be str, got {type(key).__name__} {key!r}"
                + (f" under {prefix!r}" if prefix else "")
                + ": convert the key with str()."
            )
        if not key:
            raise ValueError(
                "Logged names must not be empty"
                + (f" (an empty key under {prefix!r})" if prefix else "")
                + ": give the value a name."
            )
        tag = f"{prefix}/{key}" if prefix else key
        if isinstance(value, Mapping):
            _flatten_values(value, tag, scalars, texts)
            continue
        if tag in scalars or tag in texts:
            raise ValueError(
                f"Value {tag!r} is given twice in one call (a key containing '/' clashes with a "
                "nested dict): rename one of them."
            )
        if isinstance(value, str):
            texts[tag] = value
        elif _is_scalar(tag, value):
            scalars[tag] = value
        else:
            raise TypeError(
                f"Value {tag!r} has type {type(value).__name__}, which TBXTracker.log cannot write: "
                "log numbers (int, float, bool, one-element tensors or arrays), str (as text) or "
                "dicts of these (as 'a/b' tags); use `log_images`, `log_histograms` or "
                "`log_embedding` on the tracker for images, tensors and embeddings."
            )


def _image_array(key: str, image: Any, dataformats: str) -> tuple[np.ndarray, str]:
    """One image as an array with its format: PIL images are HWC, others use ``dataformats``."""
    if hasattr(image, "getbands") and hasattr(image, "size"):  # a PIL image, without importing PIL
        return np.asarray(image), _PIL_FORMAT
    if isinstance(image, torch.Tensor):
        array = image.detach().cpu().numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(
            f"Image {key!r} has type {type(image).__name__}: log a tensor, a NumPy array, a PIL "
            "image, or a list of these."
        )
    return array, dataformats


def _as_nchw(key: str, batch: np.ndarray, fmt: str) -> np.ndarray:
    """A batch in ``fmt`` (``N`` + one image's layout) as NCHW with 1, 3 or 4 channels."""
    if len(set(fmt)) != len(fmt) or set(fmt) - set("NCHW") or not {"H", "W"} <= set(fmt):
        raise ValueError(
            f"dataformats={fmt[1:]!r} for image {key!r} is not a layout of H, W and optionally C: "
            "use 'CHW', 'HWC' or 'HW'."
        )
    if "C" not in fmt:
        batch, fmt = batch[:, None], "NC" + fmt[1:]
    batch = batch.transpose([fmt.index(axis) for axis in "NCHW"])
    if batch.shape[1] not in (1, 3, 4):
        raise ValueError(
            f"Image {key!r} has {batch.shape[1]} channels in dataformats={fmt[1:]!r}: images have "
            "1, 3 or 4 channels; pass the dataformats that matches the array ('CHW', 'HWC', 'HW')."
        )
    return batch


def _image_batch(key: str, images: Any, dataformats: str) -> np.ndarray:
    """Any accepted image value as one NCHW batch array."""
    fmt = dataformats.upper()
    if isinstance(images, list | tuple):
        if not images:
            raise ValueError(f"Image list {key!r} is empty: log at least one image.")
        parts = [_image_array(f"{key}[{i}]", image, fmt) for i, image in enumerate(images)]
        formats = {part_fmt for _, part_fmt in parts}
        if len(formats) > 1:
            raise ValueError(
                f"Images of {key!r} mix PIL images (HWC) with arrays in {fmt}: convert them to one "
                "layout, or pass dataformats matching all of them."
            )
        (one_fmt,) = formats
        arrays = [array for array, _ in parts]
        for i, array in enumerate(arrays):
            if array.ndim != len(one_fmt):
                raise ValueError(
                    f"Image {key}[{i}] has {array.ndim} dimensions, expected {len(one_fmt)} for "
                    f"dataformats={one_fmt!r}."
                )
        shapes = {array.shape for array in arrays}
        if len(shapes) > 1:
            raise ValueError(
                f"Images of {key!r} have different shapes {sorted(shapes)}: resize them to one "
                "shape to log them as one batch, or log them under separate keys."
            )
        return _as_nchw(key, np.stack(arrays), "N" + one_fmt)
    array, one_fmt = _image_array(key, images, fmt)
    if array.ndim == len(one_fmt):
        return _as_nchw(key, array[None], "N" + one_fmt)
    if array.ndim == len(one_fmt) + 1:
        return _as_nchw(key, array, "N" + one_fmt)
    raise ValueError(
        f"Image {key!r} has shape {tuple(array.shape)}, which fits neither one image nor a batch "
        f"in dataformats={one_fmt!r}: pass dataformats ('CHW', 'HWC' or 'HW') that matches it."
    )


class TBXTracker(GeneralTracker):  # type: ignore[misc]
    """An Accelerate tracker writing TensorBoard runs through tbx_lightning.

    Selected with ``Accelerator(log_with="tbx")`` after ``import tbx_lightning``, or
    passed as an instance (``log_with=[TBXTracker("my-project", "runs")]``). The run
    lives in ``<logging_dir>/<run_name>/version_N``; each run gets the next free
    version. Constructing the tracker creates no files and touches no distributed
    state; :meth:`start` (called by ``accelerator.init_trackers``) opens the run on
    the main process only.

    Args:
        run_name: The project name given to ``init_trackers``; the folder under ``logging_dir``.
        logging_dir: Where runs go, a local path or an fsspec URL (``Accelerator(project_dir=...)``).
        version: ``None`` claims the next free ``version_N``; an int writes ``version_<int>``,
            a str uses that folder name as given.
        flush_secs: Seconds between flushes of the event file to storage.
        max_queue: Pending calls at which logging blocks until the writer catches up.
        mask_secrets: Mask config keys that look like credentials in the HParams table and
            ``config.yaml``.
        filename_suffix: Appended to the event file's name.

    Example:
        >>> import tbx_lightning, tempfile
        >>> from accelerate import Accelerator
        >>> accelerator = Accelerator(log_with="tbx", project_dir=tempfile.mkdtemp())
        >>> accelerator.init_trackers("my-project", config={"lr": 0.1, "betas": [0.9, 0.99]})
        >>> accelerator.log({"train": {"loss": 0.5}, "note": "warm-up"}, step=1)
        >>> accelerator.get_tracker("tbx").run_writer.log_dir.endswith("version_0")
        True
        >>> accelerator.end_training()
    """

    name = "tbx"
    requires_logging_directory = True
    main_process_only = True

    def __init__(
        self,
        run_name: str,
        logging_dir: str | os.PathLike[str],
        *,
        version: int | str | None = None,
        flush_secs: float = 10.0,
        max_queue: int = 10_000,
        mask_secrets: bool = True,
        filename_suffix: str = "",
    ) -> None:
        super().__init__()
        if not isinstance(run_name, str) or not run_name:
            raise ValueError(
                f"Expected a non-empty project name for TBXTracker, got {run_name!r}: pass it as "
                "`accelerator.init_trackers('my-project')` or `TBXTracker('my-project', 'runs')`."
            )
        if logging_dir is None:
            raise ValueError(
                "TBXTracker needs a logging directory: pass `Accelerator(project_dir='runs')` "
                "(or `logging_dir=`), or `TBXTracker(project_name, 'runs')`."
            )
        if not flush_secs > 0:
            raise ValueError(
                f"Expected `flush_secs` > 0, got {flush_secs!r}: set it in "
                "`init_trackers(..., init_kwargs={'tbx': {'flush_secs': 10}})`."
            )
        if max_queue < 1:
            raise ValueError(f"Expected `max_queue` >= 1, got {max_queue!r}.")
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int | str)
        ):
            raise TypeError(
                f"`version` must be None, an int or a str, got {type(version).__name__}."
            )
        self.run_name = run_name
        self.logging_dir = os.fspath(logging_dir)
        self.init_kwargs: dict[str, Any] = {
            "version": version,
            "flush_secs": flush_secs,
            "max_queue": max_queue,
            "mask_secrets": mask_secrets,
            "filename_suffix": filename_suffix,
        }
        self._run: RunWriter | None = None
        self._hparams: RunHParams | None = None
        self._version: int | str | None = None
        self._step: int | None = None
        self._finished = False

    # ------------------------------------------------------------------ lifecycle
    @on_main_process
    def start(self) -> None:
        """Claims ``<logging_dir>/<run_name>/version_N`` and opens the run (main process only).

        Called by ``accelerator.init_trackers``; calling it again is a no-op.
        """
        if self._run is not None:
            return
        kwargs = self.init_kwargs
        fs, log_dir, version = _fs.run_dir(self.logging_dir, self.run_name, kwargs["version"])
        self._run = RunWriter(
            _fs.url(fs, log_dir),
            flush_secs=kwargs["flush_secs"],
            max_queue=kwargs["max_queue"],
            filename_suffix=kwargs["filename_suffix"],
        )
        self._hparams = RunHParams(self._run, mask_secrets=kwargs["mask_secrets"])
        self._version = version

    @on_main_process
    def store_init_configuration(self, values: Any) -> None:
        """Logs the run's config: the HParams table row and ``config.yaml``.

        ``init_trackers(..., config=cfg)`` calls this. ``values`` may be an OmegaConf
        DictConfig, a dict (nested, with lists and None), an ``argparse.Namespace`` or a
        dataclass instance; nested keys become ``a.b`` columns. Calling it again adds or
        updates keys.

        Raises:
            HParamsError: a missing mandatory value (``???``) or a broken interpolation;
                the message names the key.
        """
        self._hparams_or_raise().log(values)

    @on_main_process
    def finish(self, status: str = "success") -> None:
        """Ends the run with ``status`` and closes its files (main process only).

        ``accelerator.end_training()`` calls this with ``"success"``. To mark a run that
        failed, call ``tracker.finish("failed")`` in an ``except`` block first; a later
        ``end_training()`` then leaves that status as it is. A run that is never
        finished stays ``running`` in TensorBoard, never ``success``.

        Args:
            status: ``success``, ``failed``, ``aborted``, ``interrupted`` or ``running``.

        Raises:
            ValueError: an unknown status; the run stays open then.
        """
        if self._run is None or self._finished:
            return
        if status.lower() not in STATUSES:
            raise ValueError(f"Unknown run status {status!r}: use one of {sorted(STATUSES)}.")
        hparams = self._hparams_or_raise()
        self._finished = True
        try:
            hparams.finish(status)
        finally:
            self._run.close()

    @on_main_process
    def flush(self) -> None:
        """Writes everything logged so far to storage before returning."""
        self.run_writer.flush()

    # ------------------------------------------------------------------ accessors
    @property
    def tracker(self) -> SummaryWriter:
        """The run's tensorboardX ``SummaryWriter`` (what ``get_tracker("tbx", unwrap=True)`` gives).

        Its events go into the run's one event stream, ordered with the scalars.
        """
        return self.run_writer.experiment

    @property
    def run_writer(self) -> RunWriter:
        """The run's :class:`~tbx_lightning.RunWriter` (fast scalars, ``log_dir``, ``flush``)."""
        if self._run is None:
            raise _not_started(self)
        return self._run

    @property
    def log_dir(self) -> str:
        """The run directory, ``<logging_dir>/<run_name>/version_N``, as a path or URL."""
        return self.run_writer.log_dir

    @property
    def version(self) -> int | str:
        """The run's version: the ``N`` of ``version_N``, or the folder name given as a str."""
        if self._version is None:
            raise _not_started(self)
        return self._version

    def _hparams_or_raise(self) -> RunHParams:
        if self._hparams is None:
            raise _not_started(self)
        return self._hparams

    def _resolve_step(self, step: Any, *, advance: bool) -> int:
        """``step``, or for None the next step (scalars) or the latest one (everything else)."""
        if step is not None:
            return _coerce_step(step)
        if self._step is None:
            return 0
        return self._step + 1 if advance else self._step

    def _seen(self, step: int) -> None:
        self._step = step if self._step is None else max(self._step, step)

    # ------------------------------------------------------------------ logging
    @on_main_process
    def log(self, values: Mapping[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Logs numbers as scalars, strings as text; nested dicts become ``a/b`` tags.

        Numbers may be int, float, bool, NumPy numbers or one-element tensors; all
        tensors of one call reach the host in one transfer. Without ``step``, values go
        one step past the highest step logged so far (0 first), so repeated calls draw
        a curve instead of piling up at step 0.

        Raises:
            TypeError: a value of any other type, or a tensor with more than one
                element; the message names the key. Nothing of the call is written then.
        """
        if kwargs:
            raise TypeError(
                f"TBXTracker.log got unexpected keyword arguments {sorted(kwargs)}: it takes "
                "`values` and `step` only; remove them from `log_kwargs={'tbx': ...}`."
            )
        run = self.run_writer
        scalars: dict[str, Any] = {}
        texts: dict[str, str] = {}
        _flatten_values(values, "", scalars, texts)
        at = self._resolve_step(step, advance=True)
        if scalars:
            run.log_scalars(scalars, at)
        for tag, text in texts.items():
            run.experiment.add_text(tag, text, global_step=at)
        if scalars or texts:
            self._seen(at)

    @on_main_process
    def log_images(self, values: Mapping[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Logs images: each value is one image, a batch, or a list of images.

        Values may be tensors or NumPy arrays (float in [0, 1] or uint8), PIL images
        (always HWC), or lists of these of one shape. Pass ``dataformats=`` for the
        layout of one image (``"CHW"`` by default, ``"HWC"``, ``"HW"``); a tensor with
        one more dimension is a batch, shown as one grid image under its key (as
        tensorboardX's ``add_images`` does). Without ``step``, images go to the latest step.

        Raises:
            TypeError: a value that is not an image; ValueError: a shape that does not
                fit ``dataformats``. The message names the key; nothing of the call is
                written then.
        """
        dataformats = kwargs.pop("dataformats", "CHW")
        if kwargs:
            raise TypeError(
                f"TBXTracker.log_images got unexpected keyword arguments {sorted(kwargs)}: it "
                "takes `values`, `step` and `dataformats`."
            )
        if not isinstance(dataformats, str):
            raise TypeError(f"`dataformats` must be a str such as 'CHW', got {dataformats!r}.")
        experiment = self.tracker
        batches = {key: _image_batch(key, images, dataformats) for key, images in values.items()}
        at = self._resolve_step(step, advance=False)
        for key, batch in batches.items():
            experiment.add_images(key, batch, global_step=at, dataformats="NCHW")
        if batches:
            self._seen(at)

    @on_main_process
    def log_histograms(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """Logs a histogram per tensor or array (weights, activations, gradients).

        Routed to :func:`tbx_lightning.monitor.log_histograms`, as ``TBXLogger`` does:
        each tensor is binned on its own device and only the bins reach the host.
        Without ``step``, histograms go to the latest step.

        Raises:
            TypeError: a value that is not a real tensor or array; ValueError: an empty
                one. The message names the key.
        """
        from tbx_lightning.monitor import log_histograms

        at = self._resolve_step(step, advance=False)
        log_histograms(self.run_writer, values, at)
        if values:
            self._seen(at)

    @on_main_process
    def log_embedding(
        self,
        tag: str,
        mat: Any,
        *,
        metadata: Any = None,
        metadata_header: Any = None,
        label_img: Any = None,
        step: int | None = None,
        max_points: int | None = None,
        seed: int = 0,
    ) -> Any:
        """Writes an embedding for TensorBoard's projector, as ``TBXLogger`` does.

        See :func:`tbx_lightning.projector.log_embedding` for the arguments; returns
        its ``EmbeddingRecord``. Without ``step``, the embedding goes to the latest
        step logged (the next free step of the tag if nothing was logged yet); the same
        ``(tag, step)`` logged again replaces that entry, so pass ``step`` to keep several.
        """
        from tbx_lightning.projector import log_embedding

        at = (
            None if step is None and self._step is None else self._resolve_step(step, advance=False)
        )
        result = log_embedding(
            self.run_writer,
            tag,
            mat,
            metadata=metadata,
            metadata_header=metadata_header,
            label_img=label_img,
            step=at,
            max_points=max_points,
            seed=seed,
        )
        if at is not None:
            self._seen(at)
        return result

    @on_main_process
    def log_graph(
        self, model: torch.nn.Module, example_input: Any, step: int | None = None, **options: Any
    ) -> Any:
        """Writes the model's graph for TensorBoard's Graphs tab, as ``TBXLogger`` does.

        See :func:`tbx_lightning.graph.write_graph` for ``options`` (``methods``,
        ``max_depth``, ``collapse_repeated``); returns its ``GraphExport``. Pass the
        unwrapped model (``accelerator.unwrap_model(model)``) and an input on its device.

        Raises:
            GraphExportError: the model could not be traced; the message says why.
        """
        from tbx_lightning.graph import write_graph

        at = self._resolve_step(step, advance=False)
        result = write_graph(self.tracker, model, example_input, step=at, **options)
        self._seen(at)
        return result


# ---------------------------------------------------------------------- registration
_OLD_ACCELERATE = (
    "Unsupported logging capability: 'tbx'. accelerate {version} has no tracker registry "
    "(`accelerate.tracking.register_tracker_class`), so `log_with='tbx'` cannot name "
    "tbx_lightning's tracker. Pass an instance instead: `from tbx_lightning import TBXTracker; "
    "Accelerator(log_with=[TBXTracker('my-project', 'runs')])`, or upgrade accelerate."
)


def _explain_missing_registry(tracking: Any) -> None:
    """On accelerate releases without a registry, make ``log_with="tbx"`` say what to do."""
    import sys

    original = getattr(tracking, "filter_trackers", None)
    if original is None or getattr(original, "_tbx_explains", False):
        return
    version = getattr(sys.modules.get("accelerate"), "__version__", "(this release)")

    @functools.wraps(original)
    def filter_trackers(log_with: Any, *args: Any, **kwargs: Any) -> Any:
        names = log_with if isinstance(log_with, list | tuple) else [log_with]
        if any(isinstance(name, str) and str(name) == TBXTracker.name for name in names):
            raise ValueError(_OLD_ACCELERATE.format(version=version))
        return original(log_with, *args, **kwargs)

    wrapped: Callable[..., Any] = filter_trackers
    wrapped._tbx_explains = True  # type: ignore[attr-defined]
    tracking.filter_trackers = wrapped
    # ``accelerate.accelerator`` binds the name on import; replace it there too if it is loaded.
    accelerator_module = sys.modules.get("accelerate.accelerator")
    if getattr(accelerator_module, "filter_trackers", None) is original:
        accelerator_module.filter_trackers = wrapped  # type: ignore[union-attr]


def register() -> None:
    """Registers :class:`TBXTracker` with Accelerate as ``"tbx"``; safe to call repeatedly.

    Runs by itself when ``accelerate.tracking`` is imported after ``import tbx_lightning``.
    With an accelerate release that lacks ``register_tracker_class``, ``log_with="tbx"``
    fails with a message that says to pass ``log_with=[TBXTracker(...)]``, which works there.
    """
    import accelerate.tracking as tracking

    register_class = getattr(tracking, "register_tracker_class", None)
    if register_class is None:
        _explain_missing_registry(tracking)
        return
    registry = getattr(tracking, "LOGGER_TYPE_TO_CLASS", {})
    current = registry.get(TBXTracker.name)
    if current is TBXTracker:
        return
    if current is not None and (current.__module__, current.__qualname__) == (
        __name__,
        "TBXTracker",
    ):
        registry[TBXTracker.name] = TBXTracker  # this module was reloaded: replace quietly
        return
    register_class(TBXTracker)


# Importing this module first (``from tbx_lightning import TBXTracker`` before accelerate)
# loads accelerate.tracking from the import at the top, while this module is half built;
# the import hook skips that case, so the registration happens here, once the class exists.
register()
