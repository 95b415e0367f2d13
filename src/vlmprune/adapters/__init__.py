"""Architecture adapters: the only place that knows where a model family keeps its parts.

Two small tables. ``VLM_PARTS`` is keyed by the vision-language model's ``model_type`` and says
where the vision tower, projector and language model live. ``LAYER_LAYOUTS`` is keyed by the
text config's ``model_type`` and says how one decoder layer lays out its attention and MLP.
From a layout, :meth:`Adapter.slices` derives the one description every other part of vlmprune
uses: which output rows / input columns of which projection belong to which q head, kv group or
MLP channel (pruning cuts by it, criteria reduce statistics by it, the planner counts by it).
A family that deviates registers an :class:`Adapter` subclass (``register_adapter``) overriding
the small hooks (``slices``, ``base_model``, ``protected_layers``), in a module of its own
(``qwen3_vl``, ``qwen3_5``, ``gemma4``); the generic adapter and the tables are in ``base``.
Everything else is generic.
"""

from __future__ import annotations

from vlmprune.adapters import gemma4, qwen3_5, qwen3_vl  # noqa: F401  (the families with hooks register here)
from vlmprune.adapters.base import (
    ADAPTERS,
    LAYER_LAYOUTS,
    UNITS,
    VLM_PARTS,
    Adapter,
    LayerLayout,
    Slice,
    VLMParts,
    config_value,
    get_adapter,
    register_adapter,
    supported_model_types,
)

__all__ = ["ADAPTERS", "LAYER_LAYOUTS", "UNITS", "VLM_PARTS", "Adapter", "LayerLayout", "Slice", "VLMParts",
           "config_value", "get_adapter", "register_adapter", "supported_model_types"]
