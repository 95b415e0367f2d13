"""Checks and inputs shared by the test modules (no test module imports another)."""

from __future__ import annotations

import torch
import transformers
from tiny_models import make_inputs

import vlmprune
from vlmprune.adapters import config_value, get_adapter
from vlmprune.summary import layer_shapes


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def greedy(model, inputs, n=6):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, min_new_tokens=n)


def assert_close(actual, expected):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


def check_config(model):
    adapter = get_adapter(model)
    config = model.config.get_text_config()
    lm = adapter.language_model(model)
    assert lm.config is config
    layers = adapter.layers(model)
    assert config.num_hidden_layers == len(layers)
    if getattr(config, "layer_types", None) is not None:
        assert len(config.layer_types) == len(layers)
    widths = getattr(config, "vlmprune_layer_widths", {}) or {}
    for i, (layer, shape) in enumerate(zip(layers, layer_shapes(model, adapter))):
        attn = adapter.attention(layer)
        assert attn.layer_idx == i
        if getattr(config, "layer_types", None) is not None:  # what the layer was built as still matches
            for owner, name in ((layer, "block_type"), (attn, "layer_type")):
                if isinstance(getattr(owner, name, None), str):
                    assert getattr(owner, name) == config.layer_types[i], (i, name)
        if adapter.has_heads(layer):  # (heads kept whole elsewhere: Qwen3.5 linear attention, Gemma 4)
            assert attn.num_key_value_groups == shape.num_heads // shape.num_kv_heads
        assert shape.num_heads % shape.num_kv_heads == 0
        expected = widths.get(str(i), {k: config_value(config, k) for k in  # (past Gemma 4's per-layer guard)
                                        ("num_attention_heads", "num_key_value_heads", "intermediate_size")})
        assert (shape.num_heads, shape.num_kv_heads, shape.intermediate_size) == (
            expected["num_attention_heads"], expected["num_key_value_heads"], expected["intermediate_size"])
        assert shape.head_dim == config_value(config, "head_dim")


def reload_plain(model, tmp_path):
    out = vlmprune.save_model(model, tmp_path / "out")
    loaded, info = transformers.AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return loaded.eval()


def labelled(model, family, answer=6, seed=0):
    """Inputs whose last ``answer`` real tokens are labelled with the model's own greedy
    predictions, so the intact model is near its best on them."""
    batch = make_inputs(family, model, seed=seed)
    with torch.no_grad():
        pred = model(**batch).logits.argmax(-1)
    labels = torch.full_like(batch["input_ids"], -100)
    labels[:, -answer:] = pred[:, -answer - 1 : -1]
    batch["labels"] = labels
    return batch
