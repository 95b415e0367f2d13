"""Deployment targets: what a pruned model must fit, measured exactly, and the ratio that meets it.

A target is ``params=0.7`` (fraction of the whole model kept), ``params=1.5B`` (absolute), or
``memory=2GB[,seq=4096,batch=1,dtype=bf16]``: weight bytes plus the KV cache at that context, with
the cache counted the way the family stores it (per-layer kv heads x head_dim x K and V at the
positions the adapter says the layer keeps: sliding-window layers the window, KV-sharing consumers and
linear-attention layers none). The planner works in parameters; for a memory target the
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


def footprint(model: nn.Module, target: Target, plan: PruningPlan | None = None,
              budget: ModelBudget | None = None, shapes: list[LayerShape] | None = None) -> Footprint:
    """The model's footprint, or the footprint it would have after ``plan`` (computed, not applied)."""
    budget = budget or ModelBudget.of(model)
    shapes = shapes or layer_shapes(model)
    plan = plan or PruningPlan()
    parameters = budget.total - achieved(plan, budget, shapes)["params_removed"]
    kept = plan.kept_layers(len(shapes))
    widths = plan.resolve(shapes)
    adapter = get_adapter(model)
    kv = 0
    for i in kept:  # the cache as the family stores it: K and V of each kv head at each kept position
        kv_heads = len(widths[i].kv_heads) if i in widths else shapes[i].num_kv_heads
        kv += 2 * kv_heads * shapes[i].head_dim * adapter.kv_positions(model, i, target.seq) * target.batch
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
    if target.kind == "memory":
        def measure(plan: PruningPlan | None) -> float:
            return footprint(model, target, plan, budget, shapes).memory_bytes

        unit, scale = "GB", 1e9
    else:
        coef = latency_profile(model, target)["coef"]

        def measure(plan: PruningPlan | None) -> float:
            return predict_latency(coef, latency_features(shapes, plan))

        unit, scale = "ms (predicted)", 1e-3
    now = measure(None)
    if now <= target.value:
        raise VlmpruneError(f"--target {target.spec}: the model already fits ({now / scale:.3f} {unit} <= "
                            f"{target.value / scale:.3f} {unit}); nothing to prune")
    low, high = 0.0, 0.95
    best = None
    for _ in range(30):
        mid = (low + high) / 2
        try:
            fits = measure(plan_at(mid)) <= target.value
        except VlmpruneError:
            fits = False  # the planner cannot remove that much this way: too far
            high = mid
            continue
        if fits:
            best, high = mid, mid
        else:
            low = mid
    if best is None:
        raise VlmpruneError(f"--target {target.spec}: no plan of this method fits ({now / scale:.3f} {unit} now); "
                            f"relax the target, shorten seq, or use another method")
    return best


# ------------------------------------------------------------------------------------------ latency
# Prefill time is modelled as t = c0 + c1 * layers + c2 * (q heads, summed over layers) + c3 * (MLP
# channels, summed over layers): each kept layer costs a fixed part (norms, residuals, the attention
# kernel launch) plus a part proportional to its heads and channels (their GEMMs). The coefficients
# are fitted to timings of the real model and of pruned copies of it (fewer layers, half the
# attention, half the MLP) on this device, cached per model, device and context.


def latency_features(shapes: list[LayerShape], plan: PruningPlan | None = None) -> list[float]:
    plan = plan or PruningPlan()
    widths = plan.resolve(shapes)
    kept = plan.kept_layers(len(shapes))
    heads = sum(len(widths[i].q_heads) if i in widths else shapes[i].num_heads for i in kept)
    channels = sum(len(widths[i].mlp_channels) if i in widths else shapes[i].intermediate_size for i in kept)
    return [1.0, float(len(kept)), float(heads), float(channels)]


def fit_latency(points: list[tuple[list[float], float]]) -> list[float]:
    """Least-squares coefficients of ``latency_features`` -> seconds (a pure function: no timing here)."""
    import torch

    x = torch.tensor([f for f, _ in points], dtype=torch.float64)
    y = torch.tensor([[t] for _, t in points], dtype=torch.float64)
    return torch.linalg.lstsq(x, y).solution.squeeze(1).tolist()


def predict_latency(coef: list[float], features: list[float]) -> float:
    return float(sum(c * f for c, f in zip(coef, features)))


def measure_prefill(model: nn.Module, seq: int, batch: int, repeats: int = 3) -> float:
    """Median wall time of one text prefill of ``batch`` x ``seq`` tokens (no image), after one warm-up."""
    import statistics
    import time

    import torch

    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def latency_profile(model: nn.Module, target: Target) -> dict:
    """The fitted latency model of ``model`` on its device at the target's context (measured once, cached)."""
    import copy
    import json

    from vlmprune.inspect import source_record
    from vlmprune.paths import cache_root

    device = next(model.parameters()).device
    key = f"{source_record(model)['fingerprint']}-{device.type}-s{target.seq}-b{target.batch}"
    cache = cache_root() / "latency" / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    shapes = layer_shapes(model)
    n = len(shapes)
    variants = [PruningPlan(), PruningPlan(drop_layers=list(range(n - max(1, n // 4), n))),
                PruningPlan(drop_layers=list(range(n // 2, n)) if n >= 2 else [])]
    half_mlp = {i: {"mlp_channels": list(range(max(1, s.intermediate_size // 2)))} for i, s in enumerate(shapes)}
    variants.append(PruningPlan(layers=half_mlp))
    if all(s.num_kv_heads > 1 for s in shapes):
        variants.append(PruningPlan(layers={i: {"kv_heads": list(range(s.num_kv_heads // 2))}
                                            for i, s in enumerate(shapes)}))
    elif all(s.group_size > 1 for s in shapes):
        variants.append(PruningPlan(layers={i: {"q_heads": [k * s.group_size + j for k in range(s.num_kv_heads)
                                                            for j in range(s.group_size // 2)]}
                                            for i, s in enumerate(shapes)}))
    points = []
    for plan in variants:
        candidate = model if not plan.drop_layers and not plan.layers else _applied(copy.deepcopy(model), plan)
        points.append((latency_features(shapes, plan), measure_prefill(candidate, target.seq, target.batch)))
        del candidate
    profile = {"coef": fit_latency(points), "points": [{"features": f, "seconds": t} for f, t in points],
               "device": str(device), "seq": target.seq, "batch": target.batch}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(profile, indent=1))
    return profile


def _applied(model: nn.Module, plan: PruningPlan) -> nn.Module:
    from vlmprune.prune.apply import apply_plan_

    return apply_plan_(model, plan)
