"""The text model of a (pruned) VLM as a GGUF file for llama.cpp.

Written with the PyPI ``gguf`` package (``GGUFWriter``, ``TensorNameMap``, numpy quantizers); the K-quant
mixes are quantized by llama.cpp's own kernels (``vlmprune.export.gguf_quant``).
What llama.cpp can hold decides the architecture, before anything is written:

* Llama / Mistral backbones with the same widths in every layer -> ``llama``; with per-layer heads,
  kv heads or MLP widths (vlmprune's ``vlmprune_layer_widths``) -> ``deci``, the Llama graph that
  reads ``head_count``, ``head_count_kv`` and ``feed_forward_length`` per layer. q/k rows are
  permuted per layer from Hugging Face's rotate-half order to llama.cpp's interleaved rope order.
* Qwen2 backbones with uniform widths -> ``qwen2``; with per-layer widths -> ``deci`` as well
  (llama.cpp's qwen2 graph builds every layer with layer 0's widths; deci reads Qwen2's q/k/v
  biases, and the permuted q/k rows carry its rotate-half RoPE over, measured exact).
* Phi-3 with uniform widths -> ``phi3`` (fused qkv and gate/up as Hugging Face holds them); with
  per-layer widths -> ``deci``: the fused matrices are split into q / k / v and gate / up, and q / k
  rows permuted from its rotate-half RoPE to deci's interleaved one, as for Qwen2.
* Gemma 3 with uniform widths -> ``gemma3``; per-layer widths are refused.
* Qwen2.5-VL with uniform widths -> ``qwen2vl`` (Qwen2 layers with M-RoPE: ``rope.dimension_sections``
  from ``mrope_section``, so image tokens get their (time, row, column) positions); per-layer widths
  are refused (that graph reads layer 0's widths, and deci has no M-RoPE).
* Everything else is refused, naming the reason and the fix.

Dropped layers need nothing special: the model has fewer layers, ``block_count`` says so and the
blocks are numbered densely.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlmprune.config import GGUF_K_QUANTS as K_QUANTS
from vlmprune.config import GGUF_NUMPY_QUANTS as NUMPY_QUANTS
from vlmprune.config import refuse_imatrix_quant
from vlmprune.errors import VlmpruneError
from vlmprune.readers import read_json

log = logging.getLogger("vlmprune")

QUANTS = NUMPY_QUANTS + K_QUANTS

# Hugging Face byte-level pre-tokenizer regexes and llama.cpp's name (tokenizer.ggml.pre) for each.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def ggml_type(name: str):
    """The gguf package's type for a tensor type name (f32, f16, bf16, q8_0, q4_0, q4_k, q6_k, ...)."""
    import gguf

    return gguf.GGMLQuantizationType[name.upper()]


def file_type(name: str):
    """general.file_type of a --quant (f32, q8_0, q4_k_m, ...)."""
    import gguf

    return gguf.LlamaFileType.ALL_F32 if name == "f32" else gguf.LlamaFileType[f"MOSTLY_{name.upper()}"]


@dataclass
class TensorWriter:
    """Adds tensors to a GGUFWriter in the requested type; 1-D tensors stay f32. With ``quant`` q8_0 / q4_0
    (numpy) a matrix whose rows do not fill whole 32-blocks falls back to f16; with a K-quant ``mix`` each
    matrix gets the mix's type (llama.cpp's kernels) and falls back as llama.cpp does. Fallbacks are recorded."""

    writer: object
    quant: str
    mix: object = None  # gguf_quant.Mix for the K-quant mixes
    fallbacks: list[dict] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, data: np.ndarray, quant: str | None = None) -> None:
        import gguf

        data = np.ascontiguousarray(data, dtype=np.float32)
        want = quant or self.quant
        kind = "f32" if data.ndim <= 1 else want
        reason = None
        if data.ndim > 1 and quant is None and self.mix is not None:
            want, kind, reason = self.mix.choose(name, data.shape)
        elif kind in ("q8_0", "q4_0"):
            block = gguf.GGML_QUANT_SIZES[ggml_type(kind)][0]
            if data.shape[-1] % block:
                reason, kind = f"row length {data.shape[-1]} is not a multiple of {block}", "f16"
        if reason is not None:
            self.fallbacks.append({"tensor": name, "shape": list(data.shape), "wanted": want, "written": kind,
                                   "reason": reason})
        qtype = ggml_type(kind)
        if kind == "f32":
            self.writer.add_tensor(name, data)
        elif kind == "f16":
            self.writer.add_tensor(name, data.astype(np.float16))
        elif self.mix is not None:  # every quantized type of a K-quant file: llama.cpp's kernels
            from vlmprune.export.gguf_quant import quantize

            self.writer.add_tensor(name, quantize(data, kind), raw_dtype=qtype)
        else:
            self.writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        self.counts[kind] = self.counts.get(kind, 0) + 1


