"""The Trainer's log keys under the tag names of the other routes.

``Trainer.log`` hands callbacks flat dicts: the training loss and friends at each
logging step, ``eval_*`` after an evaluation, ``train_*`` once at the end of
``train()``, and whatever a subclass adds (TRL's ``entropy``, ``mean_token_accuracy``,
``rewards/chosen``, ``kl``, ...). They become the tags the Lightning and Accelerate
routes write for the same things:

========================================  ==========================================
Trainer key                               tag
========================================  ==========================================
``loss``                                  ``train/loss``
``eval_<name>`` / ``test_<name>``         ``eval/<name>`` / ``test/<name>``
``epoch``                                 ``trainer/epoch`` (as ``TBXLogger``'s ``epoch_tag``)
``learning_rate``                         ``vitals/lr/group_0``
``grad_norm``                             ``vitals/grad_norm_total`` (before clipping)
``train_loss`` (the mean of a ``train()``)  ``train/loss_mean``
``train_<name>``, ``total_flos``          ``train/<name>``, ``train/total_flos``
any other ``<name>`` (TRL's metrics)      ``train/<name>``
a key under ``train/``, ``eval/``, ...    as it is
========================================  ==========================================

``learning_rate`` and ``grad_norm`` are left to the training monitor where it measures
them itself (the same values, on its own steps): :func:`trainer_tags` takes the keys
to leave out.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from tbx_lightning.errors import LoggedValueError

__all__ = ["EPOCH_TAG", "KEPT_PREFIXES", "tag_of", "trainer_tags"]

EPOCH_TAG = "trainer/epoch"
# Keys already shaped like this package's tags pass through unchanged.
KEPT_PREFIXES = ("train/", "eval/", "test/", "val/", "vitals/", "vitals_layers/", "trainer/")

_FIXED = {
    "loss": "train/loss",
    "epoch": EPOCH_TAG,
    "learning_rate": "vitals/lr/group_0",
    "grad_norm": "vitals/grad_norm_total",
    "train_loss": "train/loss_mean",
    "total_flos": "train/total_flos",
}
_SPLITS = (("eval_", "eval/"), ("test_", "test/"), ("train_", "train/"))


def tag_of(key: str) -> str:
    """The tag of one Trainer log key.

    Args:
        key: A key of the dict the Trainer passes to ``on_log``.

    Example:
        >>> [tag_of(k) for k in ("loss", "eval_loss", "epoch", "mean_token_accuracy")]
        ['train/loss', 'eval/loss', 'trainer/epoch', 'train/mean_token_accuracy']
        >>> tag_of("eval_rewards/chosen"), tag_of("train_runtime"), tag_of("val/acc")
        ('eval/rewards/chosen', 'train/runtime', 'val/acc')
    """
    fixed = _FIXED.get(key)
    if fixed is not None:
        return fixed
    if key.startswith(KEPT_PREFIXES):
        return key
    for prefix, split in _SPLITS:
        if key.startswith(prefix) and len(key) > len(prefix):
            return split + key[len(prefix) :]
    return f"train/{key}"


def trainer_tags(logs: Mapping[str, Any], *, leave_out: Collection[str] = ()) -> dict[str, Any]:
    """``logs`` keyed by tag; ``None`` values (a metric with no value in the interval) and
    the keys in ``leave_out`` are not written.

    Example:
        >>> trainer_tags({"loss": 1.5, "grad_norm": 0.3, "epoch": 0.5, "kl": None},
        ...              leave_out={"grad_norm"})
        {'train/loss': 1.5, 'trainer/epoch': 0.5}
    """
    out: dict[str, Any] = {}
    keys: dict[str, str] = {}
    for key, value in logs.items():
        if value is None or key in leave_out:
            continue
        if not isinstance(key, str):
            out[key] = value  # the run names it in its error
            continue
        tag = tag_of(key)
        if tag in keys:
            raise LoggedValueError(
                f"The Trainer's log keys {keys[tag]!r} and {key!r} both map to the tag {tag!r}: "
                "rename one of them where it is logged."
            )
        keys[tag] = key
        out[tag] = value
    return out
