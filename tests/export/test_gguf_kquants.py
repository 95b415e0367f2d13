"""K-quant mixes (--quant q4_k_m ...) of vlmprune export --format gguf: llama.cpp's own kernels through
ctypes, llama.cpp's per-tensor mix rules, checked in a real llama.cpp (xllamacpp) and with the gguf
package's independent numpy dequantizers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("xllamacpp")

from tiny_gguf import PROMPT, LlamaCpp, hf_greedy, hf_logprobs, partial_utf8_ids, rel_diff, save_tiny_llava

import vlmprune
from vlmprune.errors import VlmpruneError
from vlmprune.export import export_gguf
from vlmprune.planning.plan import PruningPlan

# every matrix's rows (input dimension) a multiple of 256: hidden 256, 4 heads of 64, MLP 512; 8 layers, so
# that llama.cpp's use_more_bits picks layers 0, 3, 6 and 7 (the first and last eighth, every third between)
WIDE = {"layers": 8, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64}
# per-layer widths: MLP 320 in layers 1 and 3 (32-blocks, not 256), MLP 50 in layer 2 (not even 32), two of four
# q heads in layer 3 (attention output rows 128)
# (the channels and heads kept)
PER_LAYER = PruningPlan(layers={1: {"mlp_channels": list(range(0, 512, 2)) + list(range(1, 129, 2))},
                                2: {"mlp_channels": list(range(50))},
                                3: {"q_heads": [0, 3], "mlp_channels": list(range(192, 512))}})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("kquant-models")
    wide = save_tiny_llava(root / "wide", **WIDE)
    model = vlmprune.load(wide, dtype=torch.float32)
    vlmprune.apply_plan_(model, PER_LAYER)
    per_layer = vlmprune.save_model(model, root / "wide-per-layer", plan=PER_LAYER, source=wide)
    return {"wide": wide, "per-layer": per_layer, "tied": save_tiny_llava(root / "tied", tie_word_embeddings=True,
                                                                          **WIDE)}


def _types(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name.lower() for t in GGUFReader(str(path)).tensors}


def test_llama_cpp_kernels_give_blocks_the_gguf_package_reads():
    """Bytes from ggml_quantize_chunk, dequantized by the gguf package's own numpy code: the right layout
    and block sizes, and an error that grows as the bits shrink (measured: q8_0 0.0053, q6_k 0.0176,
    q5_k 0.0356, q5_1 0.0378, q5_0 0.0414, q4_k 0.0703, q3_k 0.151, q2_k 0.294 relative RMS on N(0, 1))."""
    import gguf

    from vlmprune.export.gguf_quant import quantize

    data = np.random.default_rng(0).standard_normal((6, 512)).astype(np.float32)
    errors = {}
    for kind in ("q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q3_k", "q2_k"):
        packed = quantize(data, kind)
        qtype = gguf.GGMLQuantizationType[kind.upper()]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        assert packed.dtype == np.uint8 and packed.shape == (6, 512 // block * size)
        back = gguf.quants.dequantize(packed, qtype)
        assert back.shape == data.shape
        errors[kind] = float(np.sqrt(np.mean((back - data) ** 2)) / np.sqrt(np.mean(data ** 2)))
    bounds = {"q8_0": 0.006, "q6_k": 0.02, "q5_k": 0.04, "q5_1": 0.043, "q5_0": 0.047, "q4_k": 0.08, "q3_k": 0.17,
              "q2_k": 0.33}
    assert all(errors[k] <= bounds[k] for k in bounds), errors
    assert errors["q8_0"] < errors["q6_k"] < errors["q5_k"] < errors["q4_k"] < errors["q3_k"] < errors["q2_k"]
    for kind in ("q8_0", "q4_0"):  # ggml's and the gguf package's numpy quantizers agree to the byte
        qtype = gguf.GGMLQuantizationType[kind.upper()]
        assert np.array_equal(quantize(data, kind), gguf.quants.quantize(data, qtype))


def test_quantizing_in_parallel_chunks_gives_the_bytes_of_one_call():
    """quantize() splits the rows over threads (ctypes releases the GIL); the bytes are those of one
    ggml_quantize_chunk call over the whole matrix."""
    import gguf

    from vlmprune.export.gguf_quant import library, quantize

    data = np.random.default_rng(1).standard_normal((3000, 512)).astype(np.float32)  # several chunks
    whole = np.empty((3000, 512 // 256 * 144), dtype=np.uint8)
    qtype = int(gguf.GGMLQuantizationType.Q4_K)
    assert library().ggml_quantize_chunk(qtype, data.ctypes.data, whole.ctypes.data, 0, 3000, 512, None) == whole.nbytes
    assert np.array_equal(quantize(data, "q4_k"), whole)


# llama.cpp's mixes on the 8-layer model, written out by hand from src/llama-quant.cpp (llama_tensor_get_type)
MORE_BITS = {0, 3, 6, 7}
EXPECTED = {
    # mix: (default, output, attn_v per layer, ffn_down per layer, attn_output per layer)
    "q4_k_m": ("q4_k", "q6_k", lambda i: "q6_k" if i in MORE_BITS else "q4_k",
               lambda i: "q6_k" if i in MORE_BITS else "q4_k", lambda i: "q4_k"),
    "q5_k_m": ("q5_k", "q6_k", lambda i: "q6_k" if i in MORE_BITS else "q5_k",
               lambda i: "q6_k" if i in MORE_BITS else "q5_k", lambda i: "q5_k"),
    "q4_k_s": ("q4_k", "q6_k", lambda i: "q5_k" if i < 4 else "q4_k", lambda i: "q5_k" if i < 1 else "q4_k",
               lambda i: "q4_k"),
    "q5_k_s": ("q5_k", "q6_k", lambda i: "q5_k", lambda i: "q5_k", lambda i: "q5_k"),
    "q6_k": ("q6_k", "q6_k", lambda i: "q6_k", lambda i: "q6_k", lambda i: "q6_k"),
    "q3_k_m": ("q3_k", "q6_k", lambda i: "q5_k" if i < 2 else "q4_k", lambda i: "q4_k", lambda i: "q4_k"),
    "q3_k_l": ("q3_k", "q6_k", lambda i: "q5_k", lambda i: "q5_k", lambda i: "q5_k"),
    "q2_k": ("q2_k", "q6_k", lambda i: "q3_k", lambda i: "q3_k", lambda i: "q3_k"),  # 2 q heads per kv head: < 4
}


@pytest.mark.parametrize("quant", list(EXPECTED))
def test_mix_writes_the_types_llama_cpp_would(models, tmp_path, quant):
    record = export_gguf(models["wide"], tmp_path / "out", quant=quant, vision=False)
    base, output, attn_v, ffn_down, attn_out = EXPECTED[quant]
    types = _types(tmp_path / "out" / "model.gguf")
    expected = {"token_embd.weight": base, "output.weight": output, "output_norm.weight": "f32"}
    for i in range(8):
        expected.update({f"blk.{i}.attn_q.weight": base, f"blk.{i}.attn_k.weight": base,
                         f"blk.{i}.attn_v.weight": attn_v(i), f"blk.{i}.attn_output.weight": attn_out(i),
                         f"blk.{i}.ffn_gate.weight": base, f"blk.{i}.ffn_up.weight": base,
                         f"blk.{i}.ffn_down.weight": ffn_down(i), f"blk.{i}.attn_norm.weight": "f32",
                         f"blk.{i}.ffn_norm.weight": "f32"})
    assert types == expected
    assert record["text"]["fallbacks"] == []
    assert sum(record["text"]["tensor_types"].values()) == len(types)
    from gguf import GGUFReader, LlamaFileType

    fields = GGUFReader(str(tmp_path / "out" / "model.gguf")).fields
    assert fields["general.file_type"].contents() == LlamaFileType[f"MOSTLY_{quant.upper()}"]


def test_phi3_fused_qkv_is_mixed_as_a_value_matrix(tmp_path):
    """llama.cpp counts Phi-3's fused attn_qkv with the value matrices (more bits in the same layers)."""
    folder = save_tiny_llava(tmp_path / "phi3", text="phi3", **WIDE)
    export_gguf(folder, tmp_path / "out", quant="q4_k_m", vision=False)
    types = _types(tmp_path / "out" / "model.gguf")
    assert {i: types[f"blk.{i}.attn_qkv.weight"] for i in range(8)} == {
        i: "q6_k" if i in MORE_BITS else "q4_k" for i in range(8)}
    assert {types[f"blk.{i}.ffn_up.weight"] for i in range(8)} == {"q4_k"}  # the fused gate / up


