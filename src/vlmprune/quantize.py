"""Post-training weight quantization of the language model's decoder layers.

Only the ``nn.Linear`` modules inside the decoder layers (as the family's adapter finds them) are
quantized; the vision tower, projector, embeddings and ``lm_head`` keep their dtype, because the
study quantized the decoder alone and the vision path is small and sensitive. Modules are chosen
by identity from ``adapter.layers(model)``, never by name patterns, so per-layer-width (pruned)
checkpoints and every supported family take the same path.

Schemes and their backends (each registered with ``@register_scheme``; ``SCHEMES`` holds them):

- ``int8``: torchao ``Int8WeightOnlyConfig`` (per-row int8 weights; runs on CPU).
- ``int8-dynamic``: torchao ``Int8DynamicActivationInt8WeightConfig`` (int8 weights, activations
  quantized per token at run time; runs on CPU).
- ``nf4``: bitsandbytes 4-bit NormalFloat with double-quantized block scales (runs on CPU with
  bitsandbytes >= 0.49; without double quantization the reloaded model's logits differ from the
  in-memory one, so it is always on).
- ``int4``: torchao ``Int4WeightOnlyConfig`` in the tinygemm layout, whose kernel exists only in
  PyTorch's CUDA build and only for bfloat16 weights: a CUDA device and a bfloat16 model.

The quantized model keeps a transformers quantizer (``model.hf_quantizer``) and
``config.quantization_config``, so ``save_pretrained`` writes safetensors that plain
``from_pretrained`` (uniform widths) or ``vlmprune.load`` (any widths) reads back.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmprune.adapters import Adapter, get_adapter
from vlmprune.errors import VlmpruneError
from vlmprune.measure import is_quantized_weight, tensor_bytes

QUANTIZATION_KEY = "quantization"  # the record's section in run.json


class QuantizationError(VlmpruneError):
    """A scheme is unknown, or this machine lacks the device or package it needs."""


QUANTIZE_EXTRA = 'pip install "vlmprune[quantize]"'
NF4_BLOCK = 64  # nf4: weights per block scale (bitsandbytes' default blocksize)
INT4_GROUP = 128  # int4: weights per scale


@dataclass(frozen=True)
class Scheme:
    name: str
    backend: str  # the Python package that does the work
    pip: str  # what to install when it is missing
    needs_cuda: bool
    description: str
    # (model, selected decoder Linears by name, modules kept unquantized) -> the transformers quantization
    # config that reloads the result; quantizes ``selected`` in place
    quantize: Callable[[nn.Module, dict[str, nn.Linear], list[str]], Any] | None = None


SCHEMES: dict[str, Scheme] = {}  # filled by register_scheme below; --scheme and the study check names here


def register_scheme(name: str, backend: str, description: str, needs_cuda: bool = False, pip: str = QUANTIZE_EXTRA):
    """Register ``fn(model, selected, keep) -> transformers quantization config`` as scheme ``name``.

    ``backend`` is the Python package it needs (checked before anything loads, with ``pip`` as the
    fix); ``needs_cuda`` refuses other devices. ``fn`` quantizes the ``selected`` decoder Linears in
    place; for torchao, ``apply_torchao(model, selected, keep, torchao_config)`` does it.
    """

    def register(fn):
        SCHEMES[name] = Scheme(name, backend, pip, needs_cuda, description, fn)
        return fn

    return register


# --------------------------------------------------------------------------- selection


def decoder_linears(model: nn.Module, adapter: Adapter | None = None) -> dict[str, nn.Linear]:
    """Full module names -> the ``nn.Linear`` modules inside the decoder layers.

    The adapter's ``layers(model)`` decides which modules are decoder layers; names come from the
    top-level model so they are the keys ``save_pretrained`` writes.
    """
    adapter = adapter or get_adapter(model)
    wanted = {id(m) for m in adapter.layers(model).modules() if isinstance(m, nn.Linear)}
    found = {name: m for name, m in model.named_modules() if id(m) in wanted}
    if not found:
        raise QuantizationError(f"{adapter.model_type}: the decoder layers hold no nn.Linear modules to quantize")
    return found


def kept_modules(model: nn.Module, selected: dict[str, nn.Module], adapter: Adapter | None = None) -> list[str]:
    """Skip list for the saved quantization config: the adapter's vision and projector paths and
    every other Linear/Embedding outside the decoder layers (lm_head, embeddings), by full path.

    transformers matches these as prefixes from the start of a module name, so full paths are
    needed (a bare ``vision_tower`` is silently ignored).
    """
    adapter = adapter or get_adapter(model)
    parts = [adapter.parts.vision, adapter.parts.projector]
    keep = list(dict.fromkeys(parts))
    for name, module in model.named_modules():
        if name in selected or not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        if any(name == p or name.startswith(p + ".") for p in parts):
            continue
        keep.append(name)
    return keep


# --------------------------------------------------------------------------- checks


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_scheme(scheme: str, device: torch.device | str = "cpu") -> Scheme:
    """The scheme, or an error naming what this machine lacks (package, device) and the fix."""
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    spec = SCHEMES[scheme]
    if importlib.util.find_spec(spec.backend) is None:
        raise QuantizationError(
            f"--scheme {scheme} needs the Python package '{spec.backend}', which is not installed; "
            f"install it with: {spec.pip}"
        )
    device = torch.device(device)
    if spec.needs_cuda and (device.type != "cuda" or not torch.cuda.is_available()):
        where = "no CUDA device is available" if not torch.cuda.is_available() else f"the model is on {device}"
        raise QuantizationError(
            f"--scheme {scheme} needs a CUDA GPU: torchao's int4 weight-only kernel (tinygemm) exists only in "
            f"PyTorch's CUDA build, and {where}. On a CPU use --scheme nf4 (4-bit, bitsandbytes) or int8."
        )
    return spec


# --------------------------------------------------------------------------- backends


def apply_torchao(model: nn.Module, selected: dict[str, nn.Linear], keep: list[str], config):
    """Apply the torchao ``config`` to the ``selected`` modules (chosen by identity)."""
    from torchao.quantization import quantize_
    from transformers import TorchAoConfig

    ids = {id(m) for m in selected.values()}
    quantize_(model, config, filter_fn=lambda module, fqn: id(module) in ids)
    return TorchAoConfig(quant_type=config, modules_to_not_convert=keep)


@register_scheme("int8", "torchao", "int8 weights (one scale per output row), activations in the model dtype")
def _int8(model: nn.Module, selected: dict[str, nn.Linear], keep: list[str]):
    from torchao.quantization import Int8WeightOnlyConfig

    return apply_torchao(model, selected, keep, Int8WeightOnlyConfig())


@register_scheme("int8-dynamic", "torchao",
                 "int8 weights and int8 activations (scales per token, computed at run time)")
def _int8_dynamic(model: nn.Module, selected: dict[str, nn.Linear], keep: list[str]):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    return apply_torchao(model, selected, keep, Int8DynamicActivationInt8WeightConfig())


@register_scheme("nf4", "bitsandbytes",
                 f"4-bit NormalFloat weights in blocks of {NF4_BLOCK}, block scales themselves quantized")
def _quantize_bnb_nf4(model: nn.Module, selected: dict[str, nn.Linear], keep: list[str]):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    dtypes = {m.weight.dtype for m in selected.values()}
    if len(dtypes) != 1:
        raise QuantizationError(f"nf4: the decoder's Linear layers have mixed dtypes {sorted(map(str, dtypes))}")
    compute_dtype = dtypes.pop()
    from bitsandbytes.functional import has_avx512bf16

    # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for its CPU kernel at the first
    # eval-mode forward, and that kernel needs output rows in blocks of 32 and input columns in
    # whole quantization blocks of 64: a layer of another shape would quantize here and then fail
    # at inference (pruned widths often are not such multiples).
    if all(m.weight.device.type == "cpu" for m in selected.values()) and has_avx512bf16():
        ragged = {n: (m.out_features, m.in_features) for n, m in selected.items()
                  if m.out_features % 32 or m.in_features % NF4_BLOCK}
        if ragged:
            name, (rows, cols) = next(iter(ragged.items()))
            raise QuantizationError(
                f"--scheme nf4 on this CPU (the AVX512-BF16 kernel of bitsandbytes) needs every decoder Linear to "
                f"have a multiple of 32 outputs and of {NF4_BLOCK} inputs; {len(ragged)} do not (e.g. {name}: "
                f"{cols} -> {rows}). Use --scheme int8 or int8-dynamic, or prune to such widths (--mlp-multiple 64, "
                f"whole kv groups)."
            )
    for name, linear in selected.items():
        device = linear.weight.device
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True,
                                     quant_type="nf4")
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        q = q.to(device)  # Params4bit quantizes when it is moved to a real device
        # a new module starts in training mode, where bitsandbytes takes another CPU kernel than in
        # eval mode: keep the original mode so the in-memory model computes what a reloaded one does
        q.train(linear.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, q)
    # the same settings the loader needs to rebuild these modules (compute dtype included: a
    # different one gives different logits after reloading)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=keep)


@register_scheme("int4", "torchao", f"int4 weights in groups of {INT4_GROUP} (tinygemm layout), bfloat16 activations",
                 needs_cuda=True)
def _int4(model: nn.Module, selected: dict[str, nn.Linear], keep: list[str]):
    from torchao.quantization import Int4WeightOnlyConfig

    bad = sorted({str(m.weight.dtype) for m in selected.values()} - {"torch.bfloat16"})
    if bad:
        raise QuantizationError(
            f"--scheme int4 needs bfloat16 decoder weights (the tinygemm kernel's only dtype), found {bad}; "
            f"load the model with dtype=torch.bfloat16 (vlmprune quantize --dtype bfloat16)"
        )
    # tile_packed_to_4d is the layout PyTorch's own CUDA int4 matmul reads; the other layouts need
    # extra kernel packages (mslk) or an XPU.
    return apply_torchao(model, selected, keep,
                             Int4WeightOnlyConfig(group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d"))


# --------------------------------------------------------------------------- the verb


def weight_bytes(module: nn.Module) -> int:
    """Bytes the module's parameters and buffers occupy as stored (quantized tensors at their
    packed size, with their scales), each shared tensor once."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def quantize(model: nn.Module, scheme: str) -> dict:
    """Quantize the decoder layers' Linear weights of ``model`` in place; returns the record that
    goes into ``run.json``'s ``quantization`` section.

    The model afterwards carries ``config.quantization_config`` and a transformers quantizer, so
    ``save_pretrained`` / ``vlmprune.save_model`` write a loadable safetensors checkpoint.
    """
    from transformers.quantizers.auto import AutoHfQuantizer

    if getattr(model.config, "quantization_config", None) is not None or getattr(model, "hf_quantizer", None):
        raise QuantizationError("the model is already quantized; quantize the unquantized checkpoint instead")
    adapter = get_adapter(model)
    selected = decoder_linears(model, adapter)
    device = next(iter(selected.values())).weight.device
    spec = check_scheme(scheme, device)
    keep = kept_modules(model, selected, adapter)
    lm = adapter.language_model(model)
    before = weight_bytes(lm)
    total_before = weight_bytes(model)
    hf_config = spec.quantize(model, selected, keep)
    model.config.quantization_config = hf_config
    # pre_quantized: the weights already are quantized tensors; the quantizer only serialises them
    model.hf_quantizer = AutoHfQuantizer.from_config(hf_config, pre_quantized=True)
    after = dict(model.named_modules())
    unquantized = [n for n in selected if not is_quantized_weight(after[n].weight)]
    if unquantized:
        raise QuantizationError(
            f"{spec.backend} left {len(unquantized)} decoder Linear layer(s) unquantized (e.g. {unquantized[0]}): "
            f"their shapes do not fit scheme {scheme}"
        )
    return {
        "scheme": scheme,
        "description": spec.description,
        "backend": spec.backend,
        "backend_version": _version(spec.backend),
        "quantized_modules": len(selected),
        "kept": keep,
        "language_model_bytes": {"before": before, "after": weight_bytes(lm)},
        "model_bytes": {"before": total_before, "after": weight_bytes(model)},
    }


