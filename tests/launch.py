"""Multi-process runs on the CPU, started the way users start them."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.tbserver import free_port


def accelerate_launch(script: str | Path, *args: str, processes: int = 2) -> list[str]:
    """The ``accelerate launch`` command line for ``processes`` gloo ranks on this machine.

    ``accelerate launch --cpu --num_processes 2`` starts one process unless MPI is set
    up; ``--multi_gpu`` with ``ACCELERATE_USE_CPU=true`` in the environment starts
    torchrun processes on the CPU, which is what the tests need.
    """
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(script),
        *args,
    ]
