"""The training engine: `run_training(TrainConfig)`.

Importing the package (or its config) stays light, so that the CLI can read the settings' fields
for `--help` without loading torch; `run_training` is imported on first use.
"""

from typing import Any

from cogtune.train.config import TrainConfig

__all__ = ["TrainConfig", "run_training"]


def __getattr__(name: str) -> Any:
    if name == "run_training":
        from cogtune.train.loop import run_training

        return run_training
    raise AttributeError(f"module 'cogtune.train' has no attribute {name!r}")