def quantize_model_dir(model: str | Path, scheme: str, output: str | Path, overwrite: bool = False,
                       dtype: str | None = None, device: str | None = None,
                       trust_remote_code: bool = False) -> tuple[Path, dict]:
    """Load ``model`` (any widths), quantize its decoder, write ``output`` atomically with the
    processor files, ``pruning_plan.json`` (the input's plan, or an empty one) and ``run.json`` (the
    input's record with a ``quantization`` section). Nothing is written when the scheme cannot run here."""
    from vlmprune.checkpoint import load, save_model
    from vlmprune.config import check_device
    from vlmprune.planning.plan import PLAN_FILE, PruningPlan
    from vlmprune.record import QuantizationRecord, RunRecord

    # refuse before loading anything: a missing package or device must not cost a model load
    check_device(device)
    wanted_device = device or ("cuda" if SCHEMES.get(scheme, SCHEMES["int8"]).needs_cuda else "cpu")
    check_scheme(scheme, wanted_device)
    net = load(model, dtype=dtype, trust_remote_code=trust_remote_code)  # a name as given: "auto" is the checkpoint's
    net.to(wanted_device)
    record = quantize(net, scheme)
    plan_path = Path(model) / PLAN_FILE
    plan = PruningPlan.load(plan_path) if plan_path.exists() else PruningPlan()
    run = RunRecord.load(model, missing_ok=True)
    run.quantization = QuantizationRecord(**record, source=str(model))
    out = save_model(net, output, plan=PruningPlan(plan.drop_layers, plan.layers), source=model, overwrite=overwrite,
                     extras=run.save)
    return out, record
