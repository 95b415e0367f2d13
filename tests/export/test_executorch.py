"""vlmprune export --format executorch, run in the real ExecuTorch runtime (XNNPACK, Python Module API).

One export of a tiny LLaVA (Llama backbone with per-layer heads, kv heads and MLP widths and a dropped
layer, DINOv2 tower whose position table is interpolated) serves the module: the program's logits and
greedy tokens against transformers on prompts other than the export's own sample, `vlmprune evaluate` on
the directory against the PyTorch model, the per-layer KV cache. Families the runner cannot express are
refused before anything is written. Lowering to XNNPACK dominates the time (2.5 to 12 minutes per program
on this project's shared 2-core VM under load): the module lowers two programs (float32 and int4), and the
tests that need one are marked ``slow`` (``pytest -m "not slow"`` leaves them out).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("executorch.runtime")

from tiny_gguf import save_tiny_gemma3, save_tiny_idefics3, save_tiny_llava
from tiny_models import build_tiny

import vlmprune
from vlmprune.errors import VlmpruneError
from vlmprune.export import export_executorch
from vlmprune.export.pte_runtime import PteModel, prompt_inputs
from vlmprune.planning.plan import PruningPlan

# per-layer widths (q heads, kv heads, MLP 50: not a multiple of the int4 group) and a dropped layer
PER_LAYER = PruningPlan(drop_layers=[2], layers={0: {"kv_heads": [1], "q_heads": [2, 3]},
                                                 1: {"mlp_channels": list(range(0, 100, 2))},
                                                 3: {"q_heads": [0, 3]}})


def rel_diff(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def _image(seed: int, size: tuple[int, int] = (30, 22)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pruned(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pte-models")
    folder = save_tiny_llava(root / "llava", layers=5, vision="dinov2")
    model = vlmprune.load(folder, dtype=torch.float32)
    vlmprune.apply_plan_(model, PER_LAYER)
    return vlmprune.save_model(model, root / "llava-pruned", plan=PER_LAYER, source=folder)


@pytest.fixture(scope="module")
def exported(pruned, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pte-out") / "fp32"
    return out, export_executorch(pruned, out, max_seq_len=96)


@pytest.mark.slow  # lowers a program to XNNPACK: minutes on a loaded 2-core machine
def test_program_reproduces_transformers(pruned, exported):
    out, record = exported
    assert record["check"]["rel_diff"] <= 1e-4 and record["check"]["tokens"] == record["check"]["pytorch_tokens"]
    model = vlmprune.load(pruned, dtype=torch.float32).eval()
    runner = PteModel(out)
    for seed, question in [(1, "How many dots are there?"), (2, "Is it red?")]:
        inputs = prompt_inputs(runner.processor, _image(seed), question)  # not square: the processor resizes
        assert int((inputs["input_ids"] == record["image_token_id"]).sum()) == record["image_tokens"] == 17
        with torch.no_grad():
            ref = model(**inputs).logits[0]
            hf = model.generate(**inputs, max_new_tokens=10, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        logits, tokens = runner.prompt_logits_and_tokens(inputs, 10)
        assert rel_diff(logits, ref) <= 1e-4, rel_diff(logits, ref)
        assert tokens == hf.tolist()


@pytest.mark.slow  # lowers a program to XNNPACK: minutes on a loaded 2-core machine
def test_one_cache_per_layer_in_its_own_shape(exported):
    out, record = exported
    assert record["layers"] == 4  # one of five dropped
    assert record["kv_heads"] == [1, 2, 2, 2] and record["head_dim"] == [16] * 4
    assert record["methods"] == ["vision_encoder", "token_embedding", "text_decoder"]
    assert record["metadata"]["get_max_seq_len"] == 96 and record["metadata"]["get_eos_ids"]
    assert any("DINOv2" in note for note in record["notes"])
    names = sorted(p.name for p in out.iterdir())
    assert {"model.pte", "export.json", "tokenizer.json", "processor_config.json"} <= set(names)
    assert not [n for n in names if n.endswith(".safetensors")]
    assert json.loads((out / "export.json").read_text())["bytes"] == (out / "model.pte").stat().st_size
    runner = PteModel(out)
    meta = runner.program.metadata("text_decoder")
    assert meta.num_inputs() == 2
    assert runner.max_seq_len == 96


@pytest.mark.slow  # lowers a program to XNNPACK: minutes on a loaded 2-core machine
def test_evaluate_answers_as_pytorch_does(pruned, exported, tmp_path):
    from vlmprune.evaluate.run import evaluate_model_dir

    records = []
    for k in range(3):
        _image(10 + k).save(tmp_path / f"{k}.png")
        records.append({"id": k, "image": f"{k}.png", "type": "shape", "conversations": [
            {"from": "human", "value": "<image>\nWhat shape is it?"}, {"from": "gpt", "value": "circle"}]})
    task = tmp_path / "task.json"
    task.write_text(json.dumps(records))
    got = evaluate_model_dir(model=str(exported[0]), tasks=[], task_file=str(task), max_new_tokens=6,
                             output=str(tmp_path / "result.json"))
    ref = evaluate_model_dir(model=str(pruned), tasks=[], task_file=str(task), max_new_tokens=6, batch_size=1)
    assert got["runtime"].startswith("ExecuTorch")
    predictions = [[e["prediction"] for e in r["tasks"]["task"]["examples"]] for r in (got, ref)]
    assert predictions[0] == predictions[1] and len(predictions[0]) == 3
    assert got["timings"]["generated_tokens"] >= 3 and got["timings"]["decode_tokens_per_s"] > 0
    assert got["disk_bytes"] == (exported[0] / "model.pte").stat().st_size
    with pytest.raises(VlmpruneError, match="--lmms-tasks"):
        evaluate_model_dir(model=str(exported[0]), tasks=[], lmms_tasks="mme")


@pytest.mark.slow  # lowers a program to XNNPACK: minutes on a loaded 2-core machine
def test_int4_keeps_the_odd_width_in_float_and_stays_close(pruned, tmp_path):
    record = export_executorch(pruned, tmp_path / "int4", quant="int4", max_seq_len=96)
    quant = record["quantization"]
    # 4 layers x 7 Linear layers, less the MLP down projection of width 50 (not a multiple of 32)
    assert quant["quantized_linears"] == 27
    assert [k["shape"] for k in quant["kept_float"]] == [[64, 50]]
    assert record["check"]["rel_diff"] <= record["check"]["tolerance"]


@pytest.mark.slow  # lowers a program to XNNPACK
def test_idefics3_exports_one_tile_and_reproduces_transformers(tmp_path):
    """SmolVLM's layout (SigLIP-style tower with gelu-tanh, pixel shuffle, Llama text): image splitting off,
    one tile through the vision encoder; the same processor settings in transformers give the same logits."""
    folder = save_tiny_idefics3(tmp_path / "idefics3")
    processor = vlmprune.load_processor(folder)
    processor.image_processor.size = {"longest_edge": 56}  # a larger image: split into 4 tiles + a global view
    processor.save_pretrained(folder)
    record = export_executorch(folder, tmp_path / "pte", max_seq_len=96)
    assert record["processor_settings"] == {"do_image_splitting": False} and record["image_tokens"] == 4
    assert any("do_image_splitting false" in note for note in record["notes"])
    runner = PteModel(tmp_path / "pte")
    assert runner.processor.image_processor.do_image_splitting is False
    model = vlmprune.load(folder, dtype=torch.float32).eval()
    for seed, question in [(1, "How many dots are there?"), (2, "Is it red?")]:
        inputs = prompt_inputs(runner.processor, _image(seed, (60, 44)), question)
        assert inputs["pixel_values"].shape[:2] == (1, 1)
        assert int((inputs["input_ids"] == record["image_token_id"]).sum()) == 4
        with torch.no_grad():
            ref = model(**inputs).logits[0]
            hf = model.generate(**inputs, max_new_tokens=10, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        logits, tokens = runner.prompt_logits_and_tokens(inputs, 10)
        assert rel_diff(logits, ref) <= 1e-4, rel_diff(logits, ref)
        assert tokens == hf.tolist()
    split = prompt_inputs(processor, _image(1, (60, 44)), "Is it red?")  # the model's own processor splits
    assert int((split["input_ids"] == record["image_token_id"]).sum()) == 5 * 4


@pytest.mark.slow  # lowers a program to XNNPACK
def test_gemma3_image_block_attends_both_ways_as_in_transformers(tmp_path):
    """Gemma 3's image tokens see each other (token_type_ids in transformers): vision_encoder's embeddings carry
    a last channel of ones, token_embedding's of zeros, and text_decoder opens the image block for a call of
    ones. The tiny model's image block matters: a causal decoder would be far off. Also through ExecuTorch's
    C++ Module (what its MultimodalRunner drives), in the runner's call order."""
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    folder = save_tiny_gemma3(tmp_path / "gemma3", layers=3, sliding_window=128)  # windows >= the KV cache
    record = export_executorch(folder, tmp_path / "pte", max_seq_len=96)
    assert record["family"] == "gemma3" and record["image_tokens"] == 4
    runner = PteModel(tmp_path / "pte")
    model = vlmprune.load(folder, dtype=torch.float32).eval()
    for seed, question in [(1, "How many dots are there?"), (2, "Is it red?")]:
        inputs = prompt_inputs(runner.processor, _image(seed), question)
        assert int(inputs["token_type_ids"].sum()) == 4
        with torch.no_grad():
            ref = model(**inputs).logits[0]
            causal = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits[0]
            hf = model.generate(**inputs, max_new_tokens=10, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        logits, tokens = runner.prompt_logits_and_tokens(inputs, 10)
        assert rel_diff(logits, ref) <= 1e-4, rel_diff(logits, ref)
        assert rel_diff(causal, ref) > 1e-2
        assert tokens == hf.tolist()
        module, pos, parts = _load_for_executorch(str(tmp_path / "pte" / "model.pte")), 0, []
        for kind, value in runner.pieces(inputs):
            embeds = module.run_method(*(("token_embedding", (value,)) if kind == "text" else
                                         ("vision_encoder", (value[0],))))[0]
            parts.append(module.run_method("text_decoder", (embeds, torch.arange(pos, pos + embeds.shape[1])))[0])
            pos += embeds.shape[1]
        assert rel_diff(torch.cat(parts, 1)[0], ref) <= 1e-4
    text = prompt_inputs(runner.processor, None, "Is it red?")  # no image: causal throughout
    with torch.no_grad():
        ref = model(**text).logits[0]
    assert rel_diff(runner.prompt_logits_and_tokens(text, 1)[0], ref) <= 1e-4


def _tiny_smolvlm():
    """SmolVLM (SmolVLM2's model_type; its processor needs torchvision, absent here) with the tiny Idefics3's
    shapes: the image path only."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMVisionConfig

    config = build_tiny("idefics3").config
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")
    vision = SmolVLMVisionConfig(**{k: v for k, v in config.vision_config.to_dict().items() if k in keep})
    torch.manual_seed(0)
    return SmolVLMForConditionalGeneration._from_config(SmolVLMConfig(
        vision_config=vision, text_config=config.text_config.to_dict(), scale_factor=2,
        image_token_id=config.image_token_id), attn_implementation="sdpa")


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_tile_encoder_is_the_models_image_path(family):
    """vision_encoder for one full tile (stored position ids, no torch.bucketize in the exported graph) computes
    what transformers' get_image_features does (no lowering: the Idefics3 test above lowers it)."""
    from vlmprune.adapters import get_adapter
    from vlmprune.export.pte import _modules
    from vlmprune.summary import layer_shapes

    model = (build_tiny("idefics3") if family == "idefics3" else _tiny_smolvlm()).eval()
    adapter = get_adapter(model)
    size = model.config.vision_config.image_size
    vision = _modules(model, adapter, layer_shapes(model, adapter), 32, size)[0]
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=pixels[None]).pooler_output[0]
        program = torch.export.export(vision, (pixels,), strict=False)
        got = program.module()(pixels)[0]
    assert ref.shape == (16, 64) and torch.allclose(got, ref, rtol=0, atol=1e-6)
    assert not [n for n in program.graph.nodes if "bucketize" in str(n.target)]


