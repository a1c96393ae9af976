"""Training: multi-task runs of patched VL models (Accelerate), metrics, checkpoints."""

from .config import TrainConfig
from .loop import Trainer, train

__all__ = ["TrainConfig", "Trainer", "train"]
