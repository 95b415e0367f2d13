"""Constraints of the 2025-26 families (issue 16): what each one refuses, and why."""

from __future__ import annotations

import math

import pytest
import torch
from checks import assert_close, check_config, greedy, labelled, logits, reload_plain
from tiny_models import build_tiny, make_inputs

import vlmprune
from vlmprune.adapters import get_adapter
from vlmprune.errors import PlanError
from vlmprune.planning.plan import PruningPlan
from vlmprune.prune.run import score_and_plan
from vlmprune.record import RunRecord

# ---------------------------------------------------------------- Qwen3-VL: DeepStack


def test_qwen3_vl_tiny_model_has_deepstack_on():
    model = build_tiny("qwen3_vl")
    inputs = make_inputs("qwen3_vl", model)
    before = logits(model, inputs)
    with torch.no_grad():
        for p in model.model.visual.deepstack_merger_list.parameters():
            p.zero_()
    assert not torch.allclose(logits(model, inputs), before)  # the injection reaches the logits


def test_dropping_a_deepstack_layer_is_refused_and_leaves_the_model_untouched():
    model = build_tiny("qwen3_vl")
    assert get_adapter(model).protected_layers(model) == {0}
    inputs = make_inputs("qwen3_vl", model)
    before = logits(model, inputs)
    with pytest.raises(PlanError, match=r"drops layer\(s\) \[0\], which qwen3_vl needs in place \(DeepStack adds"):
        vlmprune.apply_plan_(model, PruningPlan(drop_layers=[0, 2]))
    assert len(get_adapter(model).layers(model)) == 4
    assert torch.equal(logits(model, inputs), before)


def test_layer_criteria_score_deepstack_layers_but_never_choose_them():
    model = build_tiny("qwen3_vl")
    batches = [labelled(model, "qwen3_vl", seed=0)]
    plan, _ = score_and_plan(model, "layer", 0.4, "block_influence", batches)  # three of four layers
    assert plan.drop_layers == [1, 2, 3]
    plan, scores = score_and_plan(model, "layer", 0.2, "block_influence", batches)
    assert 0 not in plan.drop_layers and plan.extra["protected_layers"] == [0]
    assert all(math.isfinite(v) for v in plan.extra["scores"]["layers"])  # layer 0 is scored like the others
    assert plan.extra["scores"]["layers"] == pytest.approx(scores.values.layers.tolist(), rel=1e-5)


# ---------------------------------------------------------------- Qwen3.5: hybrid linear / gated full attention


def test_qwen3_5_linear_attention_heads_are_kept_whole():
    model = build_tiny("qwen3_5")
    adapter = get_adapter(model)
    assert [adapter.has_heads(layer) for layer in adapter.layers(model)] == [False, False, False, True]
    with pytest.raises(PlanError, match=r"cuts attention heads in layer\(s\) \[0\], whose qwen3_5 token mixer keeps"):
        vlmprune.apply_plan_(model, PruningPlan(layers={0: {"kv_heads": [1]}, 3: {"kv_heads": [1]}}))
    # the gated q projection: each head owns 2 * head_dim rows ([query | gate]) and head_dim o_proj columns
    q = next(s for s in adapter.slices(adapter.layers(model)[3], vlmprune.prune.layer_shapes(model)[3])
             if s.unit == "q" and s.dim == 0)
    assert q.owner.tolist() == [h for h in range(4) for _ in range(64)]


def test_qwen3_5_width_plans_from_scores_leave_linear_attention_whole():
    model = build_tiny("qwen3_5")
    batches = [labelled(model, "qwen3_5", seed=0)]
    plan, _ = score_and_plan(model, "width", 0.2, "taylor", batches)
    for i in (0, 1, 2):
        assert not {"q_heads", "kv_heads"} & set(plan.layers.get(i, {}))
    vlmprune.apply_plan_(model, plan)


def test_qwen3_5_keeps_a_full_attention_layer():
    model = build_tiny("qwen3_5")
    with pytest.raises(PlanError,
                       match=r"drops layer\(s\) \[3\], which qwen3_5 needs in place \(it is the last full-attention"):
        vlmprune.apply_plan_(model, PruningPlan(drop_layers=[3]))
    text = model.config.get_text_config()
    text.layer_types = ["full_attention", "linear_attention", "linear_attention", "full_attention"]
    with pytest.raises(PlanError, match="drops every full-attention layer"):
        vlmprune.apply_plan_(model, PruningPlan(drop_layers=[0, 3]))


# ---------------------------------------------------------------- Gemma 4: KV sharing, per-layer inputs


def test_gemma4_kv_sharing_producers_are_protected():
    model = build_tiny("gemma4")
    text = model.config.get_text_config()
    assert text.kv_sharing_modes == ["store", None, None, "store", "reuse", "reuse"]
    assert get_adapter(model).protected_layers(model) == {0, 3, 5}  # producers, and the last (full) layer
    with pytest.raises(PlanError,
                       match=r"drops layer\(s\) \[3\], which gemma4 needs in place \(KV sharing: a producer"):
        vlmprune.apply_plan_(model, PruningPlan(drop_layers=[3]))
    batches = [labelled(model, "gemma4", seed=0)]
    plan, _ = score_and_plan(model, "layer", 0.3, "block_influence", batches)
    assert not {0, 3, 5} & set(plan.drop_layers)
    adapter = get_adapter(model)  # the rule behind protecting the last layer, for any set of dropped layers
    assert "the last remaining layer (4) would be sliding_attention" in adapter.refuse_drop(model, {5})
    assert adapter.refuse_drop(model, {1, 2}) is None


