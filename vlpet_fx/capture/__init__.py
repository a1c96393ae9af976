"""Stage 1 — capture: any ``nn.Module`` → a torch.fx graph with maps back to modules and parameters."""

from .captured import Captured
from .inputs import build_example_inputs, register_example_inputs
from .tracer import capture

__all__ = ["Captured", "capture", "build_example_inputs", "register_example_inputs"]
