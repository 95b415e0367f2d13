"""llama.cpp's K-quant mixes (``--quant q4_k_m`` ...) for the text GGUF, quantized by llama.cpp's own kernels.

The PyPI ``gguf`` package cannot write K-quants and xllamacpp binds no quantizer, but xllamacpp's shared
object is a whole llama.cpp build and exports ggml's public C API: ``ggml_quantize_chunk`` is the
function ``llama-quantize`` itself calls for every tensor. It is reached through ctypes here; the bytes it
returns are written with ``GGUFWriter`` under the ``gguf`` package's type ids (checked against ggml's
block and type sizes when the library is loaded, so a build whose type numbering moved is refused instead
of written wrong).

A mix names a default type and the tensors that get more bits, as llama.cpp's ``llama_tensor_get_type``
decides them for a dense (not mixture-of-experts) model (``src/llama-quant.cpp``):

* ``output.weight``, and ``token_embd.weight`` when it is also the output matrix (tied), in Q6_K;
  Q8_0 when its rows do not fill 256-blocks;
* the attention value matrices (and Phi-3's fused ``attn_qkv``) and the MLP down projections of
  some layers (``use_more_bits``: the first and last eighth of the layers, and every third between)
  in Q6_K for q4_k_m / q5_k_m; the first four value matrices and the first eighth of the down
  projections in Q5_K for q4_k_s; q3_k_m / q3_k_l / q2_k raise the value, output-projection and down
  matrices as described in :func:`Mix.wanted`;
* a matrix whose rows (its input dimension) are not a multiple of the type's block falls back per
  tensor as llama.cpp does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K / Q3_K -> Q4_0; F16 when
  even 32-blocks do not fit), and is reported.

No mix here needs an importance matrix (llama.cpp asks for one only for Q2_K_S and the IQ types, which
are refused by name).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmprune.config import GGUF_K_QUANTS
from vlmprune.errors import VlmpruneError

# the default (most tensors') type of each mix
BASE = {"q2_k": "q2_k", "q3_k_s": "q3_k", "q3_k_m": "q3_k", "q3_k_l": "q3_k", "q4_k_s": "q4_k", "q4_k_m": "q4_k",
        "q5_k_s": "q5_k", "q5_k_m": "q5_k", "q6_k": "q6_k"}
# llama.cpp's per-tensor fallback when a row does not fill a 256-block: a 32-block type of about the same size
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
# every type a mix can write through ggml
GGML_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_0", "q5_0", "q5_1", "q8_0")

_EXTRA = "pip install 'vlmprune[gguf]'"


# ------------------------------------------------------------------------------------------ the quantizer


@functools.cache
def library() -> ctypes.CDLL:
    """xllamacpp's shared object with ggml's quantizer declared; a VlmpruneError naming the extra if absent."""
    import gguf

    spec = importlib.util.find_spec("xllamacpp")
    if spec is None or not spec.submodule_search_locations:
        raise VlmpruneError(f"K-quants (--quant {'/'.join(GGUF_K_QUANTS)}) are quantized by llama.cpp's own kernels, "
                            f"from the xllamacpp runtime, which is not installed: {_EXTRA}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("xllamacpp*.so")) + sorted(folder.glob("xllamacpp*.pyd"))
    if not found:
        raise VlmpruneError(f"no xllamacpp shared library in {folder}; reinstall the runtime: {_EXTRA}")
    try:
        lib = ctypes.CDLL(str(found[0]))
        names = ("ggml_quantize_chunk", "ggml_quantize_init", "ggml_quantize_requires_imatrix", "ggml_row_size",
                 "ggml_blck_size", "ggml_type_size", "ggml_validate_row_data")
        for name in names:
            getattr(lib, name)
    except (OSError, AttributeError) as exc:
        raise VlmpruneError(f"{found[0]} does not export ggml's quantizer ({exc}); K-quants need the llama.cpp build "
                            f"the `gguf` extra pins: {_EXTRA}") from None
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    for name in GGML_TYPES:  # the gguf package's type ids must be this build's
        qtype = gguf.GGMLQuantizationType[name.upper()]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        if (lib.ggml_blck_size(int(qtype)), lib.ggml_type_size(int(qtype))) != (block, size):
            raise VlmpruneError(f"the installed llama.cpp ({found[0].name}) and gguf package disagree on type "
                                f"{name} (block / bytes {lib.ggml_blck_size(int(qtype))} / "
                                f"{lib.ggml_type_size(int(qtype))} vs {block} / {size}); install the pinned pair: "
                                f"{_EXTRA}")
        if lib.ggml_quantize_requires_imatrix(int(qtype)):
            raise VlmpruneError(f"this llama.cpp build needs an importance matrix for {name}; not supported")
    return lib


def quantize(data: np.ndarray, kind: str) -> np.ndarray:
    """Rows of ``data`` (float32, last axis the row) in ggml type ``kind``: uint8 of shape (..., row bytes)."""
    import gguf

    lib = library()
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    data = np.ascontiguousarray(data, dtype=np.float32)
    n_per_row = data.shape[-1]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if n_per_row % block:  # ggml would abort the process
        raise VlmpruneError(f"internal: row length {n_per_row} is not a multiple of {kind}'s block {block}")
    rows = data.size // n_per_row
    row_bytes = lib.ggml_row_size(int(qtype), n_per_row)
    out = np.empty((*data.shape[:-1], row_bytes), dtype=np.uint8)
    lib.ggml_quantize_init(int(qtype))

    def chunk(first: int, count: int) -> int:  # ctypes releases the GIL: chunks run in parallel, as in llama-quantize
        return lib.ggml_quantize_chunk(int(qtype), data.ctypes.data, out.ctypes.data, first * n_per_row, count,
                                       n_per_row, None)

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    step = max(1, -(-rows // (4 * threads)), 2**18 // n_per_row)  # at least ~256k weights a call
    spans = [(first, min(step, rows - first)) for first in range(0, rows, step)]
    if len(spans) == 1:
        written = chunk(*spans[0])
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(threads, len(spans))) as pool:
            written = sum(pool.map(lambda span: chunk(*span), spans))
    if written != out.nbytes or not lib.ggml_validate_row_data(int(qtype), out.ctypes.data, out.nbytes):
        raise VlmpruneError(f"llama.cpp's {kind} quantizer rejected a tensor of shape {data.shape} (non-finite "
                            f"weights?); nothing was written")
    return out


# ------------------------------------------------------------------------------------------ the mixes


def more_bits(layer: int, n_layer: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third layer between."""
    eighth = n_layer // 8
    return layer < eighth or layer >= 7 * n_layer // 8 or (layer - eighth) % 3 == 2


