"""Apply a PruningPlan to a model in place and leave the model and its config consistent.

Order: widths first (plan indices are original-layer indices), then depth. Afterwards the text
config says what the modules are: num_hidden_layers, layer_types and other per-layer lists,
num_attention_heads, num_key_value_heads, head_dim, intermediate_size; every attention module's
``layer_idx`` and cached ``num_key_value_groups``.

When widths differ between layers, the config's scalar fields keep describing the layers that
were not width-pruned and ``vlmprune_layer_widths`` records the others; plain ``from_pretrained``
then fails on a shape mismatch instead of loading wrong weights, and ``vlmprune.load`` rebuilds.
"""

from __future__ import annotations

import copy

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from vlmprune.adapters import Adapter, config_value, get_adapter
from vlmprune.planning.plan import LayerKeep, LayerShape, PlanError, PruningPlan
from vlmprune.summary import layer_shapes
from vlmprune.surgery.rows import keep_cols_, keep_rows_

WIDTHS_KEY = "vlmprune_layer_widths"
# Text-config lists with one entry per decoder layer; they lose the entries of dropped layers.
PER_LAYER_LISTS = ("layer_types", "no_rope_layers", "swa_layers")


def apply_plan_(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Prune ``model`` in place as ``plan`` says; returns the same model.

    The plan is checked against the model first (PlanError names the wrong entry), so a
    refused plan leaves the model untouched.
    """
    adapter = get_adapter(model)
    shapes = layer_shapes(model, adapter)
    resolved = plan.resolve(shapes)
    layers = adapter.layers(model)
    headless = sorted(i for i, keep in resolved.items()
                      if not adapter.has_heads(layers[i]) and (len(keep.q_heads), len(keep.kv_heads))
                      != (shapes[i].num_heads, shapes[i].num_kv_heads))
    if headless:
        raise PlanError(f"the plan cuts attention heads in layer(s) {headless}, whose {adapter.model_type} token mixer "
                        f"keeps its heads whole (no prunable q heads / kv groups there); cut only MLP channels in them")
    protected = sorted(adapter.protected_layers(model) & set(plan.drop_layers))
    if protected:
        raise PlanError(f"the plan drops layer(s) {protected}, which {adapter.model_type} needs in place "
                        f"({adapter.protected_reason(model)}); drop other layers")
    refusal = adapter.refuse_drop(model, set(plan.drop_layers)) if plan.drop_layers else None
    if refusal:
        raise PlanError(f"the plan cannot drop layer(s) {sorted(plan.drop_layers)} of {adapter.model_type}: {refusal}")
    for i, keep in resolved.items():
        prune_layer_width_(layers[i], adapter, shapes[i], keep)
    if plan.drop_layers:
        _drop_layers_(model, adapter, plan.drop_layers)
    sync_config_(model, adapter)
    return model


def prune_layer_width_(layer: nn.Module, adapter: Adapter, shape: LayerShape, keep: LayerKeep) -> None:
    """Keep only ``keep``'s heads and MLP channels of one decoder layer (original indices).

    Every projection keeps the rows / columns whose owning structure is kept, as the adapter's
    slices say (a fused projection is owned by several slices: a row stays if none drops it).
    """
    kept = {"q": keep.q_heads, "kv": keep.kv_heads, "mlp": keep.mlp_channels}
    full = {"q": shape.num_heads, "kv": shape.num_kv_heads, "mlp": shape.intermediate_size}
    masks: dict[tuple[int, int], tuple[nn.Linear, int, torch.Tensor]] = {}
    for slc in adapter.slices(layer, shape):
        if len(kept[slc.unit]) == full[slc.unit]:
            continue
        key = (id(slc.module), slc.dim)
        all_kept = torch.ones(slc.owner.shape[0], dtype=torch.bool, device="cpu")
        _, _, mask = masks.setdefault(key, (slc.module, slc.dim, all_kept))
        mask &= (slc.owner < 0) | torch.isin(slc.owner, torch.as_tensor(kept[slc.unit], dtype=torch.long, device="cpu"))
    for module, dim, mask in masks.values():
        (keep_rows_ if dim == 0 else keep_cols_)(module, mask.nonzero().squeeze(1))


def _drop_layers_(model: nn.Module, adapter: Adapter, drop: list[int]) -> None:
    lm = adapter.language_model(model)
    dropped = set(drop)
    lm.layers = nn.ModuleList([layer for i, layer in enumerate(lm.layers) if i not in dropped])
    config = adapter.text_config(model)
    old_n = config.num_hidden_layers
    for name in PER_LAYER_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, (list, tuple)) and len(values) == old_n:
            setattr(config, name, [v for i, v in enumerate(values) if i not in dropped])
    config.num_hidden_layers = len(lm.layers)
    for new_idx, layer in enumerate(lm.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    adapter.layers_dropped_(model, [i for i in range(old_n) if i not in dropped])


def sync_config_(model: nn.Module, adapter: Adapter | None = None) -> None:
    """Make the text config and the per-module cached attributes match the weights."""
    adapter = adapter or get_adapter(model)
    config = adapter.text_config(model)
    actual = layer_shapes(model, adapter)
    config.num_hidden_layers = len(actual)
    # what the config must say for the stock class to build each layer (Gemma 4 doubles some MLPs)
    shapes = stock_view(actual, [adapter.mlp_width_factor(model, i) for i in range(len(actual))])
    # A family whose heads are all kept whole (Gemma 4: head widths per layer type in per_layer_config)
    # keeps its head fields as they are.
    any_heads = any(adapter.has_heads(layer) for layer in adapter.layers(model))
    head_dims = {s.head_dim for s in shapes}
    if len(head_dims) != 1:
        raise AssertionError(f"layers disagree on head_dim: {sorted(head_dims)}")
    widths = {"intermediate_size": shapes[0].intermediate_size}
    if any_heads:
        # Written explicitly: several families derive head_dim from hidden_size // num_heads.
        config.head_dim = shapes[0].head_dim
        widths = {"num_attention_heads": shapes[0].num_heads, "num_key_value_heads": shapes[0].num_kv_heads, **widths}
    # Uniform widths go into the config's own fields when the model class can be built from them
    # (Llama and Gemma3 configs refuse a hidden_size not divisible by num_attention_heads, even
    # with an explicit head_dim; Qwen2-VL derives head_dim from the head count); otherwise they
    # are recorded per layer like non-uniform widths and vlmprune.load rebuilds them.
    if stock_obstacle(config, adapter, shapes, any_heads) is None:
        for key, value in widths.items():
            setattr(config, key, value)
        if hasattr(config, WIDTHS_KEY):
            delattr(config, WIDTHS_KEY)
    base = LayerShape(*(config_value(config, k) for k in ("num_attention_heads", "num_key_value_heads", "head_dim",
                                                            "intermediate_size")))
    overrides = {}
    for idx, (layer, shape, stock) in enumerate(zip(adapter.layers(model), actual, shapes)):
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        if adapter.has_heads(layer):
            attn.num_key_value_groups = shape.group_size
            for attr, value in (("num_heads", shape.num_heads), ("num_key_value_heads", shape.num_kv_heads)):
                if hasattr(attn, attr):
                    setattr(attn, attr, value)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = shape.intermediate_size
        if stock != base:
            overrides[str(idx)] = {
                "num_attention_heads": shape.num_heads,
                "num_key_value_heads": shape.num_kv_heads,
                "intermediate_size": shape.intermediate_size,
            }
        if adapter.has_heads(layer):
            _give_layer_config(attn, config, overrides.get(str(idx)))
    if overrides:
        setattr(config, WIDTHS_KEY, overrides)


def stock_view(shapes: list[LayerShape], factors: list[int]) -> list[LayerShape]:
    """Layer shapes with each MLP width divided by the factor the stock class multiplies it by
    (a width it cannot divide stays as a negative, unique value: no config field gives it)."""
    out = []
    for s, f in zip(shapes, factors):
        width = s.intermediate_size // f if s.intermediate_size % f == 0 else -s.intermediate_size - 10**9 * f
        out.append(LayerShape(s.num_heads, s.num_kv_heads, s.head_dim, width))
    return out


def stock_obstacle(config, adapter: Adapter, shapes: list[LayerShape], any_heads: bool = True) -> str | None:
    """Why the family's stock class could not be built with these layer shapes from its config
    (so plain ``from_pretrained`` refuses and ``vlmprune.load`` is needed), or None when it can."""
    if len(set(shapes)) != 1:
        return "layers would have different widths (stock configs hold one width per field)"
    shape = shapes[0]
    if not adapter.layout.config_head_dim and config.hidden_size != shape.num_heads * shape.head_dim:
        return (f"{adapter.text_model_type} derives head_dim from hidden_size // num_attention_heads, which "
                f"{shape.num_heads} heads of {shape.head_dim} would not give")
    widths = {"intermediate_size": shape.intermediate_size}
    if any_heads:
        widths.update(num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads)
    if not _config_accepts(config, widths):
        return (f"the {type(config).__name__} refuses {shape.num_heads} attention heads with hidden_size "
                f"{config.hidden_size} (it requires hidden_size divisible by the head count)")
    return None


def predicted_shapes(model: nn.Module, plan: PruningPlan, adapter: Adapter | None = None) -> list[LayerShape]:
    """The layer shapes ``apply_plan_`` would leave, computed without cutting (checks the plan)."""
    adapter = adapter or get_adapter(model)
    shapes = layer_shapes(model, adapter)
    resolved = plan.resolve(shapes)
    layers = adapter.layers(model)
    new = {i: LayerShape(len(k.q_heads), len(k.kv_heads), shapes[i].head_dim, len(k.mlp_channels))
           for i, k in resolved.items()}
    headed = [i for i, layer in enumerate(layers) if adapter.has_heads(layer)]
    first = new.get(headed[0], shapes[headed[0]]) if headed else None
    out = []
    for i in plan.kept_layers(len(shapes)):
        s = new.get(i, shapes[i])
        if first is not None and not adapter.has_heads(layers[i]):  # borrows the first headed layer's heads
            s = LayerShape(first.num_heads, first.num_kv_heads, first.head_dim, s.intermediate_size)
        out.append(s)
    return out


def _kept_factors(model: nn.Module, plan: PruningPlan, adapter: Adapter) -> list[int]:
    # a kept layer keeps its role (a KV consumer stays one), so its factor is the one it has now
    return [adapter.mlp_width_factor(model, i) for i in plan.kept_layers(len(adapter.layers(model)))]


def loads_stock(model: nn.Module, plan: PruningPlan) -> str | None:
    """None when the model ``plan`` makes loads with plain ``from_pretrained``; else the reason
    it needs ``vlmprune.load`` (said before cutting)."""
    adapter = get_adapter(model)
    any_heads = any(adapter.has_heads(layer) for layer in adapter.layers(model))
    shapes = stock_view(predicted_shapes(model, plan, adapter), _kept_factors(model, plan, adapter))
    return stock_obstacle(adapter.text_config(model), adapter, shapes, any_heads)


def _config_accepts(config, values: dict) -> bool:
    trial = copy.copy(config)
    for key, value in values.items():
        setattr(trial, key, value)
    validate = getattr(trial, "validate", None)
    try:
        if validate is not None:
            validate()
    except (StrictDataclassError, ValueError, TypeError):
        return False
    return True


def _give_layer_config(module: nn.Module, config, override: dict | None) -> None:
    """Some attention modules read widths from ``self.config`` at run time (Phi-3's fused qkv
    split); a layer whose widths differ from the shared config gets its own copy."""
    if not hasattr(module, "config"):
        return
    if override is None:
        module.config = config
        return
    own = copy.copy(config)
    for key, value in override.items():
        setattr(own, key, value)
    if hasattr(own, WIDTHS_KEY):
        delattr(own, WIDTHS_KEY)
    module.config = own
