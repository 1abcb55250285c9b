"""What the launcher (`accelerate launch`, `torchrun`) tells each process in its environment.

Light (no torch): the reporting layer reads it when imported, and a recipe asks it before anything
loads (which process locks the output folder, which one sizes the run). Once a recipe has its
`Accelerator`, accelerate's `is_main_process` says the same.
"""

from __future__ import annotations

import os


def is_main_launch_process() -> bool:
    """Whether this is the main process of a launch (or no launch): rank 0 in the launcher's variables."""
    return int(os.environ.get("RANK", "0")) == 0


def launched_processes() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def processes_on_this_machine() -> int:
    """How many processes the launcher started on this machine (`LOCAL_WORLD_SIZE`; 1 without a launcher)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
