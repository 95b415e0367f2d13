"""Efficiency of a model: parameters, FLOPs per sample, prefill latency, decode speed, peak memory.

The timing and memory helpers are shared with benchmarks/inference_speed.py.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from vlmprune.adapters import get_adapter
from vlmprune.measure import is_quantized_weight, peak_rss_kib, reset_peak_rss, rss_kib, tensor_bytes
from vlmprune.summary import count_parameters


class Timer:
    """Seconds a callable takes: CUDA events on a GPU, perf_counter on a CPU."""

    def __init__(self, device: torch.device, clock=time.perf_counter):
        # clock=time.process_time gives CPU seconds of this process, which other jobs on a shared
        # machine disturb far less than wall time (single-threaded runs only)
        self.clock = clock
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        t0 = self.clock()
        fn()
        return self.clock() - t0


def _mb(kib: int | None) -> float:
    return float("nan") if kib is None else kib / 1024


def reset_peak(device) -> float:
    """Start a peak-memory window; returns the memory in use now (MB)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    reset_peak_rss()  # Linux: VmHWM back to the current RSS
    return _mb(rss_kib())


def peak_mb(device) -> float:
    """Peak memory (MB) since reset_peak: GPU allocations, or the process's peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _mb(peak_rss_kib())


def count_flops(model: nn.Module, inputs: dict) -> int:
    """FLOPs of one forward pass, counted by torch's FlopCounterMode with eager attention
    (CPU SDPA kernels count as zero there)."""
    from torch.utils.flop_counter import FlopCounterMode

    # Quantized Linear layers run integer or packed-4-bit kernels that FlopCounterMode does not
    # know (they would count as zero); their multiply-adds are the float layer's, so they are
    # counted from their shapes instead: 2 * rows of input * in_features * out_features.
    quantized = {name: m for name, m in model.named_modules()
                 if isinstance(getattr(m, "weight", None), torch.Tensor) and is_quantized_weight(m.weight)
                 and hasattr(m, "in_features")}
    analytic = {name: 0 for name in quantized}

    def hook(name):
        def count(module, args):
            analytic[name] += 2 * (args[0].numel() // module.in_features) * module.in_features * module.out_features
        return count

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in quantized.items()]
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**inputs, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
        for h in handles:
            h.remove()
    if not quantized:
        return int(counter.get_total_flops())
    counts, root = counter.get_flop_counts(), type(model).__name__
    seen = sum(sum(counts.get(f"{root}.{name}", {}).values()) for name in quantized)
    return int(counter.get_total_flops() - seen + sum(analytic.values()))


@torch.no_grad()
def measure(model: nn.Module, inputs: dict, decode_tokens: int = 32, repeats: int = 3, warmup: int = 1,
            clock=time.perf_counter) -> dict:
    """Prefill latency (the whole prompt, vision included), greedy decode speed with the KV
    cache, and peak memory over those runs, for one prepared batch of ``inputs``."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    batch = inputs["input_ids"].shape[0]
    timer = Timer(device, clock)
    state = {}

    def prefill():
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        state["cache"], state["next"] = out.cache, out.logits[:, -1:].argmax(-1)
        state["mask"] = inputs.get("attention_mask")

    def decode():
        cache, nxt, mask = state["cache"], state["next"], state["mask"]
        for _ in range(decode_tokens):
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            out = model(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)

    in_use = reset_peak(device)
    pre, dec = [], []
    for i in range(warmup + repeats):
        p, d = timer(prefill), timer(decode)
        if i >= warmup:
            pre.append(p)
            dec.append(d)
    # stored size: quantized weights count at their packed size with their scales, not dequantized
    weights = sum(tensor_bytes(p) for p in model.parameters()) / 2**20
    return {
        "prefill_s": statistics.median(pre),
        "decode_tokens_per_s": batch * decode_tokens / statistics.median(dec),
        "peak_memory_mb": weights + peak_mb(device) - in_use,
    }


def weight_bytes_by_part(model: nn.Module) -> dict[str, int]:
    """Bytes of the parameters of each part as they are held (quantized tensors at their packed
    size with scales), split like ``count_parameters``; tied weights count once."""
    adapter = get_adapter(model)
    unique = lambda m: {id(p): p for p in m.parameters()}  # noqa: E731
    everything, projector = unique(model), unique(adapter.projector(model))
    vision = {k: p for k, p in unique(adapter.vision(model)).items() if k not in projector}
    lm = {k: p for k, p in everything.items() if k not in projector and k not in vision}
    size = lambda d: sum(tensor_bytes(p) for p in d.values())  # noqa: E731
    return {"vision": size(vision), "projector": size(projector), "language_model": size(lm), "total": size(everything)}


def disk_bytes(model: nn.Module) -> int | None:
    """Bytes of the weight files in the directory the model was loaded from (None when it was not
    loaded from a local directory)."""
    from pathlib import Path

    path = Path(getattr(model, "name_or_path", "") or "")
    if not str(path) or not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))


def efficiency(model: nn.Module, inputs: dict, decode_tokens: int = 32, repeats: int = 3) -> dict:
    """Everything `vlmprune evaluate --efficiency` reports, for one prepared prompt batch."""
    batch = inputs["input_ids"].shape[0]
    quantization = getattr(model.config, "quantization_config", None)
    return {
        "parameters": count_parameters(model),
        "weight_bytes": weight_bytes_by_part(model),
        "disk_bytes": disk_bytes(model),
        # the backend that quantized the weights (torchao, bitsandbytes), None for a float model
        "quantization": getattr(getattr(quantization, "quant_method", None), "value", None),
        "flops_per_sample": count_flops(model, inputs) / batch,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        **measure(model, inputs, decode_tokens, repeats),
    }
