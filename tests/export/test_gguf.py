"""vlmprune export --format gguf, checked in a real llama.cpp (xllamacpp's in-process server).

What llama.cpp gives back through its server API, and so what is compared here:
* text: the log-probabilities of the whole vocabulary at the position after a prompt (``n_probs``;
  pre-sampling, i.e. softmax of the raw logits): compared with transformers' log-softmax, which is
  the logits up to a per-position constant; greedy tokens decoded one by one with the KV cache;
* tokenizer: llama.cpp tokenizes the prompt string itself; the same next-token distribution as
  transformers on the Hugging Face ids, and the same prompt length, means the same ids;
* image embeddings: read one by one through a probe text model (tests/tiny_gguf.py) whose last
  position copies the input embedding a chosen number of positions back into its logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("xllamacpp")

from tiny_gguf import (
    PROMPT,
    RAW_TEMPLATE,
    LlamaCpp,
    hf_greedy,
    hf_logprobs,
    internvl_processor,
    partial_utf8_ids,
    png_image,
    rel_diff,
    save_tiny_gemma3,
    save_tiny_idefics3,
    save_tiny_internvl,
    save_tiny_llava,
    write_probe,
)

import vlmprune
from vlmprune.errors import VlmpruneError
from vlmprune.export import export_gguf
from vlmprune.planning.plan import PruningPlan

# per-layer widths (q heads, kv heads, MLP 50: not a multiple of 32) and a dropped layer
PER_LAYER = PruningPlan(drop_layers=[2], layers={0: {"kv_heads": [1], "q_heads": [2, 3]},
                                                 1: {"mlp_channels": list(range(0, 100, 2))},
                                                 3: {"q_heads": [0, 3]}})


def _saved(root: Path, name: str, plan: PruningPlan | None = None, **kwargs) -> Path:
    folder = save_tiny_llava(root / name, layers=5, **kwargs)
    if plan is None:
        return folder
    model = vlmprune.load(folder, dtype=torch.float32)
    vlmprune.apply_plan_(model, plan)
    return vlmprune.save_model(model, root / f"{name}-pruned", plan=plan, source=folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-models")
    return {
        "llama": _saved(root, "llama"),
        "llama-gpt2": save_tiny_llava(root / "llama-gpt2", pre="gpt2"),  # GPT-2's pre-tokenizer (the demo's)
        "llama-llama3": save_tiny_llava(root / "llama-llama3", pre="llama3"),
        "qwen2-qwen2": save_tiny_llava(root / "qwen2-qwen2", pre="qwen2", text="qwen2"),
        "llama-per-layer": _saved(root, "llama", PER_LAYER),
        "llama-per-layer-tied": _saved(root, "llama-tied", PER_LAYER, tie_word_embeddings=True),
        "qwen2": _saved(root, "qwen2", text="qwen2"),
        "qwen2-per-layer": _saved(root, "qwen2", PER_LAYER, text="qwen2"),
        "phi3": _saved(root, "phi3", text="phi3"),
        "phi3-per-layer": _saved(root, "phi3", PER_LAYER, text="phi3"),
        "dinov2": save_tiny_llava(root / "dinov2", vision="dinov2"),
        "siglip": save_tiny_llava(root / "siglip", vision="siglip"),
        "idefics3": save_tiny_idefics3(root / "idefics3"),
        "internvl": save_tiny_internvl(root / "internvl"),
        "gemma3-dropped": _gemma3(root, PruningPlan(drop_layers=[2])),  # full layer dropped: pattern shifts
        "gemma3-per-layer": _gemma3(root, PruningPlan(layers={1: {"mlp_channels": list(range(64))}})),
    }


def _gemma3(root: Path, plan: PruningPlan) -> Path:
    name = f"gemma3-{len(plan.drop_layers)}"
    folder = save_tiny_gemma3(root / name)
    model = vlmprune.load(folder, dtype=torch.float32)
    vlmprune.apply_plan_(model, plan)
    out = vlmprune.save_model(model, root / f"{name}-pruned", plan=plan, source=folder)
    return out


def _check_text(model_dir: Path, out: Path, quant: str = "f32") -> tuple[float, list[int], list[int], dict]:
    from transformers import AutoTokenizer

    record = export_gguf(model_dir, out, quant=quant)
    model = vlmprune.load(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(PROMPT)["input_ids"]
    llama = LlamaCpp(out / "model.gguf")
    llama.banned = partial_utf8_ids(tok)
    n_vocab = model.config.text_config.vocab_size
    diff = rel_diff(llama.first_logprobs(ids, n_vocab), hf_logprobs(model, ids))
    return diff, llama.greedy(ids, 10), hf_greedy(model, ids, 10, llama.banned), record


@pytest.mark.parametrize("name, arch", [("llama", "llama"), ("llama-per-layer", "deci"),
                                        ("llama-per-layer-tied", "deci"), ("qwen2", "qwen2"),
                                        ("qwen2-per-layer", "deci"), ("phi3", "phi3"),
                                        ("phi3-per-layer", "deci"),
                                        ("gemma3-dropped", "gemma3")])
def test_f32_text_matches_transformers(models, tmp_path, name, arch):
    from gguf import GGUFReader

    diff, llama_tokens, hf_tokens, record = _check_text(models[name], tmp_path / "out")
    assert record["text"]["arch"] == arch
    names = {t.name for t in GGUFReader(str(tmp_path / "out" / "model.gguf")).tensors}
    # a tied lm_head is not written: llama.cpp reads token_embd for it
    untied = ("llama", "llama-per-layer", "qwen2", "qwen2-per-layer", "phi3", "phi3-per-layer")
    assert ("output.weight" in names) == (name in untied), names
    assert diff <= 1e-3, diff
    assert llama_tokens == hf_tokens
    if name.startswith("phi3"):  # the folder's name "phi3" would make llama.cpp fail (see export/gguf.py)
        assert "written as 'phi 3" in record["text"]["notes"][0]


def test_per_layer_widths_are_written_per_layer(models, tmp_path):
    from gguf import GGUFReader

    export_gguf(models["llama-per-layer"], tmp_path / "out", quant="f32", vision=False)
    fields = GGUFReader(str(tmp_path / "out" / "model.gguf")).fields

    def value(key):
        return fields[key].contents()

    assert value("general.architecture") == "deci"
    assert value("deci.block_count") == 4  # one of five dropped
    assert value("deci.attention.head_count") == [2, 4, 2, 4]
    assert value("deci.attention.head_count_kv") == [1, 2, 2, 2]
    assert value("deci.feed_forward_length") == [128, 50, 128, 128]
    assert value("deci.attention.key_length") == value("deci.attention.value_length") == 16
    assert not (tmp_path / "out" / "mmproj.gguf").exists()


@pytest.mark.parametrize("name", ["gemma3-per-layer"])
def test_per_layer_widths_of_a_family_llama_cpp_cannot_hold_are_refused(models, tmp_path, name):
    out = tmp_path / "out"
    with pytest.raises(VlmpruneError, match=r"layer 0's widths.*--stock"):
        export_gguf(models[name], out, vision=False)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_gemma3_sliding_window_pattern_follows_the_drops(models, tmp_path):
    from gguf import GGUFReader

    export_gguf(models["gemma3-dropped"], tmp_path / "out", quant="f32", vision=False)
    fields = GGUFReader(str(tmp_path / "out" / "model.gguf")).fields
    # layers s s F s s, layer 2 (the full one) dropped -> s s s s
    assert fields["gemma3.attention.sliding_window_pattern"].contents() == [True, True, True, True]


def test_cli_export_writes_the_pair_and_reports_fallbacks(models, tmp_path, capsys):
    from vlmprune.cli import main

    out = tmp_path / "out"
    assert main(["export", str(models["llama-per-layer"]), "--output", str(out), "--quant", "q8_0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [".vlmprune-output", "export.json", "mmproj.gguf", "model.gguf"]
    printed = capsys.readouterr().out
    assert "model.gguf: deci, 4 layers" in printed and "blk.1.ffn_down.weight (64, 50): f16, not q8_0" in printed
    assert main(["export", str(models["llama-per-layer"]), "--output", str(out)]) == 2  # exists: needs --overwrite
    assert main(["export", str(models["llama-per-layer"]), "--output", str(out), "--overwrite", "--no-vision"]) == 0
    assert not (out / "mmproj.gguf").exists()


def test_cli_refusal_writes_nothing(models, tmp_path):
    from vlmprune.cli import main

    out = tmp_path / "out"
    assert main(["export", str(models["gemma3-per-layer"]), "--output", str(out), "--no-vision"]) == 2
    assert not out.exists()


@pytest.mark.parametrize("name, pre", [("llama", "smollm"), ("llama-gpt2", "gpt-2"), ("llama-llama3", "llama-bpe"),
                                       ("qwen2-qwen2", "qwen2")])
def test_tokenizer_gives_the_hugging_face_ids(models, tmp_path, name, pre):
    folder = models[name]
    record = export_gguf(folder, tmp_path / "out", quant="f32", vision=False)
    assert record["text"]["vocab"]["pre"] == pre
    model = vlmprune.load(folder, dtype=torch.float32)
    tok = vlmprune.load_processor(folder).tokenizer
    llama = LlamaCpp(tmp_path / "out" / "model.gguf")
    llama.banned = partial_utf8_ids(tok)
    n_vocab = model.config.text_config.vocab_size
    prompts = [PROMPT,
               "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n  Is 2024 > 99?\n\n<image>x<|im_end|>",
               "The quick brown fox jumps over the lazy dog. 3.14159 héllo wörld",
               "I'm sure they'll say 123456 isn't 7890!\r\n\n  \tTabs   and    spaces;;; (ok)"]
    for prompt in prompts:
        ids = tok(prompt)["input_ids"]
        assert llama.prompt_tokens(prompt) == len(ids), prompt
        assert rel_diff(llama.first_logprobs(prompt, n_vocab), hf_logprobs(model, ids)) <= 1e-3, prompt


@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "bf16"])
def test_quantized_export_reloads_and_generates(models, tmp_path, quant):
    diff, llama_tokens, _, record = _check_text(models["llama-per-layer"], tmp_path / "out", quant)
    text = record["text"]
    assert text["tensor_types"][quant] > 0
    # the 50-wide MLP's down projection cannot be cut into 32-blocks: it falls back, and is reported
    assert [f["tensor"] for f in text["fallbacks"]] == ([] if quant == "bf16" else ["blk.1.ffn_down.weight"])
    assert json.loads((tmp_path / "out" / "export.json").read_text())["text"]["fallbacks"] == text["fallbacks"]
    assert len(llama_tokens) == 10
    assert diff < 0.05, diff


def _processor(monkeypatch, name: str, folder: Path):
    """The model's processor; InternVL's is assembled by hand (tiny_gguf.internvl_processor) and handed to
    the export in place of load_processor."""
    if name != "internvl":
        return vlmprune.load_processor(folder)
    processor = internvl_processor(folder)
    monkeypatch.setattr("vlmprune.checkpoint.load_processor", lambda *args, **kwargs: processor)
    return processor


@pytest.mark.parametrize("name", ["llama", "dinov2", "siglip", "gemma3-dropped", "idefics3", "internvl"])
def test_mmproj_image_embeddings_match_pytorch(models, tmp_path, monkeypatch, name):
    """Each image embedding llama.cpp injects, read through the probe, against the tower's own tokens."""
    folder = models[name]
    processor = _processor(monkeypatch, name, folder)
    record = export_gguf(folder, tmp_path / "out", quant="f32")
    model = vlmprune.load(folder, dtype=torch.float32)
    mm = record["mmproj"]
    img, b64 = png_image(mm["image_size"])
    after, extra = 0, 0  # text tokens llama.cpp puts after the image (before "b"), and in all
    with torch.no_grad():
        pixels = processor.image_processor(img, return_tensors="pt")["pixel_values"]
        if name.startswith("gemma3"):  # SigLIP, pooled 4x4 -> 2x2, RMSNorm, projection; <end_of_image> after
            tokens = model.model.get_image_features(pixels).pooler_output[0]
            after, extra = 1, 2
        elif name == "idefics3":  # pixel shuffle 4x4 -> 2x2, projection; a 1x1 tile, then the global view (read)
            tokens = model.model.get_image_features(pixels).pooler_output[0]
            after, extra = 1, 6 + len(tokens)
        elif name == "internvl":  # class token dropped, pixel shuffle 4x4 -> 2x2, LayerNorm + MLP; <img> ... </img>
            tokens = model.model.get_image_features(pixels, vision_feature_layer=-1,
                                                    vision_feature_select_strategy="default").pooler_output[0]
            after, extra = 1, 2
        else:
            states = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
            tokens = model.model.multi_modal_projector(states[model.config.vision_feature_layer][0])  # [CLS], p1..pn
    n = mm["image_tokens"]
    if name in ("siglip", "gemma3-dropped", "idefics3", "internvl"):  # no class token (or dropped): every patch
        # (or pooled / shuffled patch), in order
        assert n == tokens.shape[0] == mm["image_tokens_in_model"]
        expected = list(range(n))
    else:  # llama.cpp's LLaVA graph gives patches 2..n, then the class token (see export/gguf_vision.py)
        assert n == tokens.shape[0] - 1 and mm["image_tokens_in_model"] == (n + 1 if name == "dinov2" else n)
        expected = list(range(2, n + 1)) + [0]
    hidden = model.config.text_config.hidden_size
    message = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}},
                                            {"type": "text", "text": "b"}]}]
    for k in range(n):
        probe = tmp_path / "probe.gguf"
        n_vocab = write_probe(probe, folder, hidden, ["a", "b"], distance=n - k + after)
        llama = LlamaCpp(probe, tmp_path / "out" / "mmproj.gguf", chat_template=RAW_TEMPLATE)
        keep = processor.tokenizer.convert_tokens_to_ids("a")  # sampled: a whole UTF-8 token
        llama.banned = [i for i in range(n_vocab) if i != keep]
        out = llama.chat(message, top_logprobs=n_vocab)
        assert out["usage"]["prompt_tokens"] == n + 2 + extra
        logprobs = {p["id"]: p["logprob"] for p in out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}
        read = torch.tensor([logprobs[j] - logprobs[hidden] for j in range(hidden)])
        cos = torch.nn.functional.cosine_similarity(read[None], tokens, dim=-1)
        assert int(cos.argmax()) == expected[k], (k, cos)
        assert float(cos[expected[k]]) >= 0.9999, (k, float(cos[expected[k]]))