def test_tied_embedding_gets_the_output_type(models, tmp_path):
    export_gguf(models["tied"], tmp_path / "out", quant="q4_k_m", vision=False)
    types = _types(tmp_path / "out" / "model.gguf")
    assert "output.weight" not in types and types["token_embd.weight"] == "q6_k"


@pytest.mark.parametrize("quant, bound", [("q6_k", 0.012), ("q4_k_m", 0.04)])
def test_k_quant_export_generates_close_to_transformers(models, tmp_path, quant, bound):
    """Measured on this model: rel diff of the next-token log-probabilities to transformers 1.8e-7 (f32),
    2.3e-3 (q8_0), 8.5e-3 (q6_k), 2.3e-2 (q4_k_m)."""
    from transformers import AutoTokenizer

    folder = models["wide"]
    export_gguf(folder, tmp_path / "out", quant=quant, vision=False)
    model = vlmprune.load(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok(PROMPT)["input_ids"]
    llama = LlamaCpp(tmp_path / "out" / "model.gguf")
    llama.banned = partial_utf8_ids(tok)
    diff = rel_diff(llama.first_logprobs(ids, model.config.text_config.vocab_size), hf_logprobs(model, ids))
    assert diff <= bound, diff
    tokens = llama.greedy(ids, 10)
    assert len(tokens) == 10
    if quant == "q6_k":  # 6.56 bits a weight: the same answer
        assert tokens == hf_greedy(model, ids, 10, llama.banned)


def test_per_layer_widths_off_the_256_blocks_fall_back_and_are_listed(models, tmp_path, capsys):
    from vlmprune.cli import main

    out = tmp_path / "out"
    assert main(["export", str(models["per-layer"]), "--output", str(out), "--quant", "q4_k_m", "--no-vision"]) == 0
    printed = capsys.readouterr().out
    import json

    record = json.loads((out / "export.json").read_text())["text"]
    assert record["arch"] == "deci"
    got = {f["tensor"]: (f["wanted"], f["written"], f["reason"]) for f in record["fallbacks"]}
    assert got == {
        "blk.1.ffn_down.weight": ("q4_k", "q5_0", "row length 320 is not a multiple of 256"),
        "blk.2.ffn_down.weight": ("q4_k", "f16", "row length 50 is not a multiple of 256 (nor of 32 for q5_0)"),
        "blk.3.attn_output.weight": ("q4_k", "q5_0", "row length 128 is not a multiple of 256"),
        "blk.3.ffn_down.weight": ("q6_k", "q8_0", "row length 320 is not a multiple of 256"),  # a more-bits layer
    }
    assert "blk.2.ffn_down.weight (256, 50): f16, not q4_k (row length 50" in printed
    types = _types(out / "model.gguf")
    assert {name: types[name] for name in got} == {name: w for name, (_, w, _) in got.items()}
    assert types["blk.0.ffn_down.weight"] == "q6_k" and types["blk.4.attn_v.weight"] == "q4_k"
    llama = LlamaCpp(out / "model.gguf")
    assert len(llama.greedy(PROMPT, 5)) == 5


def test_importance_matrix_mixes_are_refused_by_name(models, tmp_path):
    from vlmprune.config import ExportConfig

    with pytest.raises(VlmpruneError, match="iq2_xxs needs an importance matrix"):
        export_gguf(models["wide"], tmp_path / "out", quant="iq2_xxs")
    with pytest.raises(VlmpruneError, match="q2_k_s needs an importance matrix"):  # a config file's value
        ExportConfig(model=str(models["wide"]), output=str(tmp_path / "out"), quant="q2_k_s")
    with pytest.raises(VlmpruneError, match="K-quant mixes are for the text model"):
        export_gguf(models["wide"], tmp_path / "out", quant="q4_k_m", vision_quant="q4_k_m")
    assert not (tmp_path / "out").exists()


def test_without_the_runtime_k_quants_name_the_extra(models, tmp_path, monkeypatch):
    import vlmprune.export.gguf_quant as gq

    gq.library.cache_clear()
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    try:
        with pytest.raises(VlmpruneError, match=r"vlmprune\[gguf\]"):
            export_gguf(models["wide"], tmp_path / "out", quant="q4_k_m")
    finally:
        gq.library.cache_clear()
    assert not (tmp_path / "out").exists()
