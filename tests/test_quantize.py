"""vlmprune quantize: only the decoder's Linear layers change, checkpoints reload to the same logits,
per-layer widths work, and a scheme this machine cannot run leaves nothing behind."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

pytest.importorskip("torchao")
pytest.importorskip("bitsandbytes")

from tiny_models import FAMILIES, build_tiny, make_inputs  # noqa: E402

import vlmprune  # noqa: E402
from vlmprune.adapters import get_adapter  # noqa: E402
from vlmprune.cli import main  # noqa: E402
from vlmprune.evaluate.efficiency import count_flops, disk_bytes, measure, weight_bytes_by_part  # noqa: E402
from vlmprune.measure import is_quantized_weight  # noqa: E402
from vlmprune.planning.plan import PruningPlan  # noqa: E402
from vlmprune.quantize import QuantizationError, decoder_linears, quantize, quantize_model_dir  # noqa: E402
from vlmprune.summary import count_parameters, layer_shapes  # noqa: E402
from vlmprune.surgery.apply import apply_plan_  # noqa: E402


def _nf4_ragged_cpu() -> bool:
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


# llava_llama_gqa's k/v projections have 16 rows: bitsandbytes' AVX512-BF16 CPU kernel needs 32
# tiny shapes the AVX512-BF16 nf4 kernel refuses (outputs not a multiple of 32 or inputs of 64): an
# 8-head GQA k_proj of 16 rows, Qwen3.5's Gated DeltaNet out_proj (32 inputs), Gemma 4's 8-wide
# per-layer input gate; nf4 on those runs only on other CPUs / GPUs
RAGGED_FOR_NF4 = {"llava_llama_gqa", "qwen3_5", "gemma4"}
NF4_FAMILIES = [f for f in FAMILIES if f not in RAGGED_FOR_NF4 or not _nf4_ragged_cpu()]


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def part_tensors(model) -> dict[str, torch.Tensor]:
    """Every tensor outside the decoder layers (vision tower, projector, embeddings, lm_head,
    final norm), cloned, by name."""
    layers = get_adapter(model).layers(model)
    prefix = next(name for name, m in model.named_modules() if m is layers) + "."
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(prefix)}


def check_quantized(model, original_outside: dict[str, torch.Tensor]) -> None:
    adapter = get_adapter(model)
    linears = decoder_linears(model, adapter)
    assert linears and all(is_quantized_weight(m.weight) for m in linears.values())
    selected = {id(m) for m in linears.values()}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and id(module) not in selected:
            assert not is_quantized_weight(weight), f"{name} was quantized"
    after = part_tensors(model)
    assert after.keys() == original_outside.keys()
    for name, tensor in original_outside.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    # the parts the adapter names are among what stayed: vision tower and projector
    for part in (adapter.vision(model), adapter.projector(model)):
        assert all(type(p) is torch.nn.Parameter for p in part.parameters())


def reload_plain(path):
    loaded, info = transformers.AutoModelForImageTextToText.from_pretrained(path, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return loaded.eval()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", ["int8", "int8-dynamic"])
def test_torchao_schemes_quantize_decoder_only_and_reload_exactly(family, scheme, tmp_path):
    model = build_tiny(family)
    inputs = make_inputs(family, model)
    outside = part_tensors(model)
    float_logits = logits(model, inputs)
    record = quantize(model, scheme)
    check_quantized(model, outside)
    assert record["quantized_modules"] == len(decoder_linears(model))
    assert record["language_model_bytes"]["after"] < 0.6 * record["language_model_bytes"]["before"]
    expected = logits(model, inputs)
    assert not torch.equal(expected, float_logits)  # quantization did change the computation
    out = vlmprune.save_model(model, tmp_path / "q")
    assert not list(out.glob("*.bin"))
    loaded = reload_plain(out)
    check_quantized(loaded, outside)
    assert torch.equal(logits(loaded, inputs), expected)
    assert torch.equal(logits(vlmprune.load(out), inputs), expected)


@pytest.mark.parametrize("family", NF4_FAMILIES)
def test_nf4_quantizes_decoder_only_and_reloads_exactly(family, tmp_path):
    model = build_tiny(family)
    inputs = make_inputs(family, model)
    outside = part_tensors(model)
    quantize(model, "nf4")
    check_quantized(model, outside)
    # saved before the first forward: on AVX512-BF16 CPUs bitsandbytes repacks the weights at the
    # first forward and its inverse on saving is lossy (see the README)
    out = vlmprune.save_model(model, tmp_path / "q")
    expected = logits(model, inputs)
    loaded = reload_plain(out)
    check_quantized(loaded, outside)
    assert torch.equal(logits(loaded, inputs), expected)
    # parameters count at their logical size, not two 4-bit values per stored byte
    assert count_parameters(loaded) == count_parameters(build_tiny(family))


@pytest.mark.skipif(not _nf4_ragged_cpu(), reason="the 32-row limit belongs to the AVX512-BF16 CPU kernel")
def test_nf4_refuses_widths_the_cpu_kernel_cannot_run(tmp_path):
    model = build_tiny("llava_llama_gqa")
    with pytest.raises(QuantizationError, match=r"multiple of 32 outputs.*k_proj: 64 -> 16"):
        quantize(model, "nf4")
    assert getattr(model.config, "quantization_config", None) is None


def pruned_non_uniform(family: str, tmp_path):
    """A checkpoint with one layer dropped and layer 1's MLP cut to 64 channels (per-layer widths)."""
    model = build_tiny(family)
    plan = PruningPlan(drop_layers=[3], layers={1: {"mlp_channels": list(range(0, 128, 2))}})
    apply_plan_(model, plan)
    assert set(model.config.get_text_config().vlmprune_layer_widths) == {"1"}
    return vlmprune.save_model(model, tmp_path / "pruned", plan=plan)


