"""Architecture adapters: the only place that knows where a model family keeps its parts.

Two small tables. ``VLM_PARTS`` is keyed by the vision-language model's ``model_type`` and says
where the vision tower, projector and language model live. ``LAYER_LAYOUTS`` is keyed by the
text config's ``model_type`` and says how one decoder layer lays out its attention and MLP.
Everything else in vlmprune is generic and asks these tables.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vlmprune.errors import UnsupportedModelError


@dataclass(frozen=True)
class VLMParts:
    """Attribute paths (dotted, from the top-level model) of a VLM's three parts."""

    vision: str
    projector: str
    language_model: str


@dataclass(frozen=True)
class LayerLayout:
    """How one decoder layer of a text backbone is laid out.

    Attention is either separate ``q``/``k``/``v`` projections or one fused ``qkv`` projection
    whose rows are [q heads | k heads | v heads]. The MLP is either gated (``gate``/``up`` rows,
    ``down`` columns), gated and fused (``gate_up`` rows = [gate | up]), or plain (``up`` rows,
    ``down`` columns, e.g. Phi's fc1/fc2).
    """

    attn: str = "self_attn"
    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    qkv: str | None = None
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str | None = "gate_proj"
    up: str | None = "up_proj"
    gate_up: str | None = None
    down: str = "down_proj"
    # False where the modeling code derives head_dim = hidden_size // num_attention_heads and
    # ignores config.head_dim (Qwen2-VL's text attention): there a changed head count cannot be
    # written into the config and is recorded per layer instead.
    config_head_dim: bool = True

    def head_projections(self) -> tuple[str, ...]:
        """Names of the attention projections whose output rows belong to heads."""
        return (self.qkv,) if self.qkv else (self.q, self.k, self.v)

    def channel_projections(self) -> tuple[str, ...]:
        """Names of the MLP projections whose output rows belong to channels."""
        if self.gate_up:
            return (self.gate_up,)
        return tuple(n for n in (self.gate, self.up) if n)


_LLAVA_LIKE = VLMParts("model.vision_tower", "model.multi_modal_projector", "model.language_model")
_QWEN_VL = VLMParts("model.visual", "model.visual.merger", "model.language_model")
_IDEFICS = VLMParts("model.vision_model", "model.connector", "model.text_model")

VLM_PARTS: dict[str, VLMParts] = {
    "llava": _LLAVA_LIKE,
    "llava_onevision": _LLAVA_LIKE,
    "internvl": _LLAVA_LIKE,
    "gemma3": _LLAVA_LIKE,
    "qwen2_vl": _QWEN_VL,
    "qwen2_5_vl": _QWEN_VL,
    "idefics3": _IDEFICS,
    "smolvlm": _IDEFICS,
}

_STANDARD = LayerLayout()
LAYER_LAYOUTS: dict[str, LayerLayout] = {
    "llama": _STANDARD,
    "mistral": _STANDARD,
    "qwen2": _STANDARD,
    "qwen2_vl_text": LayerLayout(config_head_dim=False),
    "qwen2_5_vl_text": LayerLayout(config_head_dim=False),
    "gemma3_text": _STANDARD,
    "phi": LayerLayout(o="dense", gate=None, up="fc1", down="fc2"),
    "phi3": LayerLayout(q=None, k=None, v=None, qkv="qkv_proj", gate=None, up=None, gate_up="gate_up_proj"),
}


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


@dataclass(frozen=True)
class Adapter:
    """A model family: where its parts are and how its decoder layers are laid out."""

    model_type: str
    text_model_type: str
    parts: VLMParts
    layout: LayerLayout

    def vision(self, model: nn.Module) -> nn.Module:
        return _get(model, self.parts.vision)

    def projector(self, model: nn.Module) -> nn.Module:
        return _get(model, self.parts.projector)

    def language_model(self, model: nn.Module) -> nn.Module:
        return _get(model, self.parts.language_model)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.language_model(model).layers

    def text_config(self, model: nn.Module):
        return model.config.get_text_config()

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.layout.attn)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.layout.mlp)


def supported_model_types() -> list[str]:
    return sorted(VLM_PARTS)


def get_adapter(model_or_config) -> Adapter:
    """The adapter of a model (or its config); a clear error for an unsupported family."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in VLM_PARTS:
        raise UnsupportedModelError(
            f"vlmprune does not support model_type '{model_type}'. Supported vision-language "
            f"families: {', '.join(supported_model_types())}. Adding one is a row in "
            f"vlmprune/adapters/__init__.py (VLM_PARTS, LAYER_LAYOUTS)."
        )
    text_type = config.get_text_config().model_type
    if text_type not in LAYER_LAYOUTS:
        raise UnsupportedModelError(
            f"vlmprune supports '{model_type}' but not its language model type '{text_type}'. "
            f"Supported language backbones: {', '.join(sorted(LAYER_LAYOUTS))}."
        )
    return Adapter(model_type, text_type, VLM_PARTS[model_type], LAYER_LAYOUTS[text_type])
