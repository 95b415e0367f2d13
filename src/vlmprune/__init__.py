"""vlmprune: structural pruning and cheap recovery of vision-language models."""

from vlmprune.adapters import get_adapter, supported_model_types
from vlmprune.errors import PlanError, UnsupportedModelError, VlmpruneError
from vlmprune.inspect import count_parameters, summarize
from vlmprune.io import load, save_model
from vlmprune.plan import PruningPlan
from vlmprune.prune import apply_plan_
from vlmprune.quantize import quantize

__version__ = "0.1.0"

__all__ = [
    "PlanError",
    "PruningPlan",
    "UnsupportedModelError",
    "VlmpruneError",
    "apply_plan_",
    "count_parameters",
    "get_adapter",
    "load",
    "quantize",
    "save_model",
    "summarize",
    "supported_model_types",
]
