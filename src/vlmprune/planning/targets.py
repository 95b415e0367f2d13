"""Deployment targets: what a pruned model must fit, measured exactly, and the ratio that meets it.

A target is ``params=0.7`` (fraction of the whole model kept), ``params=1.5B`` (absolute), or
``memory=2GB[,seq=4096,batch=1,dtype=bf16]``: weight bytes plus the KV cache at that context, with
the cache counted the way the family stores it (per-layer kv heads x head_dim x K and V at the
positions the adapter says the layer keeps: sliding-window layers the window, KV-sharing consumers and
linear-attention layers none). The planner works in parameters; for a memory target the
smallest ratio whose plan fits is found by bisection over the planner's own plans.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from vlmprune.adapters import get_adapter
from vlmprune.config import Target
from vlmprune.errors import VlmpruneError
from vlmprune.planning.plan import LayerShape, PruningPlan
from vlmprune.planning.solve import ModelBudget, achieved
from vlmprune.summary import layer_shapes


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

    ``plan_at(ratio) -> PruningPlan`` is the planner of the chosen method. A target is a budget: the
    ratio returned is the smallest whose plan fits it (bisection over the planner's own plans, which
    round widths and whole layers), so the model kept is the largest that fits, never one over it.
    """
    budget = budget or ModelBudget.of(model)
    shapes = layer_shapes(model)
    low = 0.0
    if target.kind == "params":
        kept = target.value * budget.total if target.value <= 1 else target.value
        ratio = 1 - kept / budget.total
        if not 0 < ratio < 1:
            raise VlmpruneError(f"--target {target.spec}: the model has {budget.total:,} parameters; the target "
                                f"keeps {kept:,.0f}, which is not a cut")
        target = replace(target, value=kept)

        def measure(plan: PruningPlan | None) -> float:
            return budget.total - (achieved(plan, budget, shapes)["params_removed"] if plan else 0)

        unit, scale = "parameters", 1
        try:
            if measure(plan_at(ratio)) <= kept:
                return ratio  # the exact ratio's plan fits: the usual case
        except VlmpruneError:
            pass
        low = ratio  # the planner rounded below the ratio: search above it
    elif target.kind == "memory":
        def measure(plan: PruningPlan | None) -> float:
            return footprint(model, target, plan, budget, shapes).memory_bytes

        unit, scale = "GB", 1e9
    else:
        profile = latency_profile(model, target)

        def measure(plan: PruningPlan | None) -> float:
            return predict_latency(profile, shapes, plan)

        unit, scale = "ms (predicted)", 1e-3
    now = measure(None)
    if now <= target.value:
        raise VlmpruneError(f"--target {target.spec}: the model already fits ({now / scale:.3f} {unit} <= "
                            f"{target.value / scale:.3f} {unit}); nothing to prune")
    high = max(0.95, (1 + low) / 2)
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
        raise VlmpruneError(f"--target {target.spec}: no plan of this method fits it ({now / scale:,.3f} {unit} "
                            f"now, {target.value / scale:,.3f} allowed); relax the target, shorten seq, or use "
                            f"another method")
    return best


# ------------------------------------------------------------------------------------------ latency
# Prefill time is modelled per layer from a timing profile of this device: one text prefill of the
# model and of three copies with every layer narrowed (attention and MLP at 3/4, 1/2 and 1/4 of their
# width), each timed with hooks around every decoder layer, its attention and its MLP. Per layer kind
# (layers of the same shape and cached positions) that gives a table attention-time(q heads) and
# MLP-time(channels), plus the layer's own fixed part (norms, residuals: layer time - attention - MLP);
# the rest of the model (embeddings, final norm, LM head) is the base. A plan's prediction is
#     base + sum over kept layers of [fixed + attention(q heads kept) + MLP(channels kept)],
# read off the tables by piecewise-linear interpolation. Cached per model, device and context.

PROFILE_VERSION = 2
PROFILE_FRACTIONS = (0.75, 0.5, 0.25)


def _interp(points: list[list[float]], x: float) -> float:
    """Piecewise-linear through ``points`` ([[x, y], ...]); linear beyond the ends, never below 0."""
    pts = sorted(points)
    if len(pts) == 1:
        return pts[0][1]
    k = next((k for k in range(len(pts) - 1) if x <= pts[k + 1][0]), len(pts) - 2)
    (x0, y0), (x1, y1) = pts[k], pts[k + 1]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def predict_latency(profile: dict, shapes: list[LayerShape], plan: PruningPlan | None = None) -> float:
    """Predicted prefill seconds of the model after ``plan`` (a pure function of the profile)."""
    plan = plan or PruningPlan()
    widths = plan.resolve(shapes)
    kind = {i: k for k, entry in enumerate(profile["kinds"]) for i in entry["layers"]}
    total = profile["base_s"]
    for i in plan.kept_layers(len(shapes)):
        entry = profile["kinds"][kind[i]]
        heads = len(widths[i].q_heads) if i in widths else shapes[i].num_heads
        channels = len(widths[i].mlp_channels) if i in widths else shapes[i].intermediate_size
        total += entry["fixed_s"] + _interp(entry["attention"], heads) + _interp(entry["mlp"], channels)
    return total


def _narrowed(model: nn.Module, shapes: list[LayerShape], fraction: float) -> PruningPlan:
    """Every layer at ``fraction`` of its width: whole kv groups where there are several, else q heads."""
    adapter = get_adapter(model)
    layers = {}
    for i, (layer, s) in enumerate(zip(adapter.layers(model), shapes)):
        entry = {"mlp_channels": list(range(max(1, round(s.intermediate_size * fraction))))}
        if adapter.has_heads(layer):
            if s.num_kv_heads > 1:
                entry["kv_heads"] = list(range(max(1, round(s.num_kv_heads * fraction))))
            elif s.num_heads > 1:
                entry["q_heads"] = list(range(max(1, round(s.num_heads * fraction))))
        layers[i] = entry
    return PruningPlan(layers=layers)


