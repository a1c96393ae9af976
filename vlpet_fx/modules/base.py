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
import functools
import math
import re
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import pydantic
import torch
from pydantic import PlainValidator
from pydantic.dataclasses import dataclass as pydantic_dataclass
from torch import nn

from .._text import shown
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
        # widths given relative to the site become absolute here too (the planner already resolved a plan's)
        self.config = type(self).resolve(in_features, out_features, placement, config)
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
    def resolve(cls, in_features: int, out_features: int, placement: str, config: MethodConfig) -> MethodConfig:
        """``config`` with every layer width an absolute integer for a site of this shape: relative widths
        (:class:`RelativeWidth`, ``reduction``) resolved by :func:`resolve_width`'s rounding, each checked by
        :func:`check_width`. The planner records the result, so a saved plan names the widths it built.
        Methods that create layers of their own width override this; it must be idempotent."""
        return config

    @classmethod
    def check_fits(cls, in_features: int, out_features: int, placement: str, config: MethodConfig) -> None:
        """Raise MethodConfigError (one line) if the method cannot be placed on a site of this shape."""
        if placement not in cls.placements:
            raise MethodConfigError(
                f"method '{cls.name}' cannot be placed '{placement}': it supports {', '.join(cls.placements)}"
            )
        config = cls.resolve(in_features, out_features, placement, config)
        cls.check_shape(out_features if placement == "after" else in_features, out_features, config)

    @classmethod
    def check_config(cls, config: MethodConfig) -> None:
        """Method-specific checks of the parameters alone, before any site is known (override): signs,
        ranges, names. Raise MethodConfigError (one line)."""

    @classmethod
    def check_shape(cls, read_features: int, out_features: int, config: MethodConfig) -> None:
        """Method-specific shape checks against the site (override): widths bounded by the site's
        features (see :func:`check_width`), divisibility. Runs at plan time, before anything is built."""

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


MAX_WIDTH = 1 << 16  # the widest layer a method may create (bottleneck, rank, gate width), whatever the site
WIDTH_FACTOR = 4  # ... and at most this multiple of the features it reads
MAX_INT = 1 << 31  # |integer parameter|


@functools.lru_cache(maxsize=None)
def _strict_model(config_class: type) -> type[pydantic.BaseModel]:
    """A strict pydantic model of a config dataclass: no coercion (``true`` is not 1, ``"4"`` is not 4) and
    no NaN/inf for float fields."""
    try:
        hints = typing.get_type_hints(config_class, include_extras=True)
    except Exception:  # an annotation that does not resolve: validate the field as any value
        hints = {}
    spec = {}
    for f in dataclasses.fields(config_class):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = pydantic.Field(default_factory=f.default_factory)
        else:
            default = ...
        spec[f.name] = (hints.get(f.name, Any), default)
    return pydantic.create_model(f"{config_class.__name__}Params", __config__=pydantic.ConfigDict(
        strict=True, extra="forbid", allow_inf_nan=False, arbitrary_types_allowed=True), **spec)


def _check_numbers(method: str, name: str, value: Any) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise MethodConfigError(f"method '{method}' parameter '{name}': {value} is not a finite number")
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise MethodConfigError(f"method '{method}' parameter '{name}': {value} is out of range (|value| <= 2**31)")
    if isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            _check_numbers(method, name, v)
    if isinstance(value, dict):
        for v in value.values():
            _check_numbers(method, name, v)