def check_quant(quant: str) -> None:
    """Refuse a quant this installation cannot write, before any work."""
    refuse_imatrix_quant(quant)
    if quant in NUMPY_QUANTS:
        return
    if quant in K_QUANTS:
        from vlmprune.export.gguf_quant import library

        library()  # llama.cpp's quantizer, or the error naming the extra
        return
    raise VlmpruneError(f"--quant {quant} is not known; choose one of {', '.join(QUANTS)}")


# ------------------------------------------------------------------------------------------ planning


@dataclass
class TextPlan:
    arch: str  # llama.cpp architecture name
    family: str  # the text config's model_type
    per_layer: bool
    heads: list[int]
    kv_heads: list[int]
    ffn: list[int]
    head_dim: int
    permute_qk: bool
    rope_sections: list[int] | None = None  # qwen2vl: M-RoPE pairs per (time, height, width, -) position


_LLAMA_LIKE = ("llama", "mistral")
_QWEN2_LIKE = ("qwen2",)
_GEMMA3_LIKE = ("gemma3_text",)
_PHI3_LIKE = ("phi3",)
_QWEN2VL_LIKE = ("qwen2_5_vl_text",)


def plan_text(model, adapter) -> TextPlan:
    """The llama.cpp architecture for the model's language backbone, or a refusal (nothing written yet)."""
    from vlmprune.summary import layer_shapes

    config = adapter.text_config(model)
    family = getattr(config, "model_type", "?")
    shapes = layer_shapes(model, adapter)
    heads = [s.num_heads for s in shapes]
    kv = [s.num_kv_heads for s in shapes]
    ffn = [s.intermediate_size for s in shapes]
    head_dims = {s.head_dim for s in shapes}
    uniform = len(set(zip(heads, kv, ffn))) == 1
    if len(head_dims) != 1:
        raise VlmpruneError(f"layers disagree on head_dim ({sorted(head_dims)}); no llama.cpp graph holds that")
    head_dim = head_dims.pop()
    act = getattr(config, "hidden_act", "silu")
    if family in _LLAMA_LIKE:
        _require_silu(act, family, "llama")
        if getattr(config, "mlp_bias", False):
            raise VlmpruneError(f"{family} backbone with MLP biases (mlp_bias=True): the llama/deci GGUF export "
                                f"does not write them; export is not supported for this model")
        if family == "mistral" and getattr(config, "sliding_window", None):
            raise VlmpruneError(f"mistral backbone with sliding_window={config.sliding_window}: llama.cpp's llama "
                                f"graph has no sliding-window attention, so the GGUF would differ on long prompts; set "
                                f"sliding_window to null in config.json if the model never sees prompts that long")
        _check_rope(config, family)
        return TextPlan("llama" if uniform else "deci", family, not uniform, heads, kv, ffn, head_dim, True)
    if family in _QWEN2_LIKE:
        # per-layer widths: deci. Qwen2 is the Llama graph plus q/k/v biases (which deci reads), and its
        # rotate-half RoPE becomes deci's interleaved one by the same q/k row permutation as Llama's
        _require_silu(act, family, "qwen2")
        if getattr(config, "use_sliding_window", False):
            raise VlmpruneError(f"{family} with use_sliding_window=True: llama.cpp's qwen2 graph has no sliding-window "
                                f"attention; not supported by the GGUF export")
        _check_rope(config, family)
        if not uniform:
            return TextPlan("deci", family, True, heads, kv, ffn, head_dim, True)
        return TextPlan("qwen2", family, False, heads, kv, ffn, head_dim, False)
    if family in _PHI3_LIKE:
        _require_silu(act, family, "phi3")
        window = getattr(config, "sliding_window", None)
        if window and window < int(getattr(config, "max_position_embeddings", 0)):
            raise VlmpruneError(f"phi3 backbone with sliding_window={window}: llama.cpp's phi3 graph attends over the "
                                f"whole context (its sliding window is disabled), so the GGUF would differ on prompts "
                                f"longer than that; set sliding_window to null in config.json if the model never sees "
                                f"prompts that long")
        _check_rope(config, family)
        if not uniform:  # phi3 reads layer 0's widths; deci is its Llama graph with per-layer widths
            return TextPlan("deci", family, True, heads, kv, ffn, head_dim, True)
        return TextPlan("phi3", family, False, heads, kv, ffn, head_dim, False)
    if family in _QWEN2VL_LIKE:
        _require_silu(act, family, "qwen2vl")
        if getattr(config, "use_sliding_window", False):
            raise VlmpruneError(f"{family} with use_sliding_window=True: llama.cpp's qwen2vl graph has no "
                                f"sliding-window attention; not supported by the GGUF export")
        sections = _mrope_sections(config, head_dim)
        if not uniform:
            raise VlmpruneError(
                f"this Qwen2.5-VL backbone has per-layer widths ({_width_summary(heads, kv, ffn)}), but llama.cpp's "
                f"qwen2vl graph (the one with M-RoPE, which image positions need) builds every layer with layer 0's "
                f"widths, so a GGUF of it would be wrong. Prune it with uniform widths instead "
                f"(`vlmprune prune --stock ...`), then export")
        return TextPlan("qwen2vl", family, False, heads, kv, ffn, head_dim, False, sections)
    if family in _GEMMA3_LIKE:
        if not uniform:
            raise VlmpruneError(
                f"this Gemma 3 backbone has per-layer widths ({_width_summary(heads, kv, ffn)}), but llama.cpp's "
                f"gemma3 graph builds every layer with layer 0's widths, so a GGUF of it would be wrong. Prune it "
                f"with uniform widths instead (`vlmprune prune --stock ...`), then export")
        _check_gemma3(config, head_dim)
        return TextPlan("gemma3", family, False, heads, kv, ffn, head_dim, False)
    supported = ", ".join(_LLAMA_LIKE + _QWEN2_LIKE + _PHI3_LIKE + ("gemma3",) + _QWEN2VL_LIKE)
    raise VlmpruneError(f"GGUF export of a {family} language backbone is not supported yet (supported: {supported}); "
                        f"nothing was written. Export the checkpoint with llama.cpp's convert_hf_to_gguf.py if the "
                        f"model has stock widths, or use `vlmprune quantize` for an int8 Hugging Face checkpoint")