def _timed_layers(model: nn.Module, seq: int, batch: int, repeats: int) -> tuple[float, list[list[float]]]:
    """Median prefill seconds and, per decoder layer, median [layer, attention, MLP] seconds."""
    import statistics
    import time

    import torch

    adapter = get_adapter(model)
    sync = torch.cuda.synchronize if next(model.parameters()).device.type == "cuda" else (lambda: None)
    modules = [(i, j, m) for i, layer in enumerate(adapter.layers(model))
               for j, m in enumerate((layer, adapter.attention(layer), adapter.mlp(layer)))]
    started, elapsed = {}, {}

    def before(key):
        def hook(module, args):
            sync()
            started[key] = time.perf_counter()
        return hook

    def after(key):
        def hook(module, args, output):
            sync()
            elapsed[key] = elapsed.get(key, 0.0) + time.perf_counter() - started[key]
        return hook

    handles = [h for i, j, m in modules for h in (m.register_forward_pre_hook(before((i, j))),
                                                 m.register_forward_hook(after((i, j))))]
    ids, mask = _prefill_inputs(model, seq, batch)
    runs, totals = [], []
    try:
        for _ in range(repeats + 1):  # the first is a warm-up
            elapsed.clear()
            totals.append(_prefill_seconds(model, ids, mask))
            runs.append(dict(elapsed))
    finally:
        for h in handles:
            h.remove()
    n = len(adapter.layers(model))
    per_layer = [[statistics.median(run.get((i, j), 0.0) for run in runs[1:]) for j in range(3)] for i in range(n)]
    return statistics.median(totals[1:]), per_layer


def _prefill_inputs(model: nn.Module, seq: int, batch: int):
    import torch

    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    return ids, torch.ones_like(ids)


def _prefill_seconds(model: nn.Module, ids, mask) -> float:
    """Wall time of one text prefill (no image; the LM head on the last position only)."""
    import time

    import torch

    sync = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        sync()
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
        sync()
    return time.perf_counter() - start


def measure_prefill(model: nn.Module, seq: int, batch: int, repeats: int = 3) -> float:
    """Median wall time of one text prefill of ``batch`` x ``seq`` tokens (no image), after one warm-up."""
    import statistics

    ids, mask = _prefill_inputs(model, seq, batch)
    return statistics.median([_prefill_seconds(model, ids, mask) for _ in range(repeats + 1)][1:])


def latency_profile(model: nn.Module, target: Target, repeats: int = 5) -> dict:
    """The latency profile of ``model`` on its device at the target's context (measured once, cached)."""
    import copy
    import json
    import statistics

    from vlmprune.paths import cache_root
    from vlmprune.summary import source_record

    device = next(model.parameters()).device
    key = f"{source_record(model)['fingerprint']}-{device.type}-s{target.seq}-b{target.batch}-v{PROFILE_VERSION}"
    cache = cache_root() / "latency" / f"{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    adapter = get_adapter(model)
    shapes = layer_shapes(model)
    layers = adapter.layers(model)
    total, full = _timed_layers(model, target.seq, target.batch, repeats)
    timed = [(PruningPlan(), full)]
    for fraction in PROFILE_FRACTIONS:
        plan = _narrowed(model, shapes, fraction)
        try:
            candidate = _applied(copy.deepcopy(model), plan)
        except VlmpruneError:  # a family that cannot narrow its attention this way: the MLP alone
            plan = PruningPlan(layers={i: {"mlp_channels": e["mlp_channels"]} for i, e in plan.layers.items()})
            candidate = _applied(copy.deepcopy(model), plan)
        timed.append((plan, _timed_layers(candidate, target.seq, target.batch, repeats)[1]))
        del candidate
    groups: dict[tuple, list[int]] = {}
    for i, (layer, s) in enumerate(zip(layers, shapes)):
        sig = (s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size, adapter.has_heads(layer),
               adapter.kv_positions(model, i, target.seq), type(layer).__name__)
        groups.setdefault(sig, []).append(i)
    kinds = []
    for members in groups.values():
        attention, mlp = {}, {}
        for plan, per_layer in timed:
            widths = plan.resolve(shapes)
            s = shapes[members[0]]
            heads = len(widths[members[0]].q_heads) if members[0] in widths else s.num_heads
            channels = len(widths[members[0]].mlp_channels) if members[0] in widths else s.intermediate_size
            # a width met twice (a cut that rounds to the full width) keeps its first timing, the full model's
            attention.setdefault(heads, statistics.fmean(per_layer[i][1] for i in members))
            mlp.setdefault(channels, statistics.fmean(per_layer[i][2] for i in members))
        fixed = statistics.fmean(full[i][0] - full[i][1] - full[i][2] for i in members)
        kinds.append({"layers": members, "fixed_s": max(0.0, fixed),
                      "attention": [[h, t] for h, t in sorted(attention.items())],
                      "mlp": [[c, t] for c, t in sorted(mlp.items())]})
    profile = {"version": PROFILE_VERSION, "device": str(device), "seq": target.seq, "batch": target.batch,
               "measured_s": total, "base_s": max(0.0, total - sum(t[0] for t in full)), "kinds": kinds}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(profile, indent=1))
    return profile


def _applied(model: nn.Module, plan: PruningPlan) -> nn.Module:
    from vlmprune.surgery.apply import apply_plan_

    return apply_plan_(model, plan)