F = "<fake_token_around_image>"
# the image as llama.cpp lays it out in the text, in the text model's tokens ("<image>": one embedding each)
IMAGE_TEXT = {"gemma3-dropped": "<start_of_image>" + "<image>" * 4 + "<end_of_image>",
              # a 1x1 tile, then the global view (the same 28-px image twice), as tools/mtmd writes idefics3
              "idefics3": F + "<row_1_col_1>" + "<image>" * 4 + "\n\n" + F + "<global-img>" + "<image>" * 4 + F,
              "internvl": "<img>" + "<IMG_CONTEXT>" * 4 + "</img>"}


@pytest.mark.parametrize("name", ["gemma3-dropped", "idefics3", "internvl"])
def test_pair_gives_the_transformers_tokens_with_an_image(models, tmp_path, monkeypatch, name):
    """The text GGUF + mmproj in llama.cpp against transformers on a prompt with an image: the same
    prompt length, log-probs and greedy tokens. Gemma 3's image block is attended bidirectionally in
    both (token_type_ids in transformers)."""
    folder = models[name]
    processor = _processor(monkeypatch, name, folder)
    export_gguf(folder, tmp_path / "out", quant="f32")
    model = vlmprune.load(folder, dtype=torch.float32)
    tok = processor.tokenizer
    img, b64 = png_image(28)
    pre, post = "<|im_start|>user\n", "What colour is the circle?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(pre + IMAGE_TEXT[name] + post)["input_ids"]
    pixels = processor.image_processor(img, return_tensors="pt")["pixel_values"]
    if name == "idefics3":
        inputs = {"pixel_values": torch.cat([pixels, pixels], dim=1)}  # [batch, images, C, H, W]
    elif name == "internvl":
        inputs = {"pixel_values": pixels}
    else:
        inputs = {"pixel_values": pixels, "token_type_ids": torch.tensor([[int(i == tok.image_token_id) for i in ids]])}
    llama = LlamaCpp(tmp_path / "out" / "model.gguf", tmp_path / "out" / "mmproj.gguf", chat_template=RAW_TEMPLATE)
    llama.banned = partial_utf8_ids(tok)
    message = [{"role": "user", "content": [{"type": "text", "text": pre},
                                            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}},
                                            {"type": "text", "text": post}]}]
    n_vocab = model.config.text_config.vocab_size
    out = llama.chat(message, top_logprobs=n_vocab, ignore_eos=True)
    assert out["usage"]["prompt_tokens"] == len(ids)
    logprobs = {p["id"]: p["logprob"] for p in out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]}
    assert rel_diff(logprobs, hf_logprobs(model, ids, **inputs)) <= 1e-3
    out = llama.chat(message, max_tokens=10, top_logprobs=1, ignore_eos=True)
    assert [t["id"] for t in out["choices"][0]["logprobs"]["content"]] == hf_greedy(model, ids, 10, llama.banned,
                                                                                     **inputs)


