"""Training: multi-task runs of patched VL models (Accelerate), metrics, checkpoints."""

from .config import TrainConfig, TrainConfigError, TrainError
from .loop import Trainer, train

__all__ = ["TrainConfig", "TrainConfigError", "TrainError", "Trainer", "train"]
