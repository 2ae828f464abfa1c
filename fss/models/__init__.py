"""Backbones, shared blocks and the methods.

Every module in this package that defines a method registers it with
:func:`fss.models.registry.register_method`; importing this package imports them all,
so adding a method is adding one file here.
"""

import importlib
import pkgutil

from fss.models.registry import create_model, get_method, list_methods, resolve_knobs

_NOT_METHODS = {"base", "registry", "blocks", "backbones", "checkpoints"}

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in _NOT_METHODS and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["create_model", "get_method", "list_methods", "resolve_knobs"]
