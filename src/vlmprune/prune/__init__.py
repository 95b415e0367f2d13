"""Structural pruning of the language backbone: widths (heads, MLP channels) and depth (layers).

``vlmprune.prune`` is this package and also the stage's verb: calling it runs
:func:`vlmprune.prune.run.prune` (``vlmprune.prune(model=..., output=..., method=..., ratio=...)``).
"""

import sys
import types

from vlmprune.summary import layer_shapes
from vlmprune.surgery.apply import apply_plan_

__all__ = ["apply_plan_", "layer_shapes"]


class _CallablePackage(types.ModuleType):
    def __call__(self, config=None, **options):
        from vlmprune.prune.run import prune

        return prune(config, **options)


sys.modules[__name__].__class__ = _CallablePackage
