"""The few-shot segmentation methods, one module each.

Each module registers its method(s) with :func:`fss.models.registry.register_method` when
imported. The list below is the whole registry: adding a method is adding its module here
and one import line (an explicit list, as timm does, so that a helper module is never
mistaken for a method).
"""

from fss.models.methods import apanet, canet, celp, dpnet, panet, pfenet, prototype, simpropnet

__all__ = ["apanet", "canet", "celp", "dpnet", "panet", "pfenet", "prototype", "simpropnet"]
