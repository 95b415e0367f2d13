"""Reference models the pruned ones must equal: the original with structures zeroed or layers skipped.

Written independently of vlmprune's surgery (it only zeroes weights), so the tests compare two
different computations of the same thing.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from vlmprune.adapters import get_adapter
from vlmprune.summary import layer_shapes


@torch.no_grad()
def zeroed(model: nn.Module, plan) -> nn.Module:
    """A copy of ``model`` in which everything the plan's widths remove is zeroed."""
    ref = copy.deepcopy(model)
    adapter = get_adapter(ref)
    lay = adapter.layout
    shapes = layer_shapes(ref, adapter)
    for i, keep in plan.resolve(shapes).items():
        layer, s = adapter.layers(ref)[i], shapes[i]
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        d = s.head_dim
        # Qwen3.5's hybrid layers: a linear-attention layer (Gated DeltaNet) has no heads to zero.
        heads_here = not hasattr(layer, "linear_attn")
        # Qwen3.5's gated attention: q_proj is twice as wide, each head's rows are [query (d) | gate (d)].
        gated = heads_here and not lay.qkv and getattr(attn, lay.q).out_features == 2 * s.num_heads * d
        for h in set(range(s.num_heads)) - set(keep.q_heads) if heads_here else ():
            rows = slice(h * d, (h + 1) * d)
            if gated:
                getattr(attn, lay.q).weight[2 * h * d : 2 * (h + 1) * d] = 0
            elif lay.qkv:
                getattr(attn, lay.qkv).weight[rows] = 0
            else:
                getattr(attn, lay.q).weight[rows] = 0
                if getattr(attn, lay.q).bias is not None:
                    getattr(attn, lay.q).bias[rows] = 0
            getattr(attn, lay.o).weight[:, rows] = 0
        for g in set(range(s.num_kv_heads)) - set(keep.kv_heads) if heads_here else ():
            rows = slice(g * d, (g + 1) * d)
            if lay.qkv:
                k0 = s.num_heads * d
                v0 = k0 + s.num_kv_heads * d
                getattr(attn, lay.qkv).weight[k0 + g * d : k0 + (g + 1) * d] = 0
                getattr(attn, lay.qkv).weight[v0 + g * d : v0 + (g + 1) * d] = 0
            else:
                for name in (lay.k, lay.v):
                    proj = getattr(attn, name)
                    proj.weight[rows] = 0
                    if proj.bias is not None:
                        proj.bias[rows] = 0
        for c in set(range(s.intermediate_size)) - set(keep.mlp_channels):
            if lay.gate_up:
                getattr(mlp, lay.gate_up).weight[[c, s.intermediate_size + c]] = 0
            else:
                for name in lay.channel_projections():
                    getattr(mlp, name).weight[c] = 0
            getattr(mlp, lay.down).weight[:, c] = 0
    return ref


class SkipLayer(nn.Module):
    """Stands in for a decoder layer and returns its input unchanged."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def skipped(model: nn.Module, layers: list[int]) -> nn.Module:
    """A copy of ``model`` whose given decoder layers pass their input through."""
    ref = copy.deepcopy(model)
    stack = get_adapter(ref).layers(ref)
    for i in layers:
        stack[i] = SkipLayer(stack[i])
    return ref