def test_idefics3_tokenizer_without_its_image_tokens_is_refused(models, tmp_path):
    """llama.cpp looks "\n\n", "<global-img>" ... up as single tokens; a vocabulary without them is refused."""
    import shutil

    folder = tmp_path / "idefics3"
    shutil.copytree(models["idefics3"], folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["added_tokens"] = [a for a in data["added_tokens"] if a["content"] != "\n\n"]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(VlmpruneError, match="splits"):
        export_gguf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gguf_pair_answers_through_the_chat_api(models, tmp_path):
    folder = models["dinov2"]
    record = export_gguf(folder, tmp_path / "out", quant="q8_0", vision_quant="q8_0")
    assert record["mmproj"]["tensor_types"]["q8_0"] > 0
    _, b64 = png_image(28)
    llama = LlamaCpp(tmp_path / "out" / "model.gguf", tmp_path / "out" / "mmproj.gguf")
    out = llama.chat([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}},
        {"type": "text", "text": "What colour is the circle?"}]}], max_tokens=5)
    assert out["choices"][0]["message"]["content"] is not None
    assert out["usage"]["completion_tokens"] >= 1
    assert out["usage"]["prompt_tokens"] > 16  # the 16 image tokens and the rendered chat template


def test_unsupported_family_is_refused_before_writing(tmp_path):
    from tiny_data import tiny_llava_processor
    from tiny_models import build_tiny

    folder = tmp_path / "phi"
    build_tiny("llava_phi").save_pretrained(folder)
    tiny_llava_processor().save_pretrained(folder)
    with pytest.raises(VlmpruneError, match="phi language backbone is not supported"):
        export_gguf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type,tower,graph", [("gemma3", "clip_vision_model", "gemma3 (SigLIP)"),
                                                  ("llava", "pixtral", "LLaVA (mlp)"),
                                                  ("qwen2_5_vl", "siglip_vision_model", "qwen2.5vl")])
