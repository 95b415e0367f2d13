"""vlmprune export --format gguf of Qwen2.5-VL: the text model as llama.cpp's qwen2vl architecture (M-RoPE)
and the mmproj on its qwen2.5vl_merger graph, checked against transformers in a real llama.cpp (xllamacpp)
with images of several shapes in the prompt (M-RoPE positions, window attention across windows)."""

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
    partial_utf8_ids,
    png_image,
    qwen2_5_vl_processor,
    rel_diff,
    save_tiny_qwen2_5_vl,
)

import vlmprune
from vlmprune.errors import VlmpruneError
from vlmprune.export import export_gguf
from vlmprune.planning.plan import PruningPlan


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen25vl") / "model")


@pytest.fixture(scope="module")
def exported(folder, tmp_path_factory):
    """The f32 pair (the processor assembled by hand: transformers' needs torchvision, see tiny_gguf)."""
    processor = qwen2_5_vl_processor(folder)
    out = tmp_path_factory.mktemp("qwen25vl-gguf") / "out"
    record = export_with_processor(folder, out, processor, quant="f32")
    return out, record, processor


def test_text_model_is_qwen2vl_and_matches_transformers(folder, exported):
    from gguf import GGUFReader

    out, record, processor = exported
    assert record["text"]["arch"] == "qwen2vl"
    fields = GGUFReader(str(out / "model.gguf")).fields
    assert fields["qwen2vl.rope.dimension_sections"].contents() == [2, 3, 3, 0]
    model = vlmprune.load(folder, dtype=torch.float32)
    tok = processor.tokenizer
    ids = tok(PROMPT)["input_ids"]
    llama = LlamaCpp(out / "model.gguf")
    llama.banned = partial_utf8_ids(tok)
    assert llama.prompt_tokens(PROMPT) == len(ids)  # the string tokenized by llama.cpp: the same ids
    n_vocab = model.config.text_config.vocab_size
    diff = rel_diff(llama.first_logprobs(ids, n_vocab), hf_logprobs(model, ids))
    assert diff <= 1e-3, diff  # measured 9.7e-8
    assert rel_diff(llama.first_logprobs(PROMPT, n_vocab), hf_logprobs(model, ids)) <= 1e-3
    assert llama.greedy(ids, 10) == hf_greedy(model, ids, 10, llama.banned)


