"""TBXLogger: a drop-in for Lightning's TensorBoardLogger, writing through the RunWriter.

It subclasses ``lightning.pytorch.loggers.TensorBoardLogger`` only so that Lightning
treats it as a TensorBoard logger where it checks the class: ``trainer.log_dir`` then
equals ``logger.log_dir``, and ``ModelCheckpoint`` without a ``dirpath`` saves into
``log_dir/checkpoints``. None of the parent's writing code runs: every method that
touches files is overridden.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
import weakref
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.core.saving import save_hparams_to_yaml
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.loggers.logger import rank_zero_experiment
    from lightning.pytorch.utilities.rank_zero import rank_zero_only
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "tbx_lightning.TBXLogger needs Lightning: pip install 'tbx-lightning[lightning]'"
    ) from error

from tensorboardX import SummaryWriter
from torch import Tensor, nn

from tbx_lightning import _fs
from tbx_lightning._writer import RunWriter
from tbx_lightning.hparams import RunHParams, to_container

__all__ = ["TBXLogger"]

# Every keyword of RunWriter (flush_secs, max_queue, ...): read from its signature so a new
# writer option is accepted here too (jsonargparse passes each one explicitly).
_WRITER_KWARGS = {
    name
    for name, param in inspect.signature(RunWriter.__init__).parameters.items()
    if param.kind is inspect.Parameter.KEYWORD_ONLY
}
# SummaryWriter arguments that Lightning's logger passes on but that never act there: a
# SummaryWriter given a log directory ignores ``comment``. Accepted so switching is one import.
_NO_EFFECT_KWARGS = {"comment"}
_STATE_KEY = "tbx_lightning.TBXLogger"


def _rank() -> int:
    return int(getattr(rank_zero_only, "rank", 0))


def _find_trainer(limit: int = 40) -> Trainer | None:
    """The Trainer whose call is on the stack (Lightning gives loggers no reference to it)."""
    frame = sys._getframe(1)
    for _ in range(limit):
        if frame is None:
            return None
        for name in ("trainer", "self"):
            candidate = frame.f_locals.get(name)
            if isinstance(candidate, Trainer):
                return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None


class _RunState(Callback):
    """Stores the run's directory in checkpoints and restores it on ``fit(ckpt_path=...)``.

    The logger attaches it to the trainer on first use; users never add it.
    """

    def __init__(self, logger: TBXLogger) -> None:
        self._logger = weakref.ref(logger)

    @property
    def state_key(self) -> str:
        return _STATE_KEY

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        logger = self._logger()
        if logger is not None and logger._version is not None:
            checkpoint[_STATE_KEY] = {
                "version": logger._version,
                "name": logger.name,
                "save_dir": logger.save_dir,
            }

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


class TBXLogger(TensorBoardLogger):
    """Lightning logger writing TensorBoard runs through tensorboardX.

    Takes every argument of Lightning's ``TensorBoardLogger`` with the same meaning.
    Runs go to ``save_dir/name/version_N``; the version is claimed atomically when
    first resolved. Hyperparameters become HParams columns keyed by their OmegaConf
    dot paths, with ``config.yaml`` and ``hparams.yaml`` beside the events.

    Args:
        save_dir: Root directory (local path or fsspec URL such as ``s3://bucket/runs``).
        name: Experiment name, a sub-folder of ``save_dir`` ("" for none).
        version: ``None`` claims the next ``version_N``; an int picks ``version_N``;
            a string is used as the folder name.
        log_graph: Export the model graph at fit start from ``example_input_array``.
        default_hp_metric: Log ``hp_metric = -1`` with the hyperparameters (Lightning's
            placeholder; not needed here, every scalar is a metric column).
        prefix: Prepended to every metric name, joined with ``-``.
        sub_dir: Extra folder inside the version folder for this logger's events.
        strict_graph: Raise instead of warning when graph export fails.
        graph_options: Passed to the graph exporter, e.g. ``{"collapse_repeated": True}``
            or ``{"max_depth": 2}`` to keep the graph of a large model small.
        mask_secrets: Mask config keys that look like credentials.
        **kwargs: Writer options: ``flush_secs``, ``max_queue``, ``filename_suffix``,
            ``purge_step``.

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
        name: str | None = "default",
        version: int | str | None = None,
        log_graph: bool = False,
        default_hp_metric: bool = False,
        prefix: str = "",
        sub_dir: str | os.PathLike[str] | None = None,
        *,
        strict_graph: bool = False,
        graph_options: Mapping[str, Any] | None = None,
        mask_secrets: bool = True,
        **kwargs: Any,
    ) -> None:
        # Skip TensorBoardLogger.__init__: it would pick torch.utils.tensorboard.
        from lightning.pytorch.loggers.logger import Logger

        Logger.__init__(self)
        for key in _NO_EFFECT_KWARGS & set(kwargs):
            kwargs.pop(key)
        unknown = sorted(set(kwargs) - _WRITER_KWARGS)
        if unknown:
            raise TypeError(
                f"TBXLogger got unexpected keyword argument(s) {unknown}: writer options are "
                f"{sorted(_WRITER_KWARGS)}."
            )
        if "flush_secs" in kwargs and not kwargs["flush_secs"] > 0:
            raise ValueError(
                f"Expected `flush_secs` > 0, got {kwargs['flush_secs']!r}: set logger.flush_secs to a "
                "positive number of seconds."
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
        self._fs, self._root_path = _fs.resolve(self._root_dir)
        self._run: RunWriter | None = None
        self._hp: RunHParams | None = None
        self._trainer_ref: weakref.ReferenceType[Trainer] | None = None
        self._exception: BaseException | None = None
        self._last_step = 0
        self._cli_logged = False
        self._experiment = None
        self.hparams: dict[str, Any] | Namespace = {}

    # ------------------------------------------------------------ where the run lives
    @property
    def name(self) -> str:
        return self._name

    @property
    def root_dir(self) -> str:
        return os.path.join(self._root_dir, self._name) if self._name else self._root_dir

    @property
    def save_dir(self) -> str:
        return self._root_dir

    @property
    def sub_dir(self) -> str | None:
        return self._sub_dir

    @property
    def version(self) -> int | str:
        """The run's version; claimed (created) on first access on global rank 0."""
        if self._version is None:
            root = (
                _fs.join(self._fs, self._root_path, self._name) if self._name else self._root_path
            )
            if _rank() == 0:
                self._version = _fs.claim_version(self._fs, root)
            else:
                # Other ranks never create directories; Lightning broadcasts rank 0's paths.
                versions = _fs.existing_versions(self._fs, root)
                return max(versions) if versions else 0
        return self._version

    @property
    def log_dir(self) -> str:
        version = self.version
        folder = version if isinstance(version, str) else f"version_{version}"
        log_dir = os.path.join(self.root_dir, folder)
        if self._sub_dir:
            log_dir = os.path.join(log_dir, self._sub_dir)
        return os.path.expandvars(os.path.expanduser(log_dir)) if "://" not in log_dir else log_dir

    # ------------------------------------------------------------------ the writer
    @property
    def run_writer(self) -> RunWriter:
        """The RunWriter of this run (rank 0 only)."""
        if self._run is None:
            self._attach_to_trainer()
            self._run = RunWriter(self.log_dir, **self._kwargs)
            self._hp = RunHParams(self._run, mask_secrets=self._mask_secrets)
        return self._run

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

    def _attach_to_trainer(self, limit: int = 40) -> None:
        trainer = _find_trainer(limit)
        if trainer is None:
            return
        if self._trainer_ref is not None and self._trainer_ref() is trainer:
            return
        self._trainer_ref = weakref.ref(trainer)
        self._cli_logged = False
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        if not any(isinstance(cb, _RunState) and cb._logger() is self for cb in callbacks):
            callbacks.append(_RunState(self))

    def _resume(self, version: int | str, step: int) -> None:
        """Switches to the checkpoint's run before anything of this fit is written."""
        if _rank() != 0:
            self._version = version
            return
        placeholder = None
        carried: dict[str, Any] = {}
        if self._run is not None:
            if self._version == version:
                return
            placeholder = self._run
            placeholder.close()
            if not placeholder.has_data and self._hp is not None:
                # Hyperparameters logged before fit belong to the resumed run.
                carried = self._hp.config
        # The version may have been claimed (e.g. by ModelCheckpoint resolving its dirpath)
        # without a writer being opened: that folder is abandoned too.
        old_dir = self.log_dir if self._version is not None else None
        old_root = self._version_dir() if self._version is not None else None
        self._version = version
        self._kwargs = {**self._kwargs, "purge_step": step}
        self._run = RunWriter(self.log_dir, **self._kwargs)
        self._hp = RunHParams(self._run, mask_secrets=self._mask_secrets)
        if carried:
            self._hp.log(carried, step=step)
            hparams_file = _fs.join(self._fs, self._run.path, self.NAME_HPARAMS_FILE)
            save_hparams_to_yaml(_fs.url(self._fs, hparams_file), self.hparams)
        if old_root is not None and old_root != self._version_dir():
            self._move_checkpoint_dirs(old_root, self._version_dir())
        if old_dir is not None and old_dir != self.log_dir:
            _remove_if_only_header(self._fs, placeholder, old_dir)
            if old_root is not None and old_root != old_dir:
                _remove_if_only_header(self._fs, None, old_root)

    def _version_dir(self) -> str:
        folder = self.version if isinstance(self.version, str) else f"version_{self.version}"
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

    # ------------------------------------------------------------------- logging
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Logs scalars: numbers, one-element tensors, and dicts of those (as ``key/sub``)."""
        if step is None:
            step = self._last_step
        self._last_step = int(step)
        flat: Mapping[str, Any] = metrics
        if self._prefix or any(isinstance(v, Mapping) for v in metrics.values()):
            flat = self._flatten_metrics(metrics)
        run = self._run if self._run is not None else self.run_writer
        run.log_scalars(flat, self._last_step)

    def _flatten_metrics(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        flat: dict[str, Any] = {}
        for key, value in metrics.items():
            name = f"{self._prefix}{self.LOGGER_JOIN_CHAR}{key}" if self._prefix else key
            if isinstance(value, Mapping):
                for sub, item in value.items():
                    flat[f"{name}/{sub}"] = item
            else:
                flat[name] = value
        return flat

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
        run = self.run_writer
        assert self._hp is not None  # created with the run writer
        container = to_container(params, mask_secrets=self._mask_secrets)
        self.hparams = {
            **(self.hparams if isinstance(self.hparams, dict) else vars(self.hparams)),
            **container,
        }
        if metrics is None and self._default_hp_metric:
            metrics = {"hp_metric": -1}
        step = self._last_step if step is None else int(step)
        self._log_cli_config()
        self._hp.log(params, metrics, step=step)
        # A URL, not the bare path: Lightning picks the file system from the protocol.
        hparams_file = _fs.url(self._fs, _fs.join(self._fs, run.path, self.NAME_HPARAMS_FILE))
        save_hparams_to_yaml(hparams_file, self.hparams)

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
                assert self._hp is not None
                self._hp.log(cli_hparams(callback.parser, callback.config), step=self._last_step)
                return

    @rank_zero_only
    def log_graph(  # type: ignore[override]
        self, model: nn.Module, input_array: Any = None, **options: Any
    ) -> None:
        """Exports the model graph (torch.export, then fx, then jit.trace).

        Called by Lightning at fit start with ``input_array=None``: then the graph is
        written only if ``log_graph=True`` and the model has ``example_input_array``.
        An explicit ``input_array`` always writes the graph. ``options`` (and the
        logger's ``graph_options``) go to the exporter: ``max_depth``,
        ``collapse_repeated``, ``methods``.
        """
        if self._run is not None:
            self._log_cli_config()
        if input_array is None:
            if not self._log_graph:
                return
            input_array = getattr(model, "example_input_array", None)
            if input_array is None:
                self._graph_problem(
                    f"log_graph=True but {type(model).__name__}.example_input_array is not set: "
                    "set it in the module's __init__ or call logger.log_graph(model, input_array)."
                )
                return
        if isinstance(model, LightningModule):
            input_array = model._on_before_batch_transfer(input_array)
            input_array = model._apply_batch_transfer_handler(input_array)
        from tbx_lightning.graph import GraphExportError, write_graph

        try:
            write_graph(
                self.experiment,
                model,
                input_array,
                step=self._last_step,
                **{**self._graph_options, **options},
            )
        except (GraphExportError, TypeError, ValueError) as error:
            # An input the exporter cannot use is a graph problem too: training goes on.
            self._graph_problem(str(error), error)

    def _graph_problem(self, message: str, error: BaseException | None = None) -> None:
        if self._strict_graph:
            raise RuntimeError(message) from error
        warnings.warn(f"Model graph not logged: {message}", UserWarning, stacklevel=3)

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
    ) -> Any:
        """Writes an embedding for TensorBoard's projector (binary float32, labels, sprite)."""
        from tbx_lightning.projector import log_embedding

        return log_embedding(
            self.run_writer,
            tag,
            mat,
            metadata=metadata,
            metadata_header=metadata_header,
            label_img=label_img,
            step=self._last_step if step is None else step,
            max_points=max_points,
        )

    @rank_zero_only
    def log_histograms(self, values: Mapping[str, Tensor], step: int | None = None) -> None:
        """Logs a histogram per tensor, binned on the tensor's device."""
        from tbx_lightning.monitor import log_histograms

        log_histograms(self.run_writer, values, self._last_step if step is None else int(step))

    # ------------------------------------------------------------------- lifecycle
    @rank_zero_only
    def save(self) -> None:
        """Lightning calls this after every ``log_metrics``: the writer thread flushes on its own
        schedule (``flush_secs``), so nothing happens here; ``finalize`` flushes."""

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Records the run's status and flushes; the run stays open for ``test``/``validate``."""
        if self._run is None:
            return
        if isinstance(self._exception, KeyboardInterrupt) and status == "failed":
            status = "aborted"
        self._exception = None
        assert self._hp is not None
        self._hp.finish(status)
        self._run.flush()

    def close(self) -> None:
        """Closes the run's writer; a later log call opens a new event file in the same run."""
        if self._run is not None:
            run, self._run = self._run, None
            run.close()

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        return None

    def _get_next_version(self) -> int:
        root = _fs.join(self._fs, self._root_path, self._name) if self._name else self._root_path
        versions = _fs.existing_versions(self._fs, root)
        return max(versions) + 1 if versions else 0

    def __getstate__(self) -> dict[str, Any]:
        if self._run is not None:
            # A spawned process reopens the run: what this one logged must be on disk.
            self._run.flush()
        state = self.__dict__.copy()
        state["_run"] = None
        state["_hp"] = None
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
        ours = {os.path.basename(run.event_file), "config.yaml", "hparams.yaml"}
        if set(entries) <= ours:
            for entry in entries:
                os.remove(os.path.join(log_dir, entry))
            os.rmdir(log_dir)
    except OSError:
        return


def __getattr__(name: str) -> Any:
    # The Lightning callbacks live in their own modules; they are part of this integration.
    if name == "EmbeddingProjector":
        from tbx_lightning._lightning_projector import EmbeddingProjector

        return EmbeddingProjector
    if name == "TrainingMonitor":
        from tbx_lightning._lightning_monitor import TrainingMonitor

        return TrainingMonitor
    raise AttributeError(f"module 'tbx_lightning.lightning' has no attribute {name!r}")
