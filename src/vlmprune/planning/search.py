"""``--method auto``: search the mix of depth and width that meets a target with the least damage.

Candidates drop the k least important layers (the layer criterion) and take the rest of the budget
from the width criterion on the layers that stay, for k = 0 (pure width) ... n (pure layer). Both
criteria are scored once; each candidate is planned (cheap) and ranked by a proxy measured without
writing anything: the KL divergence of the candidate's next-token distribution from the original
model's on the text tokens of held-out calibration batches (the candidate is a pruned copy in memory).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vlmprune import calibrate
from vlmprune.adapters import get_adapter
from vlmprune.errors import VlmpruneError
from vlmprune.importance.layer import LayerScores
from vlmprune.importance.structures import WidthScores
from vlmprune.planning.plan import PruningPlan
from vlmprune.planning.solve import ModelBudget, achieved, plan_layers, plan_width
from vlmprune.summary import layer_shapes
from vlmprune.surgery.apply import apply_plan_


@dataclass
class Candidate:
    layers_dropped: int
    ratio: float
    plan: PruningPlan
    proxy: float | None = None

    def to_dict(self, budget: ModelBudget, shapes) -> dict:
        return {"layers_dropped": self.layers_dropped, "ratio_target": self.ratio, "proxy_kl": self.proxy,
                "drop_layers": self.plan.drop_layers, "achieved": achieved(self.plan, budget, shapes),
                "widths": {str(i): {"kv_heads": len(k.kv_heads), "q_heads": len(k.q_heads),
                                    "mlp_channels": len(k.mlp_channels)}
                           for i, k in self.plan.resolve(shapes).items()}}


def mix_planner(model: nn.Module, layer_scores: LayerScores, width_scores: WidthScores, k: int, attention: str,
                mlp_multiple: int | None) -> Callable[[float], PruningPlan]:
    """``ratio -> plan`` that drops the k lowest-scoring layers and cuts widths of the others for the rest."""
    budget, shapes = ModelBudget.of(model), layer_shapes(model)
    drop = sorted(torch.argsort(layer_scores.layers, stable=True)[:k].tolist()) if k else []
    kept = [i for i in range(len(shapes)) if i not in drop]
    removed = sum(budget.layer_params[i] for i in drop)

    def plan_at(ratio: float) -> PruningPlan:
        if k and ratio * budget.total <= removed:
            return PruningPlan(drop_layers=plan_layers(layer_scores.layers, budget, ratio))
        rest = (ratio * budget.total - removed) / budget.total
        width = plan_width(width_scores, shapes, budget, rest, attention, mlp_multiple, kept, False)
        return PruningPlan(drop_layers=drop, layers=width.layers)

    return plan_at


@torch.no_grad()
def text_logprobs(model: nn.Module, batches) -> list[torch.Tensor]:
    """Log-probabilities of the next token at every text position of every batch: [tokens, vocab] each."""
    image_id = calibrate.image_token_id(model)
    device = next(model.parameters()).device
    out = []
    for batch in batches:
        mask = calibrate.select_tokens(batch, "text", image_id).to(device)
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels" and torch.is_tensor(v)}
        logits = model(**inputs).logits
        out.append(torch.log_softmax(logits[mask].double(), dim=-1).cpu())
    return out


def kl_proxy(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> float:
    """Mean over text tokens of KL(reference || candidate) of the next-token distributions."""
    total, count = 0.0, 0
    for ref, cand in zip(reference, candidate):
        total += float((ref.exp() * (ref - cand)).sum())
        count += ref.shape[0]
    if count == 0:
        raise VlmpruneError("the held-out calibration batches have no text tokens to compare distributions on")
    return total / count


def search(model: nn.Module, layer_scores: LayerScores, width_scores: WidthScores, ratio_of: Callable,
           held_out, attention: str = "groups", mlp_multiple: int | None = None,
           compensate: Callable[[nn.Module, PruningPlan], object] | None = None) -> tuple[Candidate, list[Candidate]]:
    """Every depth x width mix that meets the target (``ratio_of(plan_at) -> ratio``), ranked by the proxy.

    With ``compensate`` (``fn(copy, plan)``, updating the copy's kept weights before the cut), every
    candidate is ranked as the compensated model it would become.
    """
    budget = ModelBudget.of(model)
    layer_scores = layer_scores.without(get_adapter(model).protected_layers(model))
    pure_layer = ratio_of(lambda r: PruningPlan(drop_layers=plan_layers(layer_scores.layers, budget, r)))
    n_max = len(plan_layers(layer_scores.layers, budget, pure_layer))
    reference = text_logprobs(model, held_out)
    candidates = []
    for k in range(n_max + 1):
        plan_at = mix_planner(model, layer_scores, width_scores, k, attention, mlp_multiple)
        try:
            ratio = ratio_of(plan_at)
            plan = plan_at(ratio)
        except VlmpruneError:
            continue  # this mix cannot meet the target (e.g. too little width left)
        pruned = copy.deepcopy(model)
        if compensate is not None:
            compensate(pruned, plan)
        pruned = apply_plan_(pruned, plan)
        candidates.append(Candidate(k, ratio, plan, kl_proxy(reference, text_logprobs(pruned, held_out))))
        del pruned
    if not candidates:
        raise VlmpruneError("no depth x width mix meets the target; use a smaller cut")
    return min(candidates, key=lambda c: c.proxy), candidates