def test_a_tower_the_projector_graph_does_not_take_is_refused(model_type, tower, graph):
    from types import SimpleNamespace

    from vlmprune.export.gguf_vision import check_family

    config = SimpleNamespace(model_type=model_type, vision_config=SimpleNamespace(model_type=tower))
    import re

    with pytest.raises(VlmpruneError, match=rf"{tower} vision tower: llama.cpp's {re.escape(graph)} graph takes .* "
                                            r"--no-vision"):
        check_family(SimpleNamespace(config=config))


def test_evaluate_runs_the_gguf_pair_in_llama_cpp(models, tmp_path, capfd):
    import re

    from vlmprune.evaluate.run import evaluate_model_dir

    export_gguf(models["dinov2"], tmp_path / "out", quant="f16")
    capfd.readouterr()
    records = []
    for k in range(3):
        img, _ = png_image(28, seed=k)
        img.save(tmp_path / f"{k}.png")
        records.append({"id": k, "image": f"{k}.png", "type": "shape", "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is it?"}, {"from": "gpt", "value": "circle"}]})
    task = tmp_path / "task.json"
    task.write_text(json.dumps(records))
    result = evaluate_model_dir(model=str(tmp_path / "out"), tasks=[], task_file=str(task), max_new_tokens=4,
                                output=str(tmp_path / "result.json"))
    assert result["runtime"].startswith("llama.cpp")
    assert result["tasks"]["task"]["count"] == 3 and len(result["tasks"]["task"]["predictions"]) == 3
    assert result["timings"]["generated_tokens"] >= 3
    assert json.loads((tmp_path / "result.json").read_text())["accuracy"] == result["accuracy"]
    # llama.cpp's own log ("0.00.002.164 I srv  init: ...", 20+ lines a model) stays off the terminal
    out, err = capfd.readouterr()
    assert not re.search(r"\d+\.\d+\.\d+\.\d+ [DIWE] ", out + err), (out + err)[:500]


