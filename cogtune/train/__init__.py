"""The training engine: `run_training(TrainConfig)`."""

from cogtune.train.config import TrainConfig
from cogtune.train.loop import run_training

__all__ = ["TrainConfig", "run_training"]