def _require_silu(act: str, family: str, graph: str) -> None:
    if act != "silu":
        raise VlmpruneError(f"{family} backbone with hidden_act={act}: llama.cpp's {graph} graph uses SiLU only")


def _gemma3_rope(config) -> tuple[float, float]:
    """(global, sliding-window) rope bases of a Gemma 3 config; plain RoPE only."""
    params = getattr(config, "rope_parameters", None) or {}
    full = params.get("full_attention", params)
    local = params.get("sliding_attention", {})
    for what, p in (("full", full), ("sliding", local)):
        if p.get("rope_type", "default") != "default":
            raise VlmpruneError(f"Gemma 3 backbone with {p['rope_type']!r} rope scaling on its {what}-attention "
                                f"layers: the GGUF export writes plain RoPE only; this model is not supported")
    return (float(full.get("rope_theta", getattr(config, "rope_theta", 1e6))),
            float(local.get("rope_theta", getattr(config, "rope_local_base_freq", 1e4))))


def _check_gemma3(config, head_dim: int) -> None:
    if getattr(config, "hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh", "gelu"):
        raise VlmpruneError(f"Gemma 3 backbone with hidden_activation={config.hidden_activation}: not supported")
    if getattr(config, "query_pre_attn_scalar", head_dim) != head_dim:
        raise VlmpruneError(f"Gemma 3 backbone with query_pre_attn_scalar={config.query_pre_attn_scalar} != head_dim "
                            f"{head_dim}: llama.cpp derives the attention scale from the model size; not supported")
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if getattr(config, cap, None):
            raise VlmpruneError(f"Gemma 3 backbone with {cap}={getattr(config, cap)}: not supported")
    types = getattr(config, "layer_types", None)
    if not types or set(types) - {"sliding_attention", "full_attention"}:
        raise VlmpruneError(f"Gemma 3 backbone with layer_types={types}: not supported")
    _gemma3_rope(config)


