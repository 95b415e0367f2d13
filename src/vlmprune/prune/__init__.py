"""Structural pruning of the language backbone: widths (heads, MLP channels) and depth (layers)."""

from vlmprune.prune.apply import apply_plan_, layer_shapes

__all__ = ["apply_plan_", "layer_shapes"]
