"""Backbones, shared blocks and the methods.

Importing this package imports :mod:`fss.models.methods`, whose modules register every
method with :func:`fss.models.registry.register_method`; the registry functions below then
see all of them.
"""

from fss.models import methods  # noqa: F401  (registers the methods)
from fss.models.registry import create_model, get_method, list_methods, resolve_knobs

__all__ = ["create_model", "get_method", "list_methods", "resolve_knobs"]
