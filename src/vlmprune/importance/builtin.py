"""The built-in criteria, each registered under its name (the pure functions live in layer.py / width.py)."""

from __future__ import annotations

import logging

from vlmprune.importance import layer as layer_criteria
from vlmprune.importance import width as width_criteria
from vlmprune.importance.registry import register_criterion
from vlmprune.importance.structures import layer_params

log = logging.getLogger(__name__)

MAGNITUDE_WARNING = (
    "magnitude ranks heads and channels by the size of their weights alone, without data: a baseline, not a "
    "criterion to trust. On the demo's SmolLM2 language model it removes MLP channels that carry large "
    "activations and loses far more than a seeded random cut of the same shape (20% of the decoder cut: text "
    "perplexity 5.7e5-2.5e6 against 444-11,745 for random cuts, 37 dense; docs/performance/perplexity.md). For a model "
    "you mean to use, pass --calibration and a data criterion (taylor, activation or wanda)."
)


@register_criterion("block_influence", method="layer", stats="hidden_states")
def block_influence(stats, ctx):
    """ShortGPT: sum over tokens of 1 - cos(h_in, h_out) of each layer's own output"""
    return layer_criteria.block_influence(stats)


@register_criterion("angular", method="layer", stats="hidden_states")
def angular(stats, ctx):
    """the contiguous block of n layers whose input and output are closest in angle"""
    n = stats.num_layers
    blocks = [layer_criteria.angular_block(stats, k)[1] for k in range(1, n)]
    return layer_criteria.LayerScores(layer_criteria.angular(stats), blocks)


@register_criterion("skip_loss", method="layer", stats="skip_loss", default_tokens="answer")
def skip_loss(stats, ctx):
    """increase of the answer loss when the layer is skipped"""
    return layer_criteria.skip_loss(stats)


@register_criterion("last", method="layer")
def last(stats, ctx):
    """drop the last n layers (no data needed)"""
    return layer_criteria.last(len(ctx.shapes))


@register_criterion("taylor", method="width", stats="taylor", default_tokens="text")
def taylor(stats, ctx):
    """LLM-Pruner: sum of |W * dL/dW| over a structure's weights (the collector reduces as gradients arrive)"""
    return width_criteria.taylor(stats, ctx.shapes)


@register_criterion("magnitude", method="width")
def magnitude(stats, ctx):
    """L1 of the weights a structure owns (no data needed; a baseline: worse than random on SmolLM2)"""
    log.warning(MAGNITUDE_WARNING)
    adapter, model = ctx.adapter, ctx.model
    params = [(role, p) for i, layer in enumerate(adapter.layers(model))
              for p, role in layer_params(layer, adapter, i, ctx.shapes[i]).items()]
    return width_criteria.magnitude(params, ctx.shapes, p=1)


@register_criterion("activation", method="width", stats="activations")
def activation(stats, ctx):
    """Minitron: mean |activation| of a channel / of a head's o_proj input"""
    return width_criteria.activation(stats, ctx.shapes)


@register_criterion("wanda", method="width", stats="activations")
def wanda(stats, ctx):
    """Wanda-sp: |W| * ||X|| of the o_proj / down-projection columns a structure owns"""
    columns = [{s.unit: s.module.weight for s in ctx.adapter.slices(layer, shape) if s.dim == 1}
               for layer, shape in zip(ctx.adapter.layers(ctx.model), ctx.shapes)]  # o and down weights
    heads = [c.get("q") for c in columns]  # no "q": no heads
    return width_criteria.wanda(stats, heads, [c["mlp"] for c in columns], ctx.shapes)


@register_criterion("random", method="width")
def random(stats, ctx):
    """seeded baseline"""
    return width_criteria.random(ctx.shapes, ctx.seed)