@pytest.mark.parametrize(("family", "scheme"), [("qwen2_vl", "int8"), ("internvl_phi3", "int8-dynamic"),
                                                ("gemma3", "nf4")])
def test_per_layer_width_checkpoint(family, scheme, tmp_path):
    source = pruned_non_uniform(family, tmp_path)
    out, record = quantize_model_dir(source, scheme, tmp_path / "q")
    plan = json.loads((out / "pruning_plan.json").read_text())
    quantization = json.loads((out / "run.json").read_text())["quantization"]
    assert plan["drop_layers"] == [3] and plan["layers"]["1"]["mlp_channels"] == list(range(0, 128, 2))
    assert quantization["scheme"] == scheme and quantization["quantized_modules"] > 0
    # Plain from_pretrained does not refuse here (quantized weights carry their own shapes, so no
    # size check fires) but builds every layer at the config's widths: vlmprune.load is the way.
    loaded = vlmprune.load(out)
    assert [s.intermediate_size for s in layer_shapes(loaded)] == [128, 64, 128]
    for name, linear in decoder_linears(loaded).items():
        state = getattr(linear.weight, "quant_state", None)
        shape = tuple(state.shape) if state is not None else tuple(linear.weight.shape)
        assert shape == (linear.out_features, linear.in_features), name
    reference = vlmprune.load(source)
    outside = part_tensors(reference)
    quantize(reference, scheme)
    check_quantized(loaded, outside)
    inputs = make_inputs(family, loaded)
    assert torch.equal(logits(loaded, inputs), logits(reference, inputs))


def test_unknown_scheme_and_missing_backend_leave_no_output(tiny_repo, tmp_path, monkeypatch):
    with pytest.raises(QuantizationError, match="unknown quantization scheme 'int3'"):
        quantize_model_dir(tiny_repo.model, "int3", tmp_path / "a")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(QuantizationError, match=r"needs the Python package 'bitsandbytes'.*pip install"):
        quantize_model_dir(tiny_repo.model, "nf4", tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_int4_without_cuda_is_refused_by_the_cli(tiny_repo, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_repo.model), "--scheme", "int4", "--output", str(out)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_quantizing_twice_is_refused():
    model = build_tiny("llava_phi")
    quantize(model, "int8")
    with pytest.raises(QuantizationError, match="already quantized"):
        quantize(model, "int8-dynamic")


def test_cli_writes_checkpoint_with_processor_and_record(tiny_repo, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_repo.model), "--scheme", "int8", "--output", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "pruning_plan.json", "run.json", "tokenizer_config.json"} <= names
    plan = json.loads((out / "pruning_plan.json").read_text())
    record = json.loads((out / "run.json").read_text())["quantization"]
    assert plan["drop_layers"] == [] and record["backend"] == "torchao" and record["scheme"] == "int8"
    assert record["kept"][:2] == ["model.vision_tower", "model.multi_modal_projector"]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "torchao" and "model.vision_tower" in config["modules_to_not_convert"]
    # an existing output is not replaced without --overwrite
    assert main(["quantize", "--model", str(tiny_repo.model), "--scheme", "int8", "--output", str(out)]) == 2


