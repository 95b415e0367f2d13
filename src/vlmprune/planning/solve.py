"""From scores and a target ratio to a PruningPlan.

``ratio`` is the fraction of the WHOLE model's parameters to remove (as in the study's tables);
the achieved fraction is computed exactly from the structures each plan removes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from vlmprune.adapters import Adapter, get_adapter
from vlmprune.config import check_ratio, parse_layer_range
from vlmprune.errors import VlmpruneError
from vlmprune.importance.scores import Scores
from vlmprune.importance.structures import LayerSums, WidthScores, layer_params, reduce_
from vlmprune.planning.plan import LayerShape, PruningPlan
from vlmprune.summary import layer_shapes
from vlmprune.surgery.apply import loads_stock
from vlmprune.vocab import ATTENTION_MODES

log = logging.getLogger(__name__)



def default_mlp_multiple(intermediate_size: int) -> int:
    """64 for real models: GEMM kernels tile output widths in multiples of 64 (GPU tensor cores,
    oneDNN/AVX-512 blocks), so a ragged width costs time without saving any; 8 for small MLPs
    (< 4096), where 64-channel steps would be too coarse to hit the ratio."""
    return 64 if intermediate_size >= 4096 else 8


@dataclass
class ModelBudget:
    """Parameter counts the planner needs: whole model, language model, each layer, each structure."""

    total: int
    language_model: int
    layer_params: list[int]
    structures: list[LayerSums]  # parameters owned by each head / kv head / channel

    @classmethod
    def of(cls, model: nn.Module, adapter: Adapter | None = None) -> ModelBudget:
        from vlmprune.summary import count_parameters

        adapter = adapter or get_adapter(model)
        shapes = layer_shapes(model, adapter)
        counts = count_parameters(model, adapter)
        layers = adapter.layers(model)
        outside = adapter.outside_layer_params(model)  # e.g. Gemma 4's per-layer input slices
        per_layer = [sum(p.numel() for p in layer.parameters()) + extra for layer, extra in zip(layers, outside)]
        structures = [LayerSums.zeros(s) for s in shapes]
        for i, layer in enumerate(layers):
            for param, owned in layer_params(layer, adapter, i, shapes[i]).items():
                reduce_(structures[i], owned, _count_proxy(param, owned))
        return cls(counts["total"], counts["language_model"], per_layer, structures)

    def head_params(self, i: int) -> float:
        s = self.structures[i]
        return float((s.q_rows + s.o_cols)[0])

    def group_params(self, i: int, group_size: int) -> float:
        return float(self.structures[i].kv_rows[0]) + group_size * self.head_params(i)

    def channel_params(self, i: int) -> float:
        s = self.structures[i]
        return float((s.mlp_rows + s.mlp_cols)[0])


def _count_proxy(param: torch.Tensor, owned) -> torch.Tensor:
    """A small tensor that reduce_ turns into parameter counts per structure: each row (or
    column) of a weight holds as many parameters as the other dimension is long."""
    if owned.is_bias:
        return torch.ones(param.shape[0])
    out_features, in_features = param.shape
    if owned.dim == 1:  # column-owned
        return torch.full((1, in_features), float(out_features))
    return torch.full((out_features, 1), float(in_features))


def plan_layers(scores: torch.Tensor, budget: ModelBudget, ratio: float, block_start: int | None = None) -> list[int]:
    """Layers to drop: as many as bring the removed share closest to ``ratio``; the lowest scores
    go, or the contiguous block starting at ``block_start`` (angular criterion)."""
    check_ratio(ratio)
    L = len(budget.layer_params)
    target = ratio * budget.total
    mean_layer = sum(budget.layer_params) / L
    n = int(round(target / mean_layer))
    if n == 0:
        raise VlmpruneError(
            f"--ratio {ratio} removes less than one decoder layer (one layer is {mean_layer / budget.total:.1%} "
            f"of the model); use a larger ratio or --method width"
        )
    if n >= L:
        raise VlmpruneError(
            f"--ratio {ratio} would remove all {L} decoder layers (the language model's layers are "
            f"{sum(budget.layer_params) / budget.total:.1%} of the model); use a smaller ratio"
        )
    if block_start is not None:
        return list(range(block_start, block_start + n))
    return sorted(torch.argsort(scores, stable=True)[:n].tolist())


def layers_to_drop(num_layers: int, budget: ModelBudget, ratio: float) -> int:
    """How many layers ``plan_layers`` drops for ``ratio`` (for block criteria that need n first)."""
    return len(plan_layers(torch.zeros(num_layers), budget, ratio))


def _mlp_widths(size: int, multiple: int) -> list[int]:
    """Kept MLP widths allowed: multiples of ``multiple`` below ``size``, and ``size`` itself."""
    return sorted({size, *range(multiple, size, multiple)})


def _choose_widths(units: int, attn_step: float, size: int, mlp_step: float, widths: list[int], target: float,
                   tolerance: float) -> tuple[int, int]:
    """Kept attention units and kept MLP width for a removal of ``target`` parameters.

    ``attn_step`` / ``mlp_step``: parameters removed by one attention unit / one MLP channel fewer in
    every selected layer; ``widths``: the MLP widths allowed (the multiple honoured).

    Two steps, because they answer different questions. The attention cut is coarse (a third of
    the attention per unit on a 3-group model), so it is chosen for balance: among the attention
    cuts whose best MLP completion lands within ``tolerance`` (one MLP step) of the closest plan
    of all, the one where attention and MLP give up the most similar shares. The MLP width is then
    the allowed width closest to the target given that attention cut. (Choosing both by balance
    picked, with --attention none, a smaller MLP cut than the closest one: the "imbalance" there
    is just the MLP share, so the smallest cut within the tolerance always won: 400 channels of
    1536 for a target of ~408.)
    """
    best = {}  # kept units -> (error, kept width) of the closest width for that attention cut
    for kept_units in range(units, 0, -1):
        attn_removed = (units - kept_units) * attn_step
        best[kept_units] = min((abs(attn_removed + (size - w) * mlp_step - target), -w) for w in widths)
    closest = min(err for err, _ in best.values())

    def imbalance(kept_units: int) -> float:
        w = -best[kept_units][1]
        return abs((units - kept_units) / units - (size - w) / size)

    candidates = [k for k, (err, _) in best.items() if err <= closest + tolerance]
    kept_units = min(candidates, key=lambda k: (imbalance(k), best[k][0], -k))
    return kept_units, -best[kept_units][1]


def plan_width(
    scores: WidthScores,
    shapes: list[LayerShape],
    budget: ModelBudget,
    ratio: float,
    attention: str = "groups",
    mlp_multiple: int | None = None,
    layers: list[int] | None = None,
    global_ranking: bool = False,
) -> PruningPlan:
    """Heads/kv groups and MLP channels to keep, closest to ``ratio`` of the whole model.

    Attention and MLP give up the same share as nearly as the granularity allows. Without
    ``global_ranking`` every selected layer keeps the same widths (its own best structures);
    with it, structures compete across layers and widths may differ from layer to layer.
    """
    check_ratio(ratio)
    if attention not in ATTENTION_MODES:
        raise VlmpruneError(f"--attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    layers = list(range(len(shapes))) if layers is None else layers
    ref = shapes[layers[0]]
    if any(shapes[i] != ref for i in layers):
        if not global_ranking:
            raise VlmpruneError("the selected layers already have different widths; use --global to rank across them")
    multiple = default_mlp_multiple(ref.intermediate_size) if mlp_multiple is None else mlp_multiple
    if multiple < 1:
        raise VlmpruneError(f"--mlp-multiple must be >= 1, got {multiple}")
    if attention == "heads" and ref.group_size == 1:
        raise VlmpruneError(
            "--attention heads drops q heads inside each kv group, but this model has one q head per kv head "
            "(multi-head attention); use --attention groups"
        )
    target = ratio * budget.total
    # Options as fractions kept: attention units per layer, MLP width per layer.
    units = {"groups": ref.num_kv_heads, "heads": ref.group_size, "none": 1}[attention]
    unit_params = {
        "groups": lambda i: budget.group_params(i, shapes[i].group_size),
        "heads": lambda i: budget.head_params(i) * shapes[i].num_kv_heads,
        "none": lambda i: 0.0,
    }[attention]
    attn_step = sum(unit_params(i) for i in layers)            # removing one unit in every layer
    mlp_step = sum(budget.channel_params(i) for i in layers)   # removing one channel in every layer
    widths = _mlp_widths(ref.intermediate_size, multiple)
    kept_units, kept_width = _choose_widths(units, attn_step, ref.intermediate_size, mlp_step, widths, target,
                                            tolerance=multiple * mlp_step)
    max_removable = (units - 1) * attn_step + (ref.intermediate_size - widths[0]) * mlp_step
    if target > max_removable + multiple * mlp_step:
        raise VlmpruneError(
            f"--ratio {ratio} asks for {target / budget.total:.1%} of the model, but width pruning of the selected "
            f"layers can remove at most {max_removable / budget.total:.1%}; use a smaller ratio, more layers, or "
            f"--method layer"
        )
    if global_ranking:
        n_attn = (units - kept_units) * len(layers)
        n_mlp_channels = (ref.intermediate_size - kept_width) * len(layers)
        return _plan_global(scores, shapes, layers, attention, multiple, n_attn, n_mlp_channels)
    plan = PruningPlan()
    for i in layers:
        entry = {}
        if attention == "groups" and kept_units < units:
            kv = sorted(torch.argsort(scores.groups[i], descending=True, stable=True)[:kept_units].tolist())
            entry["kv_heads"] = kv
        elif attention == "heads" and kept_units < units:
            entry["q_heads"] = _top_heads_per_group(scores.heads[i], shapes[i], kept_units)
        if kept_width < ref.intermediate_size:
            by_score = torch.argsort(scores.channels[i], descending=True, stable=True)
            entry["mlp_channels"] = sorted(by_score[:kept_width].tolist())
        if entry:
            plan.layers[i] = entry
    return plan


def _top_heads_per_group(head_scores: torch.Tensor, shape: LayerShape, keep: int) -> list[int]:
    g = shape.group_size
    kept = []
    for k in range(shape.num_kv_heads):
        local = head_scores[k * g : (k + 1) * g]
        kept += [k * g + j for j in torch.argsort(local, descending=True, stable=True)[:keep].tolist()]
    return sorted(kept)


def _plan_global(scores, shapes, layers, attention, multiple, n_attn_units, n_channels) -> PruningPlan:
    """Remove the globally lowest-scored units: kv groups / one head per group / blocks of
    ``multiple`` MLP channels, at least one of each kept per layer."""
    attn_units = []  # (score, layer, payload)
    mlp_units = []
    for i in layers:
        s = shapes[i]
        if attention == "groups":
            order = torch.argsort(scores.groups[i], stable=True).tolist()
            attn_units += [(float(scores.groups[i][k]), i, k) for k in order[:-1]]
        elif attention == "heads":
            g = s.group_size
            ranked = [torch.argsort(scores.heads[i][k * g : (k + 1) * g], stable=True).tolist()
                      for k in range(s.num_kv_heads)]
            for r in range(g - 1):  # the r-th weakest head of every group, removed together
                heads = [k * g + ranked[k][r] for k in range(s.num_kv_heads)]
                attn_units.append((float(scores.heads[i][heads].sum()), i, heads))
        order = torch.argsort(scores.channels[i], stable=True).tolist()
        first = s.intermediate_size - ((s.intermediate_size - 1) // multiple) * multiple
        blocks, start = [], 0
        for size in [first] + [multiple] * ((s.intermediate_size - first) // multiple):
            blocks.append(order[start : start + size])
            start += size
        for block in blocks[:-1]:
            mlp_units.append((float(scores.channels[i][block].sum()) / len(block), i, block))
    removed_attn = {i: [] for i in layers}
    for _, i, payload in sorted(attn_units, key=lambda u: u[0])[:n_attn_units]:
        removed_attn[i].append(payload)
    # Within a layer, block scores rise (blocks are cut from its channels in ascending order), so
    # a global ascending sweep removes each layer's blocks weakest-first and widths stay on the grid.
    removed_ch = {i: set() for i in layers}
    left = n_channels
    for _, i, block in sorted(mlp_units, key=lambda u: u[0]):
        if left <= 0:
            break
        removed_ch[i].update(block)
        left -= len(block)
    plan = PruningPlan()
    for i in layers:
        s = shapes[i]
        entry = {}
        if attention == "groups" and removed_attn[i]:
            entry["kv_heads"] = sorted(set(range(s.num_kv_heads)) - set(removed_attn[i]))
        elif attention == "heads" and removed_attn[i]:
            gone = {h for heads in removed_attn[i] for h in heads}
            entry["q_heads"] = sorted(set(range(s.num_heads)) - gone)
        if removed_ch[i]:
            entry["mlp_channels"] = sorted(set(range(s.intermediate_size)) - removed_ch[i])
        if entry:
            plan.layers[i] = entry
    return plan


def achieved(plan: PruningPlan, budget: ModelBudget, shapes: list[LayerShape]) -> dict[str, float]:
    """Exact parameters removed by ``plan``: whole-model and language-model-only fractions."""
    removed = sum(budget.layer_params[i] for i in plan.drop_layers)
    for i, keep in plan.resolve(shapes).items():
        s = shapes[i]
        removed += (s.num_heads - len(keep.q_heads)) * budget.head_params(i)
        s_sums = budget.structures[i]
        removed += (s.num_kv_heads - len(keep.kv_heads)) * float(s_sums.kv_rows[0])
        removed += (s.intermediate_size - len(keep.mlp_channels)) * budget.channel_params(i)
    removed = int(round(removed))
    return {
        "params_removed": removed,
        "ratio": removed / budget.total,
        "ratio_language_model": removed / budget.language_model,
    }


def plan_for(model: nn.Module, scores: Scores, ratio: float, attention: str = "groups",
             mlp_multiple: int | None = None, layers: str | None = None, global_ranking: bool = False) -> PruningPlan:
    """The plan that removes the fraction ``ratio`` of the whole model, from ``scores`` of this model.

    ``plan.extra`` holds the planner's notes: the method, criterion, options, every score and the achieved
    ratios (``vlmprune prune`` lifts them into ``run.json``'s prune section and saves the plan without them).
    """
    check_ratio(ratio)
    shapes = layer_shapes(model)
    budget = ModelBudget.of(model)
    extra: dict[str, Any] = {"method": scores.method, "criterion": scores.criterion, "tokens": scores.tokens,
                             "ratio_target": ratio}
    if scores.method == "layer":
        protected = get_adapter(model).protected_layers(model)
        values = scores.values.without(protected)
        n = layers_to_drop(len(shapes), budget, ratio)
        plan = PruningPlan(drop_layers=plan_layers(values.layers, budget, ratio, values.block_start(n)))
        # the criterion's own scores, protected layers included (they are scored, never chosen)
        extra["scores"] = {"layers": [float(f"{v:.6g}") for v in scores.values.layers.tolist()]}
        if protected:
            extra["protected_layers"] = sorted(protected)
    else:
        chosen = parse_layer_range(layers, len(shapes))
        adapter = get_adapter(model)
        headless = {i for i, layer in enumerate(adapter.layers(model)) if not adapter.has_heads(layer)}
        values = _headless(scores.values, headless)
        plan = plan_width(values, shapes, budget, ratio, attention, mlp_multiple, chosen, global_ranking)
        for i in headless & set(plan.layers):  # their heads own no parameters and stay whole
            entry = {k: v for k, v in plan.layers[i].items() if k not in ("q_heads", "kv_heads")}
            if entry:
                plan.layers[i] = entry
            else:
                del plan.layers[i]
        extra.update({"attention": attention, "mlp_multiple": mlp_multiple, "layer_range": layers,
                      "global": global_ranking, "scores": scores.values.to_dict()})
    extra["achieved"] = achieved(plan, budget, shapes)
    plan.extra.update(extra)
    return plan


def _headless(values, headless: set[int]):
    """Width scores in which the heads of layers without prunable heads are never the weakest."""
    if not headless:
        return values
    heads = [torch.full_like(h, float("inf")) if i in headless else h for i, h in enumerate(values.heads)]
    groups = [torch.full_like(g, float("inf")) if i in headless else g for i, g in enumerate(values.groups)]
    return replace(values, heads=heads, groups=groups)


def stock_plan(model: nn.Module, scores: Scores, ratio: float, attention: str = "groups",
               mlp_multiple: int | None = None, layers: str | None = None, global_ranking: bool = False) -> PruningPlan:
    """``plan_for`` under ``--stock``: a width plan whose attention cut would need ``vlmprune.load`` gives way
    to the plan of the same ratio from MLP channels alone, when that one loads with plain ``from_pretrained``
    (said in the log and in ``plan.extra["stock_note"]``); otherwise the plan ``plan_for`` makes."""
    plan = plan_for(model, scores, ratio, attention, mlp_multiple, layers, global_ranking)
    obstacle = loads_stock(model, plan)
    if obstacle and plan.extra["method"] == "width" and attention != "none":
        mlp_only = plan_for(model, scores, ratio, "none", mlp_multiple, layers, global_ranking)
        if loads_stock(model, mlp_only) is None:
            log.warning("--stock: cutting attention would need vlmprune.load (%s); attention is kept whole "
                        "and only MLP channels go", obstacle)
            mlp_only.extra["stock_note"] = f"attention kept whole: {obstacle}"
            return mlp_only
    return plan
