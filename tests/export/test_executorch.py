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

from tiny_gguf import (
    Qwen2_5_VLTestProcessor,
    save_tiny_gemma3,
    save_tiny_idefics3,
    save_tiny_llava,
    save_tiny_qwen2_5_vl,
)
from tiny_models import build_tiny

import vlmprune
from vlmprune.errors import VlmpruneError
from vlmprune.export import export_executorch
from vlmprune.export.pte_runtime import PteModel, image_from_patches, image_input, prompt_inputs
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
    check = record["check"]
    # a reduced program may be off by the larger of 5e-2 and twice what int4 moves the eager model
    assert check["reduced_rel_diff_vs_float32"] > 0
    assert check["tolerance"] == max(5e-2, 2 * check["reduced_rel_diff_vs_float32"])
    assert check["rel_diff"] <= check["tolerance"]


@pytest.mark.slow  # lowers a program to XNNPACK
def test_a_program_off_by_more_than_the_tolerance_is_not_published(pruned, tmp_path, monkeypatch):
    """The check is what stands between a wrongly lowered program and the user: runtime logits moved by the
    logits' own scale (what a wrong graph or wrong weights give) are refused, reduced precision or not."""
    from vlmprune.export.pte_runtime import PteModel

    runtime_logits = PteModel.prompt_logits_and_tokens

    def off(self, inputs, max_new_tokens):
        logits, tokens = runtime_logits(self, inputs, max_new_tokens)
        return logits + logits.abs().max(), tokens

    monkeypatch.setattr(PteModel, "prompt_logits_and_tokens", off)
    out = tmp_path / "int4"
    with pytest.raises(VlmpruneError, match=r"does not reproduce the PyTorch model .* tolerance"):
        export_executorch(pruned, out, quant="int4", max_seq_len=96)
    assert not out.exists() and not list(tmp_path.glob(".int4*"))


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


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_bfloat16_encoders_run_the_vision_side_in_float32(pruned, family):
    """A bfloat16 export keeps the tower and projector in float32 (ExecuTorch 1.5.1 lowered the demo's bfloat16
    DINOv2 tower 1.9 off): vision_encoder takes the float32 image and hands the decoder bfloat16 features, the
    float32 path's own features rounded."""
    from vlmprune.adapters import get_adapter
    from vlmprune.export.pte import _modules, bfloat16_language_
    from vlmprune.summary import layer_shapes

    model = (vlmprune.load(pruned, dtype=torch.float32) if family == "llava" else build_tiny("idefics3")).eval()
    adapter = get_adapter(model)
    size = model.config.vision_config.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _modules(model, adapter, layer_shapes(model, adapter), 32, size)[0](pixels)
        bfloat16_language_(model, adapter)
        assert next(adapter.language_model(model).parameters()).dtype == torch.bfloat16
        got = _modules(model, adapter, layer_shapes(model, adapter), 32, size)[0](pixels)
    assert ref.dtype == torch.float32 and got.dtype == torch.bfloat16
    assert torch.equal(got, ref.to(torch.bfloat16))


@pytest.mark.slow  # lowers a program to XNNPACK
def test_bfloat16_program_stays_close(pruned, tmp_path):
    record = export_executorch(pruned, tmp_path / "bf16", dtype="bfloat16", max_seq_len=96)
    assert any("vision tower and projector stay float32" in note for note in record["notes"])
    check = record["check"]
    assert check["rel_diff"] <= check["tolerance"] and check["tokens"] == check["pytorch_tokens"]


def test_idefics3_takes_only_its_tile_size(tmp_path):
    folder = save_tiny_idefics3(tmp_path / "idefics3")  # 28 px tiles
    with pytest.raises(VlmpruneError, match="max_image_size"):
        export_executorch(folder, tmp_path / "out", image_size=56)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, reason", [("gemma4", "in both directions"), ("qwen2_vl", "not yet Qwen2-VL's"),
                                            ("qwen3_vl", "M-RoPE"), ("llava_next", "not supported yet")])
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


# ------------------------------------------------------------------------------------------ Qwen2.5-VL


# per-layer widths in the M-RoPE decoder: layer 0 keeps one kv head (and its two query heads), layer 1 half its MLP
QWEN_PER_LAYER = PruningPlan(layers={0: {"kv_heads": [1], "q_heads": [2, 3]},
                                     1: {"mlp_channels": list(range(0, 128, 2))}})


