"""Calibrated pruning: every adapter at ratio 0.2 by both methods, GQA legality, the CLI, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
import yaml
from checks import assert_close, check_config, greedy, labelled, logits
from reference import skipped, zeroed
from tiny_models import FAMILIES, build_tiny, make_inputs

import vlmprune
from vlmprune.cli import main
from vlmprune.errors import VlmpruneError
from vlmprune.planning.solve import ModelBudget
from vlmprune.prune.run import score_and_plan
from vlmprune.summary import layer_shapes
from vlmprune.surgery.apply import apply_plan_


def granularity(budget: ModelBudget, plan, shapes) -> float:
    """One structure's worth, as a fraction of the model: the step the plan's granularity allows."""
    if plan.extra["method"] == "layer":
        return max(budget.layer_params) / budget.total
    n = len(shapes)
    multiple = plan.extra.get("mlp_multiple") or 8
    steps = [multiple * budget.channel_params(0) * n, budget.group_params(0, shapes[0].group_size) * n]
    return max(steps) / budget.total


@pytest.mark.parametrize("method, criterion", [("layer", "block_influence"), ("width", "taylor")])
@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_02_on_every_adapter(family, method, criterion, tmp_path):
    model = build_tiny(family)
    batches = [labelled(model, family, seed=0), labelled(model, family, seed=1)]
    shapes = layer_shapes(model)
    budget = ModelBudget.of(model)
    plan, _ = score_and_plan(model, method, 0.2, criterion, batches)
    got = plan.extra["achieved"]["ratio"]
    assert abs(got - 0.2) <= granularity(budget, plan, shapes), (got, plan.to_dict())
    inputs = make_inputs(family, model)
    reference = skipped(zeroed(model, plan), plan.drop_layers)
    pruned = apply_plan_(copy.deepcopy(model), plan)
    check_config(pruned)
    assert_close(logits(pruned, inputs), logits(reference, inputs))
    after = vlmprune.count_parameters(pruned)["total"]
    assert 1 - after / budget.total == pytest.approx(got)
    out = vlmprune.save_model(pruned, tmp_path / "out", plan=plan)
    loaded = vlmprune.load(out)
    assert torch.equal(logits(loaded, inputs), logits(pruned, inputs))
    assert torch.equal(greedy(loaded, inputs), greedy(pruned, inputs))


def gqa_9_3():
    text = transformers.LlamaConfig(vocab_size=320, hidden_size=72, intermediate_size=144, num_hidden_layers=3,
                                    num_attention_heads=9, num_key_value_heads=3, head_dim=8, pad_token_id=0)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=7)
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_id=300)).eval()


@pytest.mark.parametrize("attention", ["groups", "heads"])
@pytest.mark.parametrize("global_ranking", [False, True])
def test_gqa_9_heads_3_groups_stays_legal(attention, global_ranking, tmp_path):
    model = gqa_9_3()
    plan, _ = score_and_plan(model, "width", 0.3, "magnitude", attention=attention, global_ranking=global_ranking)
    apply_plan_(model, plan)
    check_config(model)
    shapes = layer_shapes(model)
    assert all(s.num_heads % s.num_kv_heads == 0 for s in shapes)
    if attention == "heads":  # q heads go inside every group; the groups stay
        assert all(s.num_kv_heads == 3 for s in shapes)
    else:
        assert any(s.num_kv_heads < 3 for s in shapes)
        assert global_ranking or len({s.num_kv_heads for s in shapes}) == 1
    assert sum(s.num_heads for s in shapes) < 27  # attention was cut somewhere
    loaded = vlmprune.load(vlmprune.save_model(model, tmp_path / "o", plan=plan))
    check_config(loaded)


def test_layer_range_gives_non_uniform_widths_that_reload(tmp_path):
    model = build_tiny("llava_llama_gqa")
    plan, _ = score_and_plan(model, "width", 0.15, "magnitude", layers="1:3", attention="heads")
    assert set(plan.layers) <= {1, 2}
    apply_plan_(model, plan)
    widths = model.config.text_config.vlmprune_layer_widths
    assert set(widths) == {"1", "2"}
    inputs = make_inputs("llava_llama_gqa", model)
    loaded = vlmprune.load(vlmprune.save_model(model, tmp_path / "o", plan=plan))
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_planning_errors():
    model = build_tiny("llava_llama_mha")
    for ratio in (0, -0.1, 1, 1.5):
        with pytest.raises(VlmpruneError, match="--ratio must be"):
            score_and_plan(model, "layer", ratio, "last")
    with pytest.raises(VlmpruneError, match="would remove all 4 decoder layers"):
        score_and_plan(model, "layer", 0.99, "last")
    with pytest.raises(VlmpruneError, match="removes less than one decoder layer"):
        score_and_plan(model, "layer", 0.01, "last")
    with pytest.raises(VlmpruneError, match="unknown width criterion 'fisher'"):
        score_and_plan(model, "width", 0.2, "fisher")
    with pytest.raises(VlmpruneError, match="needs calibration data"):
        score_and_plan(model, "width", 0.2, "taylor")
    with pytest.raises(VlmpruneError, match="multi-head attention"):
        score_and_plan(model, "width", 0.2, "magnitude", attention="heads")
    with pytest.raises(VlmpruneError, match="can remove at most"):
        score_and_plan(model, "width", 0.95, "magnitude")


@pytest.mark.parametrize("args", [
    ["--method", "layer", "--ratio", "0.2"],
    ["--method", "width", "--ratio", "0.2", "--attention", "heads", "--mlp-multiple", "8"],
])
def test_cli_prune_with_calibration(tiny_repo, tmp_path, args):
    model_dir, data = tiny_repo.model, tiny_repo.data
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(model_dir), "--calibration", str(data), "--image-folder", str(tiny_repo.images),
            "--num-samples", "6", "--batch-size", "2", "--output", str(out), "--compensate", "none", *args]
    assert main(argv) == 0  # a plain cut: the saved model is the plan applied to the original
    plan = json.loads((out / "pruning_plan.json").read_text())
    record = json.loads((out / "run.json").read_text())["prune"]
    assert record["criterion"] in ("block_influence", "taylor") and (out / "scores.json").is_file()
    assert set(plan) == {"version", "drop_layers", "layers"}  # the plan says only what is removed
    original = vlmprune.load(model_dir)
    budget, shapes = ModelBudget.of(original), layer_shapes(original)
    saved = vlmprune.PruningPlan.from_dict(plan)
    saved.extra.update(record)  # what granularity() reads: the method and the MLP multiple
    assert abs(record["achieved"]["ratio"] - 0.2) <= granularity(budget, saved, shapes)
    png = (out / "importance.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert (out / "tokenizer_config.json").exists()
    reloaded = vlmprune.load(out)
    expected = apply_plan_(original, saved)  # the saved plan applied in memory: the same model
    inputs = make_inputs("llava_llama_gqa", expected)
    assert torch.equal(logits(reloaded, inputs), logits(expected, inputs))
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.chat_template


def test_cli_prune_compensates_by_default_with_calibration(tiny_repo, tmp_path):
    """--compensate auto (the default) is ls, sequential, when calibration data is given, and none without."""
    common = ["prune", "--model", str(tiny_repo.model), "--method", "width", "--ratio", "0.2", "--mlp-multiple", "8"]
    fitted, plain = tmp_path / "fitted", tmp_path / "plain"
    assert main([*common, "--calibration", str(tiny_repo.data), "--image-folder", str(tiny_repo.images),
                 "--num-samples", "6", "--batch-size", "2", "--output", str(fitted)]) == 0
    assert main([*common, "--criterion", "magnitude", "--output", str(plain)]) == 0
    record = json.loads((fitted / "run.json").read_text())["prune"]["compensation"]
    assert (record["mode"], record["sequential"]) == ("ls", True) and record["layers"]
    assert yaml.safe_load((fitted / "resolved_config.yaml").read_text())["compensation"]["mode"] == "ls"
    assert json.loads((plain / "run.json").read_text())["prune"].get("compensation") in (None, {"mode": "none"})
    # the fitted cut differs from the plain cut of the same plan
    plan = vlmprune.PruningPlan.from_dict(json.loads((fitted / "pruning_plan.json").read_text()))
    expected = apply_plan_(vlmprune.load(tiny_repo.model), plan)
    inputs = make_inputs("llava_llama_gqa", expected)
    assert not torch.allclose(logits(vlmprune.load(fitted), inputs), logits(expected, inputs))


@pytest.mark.parametrize("argv_tail, message", [
    (["--method", "layer", "--ratio", "0"], "--ratio must be"),
    (["--method", "layer", "--ratio", "1.2"], "--ratio must be"),
    (["--method", "layer", "--ratio", "0.97"], "would remove all"),
    (["--method", "width", "--ratio", "0.2", "--criterion", "nope"], "unknown width criterion"),
])
def test_cli_bad_input_leaves_no_output(tiny_repo, tmp_path, capsys, argv_tail, message):
    model_dir, data = tiny_repo.model, tiny_repo.data
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(model_dir), "--calibration", str(data), "--image-folder", str(tiny_repo.images),
            "--num-samples", "4", "--output", str(out), *argv_tail]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_bad_data_leaves_no_output(tiny_repo, tmp_path, capsys):
    model_dir, data = tiny_repo.model, tiny_repo.data
    records = json.loads(data.read_text())
    records[0]["image"] = "missing/nowhere.png"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(records))
    out = tmp_path / "pruned"
    base = ["prune", "--model", str(model_dir), "--image-folder", str(tiny_repo.images), "--method", "layer",
            "--ratio", "0.2", "--output", str(out)]
    assert main([*base, "--calibration", str(broken)]) == 2
    assert "nowhere.png" in capsys.readouterr().err
    broken.write_text(json.dumps([{"conversations": "not a list"}]))
    assert main([*base, "--calibration", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "record 0" in err and "conversations" in err, err
    assert not out.exists()


def text_batches(n=3, length=24):
    """Text-only calibration batches (the LM's own tokens as labels)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 300, (2, length), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


WEAK = 1e-3


def plant_weak_heads_(model, heads_per_layer):
    """Scale the q rows and o_proj columns of the given q heads by WEAK: whatever a criterion
    reads from weights, gradients or the weighted o_proj input, these heads are the least
    important. (The Minitron activation criterion reads the o_proj input alone, which a shared
    kv head keeps alive, so it cannot see such a plant: it is left out.)"""
    d = model.config.text_config.head_dim
    with torch.no_grad():
        for layer, heads in zip(model.model.language_model.layers, heads_per_layer):
            for h in heads:
                layer.self_attn.q_proj.weight[h * d : (h + 1) * d] *= WEAK
                layer.self_attn.o_proj.weight[:, h * d : (h + 1) * d] *= WEAK


def plant_weak_channels_(model, channels):
    """Scale the up row and the down column of the given MLP channels by WEAK in every layer:
    small weights, small down-projection input, small gradients, for every criterion."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.mlp.up_proj.weight[channels] *= WEAK
            layer.mlp.down_proj.weight[:, channels] *= WEAK


@pytest.mark.parametrize("criterion", ["taylor", "magnitude", "wanda"])
def test_heads_mode_removes_exactly_the_planted_weak_heads(criterion):
    """Issue 22: with --attention heads one q head per kv group goes; it must be the planted one
    of each group, wherever it sits in the group (the groups are heads 0-2, 3-5, 6-8)."""
    model = gqa_9_3()
    weak = [[0, 4, 8], [2, 3, 7], [1, 5, 6]]  # one per group, at every position in some layer
    plant_weak_heads_(model, weak)
    weak_channels = list(range(0, 144, 3))  # 48 of 144
    plant_weak_channels_(model, weak_channels)
    plan, _ = score_and_plan(model, "width", 0.2, criterion, text_batches(), attention="heads", mlp_multiple=8)
    for i, heads in enumerate(weak):
        assert sorted(set(range(9)) - set(plan.layers[i]["q_heads"])) == heads, (criterion, i, plan.layers[i])
        removed = set(range(144)) - set(plan.layers[i]["mlp_channels"])
        assert removed and removed <= set(weak_channels), (criterion, i, sorted(removed))


@pytest.mark.parametrize("criterion", ["taylor", "magnitude", "wanda"])
def test_groups_mode_removes_the_planted_weak_group(criterion):
    model = gqa_9_3()
    weak_group = [2, 0, 1]  # per layer
    plant_weak_heads_(model, [[3 * k, 3 * k + 1, 3 * k + 2] for k in weak_group])
    with torch.no_grad():  # its k and v rows too (they belong to the group alone)
        for layer, k in zip(model.model.language_model.layers, weak_group):
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight[8 * k : 8 * (k + 1)] *= WEAK
    plan, _ = score_and_plan(model, "width", 0.2, criterion, text_batches(), attention="groups", mlp_multiple=8)
    for i, k in enumerate(weak_group):
        assert plan.layers[i]["kv_heads"] == sorted(set(range(3)) - {k}), (criterion, i, plan.layers[i])


@pytest.mark.parametrize("criterion", ["taylor", "magnitude", "activation", "wanda"])
def test_mlp_channels_planted_weak_go_first(criterion):
    """--attention none: the planted channels are the first to go (all of them when the cut is
    larger, only they when it is smaller)."""
    model = gqa_9_3()
    weak_channels = sorted({5, 17, 18, 40, 41, 42, 101, 120, 131, 143} | set(range(60, 98)))  # 48 of 144
    plant_weak_channels_(model, weak_channels)
    for ratio in (0.05, 0.15):
        plan, _ = score_and_plan(model, "width", ratio, criterion, text_batches(), attention="none", mlp_multiple=8)
        for i in range(3):
            removed = set(range(144)) - set(plan.layers[i]["mlp_channels"])
            assert removed, (criterion, ratio)
            if len(removed) <= len(weak_channels):
                assert removed <= set(weak_channels), (criterion, ratio, i, sorted(removed))
            else:
                assert set(weak_channels) <= removed, (criterion, ratio, i, sorted(removed))
