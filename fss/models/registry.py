"""Method registry and knob validation.

A method registers itself with :func:`register_method`, naming its base method and
its knobs (each a :class:`Knob` with a default and the allowed values). The knob table is
the only place a knob's default is written: constructors take knobs as keyword-only
arguments without defaults (checked at registration), and :func:`create_model` fills them
in. Every method module is imported by :mod:`fss.models.methods` (listed there
explicitly), which importing any ``fss.models`` module runs first. The registry
builds models from a plain config, refusing unknown and out-of-range knobs with a
one-line :class:`~fss.errors.ConfigError`::

    @register_method("apanet", base="pfenet", knobs={**PFENET_KNOBS, "lam": Knob(0.5, ...)})
    class APANet(PFENet): ...

    model = create_model("apanet", backbone="small", shot=1, lam=0.3)

Every fact about a method lives here or in its module: its knobs (which of them only change
inference, ``Knob(test_time=True)``; the narrow CPU value the tests build it with,
``Knob(small=...)``; the paper table each reproduces), its display name in the results
tables (``register_method(display=...)``) and whether it learns anything (the class
attribute ``training_free``). The sweeps, the aggregate, the tests and the generated knob
tables of docs/methods.md (``fss methods --markdown``) read them from the registry.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from fss.coerce import coerce_value
from fss.errors import ConfigError

@dataclass(frozen=True)
class Knob:
    """One hyperparameter or component switch of a method.

    ``choices`` lists the allowed values (for strings, booleans, small integer sets);
    ``low``/``high`` bound numbers (inclusive). ``kind`` is the Python type the value is
    coerced to (``bool``, ``int``, ``float``, ``str``, ``list``). ``table`` names the
    paper table or figure the knob reproduces; ``help`` is one line for ``fss methods``.
    ``test_time`` marks a knob that only changes inference (no weight depends on it): a
    sweep of it re-evaluates a trained checkpoint instead of retraining. ``small`` is the
    value that keeps the method small enough for CPU tests (narrow heads on the small
    backbone; None: the default is small already).
    """

    default: Any
    kind: type
    help: str = ""
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    table: str = ""
    item_kind: type | None = None  # element type when kind is list
    test_time: bool = False
    small: Any = None

    def describe(self) -> dict:
        out: dict[str, Any] = {"default": self.default, "type": self.kind.__name__}
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.low is not None or self.high is not None:
            out["range"] = [self.low, self.high]
        if self.table:
            out["table"] = self.table
        if self.help:
            out["help"] = self.help
        if self.test_time:
            out["test_time"] = True
        return out

    def coerce(self, method: str, name: str, value: Any) -> Any:
        """Return ``value`` converted to this knob's type, or raise ConfigError."""
        return coerce_value(
            f"knob '{name}' of method '{method}'", value, self.kind, self.item_kind,
            choices=self.choices, low=self.low, high=self.high,
        )


def _constructor_defaults(cls, knobs: dict[str, Knob]) -> list[str]:
    """Knobs given a default by a constructor in ``cls``'s MRO (the knob table is the one place)."""
    found = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.name in knobs and p.default is not inspect.Parameter.empty:
                found.append(f"{klass.__name__}.{p.name}")
    return found


