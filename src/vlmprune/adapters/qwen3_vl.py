"""Qwen3-VL: layers that DeepStack injects into stay."""

from __future__ import annotations

from torch import nn

from vlmprune.adapters.base import _QWEN_VL, _STANDARD, Adapter, register_adapter


@register_adapter("qwen3_vl", _QWEN_VL, {"qwen3_vl_text": _STANDARD})
class Qwen3VLAdapter(Adapter):
    """Qwen3-VL: DeepStack adds features of several vision layers to the hidden states after
    language-model layers ``0 .. len(deepstack_visual_indexes) - 1`` (by position in the layer list),
    so dropping one of those layers would silently move an injection to another layer. The DeepStack
    mergers (``model.visual.deepstack_merger_list``) sit beside the main merger and are kept."""

    def protected_layers(self, model: nn.Module) -> set[int]:
        vision = model.config.vision_config
        return set(range(len(getattr(vision, "deepstack_visual_indexes", None) or ())))

    def protected_reason(self, model: nn.Module) -> str:
        n = len(self.protected_layers(model))
        return (f"DeepStack adds the features of {n} vision layer(s) to the hidden states after language-model "
                f"layers 0..{n - 1}, by position; dropping one would move an injection to another layer")
