"""TBXLogger: a drop-in for Lightning's TensorBoardLogger, writing through the RunWriter.

It subclasses ``lightning.pytorch.loggers.TensorBoardLogger`` only so that Lightning
treats it as a TensorBoard logger where it checks the class: ``trainer.log_dir`` then
equals ``logger.log_dir``, and ``ModelCheckpoint`` without a ``dirpath`` saves into
``log_dir/checkpoints``. None of the parent's writing code runs: every method that
touches files is overridden.
"""

from __future__ import annotations

import os
import sys
import weakref
from argparse import Namespace
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from tbx_lightning.errors import ConfigTypeError, MissingDependencyError

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.core.saving import save_hparams_to_yaml
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.loggers.logger import rank_zero_experiment
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "tbx_lightning.TBXLogger needs Lightning: pip install 'tbx-lightning[lightning]'"
    ) from error

from tensorboardX import SummaryWriter
from torch import Tensor, nn

from tbx_lightning import _fs
from tbx_lightning._rules import check_writer_options
from tbx_lightning._summary import SUMMARY_FILE
from tbx_lightning._writer import RunWriter
from tbx_lightning.hparams import MASK, is_secret_key, to_container
from tbx_lightning.lightning._trainer import find_trainer
from tbx_lightning.run import Run, RunSink

if TYPE_CHECKING:
    from tbx_lightning.graph import GraphExport
    from tbx_lightning.projector import EmbeddingRecord

__all__ = ["RunStateCallback", "TBXLogger"]

# SummaryWriter arguments that Lightning's logger passes on but that never act there: a
# SummaryWriter given a log directory ignores ``comment``. Accepted so switching is one import.
_NO_EFFECT_KWARGS = {"comment"}
_STATE_KEY = "tbx_lightning.TBXLogger"
# Lightning's own prefix for this warning: filters users already have keep matching.
_NO_GRAPH_PREFIX = "Could not log computational graph to TensorBoard: "


def _rank() -> int:
    return int(getattr(rank_zero_only, "rank", 0))


class RunStateCallback(Callback):
    """Keeps a :class:`TBXLogger` run across checkpoints and records why a fit stopped.

    Stores the run's version in every checkpoint and, on ``fit(ckpt_path=...)``,
    switches the logger to that run (with a purge step, so the curve goes on
    without a zig-zag); records ``aborted`` for a fit stopped with Ctrl-C. The
    logger adds it to the Trainer by itself; add it explicitly (``logger.callback()``)
    together with ``TBXLogger(find_trainer=False)`` to do without the stack lookup
    that finds the Trainer (see :mod:`tbx_lightning.lightning._trainer`).

    Args:
        logger: The logger whose run this callback keeps.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from tbx_lightning import TBXLogger
        >>> logger = TBXLogger("runs", find_trainer=False)
        >>> trainer = Trainer(logger=logger, callbacks=[logger.callback()])  # doctest: +SKIP
    """

    def __init__(self, logger: TBXLogger) -> None:
        self._logger = weakref.ref(logger)

    @property
    def state_key(self) -> str:
        return _STATE_KEY

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        logger = self._logger()
        if logger is not None:
            logger._join_trainer(trainer)

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        logger = self._logger()
        if logger is None:
            return
        if logger._version is not None:
            checkpoint[_STATE_KEY] = {
                "version": logger._version,
                "name": logger.name,
                "save_dir": logger.save_dir,
            }
        if logger._mask_checkpoint_secrets:
            for key in ("hyper_parameters", "datamodule_hyper_parameters"):
                if isinstance(checkpoint.get(key), Mapping):
                    checkpoint[key] = _masked(checkpoint[key])

    def on_load_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        logger = self._logger()
        state = checkpoint.get(_STATE_KEY)
        if logger is not None and state is not None:
            logger._resume(state["version"], int(checkpoint.get("global_step", 0)))

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        logger = self._logger()
        if logger is not None:
            logger._exception = exception


def _masked(value: Any) -> Any:
    """A copy of a checkpoint's hyperparameters with credentials masked, same shape and types."""
    try:
        from tbx_lightning._secrets import mask_secrets_in
    except ImportError:  # pragma: no cover - an hparams layer without the shape-keeping masker
        return _mask_keys(value, "")
    return mask_secrets_in(value)


