"""What every rank must agree on: a non-finite step, and an alert that ends training.

Under ``torch.distributed`` a rank that skips a step or stops alone leaves the others
waiting in their next collective, so both decisions are taken together: one small
``all_reduce`` per checked step (the non-finite flags of every rank) and one per scalar
step when an alert can end training (only the rank that writes runs most detectors).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tbx_lightning.monitor._alerts import Alert, AlertEngine

__all__ = ["KINDS", "agree_on_action", "collective_device", "distributed", "nonfinite_per_rank"]

# Alert kinds by index, for agreeing on one across ranks with a single number.
KINDS = (
    "nonfinite_loss",
    "nonfinite_grads",
    "nonfinite_weights",
    "loss_spike",
    "grad_explosion",
    "vanishing_update",
    "not_training",
    "update_ratio_high",
    "lr_zero",
    "lr_jump",
    "lr_out_of_range",
    "straggler",
)


def distributed(process_group: Any = None) -> bool:
    """Whether ``torch.distributed`` runs with more than one rank."""
    dist = torch.distributed
    return bool(
        dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1
    )


def collective_device(process_group: Any, device: torch.device) -> torch.device:
    """Where a collective's tensor lives: ``device`` for NCCL, the CPU for gloo and others."""
    gloo = torch.distributed.get_backend(process_group) != "nccl"
    return torch.device("cpu") if gloo else device


def nonfinite_per_rank(
    grads: list[torch.Tensor],
    loss: float | torch.Tensor | None,
    device: torch.device,
    process_group: Any = None,
) -> list[list[float]]:
    """``[[grads bad, loss bad], ...]`` per rank: whether each rank saw NaN/Inf.

    The L2 norm of each gradient, accumulated in float32 (so half-precision gradients
    cannot overflow it), is NaN/Inf exactly when the gradient holds NaN/Inf;
    ``_foreach_norm`` computes all of them in one multi-tensor pass (the max-abs norm
    is several times slower on the CPU). Every rank's two flags are summed into one
    small tensor, read once.
    """
    flags = torch.zeros(2, dtype=torch.float32, device=device)
    if grads:
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        flags[0] = (~torch.isfinite(torch.stack(list(norms)))).any().float()
    if isinstance(loss, torch.Tensor):
        flags[1] = (~torch.isfinite(loss.detach().reshape(()).float())).float().to(device)
    elif loss is not None and not math.isfinite(float(loss)):
        flags[1] = 1.0
    if not distributed(process_group):
        return [flags.tolist()]
    dist = torch.distributed
    world = dist.get_world_size(process_group)
    shared = torch.zeros(
        world, 2, dtype=torch.float32, device=collective_device(process_group, device)
    )
    shared[dist.get_rank(process_group)] = flags.to(shared.device)
    dist.all_reduce(shared, group=process_group)
    return shared.tolist()  # type: ignore[no-any-return]


def agree_on_action(
    checks: AlertEngine, step: int, device: torch.device, process_group: Any = None
) -> None:
    """Makes ``checks.action`` (and its trigger) the same on every rank.

    The rank that found an alert sends its action and kind; the others take them,
    with a trigger that says another rank found it.
    """
    dist = torch.distributed
    code = torch.zeros(2, dtype=torch.float32, device=collective_device(process_group, device))
    if checks.action is not None and checks.trigger is not None:
        code[0] = 2.0 if checks.action == "raise" else 1.0
        kind = checks.trigger.kind
        code[1] = float(KINDS.index(kind) + 1) if kind in KINDS else 0.0
    dist.all_reduce(code, op=dist.ReduceOp.MAX, group=process_group)
    action, kind_index = (int(v) for v in code.tolist())
    if action and checks.action is None:
        name = KINDS[kind_index - 1] if kind_index else "alert"
        checks.trigger = Alert(
            step,
            name,
            "",
            math.nan,
            math.nan,
            f"{name} found by another rank at step {step}: see the run's alerts entry",
        )
        checks.action = "raise" if action == 2 else "stop"