@pytest.mark.parametrize("scheme", ["int8-dynamic", "nf4"])
def test_efficiency_counts_stored_bytes_and_true_flops(scheme, tmp_path):
    model = build_tiny("llava_phi")
    inputs = make_inputs("llava_phi", model, batch=1)
    float_bytes, float_flops = weight_bytes_by_part(model), count_flops(model, inputs)
    quantize(model, scheme)
    out = vlmprune.save_model(model, tmp_path / "q")
    loaded = vlmprune.load(out)
    stored = weight_bytes_by_part(loaded)
    assert stored["vision"] == float_bytes["vision"] and stored["projector"] == float_bytes["projector"]
    # decoder weights at 1 byte (int8) or half a byte (nf4) plus scales, against 4 bytes in float32
    decoder = sum(p.numel() * 4 for p in get_adapter(model).layers(build_tiny("llava_phi")).parameters())
    saved = float_bytes["language_model"] - stored["language_model"]
    assert saved > (0.6 if scheme == "int8-dynamic" else 0.7) * decoder
    assert disk_bytes(loaded) == (out / "model.safetensors").stat().st_size
    # the file is its JSON header (torchao writes per-tensor metadata there) plus the tensors as held
    file = out / "model.safetensors"
    header = 8 + int.from_bytes(file.read_bytes()[:8], "little")
    # (bitsandbytes adds a small serialised quant_state per layer)
    assert abs(file.stat().st_size - header - stored["total"]) < 0.02 * stored["total"]
    # quantized kernels are not in FlopCounterMode's table: their multiply-adds are counted from shapes
    assert count_flops(loaded, inputs) == float_flops
    # prefill and cached decoding run on the quantized kernels
    speed = measure(loaded, inputs, decode_tokens=2, repeats=1, warmup=0)
    assert speed["prefill_s"] > 0 and speed["decode_tokens_per_s"] > 0


def test_study_quantization_axis_shares_recovery_and_reports_disk_size(tiny_repo, tmp_path, monkeypatch):
    from pathlib import Path

    import vlmprune.recover

    root = Path(__file__).resolve().parents[1]
    calls = []
    real_recover = vlmprune.recover.recover
    monkeypatch.setattr(vlmprune.recover, "recover", lambda config: calls.append(config) or real_recover(config))
    run = tmp_path / "run"
    grid = ("[{method: layer, ratio: 0.2, recipe: none, quantization: [none, int8]}, "
            "{method: layer, ratio: 0.2, recipe: sft, fraction: 0.5, quantization: [int8, int8-dynamic]}]")
    argv = ["study", "--config", str(root / "configs" / "study" / "smoke.yaml"), f"output={run}", f"grid={grid}",
            f"teacher={tiny_repo.model}", f"train_data={tiny_repo.data}", f"image_folder={tiny_repo.images}",
            f"evaluation.task_file={tiny_repo.task_file}"]
    assert main(argv) == 0
    cells = {c["id"]: c for c in json.loads((run / "results.json").read_text())["cells"]}
    ids = ["layer-block_influence-r0.2-none", "layer-block_influence-r0.2-none-qint8",
           "layer-block_influence-r0.2-sft-f0.5-qint8", "layer-block_influence-r0.2-sft-f0.5-qint8-dynamic"]
    assert sorted(cells) == sorted(ids) and all(c["status"] == "done" for c in cells.values())
    assert len(calls) == 1  # one recovery, shared by both schemes
    assert (run / "recovered" / "layer-block_influence-r0.2-sft-f0.5" / "sample_ids.json").exists()
    assert cells[ids[1]]["quantization"] == "int8"
    assert cells[ids[1]]["disk_bytes"] < 0.75 * cells[ids[0]]["disk_bytes"]
    quantized = json.loads((run / "cells" / ids[2] / "eval.json").read_text())["quantization"]
    assert quantized["scheme"] == "int8" and quantized["quantized_modules"] == 3 * 7  # 3 layers x q,k,v,o,gate,up,down
    assert not (run / "cells" / ids[2] / "quantized").exists()  # not kept by default
    md = (run / "results.md").read_text()
    assert "| int8-dynamic |" in md and "![accuracy_vs_disk](accuracy_vs_disk.png)" in md
    assert (run / "accuracy_vs_disk.png").stat().st_size > 5000


def test_cli_dtype_auto_keeps_the_checkpoints_dtype(tiny_repo, tmp_path):
    """--dtype auto (one of the accepted choices) loads in the checkpoint's dtype; it once ended in an internal
    error (getattr(torch, "auto"))."""
    from safetensors import safe_open

    from vlmprune.checkpoint import copy_processor_files

    source = tmp_path / "bf16"
    vlmprune.load(tiny_repo.model).to(torch.bfloat16).save_pretrained(source)
    copy_processor_files(tiny_repo.model, source)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(source), "--scheme", "int8", "--dtype", "auto", "--output", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # the parts left unquantized keep bfloat16
        kept = {f.get_tensor(k).dtype for k in f.keys() if "vision_tower" in k or "lm_head" in k}
    assert kept == {torch.bfloat16}
    assert json.loads((out / "run.json").read_text())["quantization"]["scheme"] == "int8"
