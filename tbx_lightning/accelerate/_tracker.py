"""Accelerate integration: ``TBXTracker``, a ``GeneralTracker`` named ``"tbx"``.

``import tbx_lightning`` is enough for ``Accelerator(log_with="tbx")``: the package
installs an import hook (:mod:`tbx_lightning.accelerate._registration`) that calls
:func:`register` the moment ``accelerate.tracking`` finishes loading, so accelerate is
never imported eagerly. This module is the only one that imports accelerate.

A run lives in ``<logging_dir>/<project_name>/version_N``, versioned like
``TBXLogger`` runs, and shares the HParams and status code with it
(:class:`tbx_lightning.hparams.RunHParams`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from tbx_lightning.errors import MissingDependencyError

try:
    from accelerate.tracking import GeneralTracker, on_main_process
except ImportError as error:  # pragma: no cover - exercised in a subprocess without accelerate
    raise MissingDependencyError(
        "tbx_lightning.TBXTracker needs Accelerate: pip install 'tbx-lightning[accelerate]'"
    ) from error

from tbx_lightning import _fs
from tbx_lightning._rules import check_writer_options
from tbx_lightning._writer import RunWriter
from tbx_lightning.errors import ConfigError, ConfigTypeError, RunNotStartedError
from tbx_lightning.run import Run, RunSink

if TYPE_CHECKING:
    from tensorboardX import SummaryWriter

    from tbx_lightning.graph import GraphExport
    from tbx_lightning.projector import EmbeddingRecord

__all__ = ["TBXTracker", "register"]


def _not_started(tracker: TBXTracker) -> RunNotStartedError:
    return RunNotStartedError(
        f"TBXTracker({tracker.run_name!r}) has no run yet: the run starts in "
        "`accelerator.init_trackers(...)` on the main process (or call `tracker.start()` when "
        "using the tracker without an Accelerator). Other processes never get a run: guard "
        "direct tracker calls with `if accelerator.is_main_process:`."
    )


class TBXTracker(GeneralTracker):  # type: ignore[misc]
    """An Accelerate tracker writing TensorBoard runs through tbx_lightning.

    Selected with ``Accelerator(log_with="tbx")`` after ``import tbx_lightning``, or
    passed as an instance (``log_with=[TBXTracker("my-project", "runs")]``). The run
    lives in ``<logging_dir>/<run_name>/version_N``; each run gets the next free
    version. Constructing the tracker creates no files and touches no distributed
    state; :meth:`start` (called by ``accelerator.init_trackers``) opens the run on
    the main process only. Logging rules (values, steps, statuses, graph failures)
    are those of :mod:`tbx_lightning.run`, shared with ``TBXLogger``.

    To resume a run, reopen its version with a purge step (the first step the
    resumed loop logs), so TensorBoard shows one continuous curve:
    ``init_kwargs={"tbx": {"version": 0, "purge_step": 500}}``.

    Args:
        run_name: The project name given to ``init_trackers``; the folder under ``logging_dir``.
        logging_dir: Where runs go, a local path or an fsspec URL (``Accelerator(project_dir=...)``).
        version: ``None`` claims the next free ``version_N``; an int writes ``version_<int>``,
            a str uses that folder name as given (an existing one is reopened).
        mask_secrets: Mask config keys that look like credentials in the HParams table and
            ``config.yaml``.
        hparams_exclude: fnmatch patterns of config keys left out of the HParams table
            (they stay in ``config.yaml``): None for the default list of template
            plumbing (``*._target_``, ``callbacks.*``, ``paths.*``, ...), ``[]`` for every
            key (see docs/hparams.md).
        strict_graph: Raise :class:`~tbx_lightning.GraphExportError` instead of warning
            when :meth:`log_graph` cannot export the model.
        graph_options: Defaults for the graph exporter, e.g. ``{"max_depth": 2}``.
        **writer_options: ``flush_secs``, ``max_queue``, ``max_queue_bytes``,
            ``segment_bytes``, ``purge_step``, ``filename_suffix`` (see
            :class:`~tbx_lightning.RunWriter`).

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
        mask_secrets: bool = True,
        hparams_exclude: Sequence[str] | None = None,
        strict_graph: bool = False,
        graph_options: Mapping[str, Any] | None = None,
        **writer_options: Any,
    ) -> None:
        super().__init__()
        if not isinstance(run_name, str) or not run_name:
            raise ConfigError(
                f"Expected a non-empty project name for TBXTracker, got {run_name!r}: pass it as "
                "`accelerator.init_trackers('my-project')` or `TBXTracker('my-project', 'runs')`."
            )
        if logging_dir is None:
            raise ConfigError(
                "TBXTracker needs a logging directory: pass `Accelerator(project_dir='runs')` "
                "(or `logging_dir=`), or `TBXTracker(project_name, 'runs')`."
            )
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int | str)
        ):
            raise ConfigTypeError(
                f"`version` must be None, an int or a str, got {type(version).__name__}."
            )
        options = check_writer_options(
            writer_options,
            owner="TBXTracker",
            where="it in `init_trackers(..., init_kwargs={{'tbx': {{'{option}': ...}}}})`",
        )
        self.run_name = run_name
        self.logging_dir = os.fspath(logging_dir)
        self.init_kwargs: dict[str, Any] = {
            "version": version,
            "mask_secrets": mask_secrets,
            "hparams_exclude": hparams_exclude,
            "strict_graph": strict_graph,
            "graph_options": dict(graph_options or {}),
            **options,
        }
        self._log_dir: str | None = None
        self._version: int | str | None = None
        self._tbx_run = Run(
            self._writer_dir,
            writer_options=options,
            mask_secrets=mask_secrets,
            hparams_exclude=hparams_exclude,
            strict_graph=strict_graph,
            graph_options=graph_options,
            owner="TBXTracker",
        )
        self._started = False
        self._finished = False

    def _writer_dir(self) -> str:
        if self._log_dir is None:
            raise _not_started(self)
        return self._log_dir

    # ------------------------------------------------------------------ lifecycle
    @on_main_process
    def start(self) -> None:
        """Claims ``<logging_dir>/<run_name>/version_N`` and opens the run (main process only).

        Called by ``accelerator.init_trackers``; calling it again is a no-op. With
        ``version`` and ``purge_step`` given, an existing run is reopened and goes on
        from ``purge_step`` (its HParams row and status are updated in place).
        """
        with self._tbx_run.lock:
            if self._started:
                return
            fs, log_dir, version = _fs.run_dir(
                self.logging_dir, self.run_name, self.init_kwargs["version"]
            )
            self._log_dir = _fs.url(fs, log_dir)
            self._version = version
            _ = self._tbx_run.writer
            self._started = True

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
        self._started_run().log_hyperparams(values)

    @on_main_process
    def log_hyperparams(
        self, params: Any, metrics: Mapping[str, Any] | None = None, step: int | None = None
    ) -> None:
        """Adds ``params`` to the HParams row and ``config.yaml``; ``metrics`` as scalars.

        The same call as ``TBXLogger.log_hyperparams``; ``store_init_configuration`` is
        this without metrics.
        """
        self._started_run().log_hyperparams(params, metrics, step)

    @on_main_process
    def finish(self, status: str = "success") -> None:
        """Ends the run with ``status`` and closes its files (main process only).

        ``accelerator.end_training()`` calls this with ``"success"``. To mark a run that
        failed, call ``tracker.finish("failed")`` in an ``except`` block first; a later
        ``end_training()`` then leaves that status as it is. A run that is never
        finished stays ``running`` in TensorBoard, never ``success``.

        Args:
            status: Any string: ``success``, ``failed``, ``aborted``, ``interrupted`` and
                ``running`` map to TensorBoard's statuses; any other is recorded as
                ``unknown``, the string kept as a text entry ``run/status``.
        """
        run = self._tbx_run
        with run.lock:
            if not self._started or self._finished:
                return
            self._finished = True
            try:
                run.finish(status)
            finally:
                run.release()

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
        return self._started_run().writer

    @property
    def monitor_sink(self) -> RunSink | None:
        """What a :class:`~tbx_lightning.monitor.ModelMonitor` writes into (``None`` before
        :meth:`start`): the run, with its status and counts, not one writer."""
        return self._tbx_run.monitor_sink if self._started else None

    @property
    def log_dir(self) -> str:
        """The run directory, ``<logging_dir>/<run_name>/version_N``, as a path or URL."""
        return self._writer_dir()

    @property
    def version(self) -> int | str:
        """The run's version: the ``N`` of ``version_N``, or the folder name given as a str."""
        if self._version is None:
            raise _not_started(self)
        return self._version

    def _started_run(self) -> Run:
        if not self._started:
            raise _not_started(self)
        return self._tbx_run

    # ------------------------------------------------------------------ logging
    @on_main_process
    def log(self, values: Mapping[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Logs numbers as scalars, strings as text; nested dicts become ``a/b/c`` tags.

        Numbers may be int, float, bool, NumPy numbers or one-element tensors; all
        tensors of one call reach the host in one transfer. Without ``step``, values go
        one step past the highest step logged so far (0 first), so repeated calls draw
        a curve instead of piling up at step 0.

        Raises:
            LoggedTypeError: a value of any other type, or a tensor with more than one
                element; LoggedValueError: an empty name, or two values on one tag. The
                message names the key. Nothing of the call is written then.
        """
        if kwargs:
            raise ConfigTypeError(
                f"TBXTracker.log got unexpected keyword arguments {sorted(kwargs)}: it takes "
                "`values` and `step` only; remove them from `log_kwargs={'tbx': ...}`."
            )
        self._started_run().log(values, step)

    @on_main_process
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """The same as :meth:`log`, under ``TBXLogger``'s name for it."""
        self._started_run().log(metrics, step)

    @on_main_process
    def log_text(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """Logs strings as text entries (TensorBoard's Text tab); dicts as ``a/b`` tags.

        Without ``step``, text goes to the latest step logged.
        """
        self._started_run().log_text(values, step)

    @on_main_process
    def log_images(
        self, values: Mapping[str, Any], step: int | None = None, *, dataformats: str = "CHW"
    ) -> None:
        """Logs images: each value is one image, a batch, or a list of images.

        Values may be tensors or NumPy arrays (float in [0, 1] or uint8), PIL images
        (always HWC), or lists of these of one shape. Pass ``dataformats=`` for the
        layout of one image (``"CHW"`` by default, ``"HWC"``, ``"HW"``); a tensor with
        one more dimension is a batch, shown as one grid image under its key (as
        tensorboardX's ``add_images`` does). Without ``step``, images go to the latest step.

        Raises:
            LoggedTypeError: a value that is not an image; LoggedValueError: a shape
                that does not fit ``dataformats``. The message names the key; nothing of
                the call is written then.
        """
        self._started_run().log_images(values, step, dataformats=dataformats)

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
        self._started_run().log_histograms(values, step)

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
    ) -> EmbeddingRecord:
        """Writes an embedding for TensorBoard's projector, as ``TBXLogger`` does.

        See :func:`tbx_lightning.projector.log_embedding` for the arguments; returns
        its ``EmbeddingRecord``. Without ``step``, the embedding goes to the latest
        step logged (the next free step of the tag if nothing was logged yet); the same
        ``(tag, step)`` logged again replaces that entry, so pass ``step`` to keep several.
        """
        return self._started_run().log_embedding(
            tag,
            mat,
            metadata=metadata,
            metadata_header=metadata_header,
            label_img=label_img,
            step=step,
            max_points=max_points,
            seed=seed,
        )

    @on_main_process
    def log_graph(
        self,
        model: torch.nn.Module,
        input_array: Any = None,
        step: int | None = None,
        **options: Any,
    ) -> GraphExport | None:
        """Writes the model's graph for TensorBoard's Graphs tab, as ``TBXLogger`` does.

        See :func:`tbx_lightning.graph.write_graph` for ``options`` (``methods``,
        ``max_depth``, ``collapse_repeated``); returns its ``GraphExport``. Pass the
        unwrapped model (``accelerator.unwrap_model(model)``) and an input on its
        device; without ``input_array``, the model's ``example_input_array`` is used.
        A model that cannot be exported warns and returns None, so the training loop
        goes on; with ``strict_graph=True`` it raises
        :class:`~tbx_lightning.GraphExportError`.
        """
        if input_array is None and "example_input" in options:
            input_array = options.pop("example_input")  # the keyword of earlier releases
        run = self._started_run()
        if input_array is None:
            input_array = getattr(model, "example_input_array", None)
            if input_array is None:
                run.graph_problem(
                    f"no `input_array` was given and {type(model).__name__} has no "
                    "`example_input_array`: call tracker.log_graph(model, input_array).",
                    model,
                )
                return None
        return run.log_graph(model, input_array, step, **options)


# ---------------------------------------------------------------------- registration
def register() -> None:
    """Registers :class:`TBXTracker` with Accelerate as ``"tbx"``; safe to call repeatedly.

    Runs by itself when ``accelerate.tracking`` is imported after ``import tbx_lightning``,
    through ``accelerate.tracking.register_tracker_class`` (accelerate 1.15 and later, the
    declared floor; ``tests/test_upstream_contract.py`` fails loudly if it goes away).
    """
    import accelerate.tracking as tracking

    register_class = tracking.register_tracker_class
    registry = getattr(tracking, "LOGGER_TYPE_TO_CLASS", {})
    current = registry.get(TBXTracker.name)
    if current is TBXTracker:
        return
    base = getattr(tracking, "GeneralTracker", GeneralTracker)
    if not issubclass(TBXTracker, base):
        # ``importlib.reload(accelerate.tracking)`` made a new GeneralTracker class (and an
        # empty registry); the tracker keeps the contract, so it goes into the new registry
        # as it is, where ``log_with="tbx"`` looks it up.
        registry[TBXTracker.name] = TBXTracker
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