def test_sentencepiece_tokenizer_gives_sentencepiece_ids(tmp_path):
    """LLaVA-1.5's Llama 2 tokenizer is SentencePiece: tokenizer.model beside the model is written with
    its scores and byte tokens; llama.cpp must tokenize as sentencepiece does (BOS added)."""
    spm = pytest.importorskip("sentencepiece")
    from tiny_gguf import CORPUS, tiny_llava

    import vlmprune.export.gguf as text
    from vlmprune.adapters import get_adapter

    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
                                   remove_extra_whitespaces=False, normalization_rule_name="identity",  # as Llama 2
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))

    class Tok:  # what tiny_llava asks of a tokenizer; one added token (<image>) after the SentencePiece ones
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

        def __len__(self):
            return sp.vocab_size() + 1

        def convert_tokens_to_ids(self, token):
            return sp.vocab_size()

    model = tiny_llava(Tok())
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((tmp_path / "tokenizer.model").read_bytes())
    (folder / "tokenizer.json").write_text(json.dumps({"added_tokens": [
        {"id": sp.vocab_size(), "content": "<image>", "special": True}]}))
    (folder / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    adapter = get_adapter(model)
    path = tmp_path / "model.gguf"
    record = text.write_text_gguf(path, model, adapter, text.plan_text(model, adapter),
                                  text.TokenizerSource(folder, None), "f32", "spm")
    assert record["vocab"]["model"] == "llama"
    llama = LlamaCpp(path)
    llama.banned = [i for i in range(sp.vocab_size()) if sp.IsByte(i) and int(sp.IdToPiece(i)[3:5], 16) >= 0x80]
    n_vocab = model.config.text_config.vocab_size
    for prompt in ["What colour is the circle? 12 apples", "  two  spaces\nand a newline", "héllo wörld ß"]:
        ids = [1] + sp.encode(prompt)
        assert llama.prompt_tokens(prompt) == len(ids), prompt
        assert rel_diff(llama.first_logprobs(prompt, n_vocab), hf_logprobs(model, ids)) <= 1e-3, prompt


def test_a_tokenizer_llama_cpp_would_split_differently_is_refused_before_writing(tmp_path):
    from tiny_data import tiny_llava_processor
    from tiny_models import build_tiny

    folder = tmp_path / "char-level"
    build_tiny("llava_llama_gqa").save_pretrained(folder)
    tiny_llava_processor().save_pretrained(folder)  # a WordLevel (one token per character) tokenizer
    with pytest.raises(VlmpruneError, match="WordLevel"):
        export_gguf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
