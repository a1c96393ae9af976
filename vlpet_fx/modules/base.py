"""The contract every PET method implements, and the registry that maps method names to it.

A PET method is a module built for one site, ``Method(in_features, out_features, config)``, where the site
turns an input ``x`` (in_features) into a value ``y`` (out_features). It says how it changes that value:

* ``after(y)``       -- placed *after* the site (sequential): returns the new ``y``;
* ``parallel(x, y)`` -- placed *in parallel* to the site: returns the new ``y`` from the site's input and output.

A method lists the placements it supports. Forwards never branch on module state (``torch.compile`` with
``fullgraph=True`` must see one graph); choices made by the config are resolved in ``__init__``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import MethodConfigError

PLACEMENTS = ("after", "parallel")


@dataclass
class MethodConfig:
    """Base of every method's config dataclass."""


class PetModule(nn.Module):
    """Base class of PET modules (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    placements: ClassVar[tuple[str, ...]] = PLACEMENTS
    inserts_module: ClassVar[bool] = True  # False for `none` (full fine-tuning of the site's own module)
    mergeable: ClassVar[bool] = False  # a linear re-parameterisation that can be folded into the base weight

    def __init__(self, in_features: int, out_features: int, config: MethodConfig, placement: str = "after"):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        self.placement = placement
        # what the module reads: the site's output (after) or its input (parallel)
        self.read_features = out_features if placement == "after" else in_features

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Calling the module applies it as an ``after`` placement."""
        return self.after(y)

    def delta(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def after(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.delta(y)

    def delta_weight(self) -> torch.Tensor:
        """For ``mergeable`` methods: the (out, in) matrix the module adds to its site's linear weight."""
        raise NotImplementedError(f"method '{self.name}' is not a linear re-parameterisation")

    def parallel(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.delta(x)

    @classmethod
    def check_fits(cls, in_features: int, out_features: int, placement: str, config: MethodConfig) -> None:
        """Raise MethodConfigError (one line) if the method cannot be placed on a site of this shape."""
        if placement not in cls.placements:
            raise MethodConfigError(
                f"method '{cls.name}' cannot be placed '{placement}': it supports {', '.join(cls.placements)}"
            )
        cls.check_shape(out_features if placement == "after" else in_features, out_features, config)

    @classmethod
    def check_shape(cls, read_features: int, out_features: int, config: MethodConfig) -> None:
        """Method-specific shape checks (override)."""

    @classmethod
    def count(cls, in_features: int, out_features: int, placement: str, config: MethodConfig) -> int:
        """Number of parameters this method adds on one site (built on the meta device, no memory)."""
        if not cls.inserts_module:
            return 0
        with torch.device("meta"):
            mod = cls(in_features, out_features, config, placement=placement)
        return sum(p.numel() for p in mod.parameters())


@dataclass(frozen=True)
class MethodEntry:
    name: str
    module: type[PetModule]
    config: type[MethodConfig]


_METHODS: dict[str, MethodEntry] = {}


def register_pet(name: str) -> Callable[[type[PetModule]], type[PetModule]]:
    """Register a PET method under ``name`` so rule sets can use it (``type: name``).

    The class must subclass :class:`PetModule` and set ``config_class`` to a dataclass of its parameters.
    """

    def deco(cls: type[PetModule]) -> type[PetModule]:
        if not (isinstance(cls, type) and issubclass(cls, PetModule)):
            raise TypeError(f"@register_pet('{name}') needs a PetModule subclass, got {cls!r}")
        if not dataclasses.is_dataclass(cls.config_class):
            raise TypeError(f"{cls.__name__}.config_class must be a dataclass")
        cls.name = name
        _METHODS[name] = MethodEntry(name, cls, cls.config_class)
        return cls

    return deco


def get_method(name: str) -> MethodEntry:
    if name not in _METHODS:
        raise MethodConfigError(f"unknown PET method '{name}': known methods are {', '.join(sorted(_METHODS))} "
                                "(register your own with @vlpet_fx.register_pet)")
    return _METHODS[name]


def list_methods() -> list[str]:
    return sorted(_METHODS)


def make_config(method: str, params: dict[str, Any]) -> MethodConfig:
    """Build a method's config dataclass from a plain dict, rejecting unknown keys and wrong types."""
    entry = get_method(method)
    fields = {f.name: f for f in dataclasses.fields(entry.config)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise MethodConfigError(
            f"method '{method}' has no parameter '{unknown[0]}': its parameters are {', '.join(fields) or '(none)'}"
        )
    import pydantic

    try:
        return pydantic.TypeAdapter(entry.config).validate_python(dict(params))
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise MethodConfigError(f"method '{method}' parameter '{where}': {err['msg']}") from None


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise MethodConfigError(f"unknown activation '{name}': choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def bottleneck(features: int, dim: int | None, reduction: float | None, what: str) -> int:
    """The bottleneck width: ``dim`` if given, else ``features // reduction``."""
    r = dim if dim is not None else int(features // (reduction or 1))
    if r < 1:
        raise MethodConfigError(f"{what}: bottleneck width {r} < 1 for {features} features; lower `reduction` or set `dim`")
    return r
