"""The update/weight ratio of each group, from fixed samples or whole copies, and the samples.

The ratio compares the weights before and after an optimizer step at ``ratio_sample``
fixed positions per group (drawn once, uniformly with replacement, in runs of 16 so a
gather reads whole cache lines); a group that small or smaller is compared whole.
A sampled ratio of 0 may have missed a sparse update, so such a group is compared
whole for the next ``patience`` checks, and from then on if it moved.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tbx_lightning.monitor._binning import (
    _FUSED_CHUNK,
    _acc_dtype,
    _flat,
    copy_sumsq_cpu,
    diff_sumsq_cpu,
    sumsq_cpu,
)
from tbx_lightning.monitor._groups import Group

__all__ = ["Sampler", "UpdateRatio"]

# Consecutive positions per draw of the update ratio's sample: 16 float32 values are one
# 64-byte cache line, so the gather reads 16x fewer lines than single positions would.
_RATIO_RUN = 16

# per parameter: (group, parameter, values before the step, sample indices or None,
# weight, the squared norm of the values before the step where measured while copying)
_Item = tuple[int, nn.Parameter, torch.Tensor, torch.Tensor | None, float, float | None]


class Sampler:
    """Fixed random positions per group, one generator per kind of sample and rank."""

    def __init__(self, seed: int, rank: int) -> None:
        self._seed = seed
        self._rank = rank
        self._generators: dict[int, torch.Generator] = {}
        # (group, sample size, run length, tensor sizes, device) -> positions per tensor
        self._index: dict[tuple[int, int, int, tuple[int, ...], torch.device], list[torch.Tensor]]
        self._index = {}

    def generator(self, stream: int) -> torch.Generator:
        """A CPU generator per sample kind (0: histograms, 1: update ratio)."""
        gen = self._generators.get(stream)
        if gen is None:
            gen = torch.Generator()
            gen.manual_seed(self._seed + 1000003 * self._rank + 7919 * stream)
            self._generators[stream] = gen
        return gen

    def positions(
        self, gi: int, group: list[torch.Tensor], size: int, *, ratio: bool = False
    ) -> tuple[list[torch.Tensor] | None, float]:
        """Per tensor, ``size`` sampled positions (None: the group is small, take it all).

        Histograms draw single positions. The update ratio (``ratio=True``) draws
        ``size // 16`` uniform starts of 16 consecutive positions (wrapping at the end, so
        every position is equally likely). Each kind has its own generator, so one does
        not move the other. Drawn once, on the CPU: the same positions every call give
        smooth curves and cost one ``index_select`` per tensor, and splitting them
        between the tensors reads nothing back from an accelerator.
        """
        run = _RATIO_RUN if ratio else 1
        sizes = tuple(t.numel() for t in group)
        total = sum(sizes)
        if total <= size:
            return None, 1.0
        device = group[0].device
        key = (gi, size, run, sizes, device)
        index = self._index.get(key)
        if index is None:
            cpu = torch.device("cpu")
            gen = self.generator(1 if ratio else 0)
            starts = torch.randint(total, (size // run, 1), generator=gen)
            positions = (starts + torch.arange(run)).remainder_(total)
            positions = positions.reshape(-1).sort().values
            cuts = torch.searchsorted(positions, torch.tensor(sizes).cumsum(0)).tolist()
            index, start, offset = [], 0, 0
            for n, cut in zip(sizes, cuts, strict=True):
                part = (positions[start:cut] - offset).to(torch.int32)
                index.append(part if device == cpu else part.to(device))
                start, offset = cut, offset + n
            self._index[key] = index
        return index, total / ((size // run) * run)


@dataclass
class _Snapshot:
    """Weights (or a sample of them) before an optimizer step."""

    step: int
    items: list[_Item]


class UpdateRatio:
    """``||w_after - w_before|| / ||w_before||`` per group, for one step at a time.

    Args:
        groups: The monitor's groups.
        sampler: Where sample positions come from.
        ratio_sample: Positions per group, or ``None`` to compare every weight.
        sharded: Whether parameters are shards (compared whole, summed over ranks).
        process_group: The group to sum over when sharded.
    """

    def __init__(
        self,
        groups: list[Group],
        sampler: Sampler,
        ratio_sample: int | None,
        *,
        sharded: bool,
        process_group: object = None,
    ) -> None:
        self.groups = groups
        self.sampler = sampler
        self.ratio_sample = ratio_sample
        self.sharded = sharded
        self.process_group = process_group
        self.snapshot: _Snapshot | None = None
        # Confirming a sampled ratio of 0: group -> scalar checks left to compare it
        # whole; and the groups found to train sparsely, compared whole from then on.
        self.whole: dict[int, int] = {}
        self.sparse: set[int] = set()
        self.buffers: dict[int, torch.Tensor] = {}
        self._scratch_buffers: dict[torch.dtype, torch.Tensor] = {}

    def sampled(self, gi: int) -> bool:
        """Whether this scalar step compares group ``gi`` at sampled positions."""
        return (
            self.ratio_sample is not None
            and not self.sharded
            and gi not in self.whole
            and gi not in self.sparse
        )

    def take(self, step: int) -> dict[int, float]:
        """Keeps the trainable weights (or their sample) as they are before the step.

        Returns the squared norms measured while copying, by ``id`` of the parameter.
        """
        items: list[_Item] = []
        measured: dict[int, float] = {}
        for gi, g in enumerate(self.groups):
            members = [p.param for p in g.params if p.param.requires_grad]
            flats = [_flat(p) for p in members]
            index: list[torch.Tensor] | None = None
            weight = 1.0
            if self.sampled(gi) and flats:
                assert self.ratio_sample is not None
                index, weight = self.sampler.positions(gi, flats, self.ratio_sample, ratio=True)
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
        for key in [k for k in self.buffers if k not in whole]:
            del self.buffers[key]
        self.snapshot = _Snapshot(step, items)
        return measured

    def sampled_groups(self) -> list[int]:
        """The groups the pending snapshot compares at sampled positions."""
        snap = self.snapshot
        return [] if snap is None else sorted({i[0] for i in snap.items if i[3] is not None})

    def _copy(self, param: nn.Parameter, flat: torch.Tensor) -> tuple[torch.Tensor, float | None]:
        """A copy of ``flat``, with its squared norm where the copy measured it.

        On the CPU the copy goes into a buffer kept between scalar steps (fresh 100 MB
        allocations cost page faults on every scalar step) and float32/float64 values
        are measured chunk by chunk as they are copied. Accelerators' caching allocators
        reuse memory anyway, so there the copy is released after the step.
        """
        if flat.device.type != "cpu":
            return flat.clone(), None
        buf = self.buffers.get(id(param))
        if buf is None or buf.shape != flat.shape or buf.dtype != flat.dtype:
            buf = torch.empty_like(flat)
            self.buffers[id(param)] = buf
        if flat.dtype in (torch.float32, torch.float64):
            return buf, copy_sumsq_cpu(flat, buf)
        return buf.copy_(flat), None

    def _scratch(self, dtype: torch.dtype) -> torch.Tensor:
        buf = self._scratch_buffers.get(dtype)
        if buf is None:
            buf = self._scratch_buffers[dtype] = torch.empty(_FUSED_CHUNK, dtype=dtype)
        return buf

    def ratios(self, device: torch.device) -> torch.Tensor | None:
        """The ratio per group of the pending snapshot's step (``None``: no snapshot)."""
        snap, self.snapshot = self.snapshot, None
        if snap is None:
            return None
        acc = torch.zeros(len(self.groups), 2, dtype=_acc_dtype(device), device=device)
        # Groups measured on the host (CPU tensors): summed here, added once.
        host = [[0.0, 0.0] for _ in self.groups]
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

    def drop(self) -> None:
        """Forgets the pending snapshot (a step that logs no ratio)."""
        self.snapshot = None

    def confirm_zeros(
        self, sampled: list[int], mask: list[bool], ratios: list[float], patience: int | None
    ) -> set[str]:
        """The groups whose ratio of 0 does not count as not training (yet).

        A sampled 0 is compared whole for the next ``patience`` checks, which either show
        the group stuck (the alert counts those; then it goes back to the sample) or show
        it moving: it trains sparsely and is compared whole from then on. A step where no
        group moved at all (a zero learning rate, a skipped step) starts no whole
        comparison: that would copy the whole model for nothing. ``patience=None``
        (no alerts) starts none either.
        """
        for gi in list(self.whole):
            if ratios[gi] > 0.0:
                self.sparse.add(gi)
                del self.whole[gi]
            else:
                self.whole[gi] -= 1
                if self.whole[gi] <= 0:
                    del self.whole[gi]
        zeros = [gi for gi in sampled if mask[gi] and ratios[gi] == 0.0]
        moved = any(mask[gi] and ratios[gi] > 0.0 for gi in range(len(ratios)))
        if patience is not None and moved:
            for gi in zeros:
                if gi not in self.sparse:
                    self.whole[gi] = patience
        return {self.groups[gi].name for gi in zeros}