def _tiny_qwen2_5_vl_pruned(root: Path) -> Path:
    folder = save_tiny_qwen2_5_vl(root / "qwen25vl", window_size=28)  # 28 px windows: 2x2 merged patches each
    model = vlmprune.load(folder, dtype=torch.float32)
    vlmprune.apply_plan_(model, QWEN_PER_LAYER)
    return vlmprune.save_model(model, root / "qwen25vl-pruned", plan=QWEN_PER_LAYER, source=folder)


def _pieces_through(modules, processor, inputs) -> torch.Tensor:
    """The prompt through the (eager) methods in the runner's call order: text before the image, the image,
    text after; each encoder's output through text_decoder at the next cache positions."""
    vision, embedding, decoder = modules
    ids = inputs["input_ids"][0]
    where = (ids == processor.image_token_id).nonzero().flatten()
    first, last = int(where[0]), int(where[-1])
    calls = [embedding(ids[None, :first]), vision(image_input(inputs)), embedding(ids[None, last + 1:])]
    pos, logits = 0, []
    for embeds in calls:
        logits.append(decoder(embeds, torch.arange(pos, pos + embeds.shape[1])))
        pos += embeds.shape[1]
    return torch.cat(logits, 1)[0]


@pytest.mark.parametrize("size", [56, 84])  # 4x4 merged patches in 2x2 windows; 6x6 in windows padded at the edge
def test_qwen2_5_vl_tower_encoder_is_the_models_image_path(size):
    """vision_encoder for one fixed grid (constant rotary table, window order and block-diagonal window mask, the
    Conv3d patch embedding over two identical frames as a Conv2d) computes from the [1, 3, S, S] image what
    transformers' get_image_features does from the processor's flattened patches, with a last channel of ones,
    and traces with no data-dependent split (no lowering: the slow test below lowers it)."""
    from vlmprune.adapters import get_adapter
    from vlmprune.export.pte import _modules
    from vlmprune.summary import layer_shapes

    model = build_tiny("qwen2_5_vl").eval()  # window attention in block 0 (28 px windows), full in block 1
    adapter = get_adapter(model)
    vision = _modules(model, adapter, layer_shapes(model, adapter), 32, size)[0]
    side = size // 7
    pixels = torch.randn(side * side, 3, 1, 7 * 7, generator=torch.Generator().manual_seed(0))
    pixels = pixels.expand(-1, -1, 2, -1).reshape(side * side, 3 * 2 * 7 * 7)  # a picture: two identical frames
    grid = torch.tensor([[1, side, side]])
    image = image_from_patches(pixels, grid)
    assert image.shape == (1, 3, size, size)
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=pixels, image_grid_thw=grid).pooler_output[0]
        program = torch.export.export(vision, (image,), strict=False)
        got = program.module()(image)[0]
        vision.window_mask.fill_(True)  # no windows: another function
        unwindowed = vision(image)[0]
    assert ref.shape == ((side // 2) ** 2, 64) and got.shape == ((side // 2) ** 2, 65)
    assert torch.allclose(got[:, :-1], ref, rtol=0, atol=1e-6) and bool((got[:, -1] == 1).all())
    assert rel_diff(unwindowed[:, :-1], ref) > 1e-3
    assert not [n for n in program.graph.nodes if "split" in str(n.target) or "local_scalar" in str(n.target)]


def test_qwen2_5_vl_decoder_derives_mrope_positions_from_the_cache_position(tmp_path):
    """Per-layer widths; text_decoder's 3-D positions (the image's rows and columns from its first cache position,
    the text after it shifted by a delta kept in the program and reset at cache position 0) give transformers'
    logits over two successive prompts and its greedy tokens; plain 1-D positions would not (eager methods, no
    lowering)."""
    from vlmprune.adapters import get_adapter
    from vlmprune.export.pte import _modules
    from vlmprune.summary import layer_shapes

    folder = _tiny_qwen2_5_vl_pruned(tmp_path)
    processor = Qwen2_5_VLTestProcessor(folder)
    model = vlmprune.load(folder, dtype=torch.float32).eval()
    adapter = get_adapter(model)
    assert [s.num_kv_heads for s in layer_shapes(model, adapter)] == [1, 2, 2]
    modules = _modules(model, adapter, layer_shapes(model, adapter), 96, 56)
    for seed, question in [(1, "How many dots are there?"), (2, "Is it red?")]:
        inputs = prompt_inputs(processor, _image(seed, (56, 56)), question)
        assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
        n = inputs["input_ids"].shape[1]
        with torch.no_grad():
            ref = model(**inputs).logits[0]
            plain = model(**inputs, position_ids=torch.arange(n)[None]).logits[0]
            hf = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, n:].tolist()
            logits = _pieces_through(modules, processor, inputs)
            tokens, pos = [int(logits[-1].argmax())], n
            while len(tokens) < 6:
                step = modules[1](torch.tensor([[tokens[-1]]]))
                tokens.append(int(modules[2](step, torch.tensor([pos]))[0, -1].argmax()))
                pos += 1
        assert rel_diff(logits, ref) <= 1e-5, rel_diff(logits, ref)
        assert rel_diff(plain, ref) > 1e-4  # the tiny model: 1.8e-4 (1-D positions after the image are 12 ahead)
        assert tokens == hf


def test_qwen2_5_vl_image_size_must_be_whole_merged_patches(tmp_path, monkeypatch):
    import vlmprune.checkpoint as checkpoint

    folder = save_tiny_qwen2_5_vl(tmp_path / "qwen25vl")
    monkeypatch.setattr(checkpoint, "load_processor", lambda *args, **kwargs: Qwen2_5_VLTestProcessor(folder))
    with pytest.raises(VlmpruneError, match="multiple of 14"):
        export_executorch(folder, tmp_path / "out", image_size=50)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # lowers a program to XNNPACK
def test_qwen2_5_vl_exports_and_reproduces_transformers(tmp_path, monkeypatch):
    """Qwen2.5-VL (M-RoPE text, windowed vision tower) at one image size: the runtime resizes each image to it,
    the program's logits over two successive prompts match transformers on the same inputs, greedy tokens
    identical, also through ExecuTorch's C++ Module in the runner's call order. The processor is assembled
    by hand (transformers' needs torchvision, see tiny_gguf)."""
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    import vlmprune.checkpoint as checkpoint

    folder = _tiny_qwen2_5_vl_pruned(tmp_path)  # per-layer widths; 56 px images: 4 windows of 2x2 merged patches
    processor = Qwen2_5_VLTestProcessor(folder)
    monkeypatch.setattr(checkpoint, "load_processor", lambda *args, **kwargs: processor)
    record = export_executorch(folder, tmp_path / "pte", max_seq_len=96, image_size=56)
    assert record["family"] == "qwen2_5_vl" and record["image_tokens"] == 16 and record["resize_images"] == 56
    assert record["kv_heads"] == [1, 2, 2]
    assert record["check"]["rel_diff"] <= 1e-5 and record["check"]["tokens"] == record["check"]["pytorch_tokens"]
    assert {"model.pte", "export.json", "tokenizer.json", "preprocessor_config.json"} <= {
        p.name for p in (tmp_path / "pte").iterdir()}
    runner = PteModel(tmp_path / "pte", processor=processor)
    model = vlmprune.load(folder, dtype=torch.float32).eval()
    module = _load_for_executorch(str(tmp_path / "pte" / "model.pte"))  # one C++ Module for both prompts
    for seed, question in [(1, "How many dots are there?"), (2, "Is it red?")]:
        inputs = runner.inputs(_image(seed, (60, 44)), question)  # not square: resized to 56 x 56
        assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
        with torch.no_grad():
            ref = model(**inputs).logits[0]
            hf = model.generate(**inputs, max_new_tokens=10, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        logits, tokens = runner.prompt_logits_and_tokens(inputs, 10)
        # tighter than the other families' 1e-4: 1-D positions are only 1.8e-4 off on this tiny model (measured 7e-7)
        assert rel_diff(logits, ref) <= 1e-5, rel_diff(logits, ref)
        assert tokens == hf.tolist()
        pos, parts = 0, []
        for kind, value in runner.pieces(inputs):
            embeds = module.run_method(*(("token_embedding", (value,)) if kind == "text" else
                                         ("vision_encoder", (value[0],))))[0]
            parts.append(module.run_method("text_decoder", (embeds, torch.arange(pos, pos + embeds.shape[1])))[0])
            pos += embeds.shape[1]
        assert rel_diff(torch.cat(parts, 1)[0], ref) <= 1e-5
    with pytest.raises(VlmpruneError, match="not resized"):  # the processor alone keeps the aspect ratio
        runner.prefill(prompt_inputs(processor, _image(1, (60, 44)), "Is it red?"))