def make_config(method: str, params: dict[str, Any]) -> MethodConfig:
    """Build a method's config dataclass from a plain dict, rejecting unknown keys, wrong types (strictly: no
    bool for an int, no string for a number), non-finite numbers and values the method's ``check_config``
    refuses."""
    entry = get_method(method)
    fields = {f.name: f for f in dataclasses.fields(entry.config) if f.init}
    if not isinstance(params, dict):
        raise MethodConfigError(f"method '{method}' parameters must be a mapping, not {type(params).__name__}")
    unknown = sorted((k for k in params if k not in fields), key=str)
    if unknown:
        raise MethodConfigError(
            f"method '{method}' has no parameter '{shown(unknown[0], 40)}': its parameters are "
            f"{', '.join(fields) or '(none)'}"
        )
    try:
        checked = _strict_model(entry.config).model_validate(dict(params))
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"][:1])
        msg = err["msg"].removeprefix("Value error, ")
        raise MethodConfigError(f"method '{method}' parameter '{shown(where, 40)}': {shown(msg, 200)}") from None
    values = {name: getattr(checked, name) for name in fields}
    for name, value in values.items():
        _check_numbers(method, name, value)
    try:
        config = entry.config(**values)
    except (TypeError, ValueError) as exc:
        raise MethodConfigError(f"method '{method}': {shown(str(exc), 160)}") from None
    entry.module.check_config(config)
    return config


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
        raise MethodConfigError(f"unknown activation '{shown(name, 40)}': choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


RELATIVE_FORMS = "a relative width: {of_site: 0.125} or '1/8' of the site's features"
_FRACTION = re.compile(r"^\s*(\d{1,7})\s*/\s*(\d{1,7})\s*$")


@pydantic_dataclass(frozen=True, config=pydantic.ConfigDict(strict=True, extra="forbid", allow_inf_nan=False))
class RelativeWidth:
    """A layer width given as a fraction of the features of the site it is built on (0 < of_site <= 1).
    Written ``{of_site: 0.125}`` or ``'1/8'`` in a rule set; resolved per site by :func:`resolve_width`."""

    of_site: float

    def __post_init__(self):
        if not 0.0 < self.of_site <= 1.0:
            raise ValueError(_bad_fraction(self.of_site))


def _bad_fraction(value) -> str:
    return (f"a relative width is a fraction of the site in (0, 1], not {shown(value, 40)}: a layer wider than "
            "its site is not a bottleneck (give an absolute width for that, at most 4 x the site)")


def parse_width(value: Any) -> "int | RelativeWidth":
    """A width parameter as a rule set gives it: an integer (absolute), ``{of_site: fraction}`` or the string
    ``'p/q'`` (relative). Anything else (``true``, ``96.0``, ``'96'``) is a ValueError of one line."""
    if isinstance(value, RelativeWidth) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str):
        m = _FRACTION.match(value)
        if m is None:
            raise ValueError(f"Input should be a valid integer (an absolute width) or {RELATIVE_FORMS}; "
                             f"{shown(repr(value), 40)} is neither")
        p, q = int(m.group(1)), int(m.group(2))
        if q == 0 or p == 0 or p > q:
            raise ValueError(_bad_fraction(value))
        return RelativeWidth(p / q)
    if isinstance(value, dict):
        if set(value) != {"of_site"}:
            extra = sorted((k for k in value if k != "of_site"), key=str)
            raise ValueError(f"a relative width has the one key `of_site`"
                             + (f", not '{shown(extra[0], 30)}'" if extra else ", which is missing"))
        f = value["of_site"]
        if isinstance(f, bool) or not isinstance(f, (int, float)):
            raise ValueError(f"of_site: a relative width's fraction is a number in (0, 1], not {shown(repr(f), 40)}")
        if not math.isfinite(f) or not 0 < f <= 1:
            raise ValueError(_bad_fraction(f))
        return RelativeWidth(float(f))
    raise ValueError(f"Input should be a valid integer (an absolute width) or {RELATIVE_FORMS}, not "
                     f"{shown(repr(value), 40)}")


# the type of a width parameter in a method's config dataclass (``dim: Width | None = None``)
Width = typing.Annotated[typing.Union[int, RelativeWidth], PlainValidator(parse_width)]


def check_width(width: int, features: int, what: str) -> int:
    """A layer width a method creates on a site that reads ``features``: 1 <= width <= min(WIDTH_FACTOR *
    features, MAX_WIDTH). Checked at plan time, so an absurd width never reaches an allocation."""
    cap = min(WIDTH_FACTOR * features, MAX_WIDTH)
    if width < 1:
        raise MethodConfigError(f"{what} {width} < 1 for {features} features; lower `reduction` or set `dim`")
    if width > cap:
        raise MethodConfigError(f"{what} {width} is too wide for a site of {features} features: at most {cap} "
                                f"(= min({WIDTH_FACTOR} x features, {MAX_WIDTH}))")
    return width


def resolve_width(width: "int | RelativeWidth", features: int, what: str, multiple: int = 1) -> int:
    """An absolute width for a site of ``features``: an integer as given; a relative width rounded to the
    nearest multiple of ``multiple`` (halves up), at least ``multiple``:
    ``max(m, m * floor(features * of_site / m + 1/2))``. Then bounded by :func:`check_width`."""
    if isinstance(width, RelativeWidth):
        m = max(1, int(multiple))
        width = max(m, m * math.floor(features * width.of_site / m + 0.5))
    return check_width(width, features, what)


def bottleneck(features: int, dim: "int | RelativeWidth | None", reduction: float | None, what: str,
               multiple: int = 1) -> int:
    """The bottleneck width: ``dim`` if given (absolute, or relative to ``features``), else
    ``features / reduction``; relative widths are rounded by :func:`resolve_width` (to a multiple of
    ``multiple``) and every width is bounded by :func:`check_width`."""
    if dim is None:
        if not reduction or not math.isfinite(reduction) or reduction < 1:
            raise MethodConfigError(f"{what}: reduction {reduction} gives no usable bottleneck width; set `dim` "
                                    "or a reduction >= 1")
        dim = RelativeWidth(1.0 / reduction)
    return resolve_width(dim, features, f"{what}: bottleneck width", multiple)


def check_reduction(method: str, reduction: float) -> None:
    """``reduction`` (width = features / reduction) must be at least 1: a smaller one is wider than the site."""
    if reduction < 1:
        raise MethodConfigError(f"method '{method}' parameter 'reduction': must be >= 1 (width = features / "
                                f"reduction), got {reduction}; for a layer wider than its site give an absolute `dim`")


def check_positive(method: str, **values) -> None:
    """Each given value (a number, or None for unset) must be > 0 (a relative width is bounded by its type)."""
    for name, v in values.items():
        if v is not None and not isinstance(v, RelativeWidth) and not v > 0:
            raise MethodConfigError(f"method '{method}' parameter '{name}': must be > 0, got {v}")
