"""The command line: inspect, prune --plan, and clear errors that leave no output behind."""

import json

import pytest
import torch
import transformers
from tiny_models import build_tiny, make_inputs

from vlmprune.adapters import get_adapter
from vlmprune.cli import main
from vlmprune.errors import UnsupportedModelError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "llava_phi3"
    model = build_tiny("llava_phi3")
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text("{}")  # stands in for processor files
    return path


def test_inspect_prints_parts_and_layers(tiny_dir, capsys):
    assert main(["inspect", str(tiny_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model_type"] == "llava" and summary["text_model_type"] == "phi3"
    assert summary["num_layers"] == 4
    assert summary["layers"][0] == {"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "intermediate_size": 128}
    p = summary["parameters"]
    assert p["total"] == p["vision"] + p["projector"] + p["language_model"]
    assert main(["inspect", str(tiny_dir)]) == 0
    assert "decoder layers" in capsys.readouterr().out


def test_prune_with_plan_writes_loadable_checkpoint(tiny_dir, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"version": 1, "drop_layers": [2],
                                "layers": {str(i): {"kv_heads": [1], "mlp_channels": list(range(0, 128, 2))}
                                           for i in (0, 1, 3)}}))
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_dir), "--plan", str(plan), "--output", str(out)]) == 0
    assert (out / "tokenizer_config.json").exists() and (out / "pruning_plan.json").exists()
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    saved = json.loads((out / "pruning_plan.json").read_text())
    parameters = json.loads((out / "run.json").read_text())["prune"]["parameters"]
    assert saved["drop_layers"] == [2] and parameters["after"]["total"] < parameters["before"]["total"]
    model = transformers.AutoModelForImageTextToText.from_pretrained(out)
    text = model.config.text_config
    widths = (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads, text.intermediate_size)
    assert widths == (3, 2, 1, 64)
    with torch.no_grad():
        model(**make_inputs("llava_phi3", model))
    # an existing output is not replaced without --overwrite
    assert main(["prune", "--model", str(tiny_dir), "--plan", str(plan), "--output", str(out)]) == 2


def test_bad_plan_leaves_no_output(tiny_dir, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": {"0": {"q_heads": [0, 1, 2]}}}))
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_dir), "--plan", str(plan), "--output", str(out)]) == 2
    assert "every kept kv head must keep the same number" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".pruned*"))


def test_unsupported_model_is_named(tmp_path, capsys):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2)
    with pytest.raises(UnsupportedModelError, match="model_type 'llama'.*Supported.*llava"):
        get_adapter(transformers.LlamaForCausalLM(config))
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    assert main(["inspect", str(tmp_path / "m")]) == 2
    assert "does not support model_type 'llama'" in capsys.readouterr().err