@pytest.mark.parametrize("height, width", [(28, 126), (126, 28), (56, 70)])
def test_pair_gives_the_transformers_tokens_with_an_image(folder, exported, height, width):
    """An image of (height / 14) x (width / 14) merged tokens in the prompt: llama.cpp's image embeddings
    (window attention in blocks 0 and 2: two 8x8-token windows for 126 px) and M-RoPE positions (time,
    row, column) against transformers: the prompt length, the next-token log-probs and 10 greedy tokens."""
    out, record, processor = exported
    mm = record["mmproj"]
    assert mm["projector"] == "qwen2.5vl_merger" and mm["window_attention_every"] == 2
    model = vlmprune.load(folder, dtype=torch.float32)
    tok = processor.tokenizer
    img, b64 = png_image(height, width)
    pixels = processor.image_processor(img, return_tensors="pt")
    grid = pixels["image_grid_thw"]
    assert grid.tolist() == [[1, height // 7, width // 7]]  # kept at its size: no resampling on either side
    n = height // 14 * (width // 14)
    ids = tok(PRE + "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>" + POST)["input_ids"]
    inputs = {"pixel_values": pixels["pixel_values"], "image_grid_thw": grid}
    llama = LlamaCpp(out / "model.gguf", out / "mmproj.gguf", chat_template=RAW_TEMPLATE)
    llama.banned = partial_utf8_ids(tok)
    message = [{"role": "user", "content": [{"type": "text", "text": PRE},
                                            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}},
                                            {"type": "text", "text": POST}]}]
    n_vocab = model.config.text_config.vocab_size
    got = llama.chat(message, top_logprobs=n_vocab, ignore_eos=True)
    assert got["usage"]["prompt_tokens"] == len(ids)
    logprobs = {p["id"]: p["logprob"] for p in got["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}
    diff = rel_diff(logprobs, hf_logprobs(model, ids, **inputs))
    assert diff <= 1e-3, diff  # measured 6.3e-6, 9.2e-6, 9.3e-6
    got = llama.chat(message, max_tokens=10, top_logprobs=1, ignore_eos=True)
    assert [t["id"] for t in got["choices"][0]["logprobs"]["content"]] == hf_greedy(model, ids, 10, llama.banned,
                                                                                   **inputs)


def test_per_layer_widths_are_refused_before_writing(folder, tmp_path):
    model = vlmprune.load(folder, dtype=torch.float32)
    plan = PruningPlan(layers={1: {"mlp_channels": list(range(64))}})
    vlmprune.apply_plan_(model, plan)
    pruned = vlmprune.save_model(model, tmp_path / "pruned", plan=plan, source=folder)
    with pytest.raises(VlmpruneError, match=r"qwen2vl graph .* layer 0's widths.*--stock"):
        export_gguf(pruned, tmp_path / "out", vision=False)
    assert not (tmp_path / "out").exists()


def test_irregular_full_attention_blocks_are_refused(folder, tmp_path):
    """llama.cpp attends to the whole image in every n-th block only (n_wa_pattern)."""
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["vision_config"]["fullatt_block_indexes"] = [0, 1]
    (copy / "config.json").write_text(json.dumps(config))
    processor = qwen2_5_vl_processor(copy)
    with pytest.raises(VlmpruneError, match=r"fullatt_block_indexes=\[0, 1\]"):
        export_with_processor(copy, tmp_path / "out", processor)
    assert not (tmp_path / "out").exists()


def test_mmproj_image_embeddings_match_pytorch(folder, exported, tmp_path):
    """Every image embedding llama.cpp injects, read one by one through an M-RoPE probe text model
    (tests/tiny_gguf.py), against the tower and merger's tokens: a 2 x 9-token image, whose columns
    0-7 and 8 fall in different attention windows. Each read token must be the closest to its own
    PyTorch token (the probe tells the 18 apart) and match it to cosine >= 0.9999."""
    from tiny_gguf import write_mrope_probe

    out, record, processor = exported
    model = vlmprune.load(folder, dtype=torch.float32)
    img, b64 = png_image(28, 126)
    pixels = processor.image_processor(img, return_tensors="pt")
    with torch.no_grad():
        tokens = model.model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"]).pooler_output[0]
    rows, cols = 2, 9
    assert tokens.shape[0] == rows * cols
    hidden = model.config.text_config.hidden_size
    # "a" at 0, <|vision_start|> at 1, image token (y, x) at (time 2, row 2 + y, column 2 + x), <|vision_end|> at
    # 2 + max(rows, cols), "b" (the reading position) at 3 + max(rows, cols)
    last = 3 + max(rows, cols)
    message = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}},
                                            {"type": "text", "text": "b"}]}]
    lowest = 1.0
    for k in range(rows * cols):
        y, x = divmod(k, cols)
        probe = tmp_path / "probe.gguf"
        n_vocab = write_mrope_probe(probe, folder, hidden, ["a", "b", "<|vision_start|>", "<|vision_end|>"],
                                    (last - 2, last - 2 - y, last - 2 - x))
        llama = LlamaCpp(probe, out / "mmproj.gguf", chat_template=RAW_TEMPLATE)
        keep = processor.tokenizer.convert_tokens_to_ids("a")
        llama.banned = [i for i in range(n_vocab) if i != keep]
        got = llama.chat(message, top_logprobs=n_vocab)
        assert got["usage"]["prompt_tokens"] == rows * cols + 4
        logprobs = {p["id"]: p["logprob"] for p in got["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}
        read = torch.tensor([logprobs[j] - logprobs[hidden] for j in range(hidden)])
        cos = torch.nn.functional.cosine_similarity(read[None], tokens, dim=-1)
        assert int(cos.argmax()) == k, (k, cos)
        lowest = min(lowest, float(cos[k]))
    assert lowest >= 0.9999, lowest  # measured 0.99999976