def test_gemma4_dropping_consumers_and_per_layer_inputs(tmp_path):
    from reference import skipped

    model = build_tiny("gemma4")
    inputs = make_inputs("gemma4", model)
    lm = model.model.language_model
    table = lm.embed_tokens_per_layer.weight.detach().clone()
    proj = lm.per_layer_model_projection.weight.detach().clone()
    drop = [2, 4]  # a plain sliding layer and a KV consumer
    expected = logits(skipped(model, drop), inputs)
    vlmprune.apply_plan_(model, PruningPlan(drop_layers=drop))
    check_config(model)
    text = model.config.get_text_config()
    assert text.num_kv_shared_layers == 1 and text.kv_sharing_modes == ["store", None, "store", "reuse"]
    assert lm.first_kv_shared_layer_idx == 3
    kept = [0, 1, 3, 5]
    cols = torch.cat([torch.arange(i * 8, (i + 1) * 8) for i in kept])
    assert torch.equal(lm.embed_tokens_per_layer.weight, table[:, cols])  # each kept layer keeps its own slice
    assert torch.equal(lm.per_layer_model_projection.weight, proj[cols])
    assert text.per_layer_config[3].head_dim == 32 and text.per_layer_config[2].head_dim == 16  # full layer 5 -> 3
    assert_close(logits(model, inputs), expected)
    loaded = reload_plain(model, tmp_path)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    assert torch.equal(greedy(loaded, inputs), greedy(model, inputs))


def test_gemma4_double_wide_mlps_stay_stock_loadable(tmp_path):
    import transformers
    from reference import skipped
    from tiny_models import ATTN_IMPLEMENTATION, _config_gemma4

    config = _config_gemma4()
    config.text_config.use_double_wide_mlp = True  # E2B: the KV-shared layers' MLPs are twice as wide
    torch.manual_seed(0)
    model = transformers.Gemma4ForConditionalGeneration._from_config(
        config, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float32).eval()
    lm = model.model.language_model
    assert [layer.mlp.down_proj.in_features for layer in lm.layers] == [128] * 4 + [256] * 2
    inputs = make_inputs("gemma4", model)
    plan = PruningPlan(drop_layers=[1, 4])
    assert loads_stock(model, plan) is None
    expected = logits(skipped(model, plan.drop_layers), inputs)
    vlmprune.apply_plan_(model, plan)
    text = model.config.get_text_config()
    assert text.intermediate_size == 128 and not getattr(text, "vlmprune_layer_widths", None)
    assert_close(logits(model, inputs), expected)
    loaded = reload_plain(model, tmp_path)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))
    assert torch.equal(greedy(loaded, inputs), greedy(model, inputs))


def test_gemma4_heads_and_experts_stay_whole():
    model = build_tiny("gemma4")
    with pytest.raises(PlanError, match=r"cuts attention heads in layer\(s\) \[1\], whose gemma4 token mixer keeps"):
        vlmprune.apply_plan_(model, PruningPlan(layers={1: {"kv_heads": [0]}}))


# ---------------------------------------------------------------- loadability, said before the cut; --stock

from tiny_models import FAMILIES  # noqa: E402

from vlmprune.surgery.apply import loads_stock  # noqa: E402


def _source(family, tmp_path):
    model = build_tiny(family)
    return model, vlmprune.save_model(model, tmp_path / "src")


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_prune_loads_with_plain_from_pretrained(family, tmp_path):
    import transformers

    model, src = _source(family, tmp_path)
    mode = "heads" if vlmprune.prune.layer_shapes(model)[-1].group_size > 1 else "groups"
    result = vlmprune.prune(model=str(src), output=str(tmp_path / "out"), method="width", ratio=0.2,
                            criterion="magnitude", attention=mode, stock=True)
    plan, record = result.plan, result.record.prune
    assert record.loads_with == "from_pretrained"
    # where cutting heads could not load stock, attention is left whole and the record says why
    unrestricted, _ = score_and_plan(model, "width", 0.2, "magnitude", attention=mode)
    assert (record.stock_note is not None) == (loads_stock(model, unrestricted) is not None)
    if record.stock_note is not None:
        assert not any({"q_heads", "kv_heads"} & set(entry) for entry in plan.layers.values())
    loaded, info = transformers.AutoModelForImageTextToText.from_pretrained(result.output, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    inputs = make_inputs(family, model)
    assert torch.equal(logits(loaded.eval(), inputs), logits(vlmprune.load(result.output), inputs))


def test_the_plan_says_before_the_cut_when_vlmprune_load_is_needed(tmp_path, caplog):
    _, src = _source("qwen2_5_vl", tmp_path)
    with caplog.at_level("WARNING", logger="vlmprune"):
        result = vlmprune.prune(model=str(src), output=str(tmp_path / "out"), method="width", ratio=0.2,
                                criterion="magnitude", attention="groups")
    assert result.record.prune.loads_with == "vlmprune.load"
    assert "derives head_dim from hidden_size // num_attention_heads" in result.record.prune.loads_with_reason
    assert "will need vlmprune.load" in caplog.text
    saved = RunRecord.load(result.output)
    assert saved.prune.loads_with == "vlmprune.load"


def test_stock_refuses_shapes_no_stock_class_holds(tmp_path):
    from vlmprune.errors import VlmpruneError

    _, src = _source("llava_llama_gqa", tmp_path)
    with pytest.raises(VlmpruneError, match="--stock: the pruned model could not load with plain from_pretrained: "
                                            "layers would have different widths"):
        vlmprune.prune(model=str(src), output=str(tmp_path / "out"), method="width", ratio=0.1,
                       criterion="magnitude", layers="1:3", stock=True)
    assert not (tmp_path / "out").exists()