def test_idefics3_takes_only_its_tile_size(tmp_path):
    folder = save_tiny_idefics3(tmp_path / "idefics3")  # 28 px tiles
    with pytest.raises(VlmpruneError, match="max_image_size"):
        export_executorch(folder, tmp_path / "out", image_size=56)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, reason", [("gemma4", "in both directions"), ("qwen2_5_vl", "M-RoPE"),
                                            ("llava_next", "not supported yet")])
def test_families_the_runner_cannot_express_are_refused(family, reason, tmp_path):
    folder = vlmprune.save_model(build_tiny(family), tmp_path / family)
    out = tmp_path / "out"
    with pytest.raises(VlmpruneError, match=reason):
        export_executorch(folder, out)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_cli_refuses_options_of_the_other_format(pruned, tmp_path):
    from vlmprune.cli import main

    out = tmp_path / "out"
    assert main(["export", str(pruned), "--format", "executorch", "--output", str(out), "--quant", "q8_0"]) == 2
    assert main(["export", str(pruned), "--format", "gguf", "--output", str(out), "--dtype", "bfloat16"]) == 2
    assert main(["export", str(pruned), "--format", "executorch", "--output", str(out), "--quant", "int8",
                 "--dtype", "bfloat16"]) == 2
    assert main(["export", str(pruned), "--format", "executorch", "--output", str(out), "--max-seq-len", "8"]) == 2
    assert not out.exists()


def test_reference_tokens_stop_at_the_end_id_as_the_runtime_does(pruned):
    """The check compares the runtime's greedy tokens (which stop at an end-of-sequence id) with PyTorch's:
    PyTorch's must stop there too (a model that answers at once gives one token, the end id)."""
    from vlmprune.export.pte import _eos_ids, reference, sample_inputs

    model = vlmprune.load(pruned, dtype=torch.float32).eval()
    processor = vlmprune.load_processor(pruned)
    eos = _eos_ids(processor, model.generation_config)[0]
    with torch.no_grad():
        model.lm_head.weight[eos] = 50 * model.lm_head.weight.abs().max()  # the end id wins at every position
        model.lm_head.weight[eos] *= torch.sign(model.model.language_model.norm.weight)
    sample = sample_inputs(processor, 28)
    logits, tokens = reference(model, sample, 8)
    assert logits.shape == (sample["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert tokens[-1] == eos and len(tokens) < 8
