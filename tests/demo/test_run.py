"""`vlmprune demo` end to end in reduced mode, and `vlmprune evaluate` on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from vlmprune.cli import main
from vlmprune.planning.solve import ModelBudget


def demo_budget() -> ModelBudget:
    """The demo teacher's parameter budget, from its config on the meta device (no weights read)."""
    from vlmprune.demo.assemble import build_demo_model

    config = transformers.AutoConfig.from_pretrained(build_demo_model())
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(config)
    return ModelBudget.of(model)  # counts from shapes, on the CPU


def test_demo_quick_end_to_end(tmp_path):
    for module in ("easy_vqa", "gguf", "onnx", "sklearn"):
        pytest.importorskip(module)
    assert main(["demo", "--quick", "--output", str(tmp_path / "demo")]) == 0
    run = tmp_path / "demo"
    results = json.loads((run / "results.json").read_text())
    assert len(results["cells"]) == 4 and all(c["status"] == "done" for c in results["cells"])
    assert set(results["original"]["tasks"]) == {"easyvqa", "digits"}
    achieved = {c["method"]: c["achieved_ratio"] for c in results["cells"]}
    # the demo's decoder layers are all alike: dropping n of them removes exactly n layers' share, and the
    # planner takes the n closest to 15% (7 of SmolLM2's 30 layers: 15.77%)
    budget = demo_budget()
    layer = budget.layer_params[0]
    assert set(budget.layer_params) == {layer}
    dropped = round(0.15 * budget.total / layer)
    assert achieved["layer"] == pytest.approx(dropped * layer / budget.total), (achieved, dropped)
    assert abs(achieved["layer"] - 0.15) <= layer / budget.total / 2
    assert abs(achieved["width"] - 0.15) < 0.02
    report = (run / "report.md").read_text()
    assert "Wall time" in report and "![accuracy_vs_params](accuracy_vs_params.png)" in report
    assert (run / "accuracy_vs_params.png").exists()


def llava_forward_flops(config: dict, tokens: int) -> int:
    """FLOPs (2 per multiply-add) of one forward pass of a LLaVA (CLIP tower, Llama LM) over ``tokens`` prompt
    tokens and one image, from the shapes in its config.json alone: what ``count_flops`` should count (linear
    layers, the patch convolution and the two attention matmuls; norms, activations and softmax count zero)."""
    vis, text = config["vision_config"], config["text_config"]
    patches = (vis["image_size"] // vis["patch_size"]) ** 2
    v_tokens = patches + 1  # + CLS
    v_hidden, v_heads = vis["hidden_size"], vis["num_attention_heads"]
    conv = 2 * vis["hidden_size"] * patches * vis["num_channels"] * vis["patch_size"] ** 2
    v_linear = 4 * v_hidden * v_hidden + 2 * v_hidden * vis["intermediate_size"]  # q, k, v, out; fc1, fc2
    v_attention = 2 * 2 * v_tokens * v_tokens * v_hidden  # Q K^T and A V over all heads
    assert v_hidden % v_heads == 0
    vision = vis["num_hidden_layers"] * (2 * v_tokens * v_linear + v_attention)  # every layer runs
    hidden, head_dim = text["hidden_size"], text["head_dim"]
    q, kv = text["num_attention_heads"] * head_dim, text["num_key_value_heads"] * head_dim
    # the default select strategy drops CLS: one projected token per patch
    projector = 2 * patches * (v_hidden * hidden + hidden * hidden)
    t_linear = 2 * hidden * q + 2 * hidden * kv + 3 * hidden * text["intermediate_size"]  # q, o; k, v; gate, up, down
    t_attention = 2 * 2 * tokens * tokens * q  # GQA: keys and values repeated to every query head
    language = text["num_hidden_layers"] * (2 * tokens * t_linear + t_attention)
    lm_head = 2 * tokens * hidden * text["vocab_size"]
    return conv + vision + projector + language + lm_head


def test_evaluate_cli_with_task_file_and_efficiency(tiny_repo, tmp_path):
    out = tmp_path / "results.json"
    model = str(tiny_repo.model)
    assert main(["evaluate", "--model", model, "--tasks", "", "--task-file", str(tiny_repo.task_file), "--limit", "4",
                 "--efficiency", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tasks"]["test"]["count"] == 4
    eff = result["efficiency"]
    config = json.loads((tiny_repo.model / "config.json").read_text())
    assert config["model_type"] == "llava" and config["text_config"]["model_type"] == "llama"
    assert config["vision_config"]["model_type"] == "clip_vision_model"
    assert eff["flops_per_sample"] == llava_forward_flops(config, eff["prompt_tokens"])
    assert eff["prefill_s"] > 0 and eff["decode_tokens_per_s"] > 0
    assert eff["parameters"]["total"] == sum(v for k, v in eff["parameters"].items() if k != "total")
    assert main(["evaluate", "--model", model, "--tasks", "nope"]) == 2