def _mask_keys(value: Any, path: str) -> Any:
    if isinstance(value, Mapping):
        items = {}
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            secret = is_secret_key(child) and isinstance(item, str)
            items[key] = MASK if secret else _mask_keys(item, child)
        try:
            return cast(Any, type(value))(items)
        except TypeError:
            return items
    if isinstance(value, list | tuple):
        masked = [_mask_keys(item, f"{path}.{i}") for i, item in enumerate(value)]
        return tuple(masked) if isinstance(value, tuple) else masked
    return value


class TBXLogger(TensorBoardLogger):
    """Lightning logger writing TensorBoard runs through tensorboardX.

    Takes every argument of Lightning's ``TensorBoardLogger`` with the same meaning
    and the same defaults where they matter (experiment name ``lightning_logs``).
    Runs go to ``save_dir/name/version_N``; the version is claimed atomically when
    first resolved, and paths follow the ``name`` and ``version`` properties, so a
    subclass that overrides them moves the run. Hyperparameters become HParams
    columns keyed by their OmegaConf dot paths, with ``config.yaml`` and
    ``hparams.yaml`` beside the events. Each fit ends by releasing the run's
    writer thread and event file; a later call (``trainer.test``) reopens the run
    in a new event file. Logging rules (values, steps, statuses) are those of
    :mod:`tbx_lightning.run`, shared with ``TBXTracker``.

    Args:
        save_dir: Root directory (local path or fsspec URL such as ``s3://bucket/runs``).
        name: Experiment name, a sub-folder of ``save_dir`` ("" or None for none).
        version: ``None`` claims the next ``version_N``; an int picks ``version_N``;
            a string is used as the folder name.
        log_graph: Export the model graph at fit start from ``example_input_array``.
        default_hp_metric: Log ``hp_metric = -1`` with the hyperparameters (Lightning's
            placeholder; not needed here, every scalar is a metric column).
        prefix: Prepended to every metric name, joined with ``-``.
        sub_dir: Extra folder inside the version folder for this logger's events.
        strict_graph: Raise :class:`~tbx_lightning.GraphExportError` instead of
            warning when graph export fails.
        graph_options: Passed to the graph exporter, e.g. ``{"collapse_repeated": True}``
            or ``{"max_depth": 2}`` to keep the graph of a large model small.
        mask_secrets: Mask config keys that look like credentials in the HParams
            table, ``config.yaml`` and ``hparams.yaml``.
        hparams_exclude: fnmatch patterns of config keys left out of the HParams table
            (they stay in ``config.yaml`` and ``hparams.yaml``): None for the default
            list of template plumbing (``*._target_``, ``callbacks.*``, ``paths.*``, ...),
            ``[]`` for every key (see docs/hparams.md).
        mask_checkpoint_secrets: Also mask them in the ``hyper_parameters`` that
            checkpoints keep (see docs/lightning.md for what that means for
            ``load_from_checkpoint``).
        find_trainer: Find the Trainer by looking up the call stack (Lightning gives
            loggers none). With False, add ``logger.callback()`` to the Trainer.
        epoch_tag: The tag of the ``epoch`` value Lightning adds to every
            ``log_metrics`` call. ``"trainer/epoch"`` by default, where the stock logger
            writes ``epoch``: its chart then sorts after ``train/*`` in TensorBoard's Time
            Series and HParams table, which open on the run's own metrics. Pass
            ``"epoch"`` for the stock name.
        **kwargs: Writer options: ``flush_secs``, ``max_queue``, ``max_queue_bytes``,
            ``segment_bytes``, ``purge_step``, ``filename_suffix``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from tbx_lightning import TBXLogger
        >>> trainer = Trainer(logger=TBXLogger("runs", name="demo"), max_epochs=1)  # doctest: +SKIP
    """

    LOGGER_JOIN_CHAR = "-"
    NAME_HPARAMS_FILE = "hparams.yaml"
    NAME_CONFIG_FILE = "config.yaml"

    def __init__(
        self,
        save_dir: str | os.PathLike[str] = "runs",
        name: str | None = "lightning_logs",
        version: int | str | None = None,
        log_graph: bool = False,
        default_hp_metric: bool = False,
        prefix: str = "",
        sub_dir: str | os.PathLike[str] | None = None,
        *,
        strict_graph: bool = False,
        graph_options: Mapping[str, Any] | None = None,
        mask_secrets: bool = True,
        hparams_exclude: Sequence[str] | None = None,
        mask_checkpoint_secrets: bool = False,
        find_trainer: bool = True,
        epoch_tag: str = "trainer/epoch",
        **kwargs: Any,
    ) -> None:
        # Skip TensorBoardLogger.__init__: it would pick torch.utils.tensorboard.
        from lightning.pytorch.loggers.logger import Logger

        Logger.__init__(self)
        for key in _NO_EFFECT_KWARGS & set(kwargs):
            kwargs.pop(key)
        check_writer_options(
            kwargs, owner="TBXLogger", where="logger.{option} (TBXLogger({option}=...))"
        )
        root_dir = os.fspath(save_dir)
        if "://" not in root_dir:
            # Expanded once, so the version is claimed where the run is written.
            root_dir = os.path.expandvars(os.path.expanduser(root_dir))
        self._root_dir = root_dir
        self._name = name or ""
        self._version: int | str | None = version
        self._sub_dir = None if sub_dir is None else os.fspath(sub_dir)
        self._log_graph = log_graph  # type: ignore[assignment]
        self._default_hp_metric = default_hp_metric
        self._prefix = prefix
        self._kwargs = kwargs
        self._strict_graph = strict_graph
        self._graph_options = dict(graph_options or {})
        self._mask_secrets = mask_secrets
        self._mask_checkpoint_secrets = mask_checkpoint_secrets
        self._find_trainer = find_trainer
        if not isinstance(epoch_tag, str) or not epoch_tag:
            raise ConfigTypeError(
                f"`epoch_tag` of TBXLogger must be a non-empty str such as 'trainer/epoch' or "
                f"'epoch', got {epoch_tag!r}."
            )
        self._epoch_tag = epoch_tag
        self._fs, self._root_path = _fs.resolve(self._root_dir)
        self._tbx_run = Run(
            self._writer_dir,
            writer_options=kwargs,
            mask_secrets=mask_secrets,
            hparams_exclude=hparams_exclude,
            strict_graph=strict_graph,
            graph_options=self._graph_options,
            owner="TBXLogger",
            open_writer=self._open_writer,
        )
        self._trainer_ref: weakref.ReferenceType[Trainer] | None = None
        self._exception: BaseException | None = None
        self._cli_logged = False
        self._experiment = None
        self.hparams: dict[str, Any] | Namespace = {}
        self._hparams_raw: dict[str, Any] = {}

    # ------------------------------------------------------------ where the run lives
    @property
    def name(self) -> str:
        return self._name

    @property
    def root_dir(self) -> str:
        name = self.name
        return os.path.join(self.save_dir, name) if name else self.save_dir

    @property
    def save_dir(self) -> str:
        return self._root_dir

    @property
    def sub_dir(self) -> str | None:
        return self._sub_dir

    def _experiment_root(self) -> str:
        name = self.name
        return _fs.join(self._fs, self._root_path, name) if name else self._root_path

    @property
    def version(self) -> int | str:
        """The run's version; claimed (created) on first access on global rank 0."""
        if self._version is None:
            with self._tbx_run.lock:  # threads racing on first use claim one version
                if self._version is None:
                    root = self._experiment_root()
                    if _rank() != 0:
                        # Other ranks never create directories; Lightning broadcasts rank 0's.
                        versions = _fs.existing_versions(self._fs, root)
                        return max(versions) if versions else 0
                    self._version = _fs.claim_version(self._fs, root)
        return self._version

    @property
    def log_dir(self) -> str:
        version = self.version
        folder = version if isinstance(version, str) else f"version_{version}"
        log_dir = os.path.join(self.root_dir, folder)
        sub_dir = self.sub_dir
        if sub_dir:
            log_dir = os.path.join(log_dir, sub_dir)
        return os.path.expandvars(os.path.expanduser(log_dir)) if "://" not in log_dir else log_dir

    def _writer_dir(self) -> str:
        return self.log_dir

    def _open_writer(self, log_dir: str, purge_step: int | None) -> RunWriter:
        # `**self._kwargs` as written here is how jsonargparse (LightningCLI) learns that
        # every RunWriter option is an option of this logger. A purge step is the shared
        # run's to give: once, at the first opening after a resume.
        if purge_step is None and "purge_step" not in self._kwargs:
            return RunWriter(log_dir, **self._kwargs)
        return RunWriter(log_dir, **{**self._kwargs, "purge_step": purge_step})

    # ------------------------------------------------------------------ the writer
    @property
    def run_writer(self) -> RunWriter:
        """The RunWriter of this run (rank 0 only); reopens the run after a fit released it."""
        if not self._tbx_run.is_open:
            self._attach_to_trainer()
        return self._tbx_run.writer

    @property
    def monitor_sink(self) -> RunSink:
        """What training monitors write into: follows this logger's run across resumes."""
        return self._tbx_run.monitor_sink

    @property
    @rank_zero_experiment
    def experiment(self) -> SummaryWriter:
        """The tensorboardX ``SummaryWriter`` of the run (same event stream as the scalars)."""
        run = self.run_writer
        # Lightning reads ``experiment`` at the start of every fit/validate/test, before it
        # restores a checkpoint: the moment to join that trainer (also when the writer was
        # opened earlier, e.g. by log_hyperparams before fit, or for a second Trainer).
        self._attach_to_trainer(limit=8)
        return run.experiment

    def callback(self) -> RunStateCallback:
        """The callback that keeps this run across checkpoints, for ``Trainer(callbacks=[...])``.

        Needed only with ``find_trainer=False``; otherwise the logger adds it by itself.
        """
        return RunStateCallback(self)

    def _attach_to_trainer(self, limit: int = 40) -> None:
        if not self._find_trainer:
            return
        trainer = find_trainer(limit)
        if trainer is not None:
            self._join_trainer(trainer)

    def _join_trainer(self, trainer: Trainer) -> None:
        if self._trainer_ref is not None and self._trainer_ref() is trainer:
            return
        self._trainer_ref = weakref.ref(trainer)
        self._cli_logged = False
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        if not any(isinstance(cb, RunStateCallback) and cb._logger() is self for cb in callbacks):
            callbacks.append(RunStateCallback(self))

    def _resume(self, version: int | str, step: int) -> None:
        """Switches to the checkpoint's run before anything of this fit is written."""
        if _rank() != 0:
            self._version = version
            return
        run = self._tbx_run
        with run.lock:
            placeholder = None
            carried: dict[str, Any] = {}
            if run.is_open:
                if self._version == version:
                    return
                hparams = run.hparams
                placeholder = run.release()
                if placeholder is not None and not placeholder.has_data:
                    # Hyperparameters logged before fit belong to the resumed run.
                    carried = hparams.config
            # The version may have been claimed (e.g. by ModelCheckpoint resolving its dirpath)
            # without a writer being opened: that folder is abandoned too.
            old_dir = self.log_dir if self._version is not None else None
            old_root = self._version_dir() if self._version is not None else None
            self._version = version
            run.reopen(purge_step=step)
            writer = run.writer
            if carried:
                run.hparams.log(carried, step=step)
                save_hparams_to_yaml(self._hparams_target(writer), self.hparams)
            if old_root is not None and old_root != self._version_dir():
                self._move_checkpoint_dirs(old_root, self._version_dir())
            if old_dir is not None and old_dir != self.log_dir:
                _remove_if_only_header(self._fs, placeholder, old_dir)
                if old_root is not None and old_root != old_dir:
                    _remove_if_only_header(self._fs, None, old_root)

    def _version_dir(self) -> str:
        version = self.version
        folder = version if isinstance(version, str) else f"version_{version}"
        return os.path.join(self.root_dir, folder)

    def _move_checkpoint_dirs(self, old_root: str, new_root: str) -> None:
        """Checkpoint callbacks that resolved their folder inside the abandoned version follow
        the run (Lightning sets them up before the checkpoint's run is known)."""
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        for callback in getattr(trainer, "checkpoint_callbacks", []):
            dirpath = getattr(callback, "dirpath", None)
            if isinstance(dirpath, str) and (
                dirpath == old_root or dirpath.startswith(old_root.rstrip("/\\") + os.sep)
            ):
                callback.dirpath = new_root + dirpath[len(old_root) :]

    def _opened_run(self) -> Run:
        """The shared run, its writer open (and this logger joined to the trainer)."""
        if not self._tbx_run.is_open:
            self._attach_to_trainer()
        return self._tbx_run

    # ------------------------------------------------------------------- logging
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Logs numbers as scalars and strings as text; dicts of any depth as ``a/b/c``.

        Lightning's ``epoch`` goes to ``epoch_tag`` (``trainer/epoch`` by default).

        Without ``step`` (Lightning always passes one), values go one step past the
        highest step logged so far. See :mod:`tbx_lightning.run` for the rules.
        """
        if "epoch" in metrics and self._epoch_tag != "epoch":
            metrics = {(self._epoch_tag if k == "epoch" else k): v for k, v in metrics.items()}
        if self._prefix:
            metrics = {f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}": v for k, v in metrics.items()}
        self._opened_run().log(metrics, step)

    @rank_zero_only
    def log_text(self, values: Mapping[str, Any], step: int | None = None) -> None:
        """Logs strings as text entries (TensorBoard's Text tab); dicts as ``a/b`` tags."""
        self._opened_run().log_text(values, step)

    @rank_zero_only
    def log_images(
        self, values: Mapping[str, Any], step: int | None = None, *, dataformats: str = "CHW"
    ) -> None:
        """Logs images: each value is one image, a batch, or a list of images.

        Tensors or NumPy arrays (float in [0, 1] or uint8), PIL images (HWC), or lists
        of these of one shape; ``dataformats`` is the layout of one image.
        """
        self._opened_run().log_images(values, step, dataformats=dataformats)

    @rank_zero_only
    def log_hyperparams(
        self,
        params: Any,
        metrics: Mapping[str, Any] | None = None,
        step: int | None = None,
    ) -> None:
        """Records the config as HParams columns, ``config.yaml`` and ``hparams.yaml``.

        May be called again (e.g. with the best metrics at the end): the run is
        updated in place, never split into a sub-run.
        """
        run = self._opened_run()
        with run.lock:
            writer = run.writer
            if metrics is None and self._default_hp_metric:
                metrics = {"hp_metric": -1}
            self._log_cli_config()
            run.log_hyperparams(params, metrics, step)
            # Merged first, masked as a whole with every secret the run has seen: a secret
            # of a later call is masked where an earlier call's value holds a copy of it.
            self._hparams_raw = {**self._hparams_raw, **to_container(params, mask_secrets=False)}
            self.hparams = run.hparams.masked(self._hparams_raw)
            self._save_hparams_file(writer)

    def _hparams_target(self, writer: RunWriter) -> str:
        """Where ``hparams.yaml`` is written: the spool folder of a remote run (uploaded with
        the run, so an unreachable remote never blocks), else the run's own URL."""
        if writer.spool_dir is not None:
            return os.path.join(writer.spool_dir, self.NAME_HPARAMS_FILE)
        # A URL, not the bare path: Lightning picks the file system from the protocol.
        return _fs.url(self._fs, _fs.join(self._fs, writer.path, self.NAME_HPARAMS_FILE))

    def _save_hparams_file(self, writer: RunWriter) -> None:
        save_hparams_to_yaml(self._hparams_target(writer), self.hparams)

    def _log_cli_config(self) -> None:
        """Under LightningCLI, logs the whole parsed config (trainer, model, data) once.

        Lightning calls ``log_hyperparams`` only when the module or datamodule saved
        hyperparameters, but it always calls ``log_graph`` at fit start; both land here.
        """
        if self._cli_logged or self._trainer_ref is None:
            return
        trainer = self._trainer_ref()
        if trainer is None or "lightning.pytorch.cli" not in sys.modules:
            return
        from lightning.pytorch.cli import SaveConfigCallback

        for callback in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(callback, SaveConfigCallback):
                self._cli_logged = True
                self._tbx_run.log_hyperparams(cli_hparams(callback.parser, callback.config))
                return

    @rank_zero_only
    def log_graph(  # type: ignore[override]
        self, model: nn.Module, input_array: Any = None, step: int | None = None, **options: Any
    ) -> GraphExport | None:
        """Exports the model graph (torch.export, then fx, then jit.trace); returns the export.

        Called by Lightning at fit start with ``input_array=None``: then the graph is
        written only if ``log_graph=True`` and the model has ``example_input_array``.
        An explicit ``input_array`` always writes the graph. ``options`` (and the
        logger's ``graph_options``) go to the exporter: ``max_depth``,
        ``collapse_repeated``, ``methods``. A graph that cannot be exported warns and
        returns None (training goes on); with ``strict_graph=True`` it raises
        :class:`~tbx_lightning.GraphExportError`.
        """
        run = self._tbx_run
        if run.is_open:
            self._log_cli_config()
        if input_array is None:
            if not self._log_graph:
                return None
            input_array = getattr(model, "example_input_array", None)
            if input_array is None:
                run.graph_problem(
                    f"`example_input_array` of {type(model).__name__} is not set and no "
                    "`input_array` was given: set it in the module's __init__ or call "
                    "logger.log_graph(model, input_array).",
                    model,
                    prefix=_NO_GRAPH_PREFIX,
                )
                return None
        if isinstance(model, LightningModule):
            input_array = model._on_before_batch_transfer(input_array)
            input_array = model._apply_batch_transfer_handler(input_array)
        return self._opened_run().log_graph(model, input_array, step, **options)

    @rank_zero_only
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
        """Writes an embedding for TensorBoard's projector (binary float32, labels, sprite).

        See :func:`tbx_lightning.projector.log_embedding`; ``seed`` picks the points
        kept when ``max_points`` subsamples.
        """
        return self._opened_run().log_embedding(
            tag,
            mat,
            metadata=metadata,
            metadata_header=metadata_header,
            label_img=label_img,
            step=step,
            max_points=max_points,
            seed=seed,
        )

    @rank_zero_only
    def log_histograms(self, values: Mapping[str, Tensor], step: int | None = None) -> None:
        """Logs a histogram per tensor, binned on the tensor's device."""
        self._opened_run().log_histograms(values, step)

    # ------------------------------------------------------------------- lifecycle
    @rank_zero_only
    def save(self) -> None:
        """Lightning calls this after every ``log_metrics``: the writer thread flushes on its own
        schedule (``flush_secs``), so nothing happens here; ``finalize`` flushes."""

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Records the run's status, writes ``hparams.yaml`` if missing, releases the writer.

        Lightning calls it at the end of every fit/validate/test. The writer's thread
        and event file end here; a later call (``trainer.test`` after ``fit``) reopens
        the run in a new event file. Any status string is accepted: unknown ones are
        recorded as ``unknown`` with the string kept (see :meth:`tbx_lightning.run.Run.finish`).
        """
        run = self._tbx_run
        # Lightning's SLURM requeue calls this from a signal handler, maybe in the middle of
        # a call of this run on this thread: then the writer is flushed now and released
        # when that call returns.
        interrupted = run.lock.held_here()
        with run.lock:
            if not run.is_open:
                run.flush()  # a close that failed before: write what it kept, status included
                return
            if isinstance(self._exception, KeyboardInterrupt) and status == "failed":
                status = "aborted"
            self._exception = None
            writer = run.writer
            try:
                run.finish(status)
                hparams_file = _fs.join(writer.fs, writer.path, self.NAME_HPARAMS_FILE)
                if not writer.fs.exists(hparams_file):
                    # As the stock logger: every finished run has one, {} if nothing was saved.
                    self._save_hparams_file(writer)
            finally:
                if interrupted:
                    run.release_later()
                else:
                    run.release()

    @rank_zero_only
    def flush(self) -> None:
        """Writes everything logged so far to storage (nothing to do when no writer is open)."""
        self._tbx_run.flush()

    def close(self) -> None:
        """Closes the run's writer; a later log call opens a new event file in the same run."""
        self._tbx_run.release()

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        return None

    def _get_next_version(self) -> int:
        versions = _fs.existing_versions(self._fs, self._experiment_root())
        return max(versions) + 1 if versions else 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_trainer_ref"] = None
        state["_exception"] = None
        return state


# Keys of a parsed LightningCLI namespace that are CLI plumbing, not hyperparameters.
_CLI_PLUMBING = ("config", "subcommand", "ckpt_path")


def cli_hparams(parser: Any, config: Any) -> dict[str, Any]:
    """A parsed LightningCLI config as a plain nested dict, without CLI plumbing keys."""
    import yaml

    dumped = yaml.safe_load(parser.dump(config, skip_none=False)) or {}
    return {k: v for k, v in dumped.items() if k not in _CLI_PLUMBING}


def _remove_if_only_header(fs: Any, run: RunWriter | None, log_dir: str) -> None:
    """Deletes a run directory that this logger created and left empty but for its header."""
    if not _fs.is_local(fs):
        return
    try:
        entries = os.listdir(log_dir)
        if run is None:
            if not entries:
                os.rmdir(log_dir)
            return
        if run.has_data:
            return
        # Only what a writer without data leaves: its event file(s) and config files.
        ours = {
            os.path.basename(run.event_file),
            "config.yaml",
            "hparams.yaml",
            _fs.RECORDS_FILE,
            SUMMARY_FILE,
        }
        if set(entries) <= ours:
            for entry in entries:
                os.remove(os.path.join(log_dir, entry))
            os.rmdir(log_dir)
    except OSError:
        return


def __getattr__(name: str) -> Any:
    # The Lightning callbacks live in their own modules; they are part of this integration.
    if name == "EmbeddingProjector":
        from tbx_lightning.lightning._projector import EmbeddingProjector

        return EmbeddingProjector
    if name == "TrainingMonitor":
        from tbx_lightning.lightning._monitor import TrainingMonitor

        return TrainingMonitor
    raise AttributeError(f"module 'tbx_lightning.lightning' has no attribute {name!r}")
