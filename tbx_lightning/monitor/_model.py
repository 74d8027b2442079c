"""``ModelMonitor``: training-health statistics of a model, on device, and the alerts on them.

The core is framework free (torch and numpy only). :class:`ModelMonitor` is called
from a plain PyTorch or Accelerate loop; the Lightning callback
:class:`tbx_lightning.TrainingMonitor` and the Hugging Face Trainer callback route
their hooks to it, with the same options (:class:`~tbx_lightning.monitor.MonitorOptions`).

Everything is computed where the tensors live. A histogram call moves one small
tensor to the host (per-group bin counts, moments and norms), never a parameter.
Parameters are grouped by their place in the module tree (``group_depth``), so a
48-layer model gives one group per layer rather than one tag per tensor.

Tags: run-level values under ``vitals/`` (``vitals/grad_norm_total``, ``vitals/lr/...``,
``vitals/alerts``, ...), per-layer ones under ``vitals_layers/`` (:data:`._stats.LAYER_PREFIX`),
the alerts table as the Text entry ``alerts``; docs/monitor.md lists every one.

Every scalar of a step reaches the host in one packed transfer (:meth:`ModelMonitor.flush`),
where the alert detectors read it: checking costs no extra synchronisation. With
``skip_nonfinite_steps`` (on with ``on_alert="stop"``/``"raise"``) each optimizer step
also reads one flag, before the step runs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tbx_lightning.errors import ConfigTypeError, LoggedValueError, TrainingAlertError, UsageError
from tbx_lightning.monitor._alerts import Alert, AlertEngine, AlertRules
from tbx_lightning.monitor._binning import (
    _SUMSQ_ALL,
    _acc_dtype,
    _flat,
    _is_sharded_param,
)
from tbx_lightning.monitor._groups import (
    adapter_group,
    build_groups,
    group_name,
)
from tbx_lightning.monitor._guard import OVERFLOWS_IN_A_ROW, StepGuard
from tbx_lightning.monitor._lr import lr_values, unwrap_optimizer
from tbx_lightning.monitor._options import MonitorOptions, resolve_options
from tbx_lightning.monitor._pace import Pace
from tbx_lightning.monitor._ranks import agree_on_action, distributed
from tbx_lightning.monitor._ratio import Sampler, UpdateRatio
from tbx_lightning.monitor._readout import Reader, Readout
from tbx_lightning.monitor._sink import MonitorSink, SinkLinks, as_sink
from tbx_lightning.monitor._stats import Statistics

__all__ = [
    "Alert",
    "AlertRules",
    "ModelMonitor",
    "MonitorOptions",
    "MonitorSink",
    "adapter_group",
    "group_name",
]

_log = logging.getLogger(__name__)


class ModelMonitor:
    """Training-health statistics of a model, computed on device and written to a run.

    Call the hooks from the training loop; each does nothing on steps where nothing
    is due, so calling them every step is cheap:

    - :meth:`after_backward` once per optimizer step, after gradients are complete
      (after accumulation) and before clipping: weight and gradient histograms,
      norms, non-finite counts, the total gradient norm before clipping. It returns
      ``False`` when the step must not run: with ``skip_nonfinite_steps`` (on with
      ``on_alert="stop"`` or ``"raise"``) it checks the gradients and the loss for
      NaN/Inf on every optimizer step, and on finding any it fires the alert and
      clears the gradients, so that ``optimizer.step()`` leaves the weights as they
      are (torch's optimizers skip parameters without a gradient). Every rank gets the
      same answer; with ``"raise"`` every rank raises :class:`TrainingAlertError`.
    - :meth:`after_clip` after clipping: the total gradient norm after clipping.
    - :meth:`after_optimizer_step` after ``optimizer.step()``: update/weight ratio per
      group, learning rate and momentum per param group.
    - :meth:`log_throughput` once per step, at its end (samples and tokens per second,
      MFU, memory). A scalar step's values are written and checked there (at the
      optimizer hook in a loop that never calls it), with the step's loss.

    :meth:`attach` registers ``after_clip`` and ``after_optimizer_step`` as the
    optimizer's step post-hook, so a loop needs only ``after_backward`` and
    ``log_throughput``. :attr:`should_stop` is the same on every rank: a loop may
    ``break`` on it without leaving another rank waiting in a collective.

    Histograms are exact by default (every element binned, on its device, between the
    group's finite minimum and maximum); ``sample=k`` bins a fixed sample of about ``k``
    elements per group, with a Hoeffding bound on each bin's share (about 0.0095 for
    ``k=65536``, ``bins=64``, ``delta=0.001``; see docs/monitor.md). The update ratio
    compares ``ratio_sample`` fixed positions per group (relative standard error about
    ``1 / sqrt(ratio_sample)``, see :mod:`tbx_lightning.monitor._ratio`);
    ``ratio_sample=None`` compares every trainable weight.

    Sharded parameters (FSDP2/DTensor, FSDP with ``use_orig_params=True``, DeepSpeed
    ZeRO-3) are handled by letting each rank bin its own shard, then summing counts and
    moments with ``all_reduce``; full parameters are never gathered, and every rank must
    call the hooks. Gradients that a framework keeps outside ``param.grad`` (DeepSpeed
    ZeRO) cannot be seen; :attr:`unavailable` lists such statistics.

    Args:
        model: The model to watch. ``DistributedDataParallel`` and ``DataParallel``
            wrappers are unwrapped.
        sink: Where to write: a :class:`~tbx_lightning.RunWriter`, the Accelerate
            tracker (``accelerator.get_tracker("tbx")``), a ``TBXLogger``, or anything
            with ``log_scalars(metrics, step)`` and ``experiment``. ``None`` computes
            nothing unless sharded, where it computes its part and writes nothing (the
            ranks that do not write).
        options: A :class:`~tbx_lightning.monitor.MonitorOptions`, or ``None`` for the
            defaults.
        process_group: The group to reduce over when sharded (default: the world).
        **fields: Any field of :class:`~tbx_lightning.monitor.MonitorOptions` by name
            (``group_depth=3``), applied over ``options``.

    Example:
        >>> import tempfile, torch
        >>> from tbx_lightning import RunWriter
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> run = RunWriter(tempfile.mkdtemp())
        >>> monitor = ModelMonitor(model, run, hist_every_n_steps=1, norm_every_n_steps=1)
        >>> monitor.attach(opt)
        >>> for step in range(2):
        ...     loss = model(torch.randn(16, 4)).pow(2).mean()
        ...     loss.backward()
        ...     if not monitor.after_backward(step, loss=loss):
        ...         break
        ...     opt.step(); opt.zero_grad()
        ...     monitor.log_throughput(step, samples=16)
        >>> monitor.detach(); run.close()
    """

    def __init__(
        self,
        model: nn.Module,
        sink: Any = None,
        options: MonitorOptions | Mapping[str, Any] | None = None,
        *,
        process_group: Any = None,
        **fields: Any,
    ) -> None:
        opts = resolve_options(options, fields, owner="ModelMonitor")
        if not isinstance(model, nn.Module):
            raise ConfigTypeError(
                f"`model` must be a torch.nn.Module, got {type(model).__name__}: pass the "
                "model whose parameters should be watched."
            )
        self.options = opts
        self.sink: MonitorSink | None = as_sink(sink)
        while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        self.model = model
        self.process_group = process_group
        self.unavailable: dict[str, str] = {}
        named = list(model.named_parameters())
        total = sum(p.numel() for _, p in named)
        frozen = sum(p.numel() for _, p in named if not p.requires_grad)
        # Mostly frozen (adapters, a frozen backbone): statistics of what trains.
        self.trainable_only = (
            bool(total) and frozen * 2 > total
            if opts.trainable_only is None
            else bool(opts.trainable_only)
        )
        self._groups, self._params = build_groups(
            named,
            depth=opts.group_depth,
            group_fn=opts.group_fn,
            trainable_only=self.trainable_only,
        )
        self.sharded = self._detect_sharded() if opts.sharded is None else bool(opts.sharded)
        if self.sharded and not distributed(process_group):
            if opts.sharded:
                raise UsageError(
                    "`sharded=True` needs an initialised torch.distributed process group to "
                    "sum the shards' statistics: call torch.distributed.init_process_group "
                    "first, or pass sharded=False."
                )
            self.sharded = False
        if any(hasattr(p.param, "ds_tensor") for p in self._params):
            self._mark_unavailable(
                "grads",
                "DeepSpeed ZeRO keeps gradients in the optimizer's partitions, not in "
                "param.grad; gradient histograms and norms are logged only for parameters "
                "whose .grad is set.",
            )
        rank = torch.distributed.get_rank() if self.sharded else 0
        self._sampler = Sampler(opts.seed, rank)
        self._ratio = UpdateRatio(
            self._groups,
            self._sampler,
            opts.ratio_sample,
            sharded=self.sharded,
            process_group=process_group,
        )
        self._pace = Pace(
            self._params,
            flops_per_step=None if opts.flops_per_step is None else float(opts.flops_per_step),
            peak_flops=None if opts.peak_flops is None else float(opts.peak_flops),
            count_flops=opts.count_flops,
            reset_peak_memory=opts.reset_peak_memory,
            shares=self._shares_step_times,
            process_group=process_group,
        )
        self._stats = Statistics(
            self._groups,
            self._params,
            device=self._pace.device,
            sampler=self._sampler,
            bins=opts.bins,
            sample=opts.sample,
            trainable_only=self.trainable_only,
            sharded=self.sharded,
            process_group=process_group,
        )
        # Whether after_clip measures the norm again; the Lightning callback turns it off
        # when the trainer does not clip (the norm would equal the pre-clip one).
        self.measure_post_clip = True
        self._hooks: list[Any] = []
        self._step = 0
        self._last_backward_step: int | None = None
        self._step_allowed = True
        self._vetoed: int | None = None
        self._step_guard = StepGuard(self._params, process_group)
        self._agreed: int | None = None
        # A scalar step ends (flush, checks, agreement) at the optimizer hook, or, once the
        # loop calls log_throughput, there: the step's loss is then checked with it.
        self._ended: int | None = None
        self._ends_at_throughput = False
        self._staged: dict[str, Any] = {}
        self._staged_step: int | None = None
        self._losses: list[tuple[int, float | torch.Tensor]] = []
        self._frozen_written = False
        self._readout = Readout([g.name for g in self._groups], self._ratio)
        self._alerts: AlertEngine | None = None
        rules = opts.rules
        if rules is not None:
            self._alerts = AlertEngine(
                rules,
                opts.on_alert,
                self._write_text if self.sink is not None else None,
                self.sink.log_scalars if self.sink is not None else None,
                quiet=self.sink is None,
            )
        self._links = SinkLinks(self.sink, opts)
        if self._alerts is not None and self._links.webhook:
            self._alerts.listeners.append(self._links.notify)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_accelerator(cls, accelerator: Any, model: nn.Module, **fields: Any) -> ModelMonitor:
        """A monitor that writes to the accelerator's ``tbx`` tracker on the main process.

        Every process gets a monitor (sharded statistics and the agreement on a stop
        need all of them); only the main process writes.

        Example:
            >>> # accelerator = Accelerator(log_with="tbx", project_dir="runs")
            >>> # monitor = ModelMonitor.from_accelerator(accelerator, model, group_depth=2)
        """
        sink = None
        if accelerator.is_main_process:
            tracker = accelerator.get_tracker("tbx")
            if getattr(tracker, "monitor_sink", None) is None:
                raise ConfigTypeError(
                    "accelerator.get_tracker('tbx') is not a started TBXTracker "
                    f"(got {type(tracker).__name__}): create the Accelerator with log_with='tbx' "
                    "and call accelerator.init_trackers(...) first."
                )
            sink = tracker
        monitor = cls(model, sink, **fields)
        # fp16 mixed precision: the scaler's skipped steps are expected, not alerts.
        monitor.grad_scaler = getattr(accelerator, "scaler", None)
        return monitor

    # ------------------------------------------------------------------ properties
    @property
    def hist_every_n_steps(self) -> int:
        """Histogram period in optimizer steps (0: off)."""
        return self.options.hist_every_n_steps

    @property
    def norm_every_n_steps(self) -> int:
        """Period of the scalar statistics and alert checks (0: off)."""
        return self.options.norm_every_n_steps

    @property
    def flops_per_step(self) -> float | None:
        """FLOPs of one optimizer step, as given or counted (``None``: unknown)."""
        return self._pace.flops_per_step

    @flops_per_step.setter
    def flops_per_step(self, value: float | None) -> None:
        self._pace.flops_per_step = value

    @property
    def peak_flops(self) -> float | None:
        """The device's peak FLOP/s as given (``None``: looked up by device name)."""
        return self._pace.peak_flops

    @property
    def grad_scaler(self) -> Any:
        """A ``torch.amp.GradScaler`` whose skipped steps are expected (fp16), or ``None``.

        Its overflow steps are neither alerts nor stops (32 in a row are an alert); the
        Lightning and Trainer callbacks and :meth:`from_accelerator` set it, a loop sets
        it itself (``monitor.grad_scaler = scaler``).
        """
        return self._step_guard.grad_scaler

    @grad_scaler.setter
    def grad_scaler(self, scaler: Any) -> None:
        self._step_guard.grad_scaler = scaler

    @property
    def tokens_seen(self) -> float:
        """Tokens counted by :meth:`log_throughput` so far in this process."""
        return self._pace.tokens_seen

    @property
    def groups(self) -> list[str]:
        """Group names, in the order of ``model.named_parameters()``."""
        return [g.name for g in self._groups]

    def group_numel(self) -> dict[str, int]:
        """Elements per group on this rank (the local shard when sharded)."""
        return {g.name: sum(_flat(p.param).numel() for p in g.params) for g in self._groups}

    def is_hist_step(self, step: int) -> bool:
        """Whether ``step`` logs histograms."""
        n = self.options.hist_every_n_steps
        return n > 0 and step % n == 0

    def is_norm_step(self, step: int) -> bool:
        """Whether ``step`` logs scalar statistics."""
        n = self.options.norm_every_n_steps
        return n > 0 and step % n == 0

    @property
    def should_stop(self) -> bool:
        """True once an alert asked training to end (``on_alert="stop"``); the same on every
        rank, so ``if monitor.should_stop: break`` leaves no rank waiting in a collective."""
        return self._alerts is not None and self._alerts.action == "stop"

    @property
    def stop_alert(self) -> Alert | None:
        """The alert that ended (or is ending) training, where one did."""
        return None if self._alerts is None else self._alerts.trigger

    @property
    def alerts(self) -> list[Alert]:
        """The alerts fired so far, the first occurrence of each kind and place."""
        return [] if self._alerts is None else list(self._alerts.alerts)

    @property
    def alert_counts(self) -> dict[tuple[str, str], int]:
        """Occurrences per ``(kind, where)``, repeats included."""
        return {} if self._alerts is None else dict(self._alerts.counts)

    # ------------------------------------------------------------------ optimizer hooks
    def attach(self, optimizer: Any, name: str | None = None) -> None:
        """Calls :meth:`after_clip` and :meth:`after_optimizer_step` from ``optimizer``'s step hook.

        The step is the one of the last :meth:`after_backward` call. Wrappers with an
        ``optimizer`` attribute (Accelerate's, Lightning's) are unwrapped. ``name`` prefixes
        the learning-rate tags when several optimizers are attached.
        """
        inner = unwrap_optimizer(optimizer)
        if not isinstance(inner, torch.optim.Optimizer):
            raise ConfigTypeError(
                f"`optimizer` must be a torch.optim.Optimizer (or wrap one), got "
                f"{type(optimizer).__name__}."
            )

        def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            # Gradients are still the clipped ones after step(); measuring them here and
            # not in a pre-hook also works where step() runs the backward in a closure
            # (Lightning), so the pre-hook would fire before the gradients exist.
            self.after_clip(self._step)
            self.after_optimizer_step(self._step, opt, name=name)

        self._hooks.append(inner.register_step_post_hook(post))

    def detach(self) -> None:
        """Writes what is pending and removes the hooks installed by :meth:`attach`."""
        self.flush()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._pace.remove_hooks()
        self._links.close()

    close = detach

    # ------------------------------------------------------------------ loop hooks
    def observe_loss(self, step: int, loss: float | torch.Tensor) -> None:
        """Keeps the step's loss for the non-finite and spike detectors.

        A tensor stays on its device; the losses of an interval reach the host together
        with the interval's statistics, so this never synchronises. Under
        ``torch.distributed`` every rank may call it: a non-finite loss on a rank that
        does not write is counted there and reported with the next step-time share
        (``stragglers``, on by default).
        """
        if self._alerts is None or self.options.norm_every_n_steps == 0:
            return
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise LoggedValueError(
                    f"`loss` must be a one-element tensor, got shape {tuple(loss.shape)}: pass "
                    "the reduced training loss."
                )
            value: float | torch.Tensor = loss.detach().reshape(())
            if not self._active:
                self._pace.count_loss(torch.isfinite(value))  # type: ignore[arg-type]
                return
        else:
            value = float(loss)
            if not self._active:
                self._pace.count_loss(torch.tensor(math.isfinite(value)))
                return
        self._losses.append((step, value))
        if len(self._losses) >= 4 * max(self.options.norm_every_n_steps, 64):
            self.flush()  # a loop that never reaches a scalar step: bound the buffer

    def start_flop_count(self) -> None:
        """Starts counting the FLOPs of this step (only while no count is known)."""
        self._pace.start_flop_count()

    def stop_flop_count(self) -> None:
        """Ends the count started by :meth:`start_flop_count`; sets :attr:`flops_per_step`."""
        self._pace.stop_flop_count()

    def after_backward(self, step: int, *, loss: float | torch.Tensor | None = None) -> bool:
        """Statistics of the step's gradients and weights; returns whether the step may run.

        Call once per optimizer step, when gradients are complete and not yet clipped;
        a second call with the same step does nothing (and returns the same answer).
        ``loss`` (optional) is observed as :meth:`observe_loss` does and, with
        ``skip_nonfinite_steps``, checked with the gradients before the step.

        Returns:
            ``False`` when ``skip_nonfinite_steps`` found NaN/Inf on any rank: the alert
            fired, the gradients were cleared (``optimizer.step()`` then leaves the weights
            as they are) and, with ``on_alert="stop"``, :attr:`should_stop` is set.

        Raises:
            TrainingAlertError: on every rank, with ``on_alert="raise"``, when the check
                found NaN/Inf (before the step runs).
        """
        self._pace.backward_done()
        if self._last_backward_step == step:
            return self._step_allowed
        self._last_backward_step = step
        self._step = step
        if loss is not None:
            self.observe_loss(step, loss)
        hist = self.is_hist_step(step)
        norm = self.is_norm_step(step)
        if (hist or norm) and self._active:
            self._measure(step, hist, norm)
        self._step_allowed = True
        if self.options.skip_nonfinite_steps_on:
            self._step_allowed = self._guard(step, loss)
        if not self._hooks and norm and not self._ends_at_throughput:
            self._end_scalar_step(step)  # no optimizer hook will end this step
        return self._step_allowed

    def after_clip(self, step: int) -> None:
        """The total gradient norm after clipping (``vitals/grad_norm_total/post_clip``).

        Written only where clipping changed the norm: an unclipped run has one curve.
        """
        if not (
            self.measure_post_clip
            and self.is_norm_step(step)
            and self.options.log_grads
            and self._active
            and self._vetoed != step
        ):
            return
        moments = self._stats.norms(self._stats.tensors("grads"))
        if self.sink is not None:
            self._stage(step)["post_clip"] = moments[:, _SUMSQ_ALL].sum().sqrt()

    def after_optimizer_step(
        self, step: int, optimizer: Any = None, *, name: str | None = None
    ) -> None:
        """Update/weight ratios of the step, learning rates, then the step's alert checks."""
        if not self.is_norm_step(step):
            self._ratio.drop()
            return
        if self._active:
            if self._vetoed == step:
                self._ratio.drop()  # the weights did not move: no ratio to report
            else:
                self._stage_ratios(step)
            if optimizer is not None:
                values, adaptive = lr_values(optimizer, name)
                staged = self._stage(step)
                staged.setdefault("lr", {}).update(values)
                staged["adaptive"] = staged.get("adaptive", frozenset()) | adaptive
        if not self._ends_at_throughput:
            self._end_scalar_step(step)

    def log_throughput(
        self, step: int, samples: float | None = None, tokens: float | None = None
    ) -> None:
        """Counts ``samples``/``tokens`` of this step; writes rates on scalar steps.

        Rates are averages over the wall time between two written values (the first
        call only starts the clock). ``vitals/step_time_ms`` is written when neither
        count is given; ``vitals/mfu`` when the FLOPs of a step and the device's peak
        are known; ``vitals/peak_memory_mb`` where the device reports it. Counts seen
        so far feed ``by_tokens``/``by_samples``. Under ``torch.distributed`` every rank
        must call this: each rank's step time is shared for the straggler detector.
        """
        scalars: dict[str, float | int | torch.Tensor] = dict(
            self._pace.throughput(step, samples, tokens, self.is_norm_step(step))
        )
        if self.sink is not None:
            self._links.count(
                step,
                self._pace.tokens_seen if tokens is not None else None,
                self._pace.samples_seen if samples is not None else None,
            )
        if self.is_norm_step(step) and self.sink is not None:
            peak = self._pace.memory()
            if peak is not None:
                scalars["vitals/peak_memory_mb"] = peak
        if scalars and self.sink is not None:
            self.sink.log_scalars(scalars, step)
        # Under gradient accumulation log_throughput runs per micro-batch: the one after
        # the step's gradients were complete (after_backward; the optimizer step then ran,
        # or a gradient scaler skipped it) ends the scalar step.
        if self._last_backward_step == step:
            if self.is_norm_step(step):
                self._end_scalar_step(step)
            self._ends_at_throughput = True

    def log_memory(self, step: int) -> None:
        """Kept for loops written against earlier releases: :meth:`log_throughput` writes
        the peak memory now; this does nothing."""

    # ------------------------------------------------------------------ the guard
    def _guard(self, step: int, loss: float | torch.Tensor | None) -> bool:
        """NaN/Inf in the gradients (or the loss) on any rank: fire, skip the update, act."""
        per_rank = self._step_guard.check(loss, self._pace.device())
        if not any(g or los for g, los in per_rank):
            return True
        if self._step_guard.is_overflow(per_rank):
            if self._staged_step == step:
                self._staged["overflow"] = True  # the step's statistics, flushed later
            if self._alerts is not None:
                self._alerts.check_overflows(step, self._step_guard.overflows, OVERFLOWS_IN_A_ROW)
            return True  # the scaler skips this step itself
        self._vetoed = step
        grads_bad = any(g for g, _ in per_rank)
        checks = self._alerts
        if checks is not None:
            if grads_bad:
                # Per layer on this rank; a NaN in another rank's gradient shard: the model.
                counts = self._stats.nonfinite_grads() or {"model": 1.0}
                checks.check_nonfinite(step, "grads", counts)
            if any(los for _, los in per_rank):
                if len(per_rank) > 1:
                    checks.check_rank_losses(step, [1.0 if los else 0.0 for _, los in per_rank])
                else:
                    # Checked here rather than at the next scalar step: the step ends now.
                    if self._losses and self._losses[-1][0] == step:
                        self._losses.pop()
                    assert loss is not None
                    value = float(loss.item()) if isinstance(loss, torch.Tensor) else float(loss)
                    checks.check_losses([(step, value)])
        self._step_guard.skip_update(grads_bad)
        if self.sink is not None:  # the rank that writes says it, once
            _log.warning(
                "step %d skipped: non-finite %s; the weights were left as they are",
                step,
                "gradients" if grads_bad else "loss",
            )
        self._act(step)
        return False

    # ------------------------------------------------------------------ agreement
    def _end_scalar_step(self, step: int) -> None:
        """Writes the step's statistics and checks, then agrees on an alert's action."""
        if self._ended == step:
            return
        self._ended = step
        if self._active:
            self.flush()
        self._act(step)

    def _act(self, step: int) -> None:
        """Performs the action an alert asked for, the same on every rank.

        Under ``torch.distributed``, when an alert can end training, the ranks agree
        first (one small ``all_reduce`` per scalar step and per vetoed step): only the
        rank that writes runs most detectors, and a rank that stopped alone would leave
        the others waiting in their next collective.
        """
        checks = self._alerts
        if checks is None:
            return
        if self.options.can_stop and distributed(self.process_group) and self._agreed != step:
            self._agreed = step
            agree_on_action(checks, step, self._pace.device(), self.process_group)
        if checks.pending and self.sink is not None:
            checks.publish(step)
        trigger = checks.trigger
        if checks.action is None or trigger is None:
            return
        record = getattr(self.sink, "alert_stopped", None)
        if callable(record):
            record(trigger, checks.action)
        if checks.action == "raise":
            checks.action = "stop"  # raised once; a handler that goes on sees a stop
            raise TrainingAlertError(trigger)

    def _shares_step_times(self) -> bool:
        return (
            self._alerts is not None and self.options.stragglers and distributed(self.process_group)
        )

    # ------------------------------------------------------------------ measuring
    def _measure(self, step: int, hist: bool, norm: bool) -> None:
        """Histograms and norms of one step, staged for the step's one transfer."""
        opts = self.options
        # The update ratio's copy of the weights measures their norms in the same pass.
        copied = self._ratio.take(step) if norm and opts.log_update_ratio else {}
        staged = self._stats.measure(
            step,
            hist=hist,
            norm=norm,
            kinds=[k for k, on in (("weights", opts.log_weights), ("grads", opts.log_grads)) if on],
            copied=copied,
            experiment=self.sink.experiment if self.sink is not None else None,
        )
        if staged:
            self._stage(step).update(staged)

    def _stage_ratios(self, step: int) -> None:
        sampled = self._ratio.sampled_groups()
        ratios = self._ratio.ratios(self._pace.device())
        if ratios is not None:
            self._stage(step)["ratios"] = (ratios, list(self._stats.trainable), sampled)

    # ------------------------------------------------------------------ one transfer
    def _stage(self, step: int) -> dict[str, Any]:
        if self._staged_step is not None and self._staged_step != step:
            self.flush()
        self._staged_step = step
        return self._staged

    def flush(self) -> None:
        """Moves what the hooks staged to the host in one transfer, checks it, writes it.

        The hooks call this at the end of each scalar step; call it yourself only from a
        loop that stops between :meth:`after_backward` and the optimizer step.
        """
        staged, step = self._staged, self._staged_step
        self._staged, self._staged_step = {}, None
        losses, self._losses = self._losses, []
        share = self._pace.take_share()
        if step is None:
            step = losses[-1][0] if losses else (share[0] if share else None)
        if self.sink is None:  # a rank that writes nothing: only finish the collective
            if share is not None:
                share[1].wait()
            return
        if step is None:
            if self._alerts is not None and self._alerts.pending:
                self._alerts.publish(self._step)
            return
        parts: list[torch.Tensor] = []
        for key in ("weights", "grads"):
            if key in staged and isinstance(staged[key][0], torch.Tensor):
                parts.append(staged[key][0].reshape(-1))
        if "post_clip" in staged:
            parts.append(staged["post_clip"].reshape(-1))
        if "ratios" in staged:
            parts.append(staged["ratios"][0].reshape(-1))
        loss_tensors = [v for _, v in losses if isinstance(v, torch.Tensor)]
        parts.extend(t.reshape(-1) for t in loss_tensors)
        if share is not None:
            share[1].wait()
            parts.append(share[2].reshape(-1))
        host: list[float] = []
        if parts:
            device = parts[0].device
            acc = _acc_dtype(device)
            host = torch.cat([p.to(device=device, dtype=acc) for p in parts]).cpu().tolist()
        reader = Reader(host)
        scalars = self._readout.read(
            step,
            staged,
            reader,
            self._alerts,
            self.sink,
            # Without the per-step check, NaN/Inf gradients under a gradient scaler are its
            # overflows (it skips those steps); a NaN loss is still found from the loss.
            overflow=bool(staged.get("overflow"))
            or (self._step_guard.scaler_on and not self.options.skip_nonfinite_steps_on),
        )
        checks = self._alerts
        if losses and checks is not None:
            values = reader.take(len(loss_tensors))
            it = iter(values)
            checks.check_losses(
                [(s, next(it) if isinstance(v, torch.Tensor) else float(v)) for s, v in losses]
            )
        if share is not None:
            shared = reader.take(share[2].numel())
            if checks is not None:
                checks.check_step_times(share[0], shared[0::2])
                checks.check_rank_losses(share[0], shared[1::2])
        if not self._frozen_written and scalars:
            self._frozen_written = True
            frozen = self._stats.frozen_count()
            if frozen:
                scalars["vitals/frozen_params"] = float(frozen)
        if scalars:
            self.sink.log_scalars(scalars, step)
        if checks is not None and checks.pending:
            checks.publish(step)

    # ------------------------------------------------------------------ collection
    @property
    def _active(self) -> bool:
        return self.sink is not None or self.sharded

    def _detect_sharded(self) -> bool:
        if not distributed(self.process_group):
            return False
        if any(_is_sharded_param(p.param) for p in self._params):
            return True
        return any(
            type(m).__name__ in ("FullyShardedDataParallel", "FSDPModule")
            or type(m).__name__.startswith("FSDP")
            for m in self.model.modules()
        )

    def _mark_unavailable(self, what: str, why: str) -> None:
        if what not in self.unavailable:
            self.unavailable[what] = why
            _log.warning("ModelMonitor cannot produce %s statistics: %s", what, why)

    # ------------------------------------------------------------------ writing
    def _write_text(self, tag: str, text: str, step: int) -> None:
        assert self.sink is not None
        self.sink.experiment.add_text(tag, text, global_step=step)
