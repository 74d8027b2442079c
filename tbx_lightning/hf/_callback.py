"""``TBXCallback``: the Hugging Face Trainer route, a thin callback over the shared run.

A ``transformers.TrainerCallback`` that routes the Trainer's events to one
:class:`~tbx_lightning.run.Run` (values, steps, HParams row, statuses, graph,
projector) and one :class:`~tbx_lightning.monitor.ModelMonitor` (statistics, alerts,
the non-finite guard), the same core the Lightning and Accelerate routes use. What the
callback protocol does not hand over (the Trainer, the loss, the moment before
clipping) comes from :mod:`tbx_lightning.hf._trainer`; the Trainer's log keys become
tags in :mod:`tbx_lightning.hf._tags`; the HParams row is built in
:mod:`tbx_lightning.hf._config`; the run a checkpoint belongs to is kept by
:mod:`tbx_lightning.hf._resume`. This module is the only one of the route that
imports transformers at its top.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from tbx_lightning.errors import MissingDependencyError

try:
    from transformers import TrainerCallback
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "tbx_lightning.TBXCallback needs transformers: pip install 'tbx-lightning[hf]'"
    ) from error

from tbx_lightning import _fs
from tbx_lightning._rules import check_writer_options
from tbx_lightning.errors import ConfigError, ConfigTypeError
from tbx_lightning.hf._completions import (
    COMPLETIONS_TAG,
    callback_rows,
    grpo_rows,
    has_sources,
    markdown_table,
)
from tbx_lightning.hf._config import check_args_in_row, row_exclusions, run_config
from tbx_lightning.hf._resume import RunRecord, read_record, write_record
from tbx_lightning.hf._tags import EPOCH_TAG, trainer_tags
from tbx_lightning.hf._trainer import TrainerHooks, find_trainer
from tbx_lightning.hparams import DEFAULT_HPARAMS_EXCLUDE, check_hparams_exclude
from tbx_lightning.monitor import ModelMonitor, MonitorOptions
from tbx_lightning.monitor._options import resolve_options
from tbx_lightning.run import Run

__all__ = ["EMBEDDING_TAG", "TBXCallback"]

_log = logging.getLogger("tbx_lightning.alerts")
EMBEDDING_TAG = "embeddings/tokens"


class TBXCallback(TrainerCallback):  # type: ignore[misc]
    """TensorBoard runs, HParams rows and training-health alerts for ``transformers.Trainer``.

    Works with the Trainer and every trainer built on it (TRL's ``SFTTrainer``,
    ``DPOTrainer``, ``GRPOTrainer``): ``Trainer(..., callbacks=[TBXCallback()])``, or
    ``TrainingArguments(report_to="tbx")`` after ``import tbx_lightning``. Each
    ``train()`` writes one run, ``<save_dir>/<name>/version_N`` (``save_dir`` defaults
    to ``$TENSORBOARD_LOGGING_DIR``, else ``<output_dir>/runs``; ``name`` to
    ``args.run_name``, else none), from the process where ``state.is_world_process_zero``
    only; every process computes what sharded statistics need and agrees on a stop.

    - **Tags** as on the other routes: ``train/loss``, ``eval/<metric>``,
      ``trainer/epoch``, TRL's metrics under ``train/`` and ``eval/``, TRL's generated
      completions as a Text table ``completions`` per logging step; from the monitor,
      ``vitals/lr/group_<i>``, ``vitals/grad_norm_total`` (before clipping),
      ``vitals/tokens_per_sec``, ``vitals/mfu``, per-layer ``vitals_layers/...``, the
      ``alerts`` text. See docs/transformers.md for the whole table.
    - **HParams row**: the TrainingArguments fields in ``args_in_row``, the model's key
      sizes, the PEFT config, and ``config`` when given; ``config.yaml`` and the
      ``run/config`` text keep every field.
    - **Statuses**: success when ``train()`` returns, failed when it raises (aborted
      for Ctrl-C), failed with the alert as the reason when an alert stopped it.
    - **Resume**: each checkpoint folder gets ``tbx_run.json``;
      ``train(resume_from_checkpoint=...)`` goes on in that run, one curve.
    - **Alerts**: with ``on_alert="stop"``, a step with NaN/Inf gradients or loss is
      skipped before ``optimizer.step()`` (the weights stay finite), a checkpoint is
      saved and training stops through ``control``; ``"raise"`` raises
      :class:`~tbx_lightning.TrainingAlertError` on every process.

    Args:
        save_dir: Where runs go (path or fsspec URL); see above for the default.
        name: A folder under ``save_dir`` for this experiment's runs.
        version: ``None`` claims the next free ``version_N`` (or, on resume, the
            checkpoint's); an int writes ``version_<int>``, a str that folder name.
        config: Your own config for the HParams row and ``config.yaml`` (an OmegaConf
            config, a dict, a dataclass, an ``argparse.Namespace``).
        monitor: Run the training monitor (statistics, alerts, throughput, MFU).
        options: A :class:`~tbx_lightning.monitor.MonitorOptions` (or a dict of its
            fields) for the monitor; ``None`` for the defaults.
        tokens_fn: Tokens in a batch (e.g. ``lambda b: int(b["attention_mask"].sum())``);
            by default the size of ``input_ids`` (positions, padding included), which
            needs no device sync.
        log_graph: Write the model's graph once, from the first training batch.
        log_embeddings: Write the token embeddings (the input embedding module applied
            to token ids, so LoRA on the embedding is included) for the projector at the
            start and at the end of training, tag ``embeddings/tokens``.
        embedding_points: At most this many tokens (a fixed sample) in the projector.
        max_completions: Rows of each ``completions`` table.
        args_in_row: TrainingArguments fields in the HParams row (``None``:
            :data:`tbx_lightning.hf.ARGS_IN_ROW`); the other fields stay in ``config.yaml``.
        hparams_exclude: fnmatch patterns of further config keys left out of the row:
            None for :data:`~tbx_lightning.hparams.DEFAULT_HPARAMS_EXCLUDE`, ``[]`` for none.
        mask_secrets: Mask config keys that look like credentials.
        strict_graph: Raise :class:`~tbx_lightning.GraphExportError` when the graph cannot
            be exported, instead of warning.
        graph_options: Defaults for the graph exporter, e.g. ``{"max_depth": 2}``.
        writer_options: :class:`~tbx_lightning.RunWriter` options (``flush_secs``,
            ``max_queue``, ...).
        **fields: Any field of :class:`~tbx_lightning.monitor.MonitorOptions` by name
            (``norm_every_n_steps=10``, ``on_alert="stop"``), applied over ``options``.

    Example:
        >>> from tbx_lightning import TBXCallback
        >>> callback = TBXCallback("runs", name="sft", on_alert="stop", hist_every_n_steps=50)
        >>> callback.options.skip_nonfinite_steps_on
        True
        >>> # Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str] | None = None,
        name: str | None = None,
        version: int | str | None = None,
        *,
        config: Any = None,
        monitor: bool = True,
        options: MonitorOptions | Mapping[str, Any] | None = None,
        tokens_fn: Callable[[Any], Any] | None = None,
        log_graph: bool = False,
        log_embeddings: bool = False,
        embedding_points: int = 4096,
        max_completions: int = 16,
        args_in_row: Sequence[str] | None = None,
        hparams_exclude: Sequence[str] | None = None,
        mask_secrets: bool = True,
        strict_graph: bool = False,
        graph_options: Mapping[str, Any] | None = None,
        writer_options: Mapping[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        self.options = resolve_options(options, fields, owner="TBXCallback")
        if name is not None and not isinstance(name, str):
            raise ConfigTypeError(f"`name` of TBXCallback must be a str or None, got {name!r}.")
        if version is not None and (
            isinstance(version, bool) or not isinstance(version, int | str)
        ):
            raise ConfigTypeError(
                f"`version` of TBXCallback must be None, an int or a str, got {version!r}."
            )
        for key, flag in (
            ("monitor", monitor),
            ("log_graph", log_graph),
            ("log_embeddings", log_embeddings),
            ("mask_secrets", mask_secrets),
            ("strict_graph", strict_graph),
        ):
            if not isinstance(flag, bool):
                raise ConfigTypeError(
                    f"`{key}` of TBXCallback must be True or False, got {flag!r}."
                )
        for key, number in (
            ("embedding_points", embedding_points),
            ("max_completions", max_completions),
        ):
            if isinstance(number, bool) or not isinstance(number, int) or number < 1:
                raise ConfigError(
                    f"Expected `{key}` of TBXCallback to be an int >= 1, got {number!r}."
                )
        if tokens_fn is not None and not callable(tokens_fn):
            raise ConfigTypeError(
                f"`tokens_fn` of TBXCallback must be a callable taking a batch, got "
                f"{type(tokens_fn).__name__}."
            )
        self.save_dir = None if save_dir is None else os.fspath(save_dir)
        self.name = name
        self.version = version
        self.config = config
        self.monitor_on = monitor
        self.tokens_fn = tokens_fn
        self.log_graph = log_graph
        self.log_embeddings = log_embeddings
        self.embedding_points = embedding_points
        self.max_completions = max_completions
        self.args_in_row = check_args_in_row(args_in_row)
        self.hparams_exclude = (
            DEFAULT_HPARAMS_EXCLUDE
            if hparams_exclude is None
            else check_hparams_exclude(hparams_exclude, where="hparams_exclude of TBXCallback")
        )
        self.mask_secrets = mask_secrets
        self.strict_graph = strict_graph
        self.graph_options = dict(graph_options or {})
        self.writer_options = check_writer_options(
            dict(writer_options or {}),
            owner="TBXCallback",
            where="it in `TBXCallback(writer_options={{'{option}': ...}})`",
        )
        #: The monitor of the current training (every process), or None.
        self.monitor: ModelMonitor | None = None
        #: The checkpoint saved when an alert stopped training, if one did.
        self.stop_checkpoint: str | None = None
        self._hooks = TrainerHooks(
            on_train_call=self._train_called,
            on_train_error=self._train_failed,
            on_train_exit=self._train_exited,
            on_micro_batch=self._micro_batch,
            on_unscaled=self._unscaled,
        )
        self._tbx_run: Run | None = None
        self._log_dir: str | None = None
        self._run_version: int | str | None = None
        self._finished = False
        self._training = False
        self._writes = False
        self._resume_from: str | None = None
        self._step_loss: torch.Tensor | None = None
        self._batch: tuple[float | None, float | None] = (None, None)
        self._measured: int | None = None
        self._graph_pending = False
        self._whole_model = True
        self._completions = False
        self._epoch_step: int | None = None
        self._completions_step = -1
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ the run
    @property
    def run(self) -> Run | None:
        """The shared :class:`~tbx_lightning.run.Run` (world process zero), or None before it opens."""
        return self._tbx_run

    @property
    def log_dir(self) -> str | None:
        """The run directory, once the run has opened (world process zero only)."""
        return self._log_dir

    def _root(self, args: Any) -> str:
        if self.save_dir is not None:
            return self.save_dir
        env = os.environ.get("TENSORBOARD_LOGGING_DIR")
        if env:
            return os.path.expanduser(env)
        return os.path.join(str(args.output_dir), "runs")

    def _folder_name(self, args: Any) -> str:
        if self.name is not None:
            return self.name
        return str(getattr(args, "run_name", None) or "")

    def _open(
        self, args: Any, model: Any, version: int | str | None, purge_step: int | None
    ) -> Run:
        """Opens (claims, for ``version=None``) the run folder and its :class:`Run`."""
        self._close_run()
        config = run_config(args, model)
        fs, log_dir, claimed = _fs.run_dir(self._root(args), self._folder_name(args), version)
        url = _fs.url(fs, log_dir)
        options = dict(self.writer_options)
        if purge_step is not None:
            options["purge_step"] = purge_step
        run = Run(
            lambda: url,
            writer_options=options,
            mask_secrets=self.mask_secrets,
            hparams_exclude=[
                *self.hparams_exclude,
                *row_exclusions(config, self.args_in_row),
            ],
            strict_graph=self.strict_graph,
            graph_options=self.graph_options,
            owner="TBXCallback",
        )
        self._tbx_run, self._log_dir, self._run_version = run, url, claimed
        self._finished = False
        self._epoch_step = None
        self._completions_step = -1
        run.log_hyperparams(config)
        if self.config is not None:
            run.log_hyperparams(self.config)
        return run

    def _current_run(self, args: Any, model: Any) -> Run:
        """The run to log into: the current one (an ``evaluate()`` after ``train()`` goes into
        the run it evaluates), or a new one (an ``evaluate()`` before any training)."""
        if self._tbx_run is None:
            return self._open(args, model, self.version, None)
        return self._tbx_run

    def _close_run(self) -> None:
        run = self._tbx_run
        if run is not None:
            run.release()

    def _finish(self, status: str) -> None:
        run = self._tbx_run
        if run is None or self._finished:
            return
        self._finished = True
        try:
            run.finish(status)
        finally:
            run.release()

    # ------------------------------------------------------------------ Trainer hooks
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        trainer = find_trainer()
        if trainer is not None:
            self._hooks.bind(trainer)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs.get("model")
        if self._hooks.trainer is None:
            trainer = find_trainer()
            if trainer is not None:
                self._hooks.bind(trainer)
            else:
                self._warn_once(
                    "no-trainer",
                    "TBXCallback could not find the Trainer that calls it: gradient statistics "
                    "are taken after clipping, the loss is not checked per step and an "
                    "exception in train() leaves the run marked running (see "
                    "docs/transformers.md).",
                )
        self._training = True
        self._writes = bool(state.is_world_process_zero)
        self._step_loss = None
        self._measured = None
        self.stop_checkpoint = None
        if self._writes:
            self._start_run(args, state, model)
        if self.monitor_on and model is not None:
            self._start_monitor(args, model, kwargs.get("optimizer"))
        sharded = model is not None and _sharded(model)
        self._whole_model = model is not None and not sharded
        if sharded and (self.log_graph or self.log_embeddings):
            self._warn_once(
                "sharded",
                "TBXCallback(log_graph=..., log_embeddings=...) needs the whole model on one "
                "process: the model is sharded (FSDP), so no graph and no embeddings are written.",
            )
        if self._writes and self._whole_model and self.log_embeddings and state.global_step == 0:
            self._write_embeddings(model, kwargs.get("processing_class"), 0)
        self._graph_pending = self._writes and self._whole_model and self.log_graph
        # The step wrappers serve the monitor and the graph; without either a step costs
        # nothing but the callback's own (empty) hooks.
        if self.monitor is not None or self._graph_pending:
            self._hooks.wrap_step()
        self._completions = self._writes and has_sources(self._hooks.trainer)

    def _start_run(self, args: Any, state: Any, model: Any) -> None:
        resumed = state.global_step > 0
        record = None
        if resumed and self.version is None:
            where = self._resume_from or os.path.join(
                str(args.output_dir), f"checkpoint-{state.global_step}"
            )
            record = read_record(where)
        if record is not None:
            self._open(args, model, record.version, state.global_step + 1)
        elif resumed and self.version is not None:
            self._open(args, model, self.version, state.global_step + 1)
        elif self._tbx_run is not None and not self._finished:
            run = self._tbx_run  # opened by logs before train() (an evaluate() call): this run
            run.log_hyperparams(run_config(args, model))
        else:
            self._open(args, model, self.version, None)

    def _start_monitor(self, args: Any, model: Any, optimizer: Any) -> None:
        sink = self._tbx_run.monitor_sink if self._writes and self._tbx_run is not None else None
        monitor = ModelMonitor(model, sink, self.options)
        monitor.measure_post_clip = bool(getattr(args, "max_grad_norm", 0))
        # fp16 mixed precision: the scaler's skipped steps are expected, not alerts.
        trainer = self._hooks.trainer
        monitor.grad_scaler = getattr(getattr(trainer, "accelerator", None), "scaler", None)
        if optimizer is not None:
            monitor.attach(optimizer)
        self.monitor = monitor

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step + 1
        if self.monitor is None or self._measured == step:
            return
        # The gradients were not seen before clipping (no accelerator call this step).
        if getattr(args, "max_grad_norm", 0):
            self._warn_once(
                "post-clip",
                "TBXCallback measured gradients after clipping at this step: the Trainer did "
                "not call accelerator.clip_grad_norm_ (DeepSpeed, or a custom training loop); "
                "vitals/grad_norm_total is then the clipped norm.",
            )
        self._measure(step)

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            samples, tokens = self._batch
            self.monitor.log_throughput(state.global_step + 1, samples=samples, tokens=tokens)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        monitor = self.monitor
        if monitor is None:
            return
        samples, tokens = self._batch
        monitor.log_throughput(state.global_step, samples=samples, tokens=tokens)
        # Agreed on every process by the monitor: a stop never leaves a process behind.
        if monitor.should_stop and not control.should_training_stop:
            # The update that would have made the weights non-finite was skipped, so the
            # checkpoint saved now holds the last finite weights.
            control.should_save = True
            control.should_log = True
            control.should_training_stop = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        stopping = self.monitor is not None and self.monitor.should_stop
        folder = os.path.join(str(args.output_dir), f"checkpoint-{state.global_step}")
        if stopping:
            self.stop_checkpoint = folder
        if not self._writes or self._tbx_run is None or self._run_version is None:
            return
        written = write_record(
            folder, RunRecord(self._run_version, int(state.global_step), self._log_dir or "")
        )
        if written is None:
            self._warn_once(
                "no-checkpoint-folder",
                f"TBXCallback found no checkpoint folder {folder!r} to record the run in: "
                "train(resume_from_checkpoint=...) from this checkpoint starts a new run.",
            )
        self._tbx_run.flush()
        if stopping:
            _log.warning("training stopped after an alert; checkpoint saved to %s", folder)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero or not logs:
            return
        run = self._current_run(args, kwargs.get("model"))
        step = int(state.global_step)
        values = trainer_tags(logs, leave_out=self._monitor_keys(step))
        if EPOCH_TAG in values:
            if self._epoch_step == step:
                del values[EPOCH_TAG]  # an eval's log at a step whose epoch is written
            else:
                self._epoch_step = step
        run.log(values, step=step)
        self._write_completions(step)
        if not self._training:
            run.release()  # an evaluate() outside train(): its data on disk, no thread left

    def _monitor_keys(self, step: int) -> set[str]:
        """Trainer log keys whose tag the monitor writes itself (the same values).

        The monitor writes ``vitals/lr/group_<i>`` on its scalar steps, once a value
        changed (a constant learning rate gets no curve, as on the other routes): the
        Trainer's ``learning_rate`` is then not written. The Trainer's ``grad_norm``
        (before clipping, as the monitor's) fills ``vitals/grad_norm_total`` in on the
        logging steps where the monitor does not measure.
        """
        monitor = self.monitor
        if monitor is None or not self._training or monitor.norm_every_n_steps == 0:
            return set()
        keys = {"learning_rate"}
        if self.options.log_grads and monitor.is_norm_step(step):
            keys.add("grad_norm")
        return keys

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._stop_monitor()
        self._hooks.unwrap_step()
        self._training = False
        if not self._writes:
            return
        if self.log_embeddings and self._whole_model:
            self._write_embeddings(
                kwargs.get("model"), kwargs.get("processing_class"), int(state.global_step)
            )
        self._write_completions(int(state.global_step))
        self._finish("success")

    # ------------------------------------------------------------------ train() itself
    def _train_called(self, resume_from: str | None) -> None:
        self._resume_from = resume_from

    def _train_failed(self, error: BaseException) -> None:
        self._stop_monitor()
        if self._writes:
            self._finish("aborted" if isinstance(error, KeyboardInterrupt) else "failed")

    def _train_exited(self) -> None:
        self._training = False
        self._resume_from = None
        self._hooks.unwrap_step()

    def _stop_monitor(self) -> None:
        monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.stop_flop_count()  # never leave the counting mode pushed
            monitor.detach()

    # ------------------------------------------------------------------ micro-batches
    def _micro_batch(self, call: Callable[[], Any], inputs: Any) -> Any:
        if self._graph_pending:
            self._graph_pending = False
            self._write_graph(inputs)
        monitor = self.monitor
        if monitor is None:
            self._hooks.unwrap_step()  # only the graph needed the first batch
            return call()
        monitor.start_flop_count()
        try:
            loss = call()
        finally:
            monitor.stop_flop_count()
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            loss = loss.detach()
            self._step_loss = loss if self._step_loss is None else self._step_loss + loss
        self._batch = self._counts(inputs)
        return loss

    def _counts(self, inputs: Any) -> tuple[float | None, float | None]:
        """Samples and tokens of one micro-batch (shapes only, unless ``tokens_fn``)."""
        if not isinstance(inputs, Mapping):
            return None, None
        ids = inputs.get("input_ids")
        if not isinstance(ids, torch.Tensor):
            ids = next((v for v in inputs.values() if isinstance(v, torch.Tensor)), None)
        samples = float(ids.shape[0]) if ids is not None and ids.dim() > 0 else None
        tokens: float | None = None
        if self.tokens_fn is not None:
            value = self.tokens_fn(inputs)
            tokens = float(value.item() if isinstance(value, torch.Tensor) else value)
        elif isinstance(inputs.get("input_ids"), torch.Tensor):
            tokens = float(inputs["input_ids"].numel())
        return samples, tokens

    def _unscaled(self) -> None:
        """Gradients complete, unscaled, not clipped: measure, check, maybe veto the step."""
        state = getattr(self._hooks.trainer, "state", None)
        if self.monitor is None or not self._training or state is None:
            return
        self._measure(int(state.global_step) + 1)  # the step the Trainer logs this update at

    def _measure(self, step: int) -> None:
        monitor = self.monitor
        if monitor is None or self._measured == step:
            return
        self._measured = step
        loss, self._step_loss = self._step_loss, None
        monitor.after_backward(step, loss=loss)

    # ------------------------------------------------------------------ graph, projector
    def _write_graph(self, inputs: Any) -> None:
        trainer, run = self._hooks.trainer, self._tbx_run
        if trainer is None or run is None:
            return
        model = trainer.model
        example = dict(inputs) if isinstance(inputs, Mapping) else inputs
        run.log_graph(model, example, int(trainer.state.global_step))

    def _write_embeddings(self, model: Any, tokenizer: Any, step: int) -> None:
        run = self._tbx_run
        get = getattr(model, "get_input_embeddings", None)
        if run is None or not callable(get):
            return
        module = get()
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            self._warn_once(
                "embeddings",
                f"TBXCallback(log_embeddings=True) found no embedding table in "
                f"{type(model).__name__}.get_input_embeddings(): no projector entry written.",
            )
            return
        vocab = int(weight.shape[0])
        if vocab > self.embedding_points:
            generator = torch.Generator().manual_seed(self.options.seed)
            ids = torch.randperm(vocab, generator=generator)[: self.embedding_points].sort().values
        else:
            ids = torch.arange(vocab)
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                mat = module(ids.to(weight.device))
        finally:
            module.train(was_training)
        labels: list[Any] = ids.tolist()
        convert = getattr(tokenizer, "convert_ids_to_tokens", None)
        if callable(convert):
            labels = [str(t) for t in convert(labels)]
        run.log_embedding(EMBEDDING_TAG, mat, metadata=labels, step=step)

    def _write_completions(self, step: int) -> None:
        run, trainer = self._tbx_run, self._hooks.trainer
        if run is None or trainer is None or not self._completions:
            return
        columns: Mapping[str, Sequence[Any]] | None = None
        at = step
        if step > self._completions_step:
            columns = grpo_rows(trainer)
        if columns is None:
            found = callback_rows(trainer.callback_handler.callbacks, self._completions_step)
            if found is not None:
                at, columns = found
        if not columns:
            return
        table = markdown_table(columns, max_rows=self.max_completions, max_chars=500)
        if table is not None:
            run.log_text({COMPLETIONS_TAG: table}, step=at)
            self._completions_step = at

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=3)


def _sharded(model: Any) -> bool:
    """Whether ``model`` is split across processes (FSDP1/FSDP2, DTensor parameters)."""
    for module in model.modules():
        name = type(module).__name__
        if name == "FullyShardedDataParallel" or name.startswith("FSDP"):
            return True
    return any(type(p).__name__ == "DTensor" for p in model.parameters())