def _width_summary(heads, kv, ffn) -> str:
    return (f"q heads {sorted(set(heads))}, kv heads {sorted(set(kv))}, MLP widths {sorted(set(ffn))}")


def _rope(config) -> tuple[float, dict]:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), {"type": kind, **params}


def _check_rope(config, family: str) -> None:
    _, rope = _rope(config)
    if rope["type"] != "default":
        raise VlmpruneError(f"{family} backbone with rope type {rope['type']!r}: the GGUF export writes plain RoPE "
                            f"only; this model is not supported")
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1.0):
        raise VlmpruneError(f"{family} backbone with partial_rotary_factor={partial}: not supported")


def _mrope_sections(config, head_dim: int) -> list[int]:
    """Qwen2.5-VL's mrope_section (rotary pairs driven by the time, height and width positions) as llama.cpp's
    four rope.dimension_sections; plain (non-interleaved) M-RoPE only."""
    _, rope = _rope(config)
    if rope["type"] not in ("default", "mrope"):
        raise VlmpruneError(f"Qwen2.5-VL backbone with rope type {rope['type']!r}: not supported by the GGUF export")
    sections = rope.get("mrope_section") or (getattr(config, "rope_scaling", None) or {}).get("mrope_section")
    if rope.get("mrope_interleaved"):
        raise VlmpruneError("interleaved M-RoPE (Qwen3-VL style) is not llama.cpp's qwen2vl rope; not supported")
    if not sections or len(sections) > 4 or sum(sections) != head_dim // 2:
        raise VlmpruneError(f"mrope_section {sections} does not split the {head_dim // 2} rotary pairs of a head; "
                            f"the GGUF export cannot write it")
    return [int(x) for x in sections] + [0] * (4 - len(sections))


