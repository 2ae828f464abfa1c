"""One validation mechanism for every configurable value: run-config keys and method knobs.

:func:`coerce_value` converts a value read from YAML, a ``--set KEY=VALUE`` string or a
Python call to the declared type and checks its allowed values and range, raising a
one-line :class:`~fss.errors.ConfigError` that names the key. ``pipeline.config`` (the run
config's sections) and :class:`fss.models.registry.Knob` (method knobs) both call it, so a
value is accepted or refused the same way wherever it is written.
"""

from __future__ import annotations

from typing import Any, Sequence

from fss.errors import ConfigError

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(value)


def coerce_scalar(value: Any, kind: type) -> Any:
    """``value`` as ``kind`` (bool, int, float or str); ValueError when it is not one."""
    if kind is bool:
        return _parse_bool(value)
    if isinstance(value, bool):  # True is an int in Python, never a number here
        raise ValueError(value)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if isinstance(value, (int, float)):
            return int(value)
        if isinstance(value, str):
            return int(value.strip())
        raise ValueError(value)
    if kind is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        raise ValueError(value)
    if kind is str:
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ValueError(value)
    raise ValueError(value)


def type_name(kind: type | None, item_kind: type | None = None) -> str:
    if kind is list:
        return f"list of {item_kind.__name__}" if item_kind else "list"
    if kind is bool:
        return "true or false"
    return "null" if kind is type(None) else getattr(kind, "__name__", str(kind))


def coerce_value(
    where: str,
    value: Any,
    kind: type,
    item_kind: type | None = None,
    *,
    optional: bool = False,
    choices: Sequence | None = None,
    low: float | None = None,
    high: float | None = None,
) -> Any:
    """``value`` converted to ``kind`` and checked, or a one-line ConfigError naming ``where``.

    ``kind`` list: a list or a ``"[a, b]"`` / ``"a,b"`` string whose items are coerced to
    ``item_kind`` (kept as they are when None). ``optional``: None (or "null"/"none") is
    allowed. ``choices`` and ``low``/``high`` (inclusive) apply to the value or each item.
    """
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none"))):
        return None
    try:
        if kind is list:
            if isinstance(value, str):
                value = [v for v in value.strip().strip("[]").split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError(value)
            out = [coerce_scalar(v, item_kind) if item_kind else v for v in value]
        else:
            out = coerce_scalar(value, kind)
    except (ValueError, TypeError):
        want = ("null or " if optional else "") + type_name(kind, item_kind)
        raise ConfigError(f"{where} must be {want}, got {value!r}.") from None
    items = out if isinstance(out, list) else [out]
    if choices is not None and any(i not in choices for i in items):
        raise ConfigError(f"{where} got {value!r}; choose one of: {', '.join(map(str, choices))}.")
    for i in items:
        if isinstance(i, (int, float)) and not isinstance(i, bool):
            if (low is not None and i < low) or (high is not None and i > high):
                bounds = f">= {low}" if high is None else (f"<= {high}" if low is None else f"in [{low}, {high}]")
                raise ConfigError(f"{where} got {value!r}; it must be {bounds}.")
    return out
