"""Gemma 4: per-layer inputs and KV sharing."""

from __future__ import annotations

import torch
from torch import nn

from vlmprune.adapters.base import _STANDARD, Adapter, VLMParts, config_value, register_adapter


@register_adapter("gemma4", VLMParts("model.vision_tower", "model.embed_vision", "model.language_model"),
                  {"gemma4_text": _STANDARD})
class Gemma4Adapter(Adapter):
    """Gemma 4: per-layer inputs (PLE: ``embed_tokens_per_layer`` columns and
    ``per_layer_model_projection`` rows ``[i * P, (i + 1) * P)`` belong to layer i, P =
    ``hidden_size_per_layer_input``), KV sharing (the last ``num_kv_shared_layers`` layers reuse the
    keys/values of the last earlier layer of their type, the "store" layer), full-attention layers
    with their own head_dim and kv heads (``per_layer_config``), k = v on those, an optional MoE block.

    Layers and MLP channels can be pruned; attention heads are kept whole (a consumer's q heads read
    its producer's kv groups, and head widths differ per layer type); MoE experts are kept whole."""

    def has_heads(self, layer: nn.Module) -> bool:
        return False

    def protected_layers(self, model: nn.Module) -> set[int]:
        config = self.text_config(model)
        modes, types = config.kv_sharing_modes, config.layer_types
        consumed = {types[i] for i, m in enumerate(modes) if m == "reuse"}
        # the last layer too: Gemma4TextConfig forces the last layer to full attention on loading
        return {i for i, m in enumerate(modes) if m == "store" and types[i] in consumed} | {len(types) - 1}

    def protected_reason(self, model: nn.Module) -> str:
        return ("KV sharing: a producer holds the keys and values that the last num_kv_shared_layers layers of its "
                "type reuse, so drop those consumers first; and the last layer must stay a full-attention layer, "
                "which Gemma4TextConfig forces on loading")

    def refuse_drop(self, model: nn.Module, drop: set[int]) -> str | None:
        types = self.text_config(model).layer_types
        kept = [i for i in range(len(types)) if i not in drop]
        if kept and types[kept[-1]] != "full_attention":
            return (f"the last remaining layer ({kept[-1]}) would be {types[kept[-1]]}; Gemma4TextConfig forces the "
                    f"last layer to full attention on loading")
        return None

    def kv_positions(self, model: nn.Module, index: int, seq: int) -> int:
        if self.text_config(model).kv_sharing_modes[index] == "reuse":
            return 0  # reads the keys and values its store layer keeps
        return Adapter.kv_positions(self, model, index, seq)

    def mlp_width_factor(self, model: nn.Module, index: int) -> int:
        config = self.text_config(model)
        return 2 if config.use_double_wide_mlp and config.kv_sharing_modes[index] == "reuse" else 1

    def outside_layer_params(self, model: nn.Module) -> list[int]:
        lm = self.language_model(model)
        n = len(lm.layers)
        if not config_value(self.text_config(model), "hidden_size_per_layer_input"):
            return [0] * n
        per_layer = lm.embed_tokens_per_layer.weight.numel() + lm.per_layer_model_projection.weight.numel()
        return [per_layer // n] * n  # its columns of the PLE table, its rows of the PLE projection

    def layers_dropped_(self, model: nn.Module, kept: list[int]) -> None:
        lm, config = self.language_model(model), self.text_config(model)
        first_shared_old = lm.first_kv_shared_layer_idx
        config.num_kv_shared_layers = sum(1 for i in kept if i >= first_shared_old)
        lm.first_kv_shared_layer_idx = config.num_hidden_layers - config.num_kv_shared_layers
        spec = getattr(config, "_heterogeneity_spec", None)
        if spec is not None:
            overrides = {new: dict(spec.per_layer_overrides[old]) for new, old in enumerate(kept)
                         if old in spec.per_layer_overrides}
            config.per_layer_config = overrides
        width = config_value(config, "hidden_size_per_layer_input")
        if width:
            cols = torch.cat([torch.arange(i * width, (i + 1) * width) for i in kept])
            table = lm.embed_tokens_per_layer
            table.weight = nn.Parameter(table.weight.data[:, cols], requires_grad=table.weight.requires_grad)
            table.embedding_dim = len(cols)
            proj = lm.per_layer_model_projection
            proj.weight = nn.Parameter(proj.weight.data[cols], requires_grad=proj.weight.requires_grad)
            proj.out_features = len(cols)
        lm._keys_to_ignore_on_load_unexpected = [
            f"layers.{i}.self_attn.{name}" for i, layer in enumerate(lm.layers) if layer.self_attn.is_kv_shared_layer
            for name in ("k_proj", "v_proj", "k_norm", "v_norm")]
        modes = config.kv_sharing_modes  # the config's view must match what each layer was built as
        for i, layer in enumerate(lm.layers):
            attn = layer.self_attn
            built = "reuse" if attn.is_kv_shared_layer else ("store" if attn.store_full_length_kv else None)
            if modes[i] != built and not (built is None and modes[i] == "store"):
                raise AssertionError(f"layer {i} was built as KV {built!r} but the config now says {modes[i]!r}")
            layer.self_attn.store_full_length_kv = modes[i] == "store"
