"""Error types. Every error a user can cause is a :class:`VlpetError` with a one-line message
that names the problem and the fix; the CLI prints it and exits with status 2."""

from __future__ import annotations


class VlpetError(Exception):
    """Base class of all user-facing errors of vlpet-fx."""


class CaptureError(VlpetError):
    """The model could not be captured as a torch.fx graph."""


class ModelSpecError(VlpetError):
    """A model specification (built-in name, directory, ``module:factory``) could not be resolved."""


class DiscoveryError(VlpetError):
    """The captured graph holds no recognisable transformer structure."""


class MethodConfigError(VlpetError):
    """A PET method's parameters are wrong (unknown key, wrong type, or a shape that does not fit the site)."""


class RulesError(VlpetError):
    """A rule set is invalid (message starts with 'file:line: key:') or does not fit the model."""


class PlanError(VlpetError):
    """A plan cannot be applied (e.g. a site that is not a module output, with the eager back end)."""


class ExportError(VlpetError):
    """A patched model cannot be written or read back in the requested format."""
