"""vlpet-fx: an adapter-insertion compiler for vision-and-language encoder-decoder models.

Pipeline: capture (torch.export → torch.fx graph) → analysis (sites from dataflow) → rules (YAML
placements) → planner (rule → site → method) → passes (eager module surgery or graph rewrite) → export.
"""

from .analysis import Site, SiteTable, count_params, discover
from .analysis.patterns import register_pattern, unregister_pattern
from .capture import Captured, capture, register_example_inputs
from .errors import (CaptureError, DiscoveryError, ExportError, ModelSpecError, PlanError, RulesError,
                     VlpetError)
from .modules import MethodConfigError, PetModule, list_methods, register_pet
from .planner import Placement, Plan, plan
from .rules import RuleSet, load_rules, shipped_rule_names
from .api import Summary, patch, patch_graph, summary
from .export import load
from .infer import evaluate, predict

__version__ = "0.1.0"

__all__ = [
    "capture", "discover", "load_rules", "plan", "patch", "patch_graph", "summary", "load", "register_pet",
    "register_example_inputs", "register_pattern", "unregister_pattern", "predict", "evaluate", "list_methods",
    "shipped_rule_names",
    "Captured", "Site", "SiteTable", "RuleSet", "Plan", "Placement", "PetModule", "Summary", "count_params",
    "VlpetError", "CaptureError", "DiscoveryError", "ModelSpecError", "RulesError", "PlanError", "ExportError",
    "MethodConfigError", "__version__",
]
