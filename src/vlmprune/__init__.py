"""vlmprune: structural pruning and cheap recovery of vision-language models.

The public verbs load lazily (``import vlmprune`` imports neither torch nor transformers until a
verb is used), so the command line starts fast.
"""

from __future__ import annotations

import importlib

from vlmprune import quiet
from vlmprune.errors import DataError, PlanError, UnsupportedModelError, VlmpruneError

# Before anything of the package imports torch or transformers: the third-party import-time notes vlmprune.quiet
# lists (each with why it says nothing to a vlmprune user) are dropped on the loggers that emit them.
quiet.install()

__version__ = "0.1.0"

_LAZY = {
    "get_adapter": "vlmprune.adapters",
    "supported_model_types": "vlmprune.adapters",
    "count_parameters": "vlmprune.summary",
    "summarize": "vlmprune.summary",
    "load": "vlmprune.checkpoint",
    "load_processor": "vlmprune.checkpoint",
    "save_model": "vlmprune.checkpoint",
    "PruningPlan": "vlmprune.planning.plan",
    "RunRecord": "vlmprune.record",
    "apply_plan_": "vlmprune.surgery.apply",
    "score": "vlmprune.prune.run",
    "plan_for": "vlmprune.planning.solve",
    "Scores": "vlmprune.importance.scores",
    "PruneResult": "vlmprune.prune.run",
    "register_criterion": "vlmprune.importance.registry",
    "criteria": "vlmprune.importance.registry",
    "register_collector": "vlmprune.importance.registry",
    "register_loss": "vlmprune.recover.losses",
    "evaluate_model_dir": "vlmprune.evaluate.run",
    "quantize": "vlmprune.quantize",
    "register_scheme": "vlmprune.quantize",
    "PruneConfig": "vlmprune.config",
    "RecoverConfig": "vlmprune.config",
    "EvalConfig": "vlmprune.config",
}

__all__ = ["DataError", "PlanError", "UnsupportedModelError", "VlmpruneError", "prune", *_LAZY]


def __getattr__(name: str):
    if name == "prune":  # the subpackage, which is also the verb: vlmprune.prune(model=..., ...)
        return importlib.import_module("vlmprune.prune")
    if name not in _LAZY:
        raise AttributeError(f"module 'vlmprune' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
