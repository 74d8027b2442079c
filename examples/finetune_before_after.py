"""Fine-tuning, before and after: train quickstart, then fine-tune a new head on its backbone.

Run ``python examples/finetune_before_after.py``. It is the same as::

    tbx-lightning fit quickstart
    tbx-lightning fit finetune        # model.ckpt_path finds runs/quickstart/.../last.ckpt

In TensorBoard's Projector tab, the tag ``embeddings/finetune_head`` has two tensors:
``:00000000`` (before fine-tuning, the frozen features through a random head) and the
last step (after): colour by label to see the classes separate.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tbx_lightning.cli import main as tbx_lightning


def main(extra: Sequence[str] = ()) -> int:
    """Runs both experiments with the same extra overrides; returns the exit status."""
    for experiment in ("quickstart", "finetune"):
        code = tbx_lightning(["fit", experiment, *extra])
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
