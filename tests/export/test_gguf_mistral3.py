"""vlmprune export --format gguf of Mistral 3: the Mistral text model as llama.cpp's llama architecture (deci
with per-layer widths) and the mmproj on its pixtral graph (Pixtral tower with 2-D RoPE, RMSNorm + patch merger,
projector, [IMG_BREAK] after each row), checked against transformers in a real llama.cpp (xllamacpp)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("xllamacpp")

from tiny_gguf import (
    POST,
    PRE,
    PROMPT,
    RAW_TEMPLATE,
    LlamaCpp,
    export_with_processor,
    hf_greedy,
    hf_logprobs,
    mistral3_processor,
    partial_utf8_ids,
    png_image,
    rel_diff,
    save_tiny_mistral3,
    write_probe,
)

import vlmprune
from vlmprune.errors import VlmpruneError
from vlmprune.planning.plan import PruningPlan


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_mistral3(tmp_path_factory.mktemp("mistral3") / "model")


@pytest.fixture(scope="module")
def exported(folder, tmp_path_factory):
    """The f32 pair (the processor assembled by hand, as for Qwen2.5-VL: see tiny_gguf)."""
    processor = mistral3_processor(folder)
    out = tmp_path_factory.mktemp("mistral3-gguf") / "out"
    record = export_with_processor(folder, out, processor, quant="f32")
    return out, record, processor


def _chat(make, message: list[dict], **kwargs) -> tuple[dict, object]:
    """A chat answer from a llama.cpp server made by ``make()``, on another server when one answers NaN.

    llama.cpp's pixtral graph builds each [IMG_BREAK] row as 0 * (a tensor it never writes) + the embedding
    (tools/mtmd/models/pixtral.cpp: ggml_scale(ctx0, tok, 0.0) on a ggml_new_tensor_3d): where that memory
    happens to hold inf or NaN, every image row after it is NaN in that server for its whole life (measured
    here: 2 of 14 servers in one run, none in a fresh one). That is llama.cpp's, no file can change it; a
    server that answers NaN (every log-prob null) is replaced, at most five times (at 2 in 14 servers, six NaN
    servers in a row are ~1e-5 likely, and the embedding test starts 14 probes), and the answer must then be
    exact."""
    for _ in range(6):
        llama = make()
        got = llama.chat(message, **kwargs)
        if any(t.get("logprob") is not None for t in got["choices"][0]["logprobs"]["content"]):
            return got, llama
    raise AssertionError("llama.cpp answered NaN on six servers")


def _image_text(rows: int, cols: int) -> str:
    return "[IMG_BREAK]".join(["[IMG]" * cols] * rows) + "[IMG_END]"


def test_text_model_is_llama_and_matches_transformers(folder, exported):
    out, record, processor = exported
    assert record["text"]["arch"] == "llama"
    model = vlmprune.load(folder, dtype=torch.float32)
    tok = processor.tokenizer
    ids = tok(PROMPT)["input_ids"]
    llama = LlamaCpp(out / "model.gguf")
    llama.banned = partial_utf8_ids(tok)
    assert llama.prompt_tokens(PROMPT) == len(ids)
    n_vocab = model.config.text_config.vocab_size
    diff = rel_diff(llama.first_logprobs(ids, n_vocab), hf_logprobs(model, ids))
    assert diff <= 1e-3, diff  # measured 6.0e-8
    assert rel_diff(llama.first_logprobs(PROMPT, n_vocab), hf_logprobs(model, ids)) <= 1e-3  # llama.cpp's ids
    assert llama.greedy(ids, 10) == hf_greedy(model, ids, 10, llama.banned)


@pytest.mark.parametrize("height, width", [(42, 56), (56, 42)])
def test_pair_gives_the_transformers_tokens_with_an_image(folder, exported, height, width):
    """An image of (height / 14) x (width / 14) merged tokens (12: llama.cpp upscales images of fewer than 8),
    [IMG_BREAK] after each row but the last and [IMG_END]: the prompt length, the next-token log-probs and 10
    greedy tokens against transformers."""
    out, record, processor = exported
    assert record["mmproj"]["projector"] == "pixtral"
    model = vlmprune.load(folder, dtype=torch.float32)
    tok = processor.tokenizer
    img, b64 = png_image(height, width)
    pixels = processor.image_processor(img, return_tensors="pt")
    assert pixels["image_sizes"].tolist() == [[height, width]]  # kept at its size on both sides
    ids = tok(PRE + _image_text(height // 14, width // 14) + POST)["input_ids"]
    inputs = {"pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"]}
    diff = _pair_against_transformers(out, model, tok, ids, inputs, b64)
    assert diff <= 1e-3, diff  # measured 1.7e-5 (42x56), 1.3e-5 (56x42)


def _pair_against_transformers(out, model, tok, ids: list[int], inputs: dict, b64: str) -> float:
    """The exported pair in ``out`` on the PRE + image + POST turn: the prompt is as long as transformers' (``ids``),
    the 10 greedy tokens are transformers' (asserted here); returns the relative difference of the first
    next-token log-probs."""
    banned = partial_utf8_ids(tok)

    def make():
        llama = LlamaCpp(out / "model.gguf", out / "mmproj.gguf", chat_template=RAW_TEMPLATE)
        llama.banned = banned
        return llama

    message = [{"role": "user", "content": [{"type": "text", "text": PRE},
                                            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}},
                                            {"type": "text", "text": POST}]}]
    n_vocab = model.config.text_config.vocab_size
    got, _ = _chat(make, message, top_logprobs=n_vocab, ignore_eos=True)
    assert got["usage"]["prompt_tokens"] == len(ids)
    logprobs = {p["id"]: p["logprob"] for p in got["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}
    diff = rel_diff(logprobs, hf_logprobs(model, ids, **inputs))
    got, _ = _chat(make, message, max_tokens=10, top_logprobs=1, ignore_eos=True)
    assert [t["id"] for t in got["choices"][0]["logprobs"]["content"]] == hf_greedy(model, ids, 10, banned, **inputs)
    return diff


def test_per_layer_widths_go_to_deci_and_match_with_an_image(folder, tmp_path):
    """Per-layer widths (kv heads, q heads, MLP channels, a dropped layer): the text model as deci, next to
    the same mmproj; the pair against the pruned model in transformers with an image in the prompt."""
    model = vlmprune.load(folder, dtype=torch.float32)
    plan = PruningPlan(drop_layers=[2], layers={0: {"kv_heads": [1], "q_heads": [2, 3]},
                                                1: {"mlp_channels": list(range(0, 100, 2))}})
    vlmprune.apply_plan_(model, plan)
    pruned = vlmprune.save_model(model, tmp_path / "pruned", plan=plan, source=folder)
    processor = mistral3_processor(folder)
    record = export_with_processor(pruned, tmp_path / "out", processor, quant="f32")
    assert record["text"]["arch"] == "deci" and record["text"]["per_layer_widths"]
    model = vlmprune.load(pruned, dtype=torch.float32)
    tok = processor.tokenizer
    img, b64 = png_image(42, 56)
    pixels = processor.image_processor(img, return_tensors="pt")
    ids = tok(PRE + _image_text(3, 4) + POST)["input_ids"]
    inputs = {"pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"]}
    diff = _pair_against_transformers(tmp_path / "out", model, tok, ids, inputs, b64)
    assert diff <= 1e-3, diff  # measured 1.0e-5


def test_mmproj_image_embeddings_match_pytorch(folder, exported, tmp_path):
    """Every embedding llama.cpp injects for a 3 x 4-token image (the 12 merged tokens and the [IMG_BREAK]
    rows between the rows), read one by one through a probe text model (tests/tiny_gguf.py), against PyTorch's:
    each the closest to its own (cosine >= 0.9999)."""
    out, record, processor = exported
    model = vlmprune.load(folder, dtype=torch.float32)
    img, b64 = png_image(42, 56)
    pixels = processor.image_processor(img, return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(pixels["pixel_values"], pixels["image_sizes"])
    feats = getattr(feats, "pooler_output", feats)
    tokens = feats[0] if isinstance(feats, (list, tuple)) else feats
    tokens = tokens.reshape(-1, tokens.shape[-1])
    rows, cols = 3, 4
    assert tokens.shape[0] == rows * cols
    brk = model.get_input_embeddings().weight.detach()[processor.tokenizer.convert_tokens_to_ids("[IMG_BREAK]")][None]
    parts = [tokens[r * cols:(r + 1) * cols] for r in range(rows)]
    expected = torch.cat([parts[0], brk, parts[1], brk, parts[2]])  # llama.cpp's order
    n = expected.shape[0]
    hidden = model.config.text_config.hidden_size
    message = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}},
                                            {"type": "text", "text": "b"}]}]
    lowest = 1.0
    for k in range(n):
        probe = tmp_path / "probe.gguf"
        n_vocab = write_probe(probe, folder, hidden, ["a", "b"], distance=n - k + 1)  # then [IMG_END], then b
        keep = processor.tokenizer.convert_tokens_to_ids("a")

        def make(probe=probe, n_vocab=n_vocab, keep=keep):
            llama = LlamaCpp(probe, out / "mmproj.gguf", chat_template=RAW_TEMPLATE)
            llama.banned = [i for i in range(n_vocab) if i != keep]
            return llama

        got, _ = _chat(make, message, top_logprobs=n_vocab)
        assert got["usage"]["prompt_tokens"] == n + 3
        logprobs = {p["id"]: p["logprob"] for p in got["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}
        read = torch.tensor([logprobs[j] - logprobs[hidden] for j in range(hidden)])
        cos = torch.nn.functional.cosine_similarity(read[None], expected, dim=-1)
        assert torch.equal(expected[int(cos.argmax())], expected[k]), (k, cos)  # the two [IMG_BREAK] rows are one
        lowest = min(lowest, float(cos[k]))
    assert lowest >= 0.9999, lowest  # measured 0.99999946


@pytest.mark.parametrize("key, value, match", [
    ("vision_feature_layer", -2, r"vision_feature_layer=-2"),  # the graph reads the last block's output only
    ("rope_theta", 20000.0, r"rope_theta=20000.*fixes it at 10000"),  # fixed in llama.cpp's loader
])
def test_what_the_pixtral_graph_cannot_hold_is_refused_before_writing(folder, tmp_path, key, value,
                                                                      match):
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    if key == "rope_theta":
        config["vision_config"]["rope_parameters"]["rope_theta"] = value
    else:
        config[key] = value
    (copy / "config.json").write_text(json.dumps(config))
    processor = mistral3_processor(copy)
    with pytest.raises(VlmpruneError, match=match):
        export_with_processor(copy, tmp_path / "out", processor)
    assert not (tmp_path / "out").exists()
