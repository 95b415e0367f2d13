"""End-to-end verbs that read and write run directories (the CLI calls these)."""

from __future__ import annotations

from pathlib import Path

from vlmprune import calibrate
from vlmprune.adapters import get_adapter
from vlmprune.errors import VlmpruneError
from vlmprune.importance import layer as L
from vlmprune.importance import width as W
from vlmprune.importance.structures import layer_params
from vlmprune.inspect import summarize
from vlmprune.io import load, save_model
from vlmprune.plan import PruningPlan
from vlmprune.planning import (ModelBudget, achieved, check_ratio, layers_to_drop, parse_layer_range, plan_layers,
                               plan_width)
from vlmprune.prune import apply_plan_
from vlmprune.prune.apply import layer_shapes


def prune_from_plan(model: str | Path, plan: str | Path | PruningPlan, output: str | Path, overwrite: bool = False,
                    trust_remote_code: bool = False, quiet: bool = False) -> Path:
    """Apply a hand-written or saved plan to a model and write the pruned checkpoint."""
    plan = plan if isinstance(plan, PruningPlan) else PruningPlan.load(plan)
    net = load(model, trust_remote_code=trust_remote_code)
    before = summarize(net)
    apply_plan_(net, plan)
    after = summarize(net)
    plan.extra.setdefault("parameters", {"before": before.parameters, "after": after.parameters})
    out = save_model(net, output, plan=plan, source=model, overwrite=overwrite)
    if not quiet:
        from vlmprune.cli import console, print_summary

        print_summary(after, title=f"pruned model -> {out}")
        removed = 1 - after.parameters["total"] / before.parameters["total"]
        removed_lm = 1 - after.parameters["language_model"] / before.parameters["language_model"]
        console.print(f"removed {removed:.2%} of all parameters ({removed_lm:.2%} of the language model)")
    return out


LAYER_CRITERIA = ("block_influence", "angular", "skip_loss", "last")
WIDTH_CRITERIA = ("taylor", "magnitude", "activation", "wanda", "random")
DEFAULT_TOKENS = {"block_influence": "all", "angular": "all", "skip_loss": "answer", "last": "all",
                  "taylor": "answer", "magnitude": "all", "activation": "all", "wanda": "all", "random": "all"}


def check_criterion(method: str, criterion: str | None) -> str:
    choices = {"layer": LAYER_CRITERIA, "width": WIDTH_CRITERIA}.get(method)
    if choices is None:
        raise VlmpruneError(f"--method must be 'layer' or 'width', got {method!r}")
    criterion = criterion or choices[0]
    if criterion not in choices:
        raise VlmpruneError(f"unknown {method} criterion {criterion!r}; choose one of {', '.join(choices)}")
    return criterion


def plan_from_scores(model, method: str, ratio: float, criterion: str | None = None, batches=None,
                     tokens: str | None = None, attention: str = "groups", mlp_multiple: int | None = None,
                     layers: str | None = None, global_ranking: bool = False, seed: int = 0,
                     magnitude_p: int = 1):
    """Score the model on calibration batches and turn the scores into a plan for ``ratio``.

    Returns (plan, scores) where plan.extra records the method, criterion, options, every score
    and the achieved ratios.
    """
    criterion = check_criterion(method, criterion)
    check_ratio(ratio)
    tokens = tokens or DEFAULT_TOKENS[criterion]
    adapter = get_adapter(model)
    shapes = layer_shapes(model, adapter)
    budget = ModelBudget.of(model, adapter)
    needs_data = criterion not in ("last", "magnitude", "random")
    if needs_data and not batches:
        raise VlmpruneError(f"criterion {criterion!r} needs calibration data (--calibration)")
    extra = {"method": method, "criterion": criterion, "tokens": tokens, "ratio_target": ratio}
    if method == "layer":
        n = layers_to_drop(len(shapes), budget, ratio)
        block_start = None
        if criterion == "block_influence":
            scores = L.block_influence(calibrate.collect_hidden_states(model, batches, tokens))
        elif criterion == "angular":
            stats = calibrate.collect_hidden_states(model, batches, tokens)
            block_start, _ = L.angular_block(stats, n)
            scores = L.angular(stats)
        elif criterion == "skip_loss":
            scores = L.skip_loss(calibrate.collect_skip_losses(model, batches, tokens))
        else:
            scores = L.last(len(shapes))
        plan = PruningPlan(drop_layers=plan_layers(scores, budget, ratio, block_start))
        extra["scores"] = {"layers": [float(f"{v:.6g}") for v in scores.tolist()]}
        score_obj = scores
    else:
        chosen = parse_layer_range(layers, len(shapes))
        if criterion == "taylor":
            scores = W.taylor(calibrate.collect_taylor(model, batches, tokens), shapes)
        elif criterion == "magnitude":
            params = [(role, p) for i, layer in enumerate(adapter.layers(model))
                      for p, role in layer_params(layer, adapter, i).items()]
            scores = W.magnitude(params, shapes, p=magnitude_p)
        elif criterion in ("activation", "wanda"):
            stats = calibrate.collect_activations(model, batches, tokens)
            if criterion == "activation":
                scores = W.activation(stats, shapes)
            else:
                lay = adapter.layout
                o_w = [getattr(adapter.attention(x), lay.o).weight for x in adapter.layers(model)]
                d_w = [getattr(adapter.mlp(x), lay.down).weight for x in adapter.layers(model)]
                scores = W.wanda(stats, o_w, d_w, shapes)
        else:
            scores = W.random(shapes, seed)
        plan = plan_width(scores, shapes, budget, ratio, attention, mlp_multiple, chosen, global_ranking)
        extra.update({"attention": attention, "mlp_multiple": mlp_multiple, "layers": layers,
                      "global": global_ranking, "scores": scores.to_dict()})
        score_obj = scores
    extra["achieved"] = achieved(plan, budget, shapes)
    plan.extra.update(extra)
    return plan, score_obj