@dataclass
class MethodSpec:
    name: str
    base: str | None
    knobs: dict[str, Knob]
    builder: Callable[..., Any]
    help: str = ""
    backbones: tuple[str, ...] = field(default_factory=tuple)
    display: str = ""  # the method's row name in the results tables (default: its name)

    @property
    def training_free(self) -> bool:
        """True for a method with nothing to learn (the class attribute ``training_free``)."""
        return bool(self.builder.training_free)

    @property
    def test_time_knobs(self) -> frozenset[str]:
        """The knobs that only change inference (``Knob(test_time=True)``)."""
        return frozenset(k for k, knob in self.knobs.items() if knob.test_time)

    @property
    def small_knobs(self) -> dict[str, Any]:
        """The knob values that keep the method small for CPU tests (``Knob(small=...)``)."""
        return {k: knob.small for k, knob in self.knobs.items() if knob.small is not None}

    def describe(self) -> dict:
        return {
            "name": self.name,
            "base": self.base,
            "display": self.display,
            "help": self.help,
            "backbones": list(self.backbones),
            "training_free": self.training_free,
            "knobs": {k: v.describe() for k, v in self.knobs.items()},
        }


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    *,
    base: str | None,
    knobs: dict[str, Knob],
    help: str = "",
    backbones: tuple[str, ...] = (),
    display: str = "",
):
    """Class decorator adding a method to the registry under ``name`` (``display``: its row
    name in the results tables, default ``name``)."""

    def deco(cls):
        if name in _REGISTRY:
            raise RuntimeError(f"method {name!r} registered twice")
        duplicated = _constructor_defaults(cls, knobs)
        if duplicated:
            raise RuntimeError(
                f"method {name!r}: {', '.join(duplicated)} repeat a knob default in the constructor; "
                "remove it there, the knob table is the one place for defaults."
            )
        doc = (cls.__doc__ or "").strip()
        summary = help or (doc.splitlines()[0] if doc else "")
        for knob_name, knob in knobs.items():
            if knob.small is not None:
                knob.coerce(name, knob_name, knob.small)  # a small value out of range fails at import
        _REGISTRY[name] = MethodSpec(name, base, dict(knobs), cls, summary, tuple(backbones), display or name)
        cls.method_name = name
        return cls

    return deco


def list_methods() -> list[str]:
    return sorted(_REGISTRY)


def training_free_methods() -> tuple[str, ...]:
    """The registered methods with nothing to learn (the results tables' floor rows)."""
    return tuple(n for n in list_methods() if _REGISTRY[n].training_free)


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown method {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}."
        )
    return _REGISTRY[name]


def resolve_knobs(name: str, knobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults of method ``name`` overridden by ``knobs``, validated and coerced."""
    spec = get_method(name)
    knobs = dict(knobs or {})
    unknown = sorted(set(knobs) - set(spec.knobs))
    if unknown:
        raise ConfigError(
            f"method '{name}' has no knob {', '.join(repr(u) for u in unknown)}; "
            f"its knobs are: {', '.join(sorted(spec.knobs)) or '(none)'}."
        )
    out = {}
    for k, knob in spec.knobs.items():
        out[k] = knob.coerce(name, k, knobs[k]) if k in knobs else knob.default
    return out


def create_model(
    name: str,
    *,
    backbone: str = "small",
    shot: int = 1,
    backbone_weights: str | None = None,
    fg_weight: float = 1.0,
    **knobs: Any,
):
    """Build method ``name`` with the given backbone, shot and knobs.

    ``fg_weight`` is the loss's weight of foreground pixels in the segmentation CE
    (``train.fg_weight``; 1 = the papers' plain CE): a constructor argument of every method,
    so that training and ``fss bench`` build the same loss.
    """
    spec = get_method(name)
    if spec.backbones and backbone not in spec.backbones:
        raise ConfigError(
            f"method '{name}' does not support backbone {backbone!r}; "
            f"choose one of: {', '.join(spec.backbones)}."
        )
    if not isinstance(shot, int) or shot < 1:
        raise ConfigError(f"shot must be a positive integer, got {shot!r}.")
    if isinstance(fg_weight, bool) or not isinstance(fg_weight, (int, float)) or not fg_weight >= 0:
        raise ConfigError(f"fg_weight must be a number >= 0 (train.fg_weight), got {fg_weight!r}.")
    resolved = resolve_knobs(name, knobs)
    return spec.builder(backbone=backbone, shot=shot, backbone_weights=backbone_weights,
                        fg_weight=float(fg_weight), **resolved)
