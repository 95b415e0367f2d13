"""Every adapter: prune -> same logits as the reference -> save -> reload -> same logits and tokens."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from checks import assert_close, check_config, greedy, logits, reload_plain
from reference import skipped, zeroed
from tiny_models import FAMILIES, build_tiny, make_inputs

import vlmprune
from vlmprune.adapters import get_adapter
from vlmprune.planning.plan import PruningPlan
from vlmprune.summary import layer_shapes
from vlmprune.surgery.apply import apply_plan_

GQA_FAMILIES = [f for f in FAMILIES if f != "llava_llama_mha"]


def width_entry(shape, mode: str, heads: bool = True) -> dict:
    """Kept heads/channels of one layer: drop alternate kv groups, or one q head in every group
    (only MLP channels in a layer without prunable heads: Qwen3.5's linear attention)."""
    g = shape.group_size
    if not heads:
        entry = {}
    elif mode == "groups":
        kv = list(range(1, shape.num_kv_heads, 2))
        q = [h for k in kv for h in range(k * g, (k + 1) * g)]
        entry = {"kv_heads": kv, "q_heads": q}
    else:
        entry = {"q_heads": [k * g + j for k in range(shape.num_kv_heads) for j in range(1, g)]}
    entry["mlp_channels"] = [c for c in range(shape.intermediate_size) if c % 3 != 1]
    return entry


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_plan_is_bit_identical(family):
    model = build_tiny(family)
    inputs = make_inputs(family, model)
    before = logits(model, inputs)
    apply_plan_(model, PruningPlan())
    after = logits(model, inputs)
    assert after.dtype == before.dtype and torch.equal(after, before)


NEEDS_VLMPRUNE_LOAD = {("groups", "qwen2_vl"), ("groups", "qwen2_5_vl"), ("heads", "llava_llama_gqa"),
                       ("heads", "qwen2_vl"), ("heads", "qwen2_5_vl")}


@pytest.mark.parametrize("mode", ["groups", "heads"])
@pytest.mark.parametrize("family", FAMILIES)
def test_width_plan_equals_zeroed_original_and_reloads(family, mode, tmp_path):
    model = build_tiny(family)
    shapes = layer_shapes(model)
    if mode == "heads" and shapes[0].group_size == 1:
        pytest.skip("multi-head attention has one q head per kv head: only whole groups can go")
    adapter = get_adapter(model)
    plan = PruningPlan(layers={i: width_entry(s, mode, adapter.has_heads(layer))
                               for i, (s, layer) in enumerate(zip(shapes, adapter.layers(model)))})
    inputs = make_inputs(family, model)
    expected = logits(zeroed(model, plan), inputs)
    apply_plan_(model, plan)
    check_config(model)
    assert_close(logits(model, inputs), expected)
    config = model.config.get_text_config()
    # Only where the config class refuses these (uniform) widths: Llama with a hidden_size not divisible by
    # the new head count, Qwen2-VL (head_dim derived from the head count); vlmprune.load handles those.
    assert bool(getattr(config, "vlmprune_layer_widths", None)) == ((mode, family) in NEEDS_VLMPRUNE_LOAD)
    if (mode, family) in NEEDS_VLMPRUNE_LOAD:
        out = vlmprune.save_model(model, tmp_path / "out", plan=plan)
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # a shape mismatch, not another failure
            transformers.AutoModelForImageTextToText.from_pretrained(out)
        loaded = vlmprune.load(out)
    else:
        loaded = reload_plain(model, tmp_path)
    check_config(loaded)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    assert torch.equal(greedy(loaded, inputs), greedy(model, inputs))


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_plan_equals_skipped_layers_and_reloads(family, tmp_path):
    model = build_tiny(family)
    inputs = make_inputs(family, model)
    protected = get_adapter(model).protected_layers(model)
    drop = [i for i in (1, 2, 3, 0) if i not in protected][:2]  # [1, 2] unless the family needs one of them
    expected = logits(skipped(model, drop), inputs)
    old_types = getattr(model.config.get_text_config(), "layer_types", None)
    apply_plan_(model, PruningPlan(drop_layers=drop))
    check_config(model)
    if old_types is not None:
        assert model.config.get_text_config().layer_types == [t for i, t in enumerate(old_types) if i not in drop]
    assert_close(logits(model, inputs), expected)
    loaded = reload_plain(model, tmp_path)
    check_config(loaded)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    assert torch.equal(greedy(loaded, inputs), greedy(model, inputs))


@pytest.mark.parametrize("family", FAMILIES)
def test_non_uniform_widths_need_vlmprune_load(family, tmp_path):
    model = build_tiny(family)
    shapes = layer_shapes(model)
    mode = "heads" if shapes[0].group_size > 1 else "groups"
    adapter = get_adapter(model)
    last = 3 if 3 not in adapter.protected_layers(model) else 2  # Qwen3.5 keeps its one full-attention layer
    has_heads = adapter.has_heads(adapter.layers(model)[1])
    plan = PruningPlan(drop_layers=[last], layers={1: width_entry(shapes[1], mode, has_heads)})
    inputs = make_inputs(family, model)
    reference = logits(skipped(zeroed(model, plan), [last]), inputs)
    apply_plan_(model, plan)
    check_config(model)
    assert set(model.config.get_text_config().vlmprune_layer_widths) == {"1"}
    assert_close(logits(model, inputs), reference)
    out = vlmprune.save_model(model, tmp_path / "out", plan=plan)
    with pytest.raises(RuntimeError, match="mismatch"):
        transformers.AutoModelForImageTextToText.from_pretrained(out)
    loaded = vlmprune.load(out)
    check_config(loaded)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    assert torch.equal(greedy(loaded, inputs), greedy(model, inputs))
    # pruning a pruned model again: indices refer to the model it is applied to
    # (layer 0, or a later one where the family needs layer 0 in place: DeepStack, KV-sharing producers)
    again = copy.deepcopy(loaded)
    victim = next(i for i in (0, 2, 3) if i not in get_adapter(again).protected_layers(again))
    apply_plan_(again, PruningPlan(drop_layers=[victim]))
    check_config(again)
    moved = "0" if victim == 0 else "1"
    widths = model.config.get_text_config().vlmprune_layer_widths
    assert again.config.get_text_config().vlmprune_layer_widths == {moved: widths["1"]}