def _category(name: str) -> str:
    """The role of a text GGUF tensor, by its llama.cpp name (as llama.cpp's quantizer sorts them)."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for part in ("attn_qkv", "attn_v", "attn_k", "attn_q", "attn_output"):
        if f"{part}.weight" in name:
            return "attn_v" if part == "attn_qkv" else part  # a fused qkv counts as a value matrix
    for part in ("ffn_up", "ffn_gate", "ffn_down"):
        if part in name:
            return part
    return "other"


@dataclass
class Mix:
    """The type each matrix of a text GGUF gets in a K-quant mix."""

    quant: str  # q4_k_m, ...
    n_layer: int
    n_gqa: int  # query heads per kv head, layer 0 (as llama.cpp reads it)
    tied: bool  # no output.weight: token_embd is the output matrix too

    def wanted(self, name: str) -> str:
        """The mix's type for tensor ``name`` before any fallback for its shape."""
        q, base = self.quant, BASE[self.quant]
        cat = _category(name)
        layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
        n = self.n_layer
        if cat == "output" or (cat == "token_embd" and self.tied):
            return "q6_k"
        if cat == "attn_v":
            if q == "q2_k":
                return "q4_k" if self.n_gqa >= 4 else "q3_k"
            if q == "q3_k_m":
                return "q5_k" if layer < 2 else "q4_k"
            if q == "q3_k_l":
                return "q5_k"
            if q in ("q4_k_m", "q5_k_m") and more_bits(layer, n):
                return "q6_k"
            if q == "q4_k_s" and layer < 4:
                return "q5_k"
        elif cat == "ffn_down":
            if q == "q2_k":
                return "q3_k"
            if q == "q3_k_m":
                return "q5_k" if layer < n // 16 else "q4_k"
            if q == "q3_k_l":
                return "q5_k"
            if q in ("q4_k_m", "q5_k_m") and more_bits(layer, n):
                return "q6_k"
            if q == "q4_k_s" and layer < n // 8:
                return "q5_k"
        elif cat == "attn_output":
            if q == "q2_k":
                return "q3_k"
            if q == "q3_k_m":
                return "q4_k"
            if q == "q3_k_l":
                return "q5_k"
        return base

    def choose(self, name: str, shape: tuple[int, ...]) -> tuple[str, str, str | None]:
        """(wanted, written, reason) for a matrix: written differs from wanted when its rows do not fit."""
        import gguf

        def block(kind: str) -> int:
            return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind.upper()]][0]

        want = self.wanted(name)
        row = shape[-1]
        if row % block(want) == 0:
            return want, want, None
        second = FALLBACK[want]
        reason = f"row length {row} is not a multiple of {block(want)}"
        if row % block(second) == 0:
            return want, second, reason
        return want, "f16", f"{reason} (nor of {block(second)} for {second})"
