"""Planning: rules resolved against a site table, without touching the model."""

from .plan import Placement, Plan, plan
from .select import match_modules, match_sites, stack_roots

__all__ = ["Placement", "Plan", "plan", "match_modules", "match_sites", "stack_roots"]
