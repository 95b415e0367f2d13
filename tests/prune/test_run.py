"""Calibrated pruning: every adapter at ratio 0.2 by both methods, GQA legality, the CLI, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

import vlmprune
from reference import skipped, zeroed
from checks import assert_close, check_config, greedy, labelled, logits
from tiny_models import FAMILIES, build_tiny, make_inputs
from vlmprune.cli import main
from vlmprune.errors import VlmpruneError
from vlmprune.prune.run import score_and_plan
from vlmprune.planning import ModelBudget
from vlmprune.prune import apply_plan_, layer_shapes


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
            "--num-samples", "6", "--batch-size", "2", "--output", str(out), *args]
    assert main(argv) == 0
    plan = json.loads((out / "pruning_plan.json").read_text())
    assert plan["criterion"] in ("block_influence", "taylor") and "scores" in plan
    original = vlmprune.load(model_dir)
    budget, shapes = ModelBudget.of(original), layer_shapes(original)
    saved = vlmprune.PruningPlan.from_dict(plan)
    assert abs(plan["achieved"]["ratio"] - 0.2) <= granularity(budget, saved, shapes)
    png = (out / "importance.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert (out / "tokenizer_config.json").exists()
    reloaded = vlmprune.load(out)
    expected = apply_plan_(original, saved)  # the saved plan applied in memory: the same model
    inputs = make_inputs("llava_llama_gqa", expected)
    assert torch.equal(logits(reloaded, inputs), logits(expected, inputs))
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.chat_template


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
