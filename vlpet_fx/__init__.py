"""vlpet-fx: an adapter-insertion compiler for vision-and-language encoder-decoder models.

Pipeline: capture (torch.export → torch.fx graph) → analysis (sites from dataflow) → rules (YAML
placements) → passes (eager module surgery or graph rewrite) → back ends (export formats).
"""

from .analysis import Site, SiteTable, count_params, discover
from .capture import Captured, capture, register_example_inputs
from .errors import CaptureError, DiscoveryError, ModelSpecError, VlpetError

__version__ = "0.1.0"

__all__ = [
    "capture", "discover", "register_example_inputs", "Captured", "Site", "SiteTable", "count_params",
    "VlpetError", "CaptureError", "DiscoveryError", "ModelSpecError", "__version__",
]
