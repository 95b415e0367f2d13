"""Deployment targets: what a pruned model must fit, measured exactly, and the ratio that meets it.

A target is ``params=0.7`` (fraction of the whole model kept), ``params=1.5B`` (absolute), or
``memory=2GB[,seq=4096,batch=1,dtype=bf16]``: weight bytes plus the KV cache at that context, with
the cache counted the way the family stores it (per-layer kv heads x head_dim x K and V; sliding-
window layers hold at most the window). The planner works in parameters; for a memory target the
smallest ratio whose plan fits is found by bisection over the planner's own plans.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vlmprune.adapters import get_adapter
from vlmprune.config import Target
from vlmprune.errors import VlmpruneError
from vlmprune.plan import LayerShape, PruningPlan
from vlmprune.planning import ModelBudget, achieved
from vlmprune.prune.apply import layer_shapes


@dataclass
class Footprint:
    """Parameters and bytes of a model (or of a model after a plan) at a target's context."""

    parameters: int
    weight_bytes: int
    kv_bytes: int

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    def value(self, target: Target) -> float:
        return self.parameters if target.kind == "params" else self.memory_bytes


def kv_tokens(model: nn.Module, layer: int, seq: int) -> int:
    """How many positions layer ``layer`` keeps in its KV cache at context ``seq``."""
    text = get_adapter(model).text_config(model)
    types = getattr(text, "layer_types", None)
    window = getattr(text, "sliding_window", None)
    if types is not None and layer < len(types) and types[layer] == "sliding_attention" and window:
        return min(seq, int(window))
    return seq


def footprint(model: nn.Module, target: Target, plan: PruningPlan | None = None,
              budget: ModelBudget | None = None, shapes: list[LayerShape] | None = None) -> Footprint:
    """The model's footprint, or the footprint it would have after ``plan`` (computed, not applied)."""
    budget = budget or ModelBudget.of(model)
    shapes = shapes or layer_shapes(model)
    plan = plan or PruningPlan()
    parameters = budget.total - achieved(plan, budget, shapes)["params_removed"]
    kept = plan.kept_layers(len(shapes))
    widths = plan.resolve(shapes)
    kv = 0
    for i in kept:
        kv_heads = len(widths[i].kv_heads) if i in widths else shapes[i].num_kv_heads
        kv += 2 * kv_heads * shapes[i].head_dim * kv_tokens(model, i, target.seq) * target.batch
    return Footprint(parameters, parameters * target.dtype_bytes, kv * target.dtype_bytes)


def ratio_for(model: nn.Module, target: Target, plan_at, budget: ModelBudget | None = None) -> float:
    """The ratio (of the whole model's parameters) whose plan meets ``target``.

    ``plan_at(ratio) -> PruningPlan`` is the planner of the chosen method. Parameter targets are
    exact arithmetic; memory targets take the smallest ratio whose plan fits (bisection).
    """
    budget = budget or ModelBudget.of(model)
    if target.kind == "params":
        kept = target.value * budget.total if target.value <= 1 else target.value
        ratio = 1 - kept / budget.total
        if not 0 < ratio < 1:
            raise VlmpruneError(f"--target {target.spec}: the model has {budget.total:,} parameters; the target "
                                f"keeps {kept:,.0f}, which is not a cut")
        return ratio
    shapes = layer_shapes(model)
    now = footprint(model, target, None, budget, shapes)
    if now.memory_bytes <= target.value:
        raise VlmpruneError(f"--target {target.spec}: the model already fits ({now.memory_bytes / 1e9:.3f} GB <= "
                            f"{target.value / 1e9:.3f} GB); nothing to prune")
    low, high = 0.0, 0.95
    best = None
    for _ in range(30):
        mid = (low + high) / 2
        try:
            fits = footprint(model, target, plan_at(mid), budget, shapes).memory_bytes <= target.value
        except VlmpruneError:
            fits = False  # the planner cannot remove that much this way: too far
            high = mid
            continue
        if fits:
            best, high = mid, mid
        else:
            low = mid
    if best is None:
        raise VlmpruneError(f"--target {target.spec}: no plan of this method fits ({now.memory_bytes / 1e9:.3f} GB "
                            f"now); use a larger memory budget, a shorter seq, or another method")
    return best