# ------------------------------------------------------------------------------------------ writing


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotate-half q/k rows -> the interleaved pairs llama.cpp's NORM rope expects."""
    out = w.shape[0]
    head_dim = out // n_head
    rest = w.shape[1:]
    return w.reshape(n_head, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(out, *rest)


def write_text_gguf(path: Path, model, adapter, plan: TextPlan, tok, quant: str, name: str) -> dict:
    """Write the language model (weights, hyperparameters, tokenizer) to ``path``; return a record."""
    import gguf
    import torch

    config = adapter.text_config(model)
    lm = adapter.language_model(model)
    n_layer = len(plan.heads)
    arch_enum = {"llama": gguf.MODEL_ARCH.LLAMA, "deci": gguf.MODEL_ARCH.DECI,
                 "qwen2": gguf.MODEL_ARCH.QWEN2, "gemma3": gguf.MODEL_ARCH.GEMMA3,
                 "phi3": gguf.MODEL_ARCH.PHI3, "qwen2vl": gguf.MODEL_ARCH.QWEN2VL}[plan.arch]
    names = gguf.TensorNameMap(arch_enum, n_layer)
    # tensors spool to a temporary file as they are added (not all held in memory until the end)
    writer = gguf.GGUFWriter(str(path), plan.arch, use_temp_file=True)

    writer.add_type(gguf.GGUFType.MODEL)
    notes = []
    if check_tokenizer(tok)[0] == "bpe" and re.search(r"phi-?3", name, re.IGNORECASE):
        # measured: llama.cpp fails to load a file with a byte-level BPE vocabulary whose general.name contains
        # "phi3" / "phi-3" (phi3 and deci alike: "error loading model vocabulary: _Map_base::at"); the name is
        # metadata only
        notes.append(f"general.name {name!r} written as {re.sub(r'(?i)phi-?3', 'phi 3', name)!r}: llama.cpp's "
                     f"loader fails on a BPE-vocabulary file whose name contains phi3")
        name = re.sub(r"(?i)phi-?3", "phi 3", name)
    writer.add_name(name)
    writer.add_file_type(file_type(quant))
    if quant not in ("f32", "f16", "bf16"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    hidden = config.hidden_size
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layer)
    if plan.per_layer:
        writer.add_head_count(plan.heads)
        writer.add_head_count_kv(plan.kv_heads)
        writer.add_feed_forward_length(plan.ffn)
    else:
        writer.add_head_count(plan.heads[0])
        writer.add_head_count_kv(plan.kv_heads[0])
        writer.add_feed_forward_length(plan.ffn[0])
    writer.add_key_length(plan.head_dim)
    writer.add_value_length(plan.head_dim)
    writer.add_rope_dimension_count(plan.head_dim)
    if plan.arch == "gemma3":
        full, local = _gemma3_rope(config)
        writer.add_rope_freq_base(full)
        writer.add_rope_freq_base_swa(local)
        writer.add_sliding_window(int(config.sliding_window))
        # per layer, after drops (without it llama.cpp assumes every 6th layer is global)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])
    else:
        theta, _ = _rope(config)
        writer.add_rope_freq_base(theta)
    if plan.rope_sections is not None:
        writer.add_rope_dimension_sections(plan.rope_sections)
    writer.add_layer_norm_rms_eps(float(getattr(config, "rms_norm_eps", 1e-6)))
    if plan.arch == "qwen2vl":
        # measured: this llama.cpp build's qwen2vl loader reads only rope.dimension_sections
        # (llama_model_qwen2vl::load_arch_hparams; the qwen2 reading it used to fall through to is gone)
        notes.append(f"llama.cpp's qwen2vl graph ignores the RMS-norm epsilon written in the file "
                     f"({getattr(config, 'rms_norm_eps', 1e-6)}) and normalises with 0: invisible for hidden "
                     f"states of trained models, but an all-zero hidden state (e.g. an all-zero embedding row) "
                     f"becomes NaN")

    state = {k: v for k, v in lm.state_dict().items()}
    embed = lm.get_input_embeddings().weight
    n_vocab = embed.shape[0]
    writer.add_vocab_size(n_vocab)
    head = model.get_output_embeddings().weight if model.get_output_embeddings() is not None else embed
    tied = head.data_ptr() == embed.data_ptr()
    mix = None
    if quant in K_QUANTS:
        from vlmprune.export.gguf_quant import Mix

        mix = Mix(quant, n_layer, plan.heads[0] // plan.kv_heads[0], tied)
    tensors = TensorWriter(writer, quant, mix)

    def numpy(t: torch.Tensor) -> np.ndarray:
        return t.detach().to(torch.float32).cpu().numpy()

    def gguf_name(key: str) -> str:
        mapped = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise VlmpruneError(f"the GGUF export has no llama.cpp name for the weight {key}; this model has a part "
                                f"the {plan.arch} architecture does not hold")
        return mapped

    for key, value in state.items():
        hf_key = "model." + key
        data = numpy(value)
        if plan.arch == "deci" and (".qkv_proj." in key or ".gate_up_proj." in key):  # Phi-3's fused matrices
            for part_key, part in _split_fused(key, data, plan):
                tensors.add(gguf_name("model." + part_key), part)
            continue
        if plan.permute_qk and ".self_attn.q_proj." in key:
            data = permute_rows(data, plan.heads[_layer_index(key)])
        elif plan.permute_qk and ".self_attn.k_proj." in key:
            data = permute_rows(data, plan.kv_heads[_layer_index(key)])
        if plan.arch == "gemma3" and key.endswith("norm.weight"):
            data = data + 1.0  # Gemma's RMSNorm scales by (1 + w); llama.cpp's by w
        tensors.add(gguf_name(hf_key), data)
    if not tied:  # tied: llama.cpp reads token_embd as the output matrix when output.weight is absent
        tensors.add(gguf_name("lm_head.weight"), numpy(head))

    vocab_record = add_tokenizer(writer, tok, n_vocab)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"file": path.name, "arch": plan.arch, "layers": n_layer, "per_layer_widths": plan.per_layer,
            "bytes": path.stat().st_size, "tensor_types": tensors.counts, "fallbacks": tensors.fallbacks,
            "vocab": vocab_record, "notes": notes}


def _split_fused(key: str, data: np.ndarray, plan: TextPlan) -> list[tuple[str, np.ndarray]]:
    """Phi-3's qkv_proj -> q / k / v (q and k rows permuted for deci's rope), gate_up_proj -> gate / up."""
    i = _layer_index(key)
    if ".gate_up_proj." in key:
        gate, up = np.split(data, 2, axis=0)
        return [(key.replace("gate_up_proj", "gate_proj"), gate), (key.replace("gate_up_proj", "up_proj"), up)]
    q_rows, kv_rows = plan.heads[i] * plan.head_dim, plan.kv_heads[i] * plan.head_dim
    q, k, v = np.split(data, [q_rows, q_rows + kv_rows], axis=0)
    if v.shape[0] != kv_rows:
        raise VlmpruneError(f"{key} has {data.shape[0]} rows, not q + k + v of {plan.heads[i]} / {plan.kv_heads[i]} "
                            f"heads of {plan.head_dim}; the checkpoint disagrees with its config")
    return [(key.replace("qkv_proj", "q_proj"), permute_rows(q, plan.heads[i])),
            (key.replace("qkv_proj", "k_proj"), permute_rows(k, plan.kv_heads[i])),
            (key.replace("qkv_proj", "v_proj"), v)]


def _layer_index(key: str) -> int:
    parts = key.split(".")
    return int(parts[parts.index("layers") + 1])


# ------------------------------------------------------------------------------------------ tokenizer


@dataclass
class TokenizerSource:
    """What the GGUF needs of the model's tokenizer: its folder (tokenizer.json, tokenizer_config.json)
    and the chat template to embed (the processor's, which renders image items)."""

    folder: Path
    chat_template: str | None
    tokenizer: object = None  # the Hugging Face tokenizer: whether it adds BOS / EOS is written explicitly


def _added_specials(tokenizer) -> dict[str, bool]:
    """Whether the Hugging Face tokenizer adds BOS / EOS to a text (llama.cpp's defaults differ by
    tokenizer type: its llama-bpe pre-tokenizer adds BOS unless told otherwise)."""
    if tokenizer is None:
        return {}
    try:
        with_specials = tokenizer("a")["input_ids"]
        bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot say: leave llama.cpp's default
        return {}
    extra = len(with_specials) - len(bare)
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    return {"bos": extra > 0 and bos is not None and with_specials[0] == bos,
            "eos": extra > 0 and eos is not None and with_specials[-1] == eos and with_specials[-1] not in bare}


def _pre_name(pre: dict | None) -> str | None:
    """llama.cpp's pre-tokenizer name for a Hugging Face byte-level pre-tokenizer, or None if unknown."""
    if pre is None:
        return None
    kind = pre.get("type")
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if kind != "Sequence":
        return None
    items = pre.get("pretokenizers", [])
    kinds = [p.get("type") for p in items]
    if kinds == ["Digits", "ByteLevel"] and items[0].get("individual_digits") and items[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not items[1].get("use_regex", True):
        regex = (items[0].get("pattern") or {}).get("Regex")
        return {_LLAMA3_REGEX: "llama-bpe", _QWEN2_REGEX: "qwen2", _GPT2_REGEX: "gpt-2"}.get(regex)
    return None


def check_tokenizer(tok: TokenizerSource) -> tuple[str, str | None]:
    """("spm", None) or ("bpe", llama.cpp pre-tokenizer name); refuses what llama.cpp would tokenize differently."""
    file = tok.folder / "tokenizer.json"
    if (tok.folder / "tokenizer.model").is_file():  # SentencePiece (Llama 2 / Vicuna / Mistral v1): its own scores
        return "spm", None
    if not file.is_file():
        raise VlmpruneError(f"{tok.folder} has no tokenizer.json (a fast tokenizer); the GGUF needs one: save the "
                            f"model's processor with a fast tokenizer "
                            f"(AutoProcessor.from_pretrained(...).save_pretrained)")
    data = read_json(file)
    model = data.get("model", {}) if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise VlmpruneError(f"{file} is not a tokenizers file (no 'model' object); save the processor again")
    if model.get("type") != "BPE":
        raise VlmpruneError(f"tokenizer model {model.get('type')!r}: the GGUF export writes byte-level BPE "
                            f"tokenizers (GPT-2 / SmolLM2 / Llama 3 / Qwen2 style) and SentencePiece ones only")
    if model.get("byte_fallback"):
        raise VlmpruneError(f"{tok.folder} has a SentencePiece-style tokenizer (byte-fallback BPE) but no "
                            f"tokenizer.model; llama.cpp's tokenizer needs the SentencePiece scores: copy the original "
                            f"tokenizer.model beside the model and export again")
    pre = _pre_name(data.get("pre_tokenizer"))
    if pre is None or (data.get("decoder") or {}).get("type") != "ByteLevel":
        raise VlmpruneError(f"the tokenizer's pre-tokenizer ({json.dumps(data.get('pre_tokenizer'))[:200]}) is not one "
                            f"llama.cpp has a name for (gpt-2, smollm, llama-bpe, qwen2); the GGUF would tokenize "
                            f"differently, so nothing was written")
    if data.get("normalizer"):
        raise VlmpruneError(f"the tokenizer has a normalizer ({data['normalizer'].get('type')}); llama.cpp's BPE "
                            f"tokenizer applies none, so the GGUF would tokenize differently")
    return "bpe", pre


def add_tokenizer(writer, tok: TokenizerSource, n_vocab: int) -> dict:
    """Token list, types, merges/scores, pre-tokenizer, special ids and chat template of the model's tokenizer."""
    import gguf

    kind, pre = check_tokenizer(tok)
    if kind == "spm":
        return _add_spm(writer, tok, n_vocab)
    data = json.loads((tok.folder / "tokenizer.json").read_text())
    model = data["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    size = max([*vocab.values(), *added.keys()]) + 1
    if size > n_vocab:
        raise VlmpruneError(f"the tokenizer has {size} tokens but the model's embedding only {n_vocab} rows")
    tokens: list[str] = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, idx in vocab.items():
        tokens[idx], types[idx] = text, gguf.TokenType.NORMAL
    for idx, a in added.items():
        tokens[idx] = a["content"]
        types[idx] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_token_merges(merges)
    return {**_add_vocab(writer, tok, n_vocab, "gpt2", pre, tokens, types), "merges": len(merges)}


def _add_spm(writer, tok: TokenizerSource, n_vocab: int) -> dict:
    """A SentencePiece tokenizer (tokenizer.model, through gguf's SentencePieceVocab), plus the tokens
    added after it (tokenizer.json's added_tokens, e.g. LLaVA's <image>)."""
    import gguf

    try:
        vocab = gguf.vocab.SentencePieceVocab(tok.folder)
    except (RuntimeError, OSError, ValueError) as exc:
        raise VlmpruneError(f"cannot read {tok.folder / 'tokenizer.model'} ({exc}); the GGUF export needs the "
                            f"sentencepiece package for it: pip install sentencepiece") from None
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    added = {}
    if (tok.folder / "tokenizer.json").is_file():
        added = {a["id"]: a for a in json.loads((tok.folder / "tokenizer.json").read_text()).get("added_tokens", [])}
    if len(tokens) > n_vocab or any(i >= n_vocab for i in added):
        raise VlmpruneError(f"the tokenizer has more tokens than the model's embedding has rows ({n_vocab})")
    for i in range(len(tokens), n_vocab):
        a = added.get(i)
        tokens.append((a["content"] if a else f"[PAD{i}]").encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED if a is None else
                     gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    writer.add_token_scores(scores)
    return _add_vocab(writer, tok, n_vocab, "llama", "default", tokens, types)


def _add_vocab(writer, tok: TokenizerSource, n_vocab: int, model: str, pre: str, tokens: list, types: list) -> dict:
    """The tokenizer's kind, pre-tokenizer, tokens and their types, special ids and chat template."""
    import gguf

    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tok.folder, load_merges=False, n_vocab=n_vocab)
    _set_template(special, tok)
    special.add_to_gguf(writer, quiet=True)
    return {"model": model, "pre": pre, "tokens": n_vocab, "special": dict(special.special_token_ids),
            "chat_template": special.chat_template is not None}


def _set_template(special, tok: TokenizerSource) -> None:
    if tok.chat_template:
        special.chat_template = tok.chat_template
    special.add_special_token.update(_added_specials(tok.tokenizer))
