"""The generic adapter, the two tables and the registry (imported by :mod:`vlmprune.adapters`, which adds the
families with their own hooks: one module each)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
    "llava_next": _LLAVA_LIKE,  # image_newline lives beside the projector, outside the language model
    "mistral3": _LLAVA_LIKE,  # Pixtral tower; the patch merger is part of the projector
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
    "ministral": _STANDARD,
    "ministral3": _STANDARD,
    "qwen2": _STANDARD,
    "qwen2_vl_text": LayerLayout(config_head_dim=False),
    "qwen2_5_vl_text": LayerLayout(config_head_dim=False),
    "gemma3_text": _STANDARD,
    # q_norm / k_norm: one RMSNorm over head_dim shared by every head, so nothing to slice.
    "qwen3": _STANDARD,
    "phi": LayerLayout(o="dense", gate=None, up="fc1", down="fc2"),
    "phi3": LayerLayout(q=None, k=None, v=None, qkv="qkv_proj", gate=None, up=None, gate_up="gate_up_proj"),
}


UNITS = ("q", "kv", "mlp")  # a q head, a kv group (k and v heads), an MLP channel


@dataclass(frozen=True)
class Slice:
    """Rows (``dim=0``, with their bias entries) or input columns (``dim=1``) of one projection,
    each owned by one structure of kind ``unit``: ``owner[i]`` is the unit index of row/column i,
    or -1 where another slice (another unit kind) owns it, as in a fused qkv projection."""

    module: nn.Linear
    dim: int
    unit: str
    owner: torch.Tensor  # [rows or columns] long


def _per_unit(n_units: int, size: int) -> torch.Tensor:
    return torch.arange(n_units * size, device="cpu") // size  # cpu even under a meta-device init


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

    def base_model(self, model: nn.Module) -> nn.Module:
        """The model without its LM head (a forward that returns hidden states, not logits)."""
        return getattr(model, "model", model)

    def image_token_id(self, model: nn.Module) -> int | None:
        config = model.config
        for name in ("image_token_id", "image_token_index"):
            value = getattr(config, name, None)
            if isinstance(value, int):
                return value
        return None

    def protected_layers(self, model: nn.Module) -> set[int]:
        """Decoder layers that must not be dropped (a family that injects inputs at fixed layers)."""
        return set()

    def kv_positions(self, model: nn.Module, index: int, seq: int) -> int:
        """How many positions layer ``index`` keeps in its KV cache after a context of ``seq`` tokens
        (a sliding-window layer keeps the window minus the token being added)."""
        config = self.text_config(model)
        types = getattr(config, "layer_types", None)
        if types is not None and index < len(types) and types[index] == "sliding_attention":
            window = config_value(config, "sliding_window")
            if window:
                return min(seq, int(window) - 1)
        return seq

    def protected_reason(self, model: nn.Module) -> str:
        """Why :meth:`protected_layers` must stay (said when a plan tries to drop one)."""
        return "it feeds inputs into them"

    def refuse_drop(self, model: nn.Module, drop: set[int]) -> str | None:
        """Why dropping this set of layers together is not allowed (None: allowed), for constraints
        that no single protected layer expresses."""
        return None

    def mlp_width_factor(self, model: nn.Module, index: int) -> int:
        """How many times the config's ``intermediate_size`` the stock class builds layer ``index``'s
        MLP (Gemma 4's double-wide MLPs on KV-shared layers: 2). Index of the model as it is."""
        return 1

    def outside_layer_params(self, model: nn.Module) -> list[int]:
        """Parameters outside each decoder layer that go when it is dropped (see :meth:`layers_dropped_`)."""
        return [0] * len(self.layers(model))

    def layers_dropped_(self, model: nn.Module, kept: list[int]) -> None:
        """Called after decoder layers were removed (``kept``: original indices of the survivors, in
        order; config lists, num_hidden_layers and layer_idx already updated): drop what else a
        family keeps per layer outside the layers (Gemma 4's per-layer input slices)."""

    def has_heads(self, layer: nn.Module) -> bool:
        """Whether this layer's attention has prunable q heads / kv groups. A hybrid family's
        layers without them (Qwen3.5's linear attention) keep their token mixer whole: their
        :meth:`slices` list only MLP channels, their shape borrows the head widths of the
        layers that have heads, and a plan that cuts heads in them is refused."""
        return True

    def slices(self, layer: nn.Module, shape) -> list[Slice]:
        """Which rows / columns of which projection each q head, kv group and MLP channel owns.

        ``shape`` is the layer's :class:`~vlmprune.planning.plan.LayerShape`. Separate q/k/v or fused
        ``qkv`` ([q heads | k heads | v heads]) rows and o columns; gate/up (or fc1) rows, fused
        ``gate_up`` ([gate | up]) rows, down (fc2) columns.
        """
        heads = self.head_slices(layer, shape) if self.has_heads(layer) else []
        return heads + self.mlp_slices(layer, shape)

    def head_slices(self, layer: nn.Module, shape) -> list[Slice]:
        """The attention part of :meth:`slices`: q/k/v (or fused qkv) rows and o columns."""
        lay = self.layout
        attn = self.attention(layer)
        h, kv, d = shape.num_heads, shape.num_kv_heads, shape.head_dim
        q_owner, kv_owner = _per_unit(h, d), _per_unit(kv, d)
        out: list[Slice] = []
        if lay.qkv:
            fused = getattr(attn, lay.qkv)
            none_q, none_kv = torch.full((h * d,), -1, device="cpu"), torch.full((kv * d,), -1, device="cpu")
            out.append(Slice(fused, 0, "q", torch.cat([q_owner, none_kv, none_kv])))
            out.append(Slice(fused, 0, "kv", torch.cat([none_q, kv_owner, kv_owner])))
        else:
            out.append(Slice(getattr(attn, lay.q), 0, "q", q_owner))
            out += [Slice(getattr(attn, name), 0, "kv", kv_owner) for name in (lay.k, lay.v)]
        out.append(Slice(getattr(attn, lay.o), 1, "q", q_owner))
        return out

    def mlp_slices(self, layer: nn.Module, shape) -> list[Slice]:
        """The MLP part of :meth:`slices`: gate/up (or fc1, or fused gate_up) rows, down columns."""
        lay = self.layout
        mlp = self.mlp(layer)
        channels = torch.arange(shape.intermediate_size, device="cpu")
        out: list[Slice] = []
        if lay.gate_up:
            out.append(Slice(getattr(mlp, lay.gate_up), 0, "mlp", torch.cat([channels, channels])))
        else:
            out += [Slice(getattr(mlp, name), 0, "mlp", channels) for name in lay.channel_projections()]
        out.append(Slice(getattr(mlp, lay.down), 1, "mlp", channels))
        return out


ADAPTERS: dict[str, type[Adapter]] = {}  # model_type -> Adapter subclass of a family with its own hooks


def register_adapter(model_type: str, parts: VLMParts, text_layouts: dict[str, LayerLayout] | None = None):
    """Register a family: its parts, the layouts of its text backbones, and (decorating an Adapter
    subclass) the hooks it overrides. Returns a decorator; ``register_adapter(...)(Adapter)`` for a
    family that needs no hooks."""

    def register(cls: type[Adapter]) -> type[Adapter]:
        VLM_PARTS[model_type] = parts
        LAYER_LAYOUTS.update(text_layouts or {})
        ADAPTERS[model_type] = cls
        return cls

    return register


def config_value(config, name: str):
    """A text-config value, read past transformers' per-layer (heterogeneous) config guard."""
    raw = getattr(config, "_getattr_without_heterogeneous_validation", None)
    return raw(name) if raw is not None else getattr(config, name)


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
            f"vlmprune/adapters/base.py (VLM_PARTS, LAYER_LAYOUTS)."
        )
    text_type = config.get_text_config().model_type
    if text_type not in LAYER_LAYOUTS:
        raise UnsupportedModelError(
            f"vlmprune supports '{model_type}' but not its language model type '{text_type}'. "
            f"Supported language backbones: {', '.join(sorted(LAYER_LAYOUTS))}."
        )
    cls = ADAPTERS.get(model_type, Adapter)
    return cls(model_type, text_type, VLM_PARTS[model_type], LAYER_LAYOUTS[text_type])
