"""Qwen3.5: a hybrid of Gated DeltaNet and gated full attention."""

from __future__ import annotations

from torch import nn

from vlmprune.adapters.base import _QWEN_VL, _STANDARD, Adapter, Slice, _per_unit, register_adapter


@register_adapter("qwen3_5", _QWEN_VL, {"qwen3_5_text": _STANDARD})
class Qwen35Adapter(Adapter):
    """Qwen3.5: a hybrid decoder whose ``layer_types`` mix ``linear_attention`` (Gated DeltaNet,
    ``layer.linear_attn``) and gated full attention (``layer.self_attn``). The full-attention q
    projection carries a sigmoid output gate per head, laid out per head as [query (d) | gate (d)]
    (``view(..., -1, 2 * head_dim).chunk(2)``): a head owns 2 * head_dim rows of q_proj and head_dim
    columns of o_proj. Linear-attention layers keep their heads whole (their v/k heads, conv
    channels, A_log, dt_bias and gated norm are not cut); their MLP channels and the layers
    themselves can go."""

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn if hasattr(layer, "self_attn") else layer.linear_attn

    def has_heads(self, layer: nn.Module) -> bool:
        return hasattr(layer, "self_attn")

    def _full_attention(self, model: nn.Module) -> list[int]:
        return [i for i, t in enumerate(self.text_config(model).layer_types) if t == "full_attention"]

    def protected_layers(self, model: nn.Module) -> set[int]:
        full = self._full_attention(model)
        return set(full) if len(full) == 1 else set()

    def protected_reason(self, model: nn.Module) -> str:
        return ("it is the last full-attention layer: the hybrid cache reads the sequence length from a "
                "full-attention layer, and a stack of linear attention alone cannot generate")

    def refuse_drop(self, model: nn.Module, drop: set[int]) -> str | None:
        full = self._full_attention(model)
        if full and set(full) <= drop:
            return (f"it drops every full-attention layer ({full}); the hybrid cache reads the sequence length "
                    f"from a full-attention layer, so keep at least one")
        return None

    def kv_positions(self, model: nn.Module, index: int, seq: int) -> int:
        if self.text_config(model).layer_types[index] == "linear_attention":
            return 0  # Gated DeltaNet keeps a fixed-size recurrent state, not keys and values
        return Adapter.kv_positions(self, model, index, seq)

    def head_slices(self, layer: nn.Module, shape) -> list[Slice]:
        attn = self.attention(layer)
        gated_q = _per_unit(shape.num_heads, 2 * shape.head_dim)  # [query | gate] rows of each head
        return [Slice(s.module, 0, "q", gated_q) if s.module is attn.q_proj else s
                for s in Adapter.head_slices(self, layer, shape)]
