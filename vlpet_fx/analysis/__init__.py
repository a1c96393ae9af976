"""Stage 2 — analysis: find attention/FFN blocks, residual streams, stacks and layers; emit sites."""

from .discover import count_params, discover
from .sites import BLOCKS, ROLES, STACKS, Site, SiteTable

__all__ = ["discover", "count_params", "Site", "SiteTable", "STACKS", "BLOCKS", "ROLES"]
