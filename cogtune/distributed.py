"""Process layout for multi-process runs (`torchrun`, `accelerate launch`), through accelerate.

accelerate detects CUDA launches by itself; a launch on machines without CUDA must ask for the
CPU explicitly, which then runs as N processes over gloo (how the tests exercise data parallelism).
"""

from __future__ import annotations

import os


def launched_processes() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def force_cpu() -> bool:
    """True for a multi-process launch on a machine without CUDA."""
    import torch

    return launched_processes() > 1 and not torch.cuda.is_available()


def process_state():
    """accelerate's `PartialState` for this process (initializes the process group when launched)."""
    from accelerate import PartialState

    return PartialState(cpu=force_cpu())
