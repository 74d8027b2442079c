"""Training-health monitors: on-device histograms, norms, update ratios, learning rates.

The core is framework free (torch and numpy only). :class:`ModelMonitor` is called
from a plain PyTorch or Accelerate loop; the Lightning callback
:class:`tbx_lightning.TrainingMonitor` routes Lightning's hooks to it.

Everything is computed where the tensors live. A histogram call moves one small
tensor to the host (per-group bin counts, moments and norms), never a parameter.
Parameters are grouped by their place in the module tree (``group_depth``), so a
48-layer model gives one group per layer rather than one tag per tensor.

Tags (``<group>`` is a module path such as ``encoder.layers.3``; frozen groups get none):

- ``vitals/weights/<group>``, ``vitals/grads/<group>``: histograms.
- ``vitals/weight_norm/<group>``, ``vitals/grad_norm/<group>``: L2 norms.
- ``vitals/update_ratio/<group>``: ``||w_after - w_before|| / ||w_before||`` of one step.
- ``vitals/nonfinite/weights``, ``vitals/nonfinite/grads``: NaN/Inf counts, whole model.
- ``vitals/frozen_params``: frozen elements, once, when there are any.
- ``vitals/grad_norm_total``; ``vitals/grad_norm_total/post_clip`` once clipping changed it.
- ``vitals/lr/group_<i>``, ``vitals/momentum/group_<i>`` (``vitals/lr/<name>/group_<i>``
  for a named optimizer), once the value changed.
- ``vitals/samples_per_sec``, ``vitals/tokens_per_sec``, ``vitals/step_time_ms``,
  ``vitals/mfu``, ``vitals/peak_memory_mb``.
- ``alerts`` (text) and ``alerts/count``: see :class:`AlertRules`.

Every scalar of a step reaches the host in one packed transfer (:meth:`ModelMonitor.flush`),
where the alert detectors read it: checking costs no extra synchronisation.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from tbx_lightning.errors import ConfigError, ConfigTypeError, LoggedValueError, UsageError
from tbx_lightning.monitor import _efficiency
from tbx_lightning.monitor._alerts import (
    Alert,
    AlertEngine,
    AlertRules,
    OnAlert,
    TrainingAlertError,
)
from tbx_lightning.monitor._binning import (
    _FUSED_CHUNK,
    _MAX,
    _MIN,
    _N,
    _NONFINITE,
    _ROW,
    _SUM,
    _SUMSQ,
    _SUMSQ_ALL,
    _acc_dtype,
    _Binner,
    _flat,
    _is_sharded_param,
    _local,
    _write_histogram,
    copy_sumsq_cpu,
    diff_sumsq_cpu,
    sumsq_cpu,
)
from tbx_lightning.monitor._sink import MonitorSink

__all__ = [
    "Alert",
    "AlertRules",
    "ModelMonitor",
    "MonitorSink",
    "TrainingAlertError",
    "adapter_group",
    "group_name",
]

_log = logging.getLogger(__name__)

# Module-tree components that wrappers insert and users never wrote.
_WRAPPER_PARTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def group_name(param_name: str, depth: int) -> str:
    """The monitor group of a parameter: the first ``depth`` parts of its module path.

    A numeric part that follows the cut (an index into a ``ModuleList`` or
    ``Sequential``) is kept, so ``depth=2`` turns ``encoder.layers.3.linear1.weight``
    into ``encoder.layers.3``: one group per layer. Wrapper parts (FSDP,
    activation checkpointing, ``torch.compile``) are dropped. Parameters that sit
    directly on the root module form the group ``root``; ``depth=0`` puts every
    parameter into the group ``all``.

    Example:
        >>> group_name("encoder.layers.3.self_attn.out_proj.weight", 2)
        'encoder.layers.3'
        >>> group_name("head.weight", 2)
        'head'
    """
    if depth == 0:
        return "all"
    parts = [p for p in param_name.split(".") if p not in _WRAPPER_PARTS][:-1]
    if not parts:
        return "root"
    cut = min(depth, len(parts))
    while cut < len(parts) and parts[cut].isdigit():
        cut += 1
    keep = parts[:cut]
    return ".".join(keep)


_ADAPTER_PREFIXES = ("lora_", "hada_", "lokr_", "ia3_")


def adapter_group(param_name: str) -> str:
    """The monitor group of a parameter in an adapter model: the module the adapter wraps.

    PEFT's wrapper parts (``base_model.model``, ``lora_A``/``lora_B`` and the adapter's
    name, ``base_layer``) are dropped, so the two LoRA factors of one projection and
    its frozen base weight share a group.

    Example:
        >>> adapter_group("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
        'model.layers.0.self_attn.q_proj'
    """
    parts = [p for p in param_name.split(".") if p not in _WRAPPER_PARTS][:-1]
    if parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    for i, part in enumerate(parts):
        if part.startswith(_ADAPTER_PREFIXES) or part == "base_layer":
            parts = parts[:i]
            break
    return ".".join(parts) or "root"


# Consecutive positions per draw of the update ratio's sample: 16 float32 values are one
# 64-byte cache line, so the gather reads 16x fewer lines than single positions would.
_RATIO_RUN = 16


@dataclass
class _Param:
    name: str
    param: nn.Parameter
    group: int


@dataclass
class _Group:
    name: str
    params: list[_Param] = field(default_factory=list)


@dataclass
class _Snapshot:
    """Weights (or a sample of them) before an optimizer step, for the update ratio."""

    step: int
    # per parameter: (group, values before the step, sample indices or None, weight,
    # the squared norm of the values before the step where measured while copying)
    items: list[tuple[int, nn.Parameter, torch.Tensor, torch.Tensor | None, float, float | None]]


class ModelMonitor:
    """Training-health statistics of a model, computed on device and written to a run.

    Call the hooks from the training loop; each does nothing on steps where nothing
    is due, so calling them every step is cheap:

    - :meth:`after_backward` once per optimizer step, after gradients are complete
      (after accumulation) and before clipping: weight and gradient histograms,
      norms, non-finite counts, frozen fractions, the total gradient norm before clipping.
    - :meth:`after_clip` after clipping (before or right after ``optimizer.step()``,
      which leaves gradients as they are): the total gradient norm after clipping.
    - :meth:`after_optimizer_step` after ``optimizer.step()``: update/weight ratio per
      group, learning rate and momentum per param group.
    - :meth:`log_throughput` and :meth:`log_memory` once per step.

    :meth:`attach` registers ``after_clip`` and ``after_optimizer_step`` as the
    optimizer's step post-hook, so a loop needs only ``after_backward`` and ``log_throughput``.

    Histograms are exact by default: every element of every tensor is binned, on the
    tensor's device, into ``bins`` equal bins between the group's minimum and maximum
    finite value (all ranks together when sharded). With ``sample=k``, histograms bin a
    random sample of about ``k`` elements per group, drawn with replacement and spread
    over the group's tensors in proportion to their size; counts are rescaled to the
    group's exact element count. With probability at least ``1 - delta``, every bin's
    share of the group is then within ``sqrt(ln(2 * bins / delta) / (2 * k))`` of the
    exact share (Hoeffding, union bound over bins): about 0.0095 for ``k=65536``,
    ``bins=64``, ``delta=0.001``. Norms and non-finite counts stay exact in sampled
    mode; the histogram's minimum, maximum, sum and sum of squares are the sample's.

    The update ratio compares the weights before and after the step at ``ratio_sample``
    fixed positions per group (65,536 by default, drawn once, uniformly with
    replacement; a group that small or smaller is compared whole), so a scalar step
    copies a few hundred KiB rather than the model. Both norms of the ratio come from the
    same positions; for weights and updates of similar spread the ratio's relative
    standard error is about ``1 / sqrt(ratio_sample)`` (0.4% at the default; values
    correlated within a run of 16 widen it, to at most 1.6%).
    ``ratio_sample=None`` copies every trainable weight for an exact ratio (memory: one
    copy of the trainable parameters, held from ``after_backward`` to
    ``after_optimizer_step`` on scalar steps only). A sample can miss a sparse update
    (an embedding of which a few rows train per step), so a sampled ratio of 0 does not
    count towards ``not_training``: that group is compared whole for the next
    ``patience`` checks, and from then on if it moved (it trains sparsely). A step where
    no group moved (a zero learning rate, a skipped step) starts no whole comparison.
    Sharded parameters are compared whole, each rank its own shard.

    Sharded parameters (FSDP2/DTensor, FSDP with ``use_orig_params=True``, DeepSpeed
    ZeRO-3) are handled by letting each rank bin its own shard, then summing counts and
    moments with ``all_reduce``; bounds are agreed with a min/max ``all_reduce`` first.
    Full parameters are never gathered. In that mode every rank must call the hooks.
    Gradients that a framework keeps outside ``param.grad`` (DeepSpeed ZeRO) cannot be
    seen; :attr:`unavailable` lists such statistics and a warning is logged once.

    Args:
        model: The model to watch. ``DistributedDataParallel`` and ``DataParallel``
            wrappers are unwrapped.
        sink: Where to write (a ``RunWriter``; in Accelerate,
            ``accelerator.get_tracker("tbx", unwrap=True)``). ``None`` computes nothing
            unless sharded, where it computes its part and writes nothing (non-zero ranks).
        group_depth: Module-tree depth of the groups (see :func:`group_name`).
        group_fn: Maps a parameter name to its group; overrides ``group_depth``.
        hist_every_n_steps: Histogram period in optimizer steps; 0 turns histograms off.
        norm_every_n_steps: Period of every scalar statistic (norms, ratios, learning
            rates, throughput, memory); 0 turns them off.
        bins: Histogram bins, 2 to 1024.
        sample: ``None`` for exact histograms, or the number of elements to sample per
            group (at least 1024).
        ratio_sample: Positions per group the update ratio compares (at least 1024), or
            ``None`` for an exact ratio over every trainable weight.
        log_weights: Log weight histograms and norms.
        log_grads: Log gradient histograms and norms.
        log_update_ratio: Log the update/weight ratio.
        sharded: Whether parameters are sharded across ranks; ``None`` detects DTensor,
            DeepSpeed ZeRO-3 and FSDP modules when ``torch.distributed`` is initialised.
        process_group: The group to reduce over when sharded (default: the world).
        reset_peak_memory: Reset the device's peak-memory counter after each
            ``peak_memory_mb`` value, so each value is the peak of its window.
        seed: Seed of the sampling generator.

    Example:
        >>> import tempfile, torch
        >>> from tbx_lightning import RunWriter
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> run = RunWriter(tempfile.mkdtemp())
        >>> monitor = ModelMonitor(model, run, hist_every_n_steps=1, norm_every_n_steps=1)
        >>> monitor.attach(opt)
        >>> for step in range(2):
        ...     model(torch.randn(16, 4)).pow(2).mean().backward()
        ...     monitor.after_backward(step)
        ...     opt.step(); opt.zero_grad()
        ...     monitor.log_throughput(step, samples=16)
        >>> run.close()
    """

    def __init__(
        self,
        model: nn.Module,
        sink: MonitorSink | None = None,
        *,
        group_depth: int = 2,
        group_fn: Callable[[str], str] | None = None,
        hist_every_n_steps: int = 100,
        norm_every_n_steps: int = 10,
        bins: int = 64,
        sample: int | None = None,
        ratio_sample: int | None = 65536,
        log_weights: bool = True,
        log_grads: bool = True,
        log_update_ratio: bool = True,
        sharded: bool | None = None,
        process_group: Any = None,
        reset_peak_memory: bool = True,
        seed: int = 0,
        trainable_only: bool | None = None,
        alerts: bool | AlertRules = True,
        on_alert: OnAlert = "warn",
        flops_per_step: float | None = None,
        peak_flops: float | None = None,
        count_flops: bool = True,
        stragglers: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigTypeError(
                f"`model` must be a torch.nn.Module, got {type(model).__name__}: pass the "
                "model whose parameters should be watched."
            )
        for key, value in (
            ("group_depth", group_depth),
            ("hist_every_n_steps", hist_every_n_steps),
            ("norm_every_n_steps", norm_every_n_steps),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"Expected `{key}` to be an int >= 0, got {value!r}.")
        if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= 1024:
            raise ConfigError(f"Expected `bins` to be an int in [2, 1024], got {bins!r}.")
        for key, size, exact in (
            ("sample", sample, "exact histograms"),
            ("ratio_sample", ratio_sample, "an exact update ratio"),
        ):
            if size is not None and (
                isinstance(size, bool) or not isinstance(size, int) or size < 1024
            ):
                raise ConfigError(
                    f"Expected `{key}` to be None ({exact}) or an int >= 1024, got {size!r}."
                )
        if sink is not None and not (
            callable(getattr(sink, "log_scalars", None))
            and (hasattr(type(sink), "experiment") or hasattr(sink, "experiment"))
        ):
            raise ConfigTypeError(
                f"`sink` must have `log_scalars(metrics, step)` and `experiment` (a RunWriter), "
                f"got {type(sink).__name__}."
            )
        if not isinstance(alerts, bool | AlertRules):
            raise ConfigTypeError(
                f"`alerts` must be True, False or an AlertRules, got {type(alerts).__name__}."
            )
        for key, number in (("flops_per_step", flops_per_step), ("peak_flops", peak_flops)):
            if number is not None and (
                isinstance(number, bool) or not isinstance(number, int | float) or number <= 0
            ):
                raise ConfigError(f"Expected `{key}` to be a number > 0 or None, got {number!r}.")
        while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        self.model = model
        self.sink = sink
        self.group_depth = group_depth
        self.hist_every_n_steps = hist_every_n_steps
        self.norm_every_n_steps = norm_every_n_steps
        self.bins = bins
        self.sample = sample
        self.ratio_sample = ratio_sample
        self.log_weights = log_weights
        self.log_grads = log_grads
        self.log_update_ratio = log_update_ratio
        self.process_group = process_group
        self.reset_peak_memory = reset_peak_memory
        self.unavailable: dict[str, str] = {}
        self._seed = seed
        self._generators: dict[int, torch.Generator] = {}
        self._binner = _Binner(bins)
        # (group, sample size, run length, tensor sizes, device) -> positions per tensor
        self._sample_index: dict[
            tuple[int, int, int, tuple[int, ...], torch.device], list[torch.Tensor]
        ] = {}
        # Confirming a sampled update ratio of 0: group -> scalar checks left to compare
        # it whole; and the groups found to train sparsely, compared whole from then on.
        self._ratio_whole: dict[int, int] = {}
        self._ratio_sparse: set[int] = set()
        self._groups: list[_Group] = []
        self._params: list[_Param] = []
        named = list(model.named_parameters())
        total = sum(p.numel() for _, p in named)
        frozen = sum(p.numel() for _, p in named if not p.requires_grad)
        # Mostly frozen (adapters, a frozen backbone): statistics of what trains.
        self.trainable_only = (
            bool(total) and frozen * 2 > total if trainable_only is None else bool(trainable_only)
        )
        adapters = any(".lora_" in n or n.startswith("lora_") for n, _ in named)
        namer: Callable[[str], str]
        if group_fn is not None:
            namer = group_fn
        elif adapters:
            namer = adapter_group
        else:
            namer = lambda n: group_name(n, group_depth)  # noqa: E731
        index: dict[str, int] = {}
        for name, param in named:
            if self.trainable_only and not param.requires_grad:
                gname = namer(name) if adapters or group_fn is not None else "frozen"
            else:
                gname = namer(name)
            if not isinstance(gname, str) or not gname:
                raise ConfigError(
                    f"`group_fn` returned {gname!r} for parameter {name!r}: return a non-empty str."
                )
            if gname not in index:
                index[gname] = len(self._groups)
                self._groups.append(_Group(gname))
            entry = _Param(name, param, index[gname])
            self._groups[index[gname]].params.append(entry)
            self._params.append(entry)
        # Host-side, identical on every rank: whether a group has any trainable parameter.
        self._trainable = [any(p.param.requires_grad for p in g.params) for g in self._groups]
        self.sharded = self._detect_sharded() if sharded is None else bool(sharded)
        if self.sharded and not (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        ):
            raise UsageError(
                "`sharded=True` needs an initialised torch.distributed process group to sum "
                "the shards' statistics: call torch.distributed.init_process_group first, or "
                "pass sharded=False."
            )
        if any(hasattr(p.param, "ds_tensor") for p in self._params):
            self._mark_unavailable(
                "grads",
                "DeepSpeed ZeRO keeps gradients in the optimizer's partitions, not in "
                "param.grad; gradient histograms and norms are logged only for parameters "
                "whose .grad is set.",
            )
        self._snapshot: _Snapshot | None = None
        self._snap_buffers: dict[int, torch.Tensor] = {}
        self._diff_scratch: dict[torch.dtype, torch.Tensor] = {}
        # Whether after_clip measures the norm again; TrainingMonitor turns it off when
        # the trainer does not clip (the norm would equal the pre-clip one).
        self.measure_post_clip = True
        self._hooks: list[Any] = []
        self._step = 0
        self._last_backward_step: int | None = None
        self._tp_start: float | None = None
        self._tp_samples = 0.0
        self._tp_tokens = 0.0
        self._tp_last_step: int | None = None
        self._tp_steps = 0
        # Straggler timing under torch.distributed: when this rank's last gradient of the
        # step was accumulated, and how long it then waited for the other ranks.
        self._grad_hooks: list[Any] = []
        self._grad_mark: float | None = None
        self._tp_wait = 0.0
        self.flops_per_step = None if flops_per_step is None else float(flops_per_step)
        self.peak_flops = None if peak_flops is None else float(peak_flops)
        self.count_flops = count_flops
        self._flops = _efficiency.FlopCounter()
        self._flops_tried = False
        self._mfu_note = False
        self._stragglers = stragglers
        self._staged: dict[str, Any] = {}
        self._staged_step: int | None = None
        self._losses: list[tuple[int, float | torch.Tensor]] = []
        self._straggler: tuple[int, Any, torch.Tensor] | None = None
        self._clipped = False
        self._frozen_written = False
        self._first_values: dict[str, tuple[int, float]] = {}
        self._changed: set[str] = set()
        self._alerts: AlertEngine | None = None
        if alerts is not False:
            rules = alerts if isinstance(alerts, AlertRules) else AlertRules()
            self._alerts = AlertEngine(
                rules,
                on_alert,
                self._write_text if sink is not None else None,
                sink.log_scalars if sink is not None else None,
            )
        elif not (callable(on_alert) or on_alert in ("warn", "stop", "raise")):
            raise ConfigError(
                f"Expected `on_alert` to be 'warn', 'stop', 'raise' or a callable, got {on_alert!r}."
            )

    # ------------------------------------------------------------------ public hooks
    @classmethod
    def from_accelerator(cls, accelerator: Any, model: nn.Module, **options: Any) -> ModelMonitor:
        """A monitor that writes to the accelerator's ``tbx`` tracker on the main process.

        Example:
            >>> # accelerator = Accelerator(log_with="tbx", project_dir="runs")
            >>> # monitor = ModelMonitor.from_accelerator(accelerator, model, group_depth=2)
        """
        sink = None
        if accelerator.is_main_process:
            tracker = accelerator.get_tracker("tbx")
            sink = getattr(tracker, "run_writer", None)
            if not isinstance(sink, MonitorSink):
                raise ConfigTypeError(
                    "accelerator.get_tracker('tbx') is not a started TBXTracker "
                    f"(got {type(tracker).__name__}): create the Accelerator with log_with='tbx' "
                    "and call accelerator.init_trackers(...) first."
                )
        return cls(model, sink, **options)

    @property
    def groups(self) -> list[str]:
        """Group names, in the order of ``model.named_parameters()``."""
        return [g.name for g in self._groups]

    def group_numel(self) -> dict[str, int]:
        """Elements per group on this rank (the local shard when sharded)."""
        return {g.name: sum(_flat(p.param).numel() for p in g.params) for g in self._groups}

    def is_hist_step(self, step: int) -> bool:
        """Whether ``step`` logs histograms."""
        return self.hist_every_n_steps > 0 and step % self.hist_every_n_steps == 0

    def is_norm_step(self, step: int) -> bool:
        """Whether ``step`` logs scalar statistics."""
        return self.norm_every_n_steps > 0 and step % self.norm_every_n_steps == 0

    def attach(self, optimizer: Any, name: str | None = None) -> None:
        """Calls :meth:`after_clip` and :meth:`after_optimizer_step` from ``optimizer``'s step hook.

        The step is the one of the last :meth:`after_backward` call. Wrappers with an
        ``optimizer`` attribute (Accelerate's, Lightning's) are unwrapped. ``name`` prefixes
        the learning-rate tags when several optimizers are attached.
        """
        inner = optimizer
        for _ in range(8):  # Accelerate's and Lightning's wrappers hold the real optimizer
            nxt = getattr(inner, "optimizer", None) or getattr(inner, "_optimizer", None)
            if nxt is None or nxt is inner:
                break
            inner = nxt
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
        """Writes what is pending and removes the optimizer hooks installed by :meth:`attach`."""
        self.flush()
        for handle in self._hooks + self._grad_hooks:
            handle.remove()
        self._hooks.clear()
        self._grad_hooks.clear()

    close = detach

    @property
    def should_stop(self) -> bool:
        """True once an alert fired with ``on_alert="stop"``: the loop should end cleanly."""
        return self._alerts is not None and self._alerts.should_stop

    @property
    def alerts(self) -> list[Alert]:
        """The alerts fired so far, the first occurrence of each kind and place."""
        return [] if self._alerts is None else list(self._alerts.alerts)

    @property
    def alert_counts(self) -> dict[tuple[str, str], int]:
        """Occurrences per ``(kind, where)``, repeats included."""
        return {} if self._alerts is None else dict(self._alerts.counts)

    def observe_loss(self, step: int, loss: float | torch.Tensor) -> None:
        """Keeps the step's loss for the non-finite and spike detectors.

        A tensor stays on its device; the losses of an interval reach the host together
        with the interval's statistics, so this never synchronises.
        """
        if self._alerts is None or self.norm_every_n_steps == 0 or not self._active:
            return
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise LoggedValueError(
                    f"`loss` must be a one-element tensor, got shape {tuple(loss.shape)}: pass "
                    "the reduced training loss."
                )
            self._losses.append((step, loss.detach().reshape(())))
        else:
            self._losses.append((step, float(loss)))
        if len(self._losses) >= 4 * max(self.norm_every_n_steps, 64):
            self.flush()  # a loop that never reaches a scalar step: bound the buffer

    def start_flop_count(self) -> None:
        """Starts counting the FLOPs of this step (only while no count is known)."""
        if self.flops_per_step is None and self.count_flops and not self._flops.running:
            if self._flops_tried:
                return
            self._flops_tried = True
            self._flops.start()

    def stop_flop_count(self) -> None:
        """Ends the count started by :meth:`start_flop_count`; sets :attr:`flops_per_step`."""
        if self._flops.running:
            self.flops_per_step = self._flops.stop()

    def after_backward(self, step: int) -> None:
        """Weight/gradient histograms and norms, non-finite counts, total grad norm pre-clip.

        Call once per optimizer step, when gradients are complete and not yet clipped.
        A second call with the same step does nothing.
        """
        self._step = step
        if self._grad_mark is not None:
            # DDP waits for the other ranks' gradients at the end of backward: a rank that
            # finished early waits here, and that wait is not its own step time.
            self._tp_wait += time.perf_counter() - self._grad_mark
            self._grad_mark = None
        if self._last_backward_step == step:
            return
        self._last_backward_step = step
        hist = self.is_hist_step(step)
        norm = self.is_norm_step(step)
        if not (hist or norm) or not self._active:
            return
        self._refresh_trainable()
        kinds = [k for k, on in (("weights", self.log_weights), ("grads", self.log_grads)) if on]
        # per kind: histogram moments, bin counts, norm moments (each may be absent)
        results: list[tuple[str, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]
        results = []
        # The update ratio's copy of the weights measures their norms in the same pass.
        copied = self._take_snapshot(step) if norm and self.log_update_ratio else {}
        grad_tensors = self._tensors("grads")
        for kind in kinds:
            tensors = grad_tensors if kind == "grads" else self._tensors(kind)
            hist_m = counts = norm_m = None
            if hist:
                hist_m, counts = self._histograms(tensors)
                if self.sample is None:
                    norm_m = hist_m  # exact moments hold the norms already
            if norm and norm_m is None:
                known = None
                if kind == "weights" and copied:
                    members = self._members(kind)
                    known = [[copied.get(id(p.param)) for p in group] for group in members]
                norm_m = self._norms(tensors, known)
            results.append((kind, hist_m, counts, norm_m if norm else None))
        if self.sink is None:
            return
        norms: dict[str, torch.Tensor | np.ndarray] = {}
        if hist:
            # One transfer for every histogram and norm of the call.
            blocks = [torch.cat([t for t in r[1:] if t is not None], 1) for r in results]
            host = torch.cat(blocks, 0).cpu().double().numpy()
            groups = len(self._groups)
            for k, (kind, _, _, norm_m) in enumerate(results):
                block = host[k * groups : (k + 1) * groups]
                self._write_histograms(step, kind, block)
                if norm_m is not None:
                    norms[kind] = block[:, -_ROW:]
        else:
            norms = {kind: m for kind, _, _, m in results if m is not None}
        if norm:
            staged = self._stage(step)
            # Groups with no gradient at all (every grad None) get no gradient scalars: a
            # 0.0 norm would read like a dead layer. Sharded: other ranks may hold some.
            with_grads = [bool(t) for t in grad_tensors]
            for kind, m in norms.items():
                mask = list(self._trainable)
                if kind == "grads" and not self.sharded:
                    mask = [a and b for a, b in zip(mask, with_grads, strict=True)]
                staged[kind] = (m[:, [_SUMSQ_ALL, _NONFINITE]], mask)
            if not self._hooks:
                self.flush()  # no optimizer hook will end this step: write now

    def after_clip(self, step: int) -> None:
        """The total gradient norm after clipping (``vitals/grad_norm_total/post_clip``).

        Written only where clipping changed the norm: an unclipped run has one curve.
        """
        if not (
            self.measure_post_clip and self.is_norm_step(step) and self.log_grads and self._active
        ):
            return
        moments = self._norms(self._tensors("grads"))
        if self.sink is not None:
            self._stage(step)["post_clip"] = moments[:, _SUMSQ_ALL].sum().sqrt()

    def after_optimizer_step(
        self, step: int, optimizer: Any = None, *, name: str | None = None
    ) -> None:
        """Update/weight ratios of the step, learning rate and momentum per param group."""
        if not self.is_norm_step(step):
            self._snapshot = None
            return
        snap, self._snapshot = self._snapshot, None
        if not self._active:
            return
        staged = self._stage(step)
        if snap is not None and snap.step == step:
            sampled = sorted({item[0] for item in snap.items if item[3] is not None})
            staged["ratios"] = (self._update_ratios(snap), list(self._trainable), sampled)
        if optimizer is not None:
            staged.setdefault("lr", {}).update(self._lr_values(optimizer, name))
        self.flush()

    def log_throughput(
        self, step: int, samples: float | None = None, tokens: float | None = None
    ) -> None:
        """Counts ``samples``/``tokens`` of this step; writes rates on scalar steps.

        Rates are averages over the wall time between two written values (the first
        call only starts the clock), which stays right with asynchronous devices.
        ``vitals/step_time_ms`` is written when neither count is given (otherwise the
        rates carry the same measurement); ``vitals/mfu`` when the FLOPs of a step and
        the device's peak are known. Under ``torch.distributed`` every rank must call
        this: each rank's step time is summed over ranks for the straggler detector,
        less the time it waited at the end of backward for the other ranks (measured
        from the last gradient accumulated to :meth:`after_backward`).
        """
        now = time.perf_counter()
        if self._tp_start is None:
            self._tp_start = now
            self._tp_last_step = step
            self._watch_backward()
            return
        self._tp_samples += samples or 0
        self._tp_tokens += tokens or 0
        self._tp_steps += 1
        if not self.is_norm_step(step) or step == self._tp_last_step:
            return
        elapsed = now - self._tp_start
        steps = self._tp_steps
        scalars: dict[str, float | int | torch.Tensor] = {}
        if elapsed > 0 and steps > 0:
            step_time = elapsed / steps
            if samples is not None:
                scalars["vitals/samples_per_sec"] = self._tp_samples / elapsed
            if tokens is not None:
                scalars["vitals/tokens_per_sec"] = self._tp_tokens / elapsed
            if samples is None and tokens is None:
                scalars["vitals/step_time_ms"] = step_time * 1e3
            mfu = self._mfu(step_time)
            if mfu is not None:
                scalars["vitals/mfu"] = mfu
            self._share_step_time(step, max(elapsed - self._tp_wait, 0.0) / steps)
        self._tp_start, self._tp_samples, self._tp_tokens, self._tp_steps = now, 0.0, 0.0, 0
        self._tp_wait = 0.0
        self._tp_last_step = step
        if scalars and self.sink is not None:
            self.sink.log_scalars(scalars, step)

    def log_memory(self, step: int) -> None:
        """Peak device memory in MiB since the last value, where the device reports it.

        CUDA and XPU report a peak; CPU and MPS do not, and nothing is written for them.
        """
        if not self.is_norm_step(step) or self.sink is None:
            return
        device = self._device()
        backend = {"cuda": torch.cuda, "xpu": getattr(torch, "xpu", None)}.get(device.type)
        if backend is None or not hasattr(backend, "max_memory_allocated"):
            return
        peak = backend.max_memory_allocated(device) / 2**20
        if self.reset_peak_memory and hasattr(backend, "reset_peak_memory_stats"):
            backend.reset_peak_memory_stats(device)
        self.sink.log_scalars({"vitals/peak_memory_mb": float(peak)}, step)

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
        straggler, self._straggler = self._straggler, None
        if step is None:
            step = losses[-1][0] if losses else (straggler[0] if straggler else None)
        if self.sink is None:  # a rank that writes nothing: only finish the collective
            if straggler is not None:
                straggler[1].wait()
            return
        if step is None:
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
        if straggler is not None:
            straggler[1].wait()
            parts.append(straggler[2].reshape(-1))
        host: list[float] = []
        if parts:
            device = parts[0].device
            acc = _acc_dtype(device)
            host = torch.cat([p.to(device=device, dtype=acc) for p in parts]).cpu().tolist()
        pos = 0

        def take(n: int) -> list[float]:
            nonlocal pos
            out = host[pos : pos + n]
            pos += n
            return out

        scalars: dict[str, float | int | torch.Tensor] = {}
        checks = self._alerts
        names = [g.name for g in self._groups]
        total_sumsq: float | None = None
        for key, label in (("weights", "weight_norm"), ("grads", "grad_norm")):
            if key not in staged:
                continue
            values, mask = staged[key]
            if isinstance(values, torch.Tensor):
                rows = take(values.numel())
                pairs = [(rows[2 * i], rows[2 * i + 1]) for i in range(len(names))]
            else:
                pairs = [(float(a), float(b)) for a, b in values]
            nonfinite: dict[str, float] = {}
            for i, (sumsq, bad) in enumerate(pairs):
                if not mask[i]:
                    continue
                scalars[f"vitals/{label}/{names[i]}"] = math.sqrt(sumsq)
                nonfinite[names[i]] = bad
            scalars[f"vitals/nonfinite/{key}"] = float(sum(nonfinite.values()))
            if checks is not None:
                checks.check_nonfinite(step, key, nonfinite)
            if key == "grads" and nonfinite:
                total_sumsq = sum(pairs[i][0] for i in range(len(names)) if mask[i])
                scalars["vitals/grad_norm_total"] = math.sqrt(total_sumsq)
                if checks is not None:
                    checks.check_grad_norm(step, math.sqrt(total_sumsq))
        if "post_clip" in staged:
            (post,) = take(1)
            pre = None if total_sumsq is None else math.sqrt(total_sumsq)
            if self._clipped or pre is None or not math.isclose(post, pre, rel_tol=1e-6):
                self._clipped = self._clipped or pre is not None
                scalars["vitals/grad_norm_total/post_clip"] = post
        if "ratios" in staged:
            values, mask, sampled = staged["ratios"]
            rows = take(values.numel())
            ratios = {names[i]: rows[i] for i in range(len(names)) if mask[i]}
            scalars.update({f"vitals/update_ratio/{k}": v for k, v in ratios.items()})
            unconfirmed = self._confirm_zero_ratios(sampled, mask, rows)
            if checks is not None:
                checks.check_update_ratios(step, ratios, unconfirmed=unconfirmed)
        if "lr" in staged:
            lrs: dict[str, float] = staged["lr"]
            scalars.update(self._changing(step, lrs))
            if checks is not None:
                checks.check_lr(
                    step,
                    {
                        k.removeprefix("vitals/lr/"): v
                        for k, v in lrs.items()
                        if k.startswith("vitals/lr/")
                    },
                )
        if losses and checks is not None:
            loss_values = take(len(loss_tensors))
            it = iter(loss_values)
            checks.check_losses(
                [(s, next(it) if isinstance(v, torch.Tensor) else float(v)) for s, v in losses]
            )
        if straggler is not None:
            times = take(straggler[2].numel())
            if checks is not None:
                checks.check_step_times(straggler[0], times)
        if not self._frozen_written and scalars:
            self._frozen_written = True
            frozen = self._frozen_count()
            if frozen:
                scalars["vitals/frozen_params"] = float(frozen)
        if scalars and self.sink is not None:
            self.sink.log_scalars(scalars, step)
        if checks is not None:
            checks.publish(step)

    def _ratio_sampled(self, gi: int) -> bool:
        """Whether this scalar step compares group ``gi``'s weights at sampled positions."""
        return (
            self.ratio_sample is not None
            and not self.sharded
            and gi not in self._ratio_whole
            and gi not in self._ratio_sparse
        )

    def _confirm_zero_ratios(
        self, sampled: list[int], mask: list[bool], ratios: list[float]
    ) -> set[str]:
        """The groups whose ratio of 0 does not count as not training (yet).

        A sample can miss a sparse update (an embedding of which a few rows train per
        step). A sampled 0 is therefore compared whole for the next ``patience`` checks,
        which either show the group stuck (the alert counts those; then it goes back to
        the sample) or show it moving: it trains sparsely and is compared whole from then
        on, so its curve shows its true ratio. A step where no group moved at all (a zero
        learning rate, a skipped step) starts no whole comparison: that would copy the
        whole model for nothing.
        """
        for gi in list(self._ratio_whole):
            if ratios[gi] > 0.0:
                self._ratio_sparse.add(gi)
                del self._ratio_whole[gi]
            else:
                self._ratio_whole[gi] -= 1
                if self._ratio_whole[gi] <= 0:
                    del self._ratio_whole[gi]
        zeros = [gi for gi in sampled if mask[gi] and ratios[gi] == 0.0]
        moved = any(mask[gi] and ratios[gi] > 0.0 for gi in range(len(ratios)))
        if self._alerts is not None and moved:
            for gi in zeros:
                if gi not in self._ratio_sparse:
                    self._ratio_whole[gi] = self._alerts.rules.patience
        return {self._groups[gi].name for gi in zeros}

    def _changing(self, step: int, values: Mapping[str, float]) -> dict[str, float]:
        """Learning rates and momenta, once they differ from their first value.

        A constant schedule says nothing a config does not: it gets no curve. When a
        value first changes, its first value is written at its first step too.
        """
        out: dict[str, float] = {}
        for tag, value in values.items():
            first = self._first_values.setdefault(tag, (step, value))
            if tag not in self._changed and value != first[1]:
                self._changed.add(tag)
                if self.sink is not None and first[0] != step:
                    self.sink.log_scalars({tag: first[1]}, first[0])
            if tag in self._changed:
                out[tag] = value
        return out

    def _mfu(self, step_time: float) -> float | None:
        flops = self.flops_per_step
        if flops is None:
            return None
        peak = self.peak_flops
        if peak is None:
            param = next((p.param for p in self._params if p.param.requires_grad), None)
            dtype = param.dtype if param is not None else torch.float32
            peak = _efficiency.peak_flops(self._device(), dtype)
        if peak is None:
            if not self._mfu_note:
                self._mfu_note = True
                _log.info(
                    "vitals/mfu is not written: the peak FLOP/s of device %s is not known; "
                    "pass peak_flops=... to the monitor.",
                    self._device(),
                )
            return None
        return flops / (step_time * peak)

    def _shares_step_times(self) -> bool:
        dist = torch.distributed
        return (
            self._alerts is not None
            and self._stragglers
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def _watch_backward(self) -> None:
        """Marks the end of this rank's own backward work, to leave out waits for others.

        Under DDP every rank leaves backward when the slowest one's gradients are reduced,
        so wall-clock step times are equal; the time from the last gradient accumulated
        here to :meth:`after_backward` is the wait, subtracted from the shared step time.
        """
        if self._grad_hooks or not self._shares_step_times():
            return
        for p in self._params:
            if p.param.requires_grad:
                self._grad_hooks.append(p.param.register_post_accumulate_grad_hook(self._mark))

    def _mark(self, param: torch.Tensor) -> None:
        self._grad_mark = time.perf_counter()

    def _share_step_time(self, step: int, step_time: float) -> None:
        """Each rank's own step time into one sum over ranks, read at the next flush."""
        if not self._shares_step_times():
            return
        dist = torch.distributed
        world = dist.get_world_size(self.process_group)
        if self._straggler is not None:
            self.flush()
        backend = dist.get_backend(self.process_group)
        device = self._device() if backend == "nccl" else torch.device("cpu")
        times = torch.zeros(world, dtype=torch.float64, device=device)
        times[dist.get_rank(self.process_group)] = step_time
        work = dist.all_reduce(times, group=self.process_group, async_op=True)
        self._straggler = (step, work, times)

    # ------------------------------------------------------------------ collection
    @property
    def _active(self) -> bool:
        return self.sink is not None or self.sharded

    def _detect_sharded(self) -> bool:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return False
        if torch.distributed.get_world_size(self.process_group) < 2:
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

    def _device(self) -> torch.device:
        for p in self._params:
            return _local(p.param).device
        return torch.device("cpu")

    def _refresh_trainable(self) -> None:
        # Host-side, identical on every rank: whether a group has any trainable parameter
        # now (a callback may unfreeze layers during the fit).
        self._trainable = [any(p.param.requires_grad for p in g.params) for g in self._groups]

    def _tensors(self, kind: str) -> list[list[torch.Tensor]]:
        """Per group, the flat local tensors of ``kind``.

        Frozen groups are left out (their weights do not change; the frozen count says
        they exist), and so are frozen parameters of mixed groups in ``trainable_only``
        mode, and gradients that are ``None``.
        """
        if kind == "weights":
            return [[_flat(p.param) for p in group] for group in self._members(kind)]
        return [
            [_flat(p.param.grad) for p in group]  # type: ignore[arg-type]
            for group in self._members(kind)
        ]

    def _members(self, kind: str) -> list[list[_Param]]:
        """Per group, the parameters whose ``kind`` :meth:`_tensors` returns, in order."""
        out: list[list[_Param]] = [[] for _ in self._groups]
        for p in self._params:
            if not self._trainable[p.group]:
                continue
            if kind == "weights":
                if not (self.trainable_only and not p.param.requires_grad):
                    out[p.group].append(p)
            elif p.param.requires_grad and p.param.grad is not None:
                out[p.group].append(p)
        return out

    def _frozen_count(self) -> int:
        """Elements with ``requires_grad=False`` (the local shard's when sharded)."""
        return sum(_flat(p.param).numel() for p in self._params if not p.param.requires_grad)

    # ------------------------------------------------------------------ statistics
    def _zeros(self, *shape: int) -> torch.Tensor:
        device = self._device()
        return torch.zeros(*shape, dtype=_acc_dtype(device), device=device)

    def _moments(
        self,
        tensors: list[list[torch.Tensor]],
        full: bool,
        weights: list[float] | None = None,
        known: list[list[float | None]] | None = None,
    ) -> torch.Tensor:
        """Per group moments (one row per group), reduced over ranks when sharded.

        ``weights`` scales the additive columns of each group (sampled histograms).
        ``known`` holds, per tensor, a sum of squares measured already (norm rows only);
        a finite one stands for the tensor's row, so the tensor is not read again.
        """
        rows = []
        for gi, group in enumerate(tensors):
            if not group:
                rows.append(self._binner.row(torch.empty(0, device=self._device()), full))
                continue
            per_tensor = []
            for ti, t in enumerate(group):
                sumsq = None if known is None or full else known[gi][ti]
                if sumsq is not None and math.isfinite(sumsq):
                    per_tensor.append(
                        torch.tensor([t.numel(), 0, 0, 0, 0, 0, sumsq], dtype=torch.float64)
                    )
                else:
                    per_tensor.append(self._binner.row(t, full))
            per = torch.stack(per_tensor)
            row = per.sum(0)
            row[_MIN] = per[:, _MIN].min()
            row[_MAX] = per[:, _MAX].max()
            if weights is not None and weights[gi] != 1.0:
                additive = [_N, _NONFINITE, _SUM, _SUMSQ, _SUMSQ_ALL]
                row[additive] = row[additive] * weights[gi]
            rows.append(row)
        moments = torch.stack(rows).to(_acc_dtype(self._device()))
        if self.sharded:
            moments = moments.to(self._device())
            dist = torch.distributed
            sums = moments[:, [_N, _NONFINITE, _SUM, _SUMSQ, _SUMSQ_ALL]].contiguous()
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.process_group)
            bounds = torch.stack([-moments[:, _MIN], moments[:, _MAX]], 1).contiguous()
            dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=self.process_group)
            moments = moments.clone()
            moments[:, [_N, _NONFINITE, _SUM, _SUMSQ, _SUMSQ_ALL]] = sums
            moments[:, _MIN] = -bounds[:, 0]
            moments[:, _MAX] = bounds[:, 1]
        return moments

    def _norms(
        self, tensors: list[list[torch.Tensor]], known: list[list[float | None]] | None = None
    ) -> torch.Tensor:
        return self._moments(tensors, full=False, known=known)

    def _generator(self, stream: int) -> torch.Generator:
        """A CPU generator per sample kind (0: histograms, 1: update ratio) and rank."""
        gen = self._generators.get(stream)
        if gen is None:
            gen = torch.Generator()
            rank = torch.distributed.get_rank() if self.sharded else 0
            gen.manual_seed(self._seed + 1000003 * rank + 7919 * stream)
            self._generators[stream] = gen
        return gen

    def _histograms(self, tensors: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Moments and bin counts (float, one row per group) of ``tensors``.

        Exact mode bins every element. Sampled mode bins a fixed uniform sample of
        ``sample`` positions per group (drawn once, with replacement, over the group's
        concatenated elements) and weighs it by ``elements / sample``.
        """
        weights: list[float] | None = None
        if self.sample is not None:
            sampled = [self._group_sample(gi, group) for gi, group in enumerate(tensors)]
            tensors = [[x] if x is not None else [] for x, _ in sampled]
            weights = [w for _, w in sampled]
        moments = self._moments(tensors, full=True, weights=weights)
        device = self._device()
        counts = self._zeros(len(tensors), self.bins)
        on_cpu = device.type == "cpu"
        bounds = moments[:, [_MIN, _MAX]].tolist() if on_cpu else []
        for gi, group in enumerate(tensors):
            if not group:
                continue
            weight = 1.0 if weights is None else weights[gi]
            if on_cpu:
                lo, hi = bounds[gi]
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    continue
                dirty = bool(moments[gi, _NONFINITE] > 0)
                acc = torch.zeros(self.bins, dtype=torch.int64)
                for t in group:
                    self._binner.bin_cpu(t, lo, hi, acc, dirty)
                counts[gi] += acc.to(counts.dtype) * weight
            else:
                lo_t, hi_t = moments[gi, _MIN], moments[gi, _MAX]
                for t in group:
                    counts[gi] += self._binner.bin_device(t, lo_t, hi_t) * weight
        if self.sharded:
            counts = counts.to(device)
            torch.distributed.all_reduce(
                counts, op=torch.distributed.ReduceOp.SUM, group=self.process_group
            )
        return moments, counts

    def _group_sample(
        self, gi: int, group: list[torch.Tensor]
    ) -> tuple[torch.Tensor | None, float]:
        """A uniform sample (with replacement) of the group's elements and its weight."""
        assert self.sample is not None
        index, weight = self._sample_positions(gi, group, self.sample)
        if not group or sum(t.numel() for t in group) == 0:
            return None, 1.0
        if index is None:
            return torch.cat(group), 1.0
        picks = [
            torch.index_select(t, 0, idx) for t, idx in zip(group, index, strict=True) if len(idx)
        ]
        return torch.cat(picks), weight

    def _sample_positions(
        self, gi: int, group: list[torch.Tensor], size: int, *, ratio: bool = False
    ) -> tuple[list[torch.Tensor] | None, float]:
        """Per tensor, ``size`` sampled positions (None: the group is small, take it all).

        Histograms draw single positions. The update ratio (``ratio=True``) draws
        ``size // 16`` uniform starts of 16 consecutive positions (wrapping at the end, so
        every position is equally likely): its gather reads whole cache lines instead of
        one value per line. Each kind has its own generator, so one does not move the other.
        """
        run = _RATIO_RUN if ratio else 1
        sizes = tuple(t.numel() for t in group)
        total = sum(sizes)
        if total <= size:
            return None, 1.0
        device = group[0].device
        key = (gi, size, run, sizes, device)
        index = self._sample_index.get(key)
        if index is None:
            # Drawn once: the same positions every call give smooth curves and cost one
            # index_select per tensor; being independent of the values, the sample's error
            # bound holds at every call. Drawn on the CPU, so that splitting them between
            # the tensors reads nothing back from an accelerator.
            cpu = torch.device("cpu")
            gen = self._generator(1 if ratio else 0)
            starts = torch.randint(total, (size // run, 1), generator=gen)
            positions = (starts + torch.arange(run)).remainder_(total)
            positions = positions.reshape(-1).sort().values
            cuts = torch.searchsorted(positions, torch.tensor(sizes).cumsum(0)).tolist()
            index, start, offset = [], 0, 0
            for n, cut in zip(sizes, cuts, strict=True):
                part = (positions[start:cut] - offset).to(torch.int32)
                index.append(part if device == cpu else part.to(device))
                start, offset = cut, offset + n
            self._sample_index[key] = index
        return index, total / ((size // run) * run)

    # ------------------------------------------------------------------ update ratio
    def _take_snapshot(self, step: int) -> dict[int, float]:
        """Keeps the trainable weights (or their sample) as they are before the step.

        Returns the squared norms measured while copying, by ``id`` of the parameter.
        """
        items: list[
            tuple[int, nn.Parameter, torch.Tensor, torch.Tensor | None, float, float | None]
        ] = []
        measured: dict[int, float] = {}
        for gi, g in enumerate(self._groups):
            members = [p.param for p in g.params if p.param.requires_grad]
            flats = [_flat(p) for p in members]
            index: list[torch.Tensor] | None = None
            weight = 1.0
            if self._ratio_sampled(gi) and flats:
                assert self.ratio_sample is not None
                index, weight = self._sample_positions(gi, flats, self.ratio_sample, ratio=True)
            for k, (param, flat) in enumerate(zip(members, flats, strict=True)):
                if index is None:
                    before, sumsq = self._copy(param, flat)
                    items.append((gi, param, before, None, 1.0, sumsq))
                    if sumsq is not None:
                        measured[id(param)] = sumsq
                elif len(index[k]):
                    before = torch.index_select(flat, 0, index[k])
                    items.append((gi, param, before, index[k], weight, None))
        # A group back on its sample (a confirmed stuck layer) gives its copy back.
        whole = {id(item[1]) for item in items if item[3] is None}
        for key in [k for k in self._snap_buffers if k not in whole]:
            del self._snap_buffers[key]
        self._snapshot = _Snapshot(step, items)
        return measured

    def _copy(self, param: nn.Parameter, flat: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        """A copy of ``flat``, with its squared norm where the copy measured it.

        On the CPU the copy goes into a buffer kept between scalar steps (fresh 100 MB
        allocations cost page faults on every scalar step) and float32/float64 values
        are measured chunk by chunk as they are copied. Accelerators' caching allocators
        reuse memory anyway, so there the copy is released after the step, and nothing
        is read on the host.
        """
        if flat.device.type != "cpu":
            return flat.clone(), None
        buf = self._snap_buffers.get(id(param))
        if buf is None or buf.shape != flat.shape or buf.dtype != flat.dtype:
            buf = torch.empty_like(flat)
            self._snap_buffers[id(param)] = buf
        if flat.dtype in (torch.float32, torch.float64):
            return buf, copy_sumsq_cpu(flat, buf)
        return buf.copy_(flat), None

    def _scratch(self, dtype: torch.dtype) -> torch.Tensor:
        buf = self._diff_scratch.get(dtype)
        if buf is None:
            buf = self._diff_scratch[dtype] = torch.empty(_FUSED_CHUNK, dtype=dtype)
        return buf

    def _update_ratios(self, snap: _Snapshot) -> torch.Tensor:
        acc = self._zeros(len(self._groups), 2)
        # Groups measured on the host (CPU tensors): summed here, added once.
        host = [[0.0, 0.0] for _ in self._groups]
        for gi, param, before, idx, weight, base_sumsq in snap.items:
            now = _flat(param)
            if base_sumsq is not None:
                # The copy measured ||w_before||; ||w_after - w_before|| in one fused pass.
                host[gi][0] += diff_sumsq_cpu(now, before, self._scratch(before.dtype))
                host[gi][1] += base_sumsq
                continue
            if idx is not None:
                now = torch.index_select(now, 0, idx)
            if before.dtype not in (torch.float32, torch.float64):
                before, now = before.float(), now.float()
            if before.device.type == "cpu":  # host floats: no small-tensor arithmetic
                host[gi][1] += sumsq_cpu(before) * weight
                host[gi][0] += sumsq_cpu(before.sub_(now)) * weight
                continue
            # ``before`` is the monitor's own copy: subtract in place, no temporary.
            base = torch.linalg.vector_norm(before) ** 2
            diff = torch.linalg.vector_norm(before.sub_(now)) ** 2
            acc[gi, 0] += diff.to(acc.dtype) * weight
            acc[gi, 1] += base.to(acc.dtype) * weight
        if any(a or b for a, b in host):
            acc += torch.tensor(host, dtype=acc.dtype, device=acc.device)
        if self.sharded:
            torch.distributed.all_reduce(
                acc, op=torch.distributed.ReduceOp.SUM, group=self.process_group
            )
        return (acc[:, 0] / acc[:, 1].clamp_min(torch.finfo(acc.dtype).tiny)).sqrt()

    @staticmethod
    def _lr_values(optimizer: Any, name: str | None) -> dict[str, float]:
        inner = optimizer
        while not hasattr(inner, "param_groups") and hasattr(inner, "optimizer"):
            inner = inner.optimizer
        prefix = "" if name is None else f"{name}/"
        out: dict[str, float] = {}
        for i, group in enumerate(getattr(inner, "param_groups", [])):
            lr = group.get("lr")
            if isinstance(lr, torch.Tensor):
                lr = lr.item() if lr.device.type == "cpu" else None  # a device lr: no sync
            if lr is not None:
                out[f"vitals/lr/{prefix}group_{i}"] = float(lr)
            momentum = group.get("momentum")
            if momentum is None and isinstance(group.get("betas"), Sequence):
                momentum = group["betas"][0]
            if isinstance(momentum, int | float):
                out[f"vitals/momentum/{prefix}group_{i}"] = float(momentum)
        return out

    # ------------------------------------------------------------------ writing
    def _write_text(self, tag: str, text: str, step: int) -> None:
        assert self.sink is not None
        self.sink.experiment.add_text(tag, text, global_step=step)

    def _write_histograms(self, step: int, kind: str, block: np.ndarray) -> None:
        assert self.sink is not None
        experiment = self.sink.experiment
        for gi, g in enumerate(self._groups):
            _write_histogram(
                experiment,
                f"vitals/{kind}/{g.name}",
                block[gi],
                self.bins,
                step,
                sampled=self.sample is not None,
            )
