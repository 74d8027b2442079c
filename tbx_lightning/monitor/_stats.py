"""Per-group statistics of weights and gradients: moments, norms and histogram counts.

Computed where the tensors live, one row per group (see :mod:`._binning`), summed over
ranks with ``all_reduce`` when parameters are sharded; full parameters are never gathered.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tbx_lightning.monitor._binning import (
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
    _write_histogram,
)
from tbx_lightning.monitor._groups import Group, GroupedParam
from tbx_lightning.monitor._ratio import Sampler

__all__ = ["LAYER_PREFIX", "Statistics"]

# Per-layer tags live apart from the run-level ``vitals/`` ones: ``vitals_layers/`` sorts
# after ``vitals/``, so TensorBoard's first metric columns and groups are run-level.
LAYER_PREFIX = "vitals_layers"


class Statistics:
    """Moments, norms and histograms of the groups' weights and gradients.

    Args:
        groups: The groups, in order.
        params: Every grouped parameter.
        device: Returns the device the statistics are computed on.
        sampler: Sample positions for sampled histograms.
        bins: Histogram bins.
        sample: Elements sampled per group for histograms, or ``None`` (exact).
        trainable_only: Leave frozen parameters of mixed groups out.
        sharded: Sum over ranks (each holds a shard).
        process_group: The group to sum over.
    """

    def __init__(
        self,
        groups: list[Group],
        params: list[GroupedParam],
        *,
        device: Callable[[], torch.device],
        sampler: Sampler,
        bins: int,
        sample: int | None,
        trainable_only: bool,
        sharded: bool,
        process_group: Any = None,
    ) -> None:
        self._groups = groups
        self._params = params
        self.device = device
        self._sampler = sampler
        self._binner = _Binner(bins)
        self.bins = bins
        self.sample = sample
        self.trainable_only = trainable_only
        self.sharded = sharded
        self.process_group = process_group
        self.trainable: list[bool] = []
        self.refresh_trainable()

    def refresh_trainable(self) -> None:
        """Reads which groups train now (a callback may unfreeze layers during the fit)."""
        # Host-side, identical on every rank: whether a group has any trainable parameter.
        self.trainable = [any(p.param.requires_grad for p in g.params) for g in self._groups]

    def tensors(self, kind: str) -> list[list[torch.Tensor]]:
        """Per group, the flat local tensors of ``kind``.

        Frozen groups are left out (their weights do not change; the frozen count says
        they exist), and so are frozen parameters of mixed groups in ``trainable_only``
        mode, and gradients that are ``None``.
        """
        if kind == "weights":
            return [[_flat(p.param) for p in group] for group in self.members(kind)]
        return [
            [_flat(p.param.grad) for p in group]  # type: ignore[arg-type]
            for group in self.members(kind)
        ]

    def members(self, kind: str) -> list[list[GroupedParam]]:
        """Per group, the parameters whose ``kind`` :meth:`tensors` returns, in order."""
        out: list[list[GroupedParam]] = [[] for _ in self._groups]
        for p in self._params:
            if not self.trainable[p.group]:
                continue
            if kind == "weights":
                if not (self.trainable_only and not p.param.requires_grad):
                    out[p.group].append(p)
            elif p.param.requires_grad and p.param.grad is not None:
                out[p.group].append(p)
        return out

    def measure(
        self,
        step: int,
        *,
        hist: bool,
        norm: bool,
        kinds: list[str],
        copied: dict[int, float],
        experiment: Any,
    ) -> dict[str, Any]:
        """Histograms (written to ``experiment``) and norms of one step.

        Returns, on a scalar step, what the monitor stages for the step's one transfer:
        per kind, the rows ``[sum of squares, non-finite count]`` and the mask of groups
        that get scalars. ``copied`` holds the weights' squared norms that the update
        ratio's copy measured already. ``experiment`` ``None``: a rank that only
        computes its share of sharded statistics.
        """
        self.refresh_trainable()
        # per kind: histogram moments, bin counts, norm moments (each may be absent)
        results: list[tuple[str, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]
        results = []
        grad_tensors = self.tensors("grads")
        for kind in kinds:
            tensors = grad_tensors if kind == "grads" else self.tensors(kind)
            hist_m = counts = norm_m = None
            if hist:
                hist_m, counts = self.histograms(tensors)
                if self.sample is None:
                    norm_m = hist_m  # exact moments hold the norms already
            if norm and norm_m is None:
                known = None
                if kind == "weights" and copied:
                    members = self.members(kind)
                    known = [[copied.get(id(p.param)) for p in group] for group in members]
                norm_m = self.norms(tensors, known)
            results.append((kind, hist_m, counts, norm_m if norm else None))
        if experiment is None:
            return {}
        norms: dict[str, torch.Tensor | np.ndarray] = {}
        if hist:
            # One transfer for every histogram and norm of the call.
            blocks = [torch.cat([t for t in r[1:] if t is not None], 1) for r in results]
            host = torch.cat(blocks, 0).cpu().double().numpy()
            groups = len(self._groups)
            for k, (kind, _, _, norm_m) in enumerate(results):
                block = host[k * groups : (k + 1) * groups]
                self.write_histograms(experiment, step, kind, block)
                if norm_m is not None:
                    norms[kind] = block[:, -_ROW:]
        else:
            norms = {kind: m for kind, _, _, m in results if m is not None}
        if not norm:
            return {}
        staged: dict[str, Any] = {}
        # Groups with no gradient at all (every grad None) get no gradient scalars: a 0.0
        # norm would read like a dead layer. Sharded: other ranks may hold some.
        with_grads = [bool(t) for t in grad_tensors]
        for kind, m in norms.items():
            mask = list(self.trainable)
            if kind == "grads" and not self.sharded:
                mask = [a and b for a, b in zip(mask, with_grads, strict=True)]
            staged[kind] = (m[:, [_SUMSQ_ALL, _NONFINITE]], mask)
        return staged

    def nonfinite_grads(self) -> dict[str, float]:
        """NaN/Inf gradient values per trainable group on this rank (read once, when found)."""
        counts: list[torch.Tensor] = []
        for group in self.members("grads"):
            total = torch.zeros((), dtype=torch.float64)
            for p in group:
                grad = _flat(p.param.grad)  # type: ignore[arg-type]
                total += (~torch.isfinite(grad)).sum().cpu().double()
            counts.append(total)
        values = torch.stack(counts).tolist() if counts else []
        return {g.name: v for g, v in zip(self._groups, values, strict=True) if v > 0}

    def frozen_count(self) -> int:
        """Elements with ``requires_grad=False`` (the local shard's when sharded)."""
        return sum(_flat(p.param).numel() for p in self._params if not p.param.requires_grad)

    # ------------------------------------------------------------------ statistics
    def _zeros(self, *shape: int) -> torch.Tensor:
        device = self.device()
        return torch.zeros(*shape, dtype=_acc_dtype(device), device=device)

    def moments(
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
        device = self.device()
        rows = []
        for gi, group in enumerate(tensors):
            if not group:
                rows.append(self._binner.row(torch.empty(0, device=device), full))
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
        moments = torch.stack(rows).to(_acc_dtype(device))
        if self.sharded:
            moments = moments.to(device)
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

    def norms(
        self, tensors: list[list[torch.Tensor]], known: list[list[float | None]] | None = None
    ) -> torch.Tensor:
        return self.moments(tensors, full=False, known=known)

    def histograms(self, tensors: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Moments and bin counts (float, one row per group) of ``tensors``.

        Exact mode bins every element. Sampled mode bins a fixed uniform sample of
        ``sample`` positions per group and weighs it by ``elements / sample``.
        """
        weights: list[float] | None = None
        if self.sample is not None:
            sampled = [self._group_sample(gi, group) for gi, group in enumerate(tensors)]
            tensors = [[x] if x is not None else [] for x, _ in sampled]
            weights = [w for _, w in sampled]
        moments = self.moments(tensors, full=True, weights=weights)
        device = self.device()
        bins = self.bins
        counts = self._zeros(len(tensors), bins)
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
                acc = torch.zeros(bins, dtype=torch.int64)
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
        size = self.sample
        if not group or sum(t.numel() for t in group) == 0 or size is None:
            return None, 1.0
        index, weight = self._sampler.positions(gi, group, size)
        if index is None:
            return torch.cat(group), 1.0
        picks = [
            torch.index_select(t, 0, idx) for t, idx in zip(group, index, strict=True) if len(idx)
        ]
        return torch.cat(picks), weight

    def write_histograms(self, experiment: Any, step: int, kind: str, block: np.ndarray) -> None:
        """Writes one histogram per group from host rows ``[moments..., counts...]``."""
        for gi, g in enumerate(self._groups):
            _write_histogram(
                experiment,
                f"{LAYER_PREFIX}/{kind}/{g.name}",
                block[gi],
                self.bins,
                step,
                sampled=self.sample is not None,
            )
