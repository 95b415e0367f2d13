"""Do pruned models really run faster? Measured prefill/decode speedup held against the FLOP reduction.

    .venv/bin/python benchmarks/inference_speed.py --shapes smollm2-135m,qwen2.5-1.5b [--device cuda]

Models: LLaVA-style (ViT-S/14 vision tower, random weights) whose language model is shaped like
SmolLM2-135M, Qwen2.5-1.5B or Qwen2.5-3B. Variants: the original; layerwise at each --ratios;
widthwise at each ratio with --attention groups|heads|none and MLP widths rounded to 1, 8, 64
(--grid full: every combination; --grid axes, the default: each attention mode at multiple 64, and
multiples 1 and 8 with kv groups). Ratios are fractions of the whole model's parameters.

Work measured, per variant and batch size: the language model's prefill of a 600-token prompt
(576 image positions + 24 text tokens, as LLaVA-1.5 feeds it; the vision tower is identical in every
variant and not timed), then 32 greedy decode steps with the KV cache. Medians of --repeats runs
after --warmup runs. Peak memory: the variant's weights plus the most its runs added on top
(peak RSS on CPU, torch.cuda.max_memory_allocated on CUDA). FLOPs: analytic, matmuls only (projections, attention
scores and values, MLP, LM head on the tokens whose logits are needed).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import LM_SHAPES, build_llava  # noqa: E402

from vlmprune.adapters import get_adapter  # noqa: E402
from vlmprune.evaluate.efficiency import Timer, peak_mb, reset_peak  # noqa: E402
from vlmprune.prune.run import score_and_plan  # noqa: E402
from vlmprune.summary import (
    count_parameters,  # noqa: E402
    layer_shapes,  # noqa: E402
)
from vlmprune.surgery.apply import apply_plan_  # noqa: E402

PROMPT, IMAGE_POSITIONS = 600, 576


def variants(ratios: list[float], grid: str) -> list[dict]:
    out = [{"name": "original"}]
    out += [{"name": f"layer {r:.0%}", "method": "layer", "ratio": r} for r in ratios]
    if grid == "full":
        combos = [(a, m) for a in ("groups", "heads", "none") for m in (1, 8, 64)]
    else:
        combos = [("groups", 64), ("heads", 64), ("none", 64), ("groups", 8), ("groups", 1)]
    for r in ratios:
        for attention, multiple in combos:
            out.append({"name": f"width {r:.0%} {attention} m{multiple}", "method": "width", "ratio": r,
                        "attention": attention, "mlp_multiple": multiple})
    return out


def flops(model, batch: int, prompt: int, decode: int) -> tuple[float, float]:
    """Analytic matmul FLOPs (2 per multiply-add) of prefill and of the decode steps."""
    shapes = layer_shapes(model)
    text = model.config.get_text_config()
    D, V = text.hidden_size, text.vocab_size

    def per_token(ctx: float) -> float:
        total = 0.0
        for s in shapes:
            q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
            total += 2 * D * (2 * q + 2 * kv)          # q, k, v, o projections
            total += 2 * 2 * q * ctx                    # scores and weighted values over ctx keys
            total += 2 * 3 * D * s.intermediate_size    # gate, up, down
        return total

    prefill = sum(per_token(t + 1) for t in range(prompt)) + 2 * D * V  # logits of the last position
    dec = sum(per_token(prompt + t + 1) + 2 * D * V for t in range(decode))
    return batch * prefill, batch * dec


@torch.no_grad()
def measure(model, batch: int, decode: int, repeats: int, warmup: int, device) -> dict:
    lm, head = get_adapter(model).language_model(model), model.lm_head
    D = model.config.get_text_config().hidden_size
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    # the prompt as the language model receives it: 576 projected image features, then text
    embeds = torch.randn(batch, PROMPT, D, generator=gen).to(device, dtype) * 0.02
    text_ids = torch.randint(10, 1000, (batch, PROMPT - IMAGE_POSITIONS), generator=gen).to(device)
    embeds[:, IMAGE_POSITIONS:] = lm.embed_tokens(text_ids)
    timer = Timer(device)
    state = {}

    def prefill():
        out = lm(inputs_embeds=embeds, use_cache=True)
        state["cache"] = out.cache
        state["next"] = head(out.last_hidden_state[:, -1:]).argmax(-1)

    def decode_steps():
        cache, nxt = state["cache"], state["next"]
        for _ in range(decode):
            out = lm(input_ids=nxt, cache=cache, use_cache=True)
            cache = out.cache
            nxt = head(out.last_hidden_state[:, -1:]).argmax(-1)

    in_use = reset_peak(device)
    pre, dec = [], []
    for i in range(warmup + repeats):
        p = timer(prefill)
        d = timer(decode_steps)
        if i >= warmup:
            pre.append(p)
            dec.append(d)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    # weights + what the runs added at their peak (activations, KV cache, allocator), so the figure
    # does not depend on what else the benchmark process holds
    return {"prefill_s": statistics.median(pre), "decode_tok_s": batch * decode / statistics.median(dec),
            "decode_s": statistics.median(dec), "peak_mb": weights + peak_mb(device) - in_use}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="smollm2-135m", help=f"comma-separated: {', '.join(LM_SHAPES)}")
    parser.add_argument("--ratios", default="0.15,0.3,0.45")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--grid", choices=["axes", "full"], default="axes")
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", help="comma-separated variant names (for quick checks)")
    parser.add_argument("--json", default="benchmarks/results/inference_speed.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    ratios = [float(r) for r in args.ratios.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    machine = {"platform": platform.platform(), "processor": _cpu_name(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "device": str(device), "dtype": str(dtype),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    print(json.dumps(machine), flush=True)
    rows = []
    for shape in args.shapes.split(","):
        base = build_llava(shape, dtype=torch.float32)
        base_params = count_parameters(base)
        chosen = variants(ratios, args.grid)
        if args.only:
            keep = set(args.only.split(","))
            chosen = [v for v in chosen if v["name"] in keep or v["name"] == "original"]
        for v in chosen:
            model = base
            if "method" in v:
                model = copy.deepcopy(base)  # a copy, not a rebuild: random init of 1.5B weights cost ~40 s a variant
                plan, _ = score_and_plan(model, v["method"], v["ratio"], "last" if v["method"] == "layer" else "random",
                                           attention=v.get("attention", "groups"), mlp_multiple=v.get("mlp_multiple"))
                apply_plan_(model, plan)
            params = count_parameters(model)
            model.to(device, dtype)
            s = layer_shapes(model)
            widths = f"{len(s)}L h{s[0].num_heads}/kv{s[0].num_kv_heads} mlp{s[0].intermediate_size}"
            for batch in batches:
                f_pre, f_dec = flops(model, batch, PROMPT, args.decode)
                m = measure(model, batch, args.decode, args.repeats, args.warmup, device)
                row = {"shape": shape, "variant": v["name"], "batch": batch, "widths": widths,
                       "params": params["total"], "ratio": 1 - params["total"] / base_params["total"],
                       "prefill_flops": f_pre, "decode_flops": f_dec, **m}
                rows.append(row)
                print(json.dumps(row), flush=True)
            if model is not base:
                del model
            gc.collect()
            base.to("cpu", torch.float32)
        del base
        gc.collect()
    _add_speedups(rows)
    print_table(rows)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "args": vars(args), "rows": rows}, indent=1))
    print(f"\nwrote {out}")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _add_speedups(rows: list[dict]) -> None:
    originals = {(r["shape"], r["batch"]): r for r in rows if r["variant"] == "original"}
    for r in rows:
        o = originals[(r["shape"], r["batch"])]
        r["prefill_speedup"] = o["prefill_s"] / r["prefill_s"]
        r["prefill_flop_reduction"] = o["prefill_flops"] / r["prefill_flops"]
        r["prefill_efficiency"] = r["prefill_speedup"] / r["prefill_flop_reduction"]
        r["decode_speedup"] = r["decode_tok_s"] / o["decode_tok_s"]
        r["decode_flop_reduction"] = o["decode_flops"] / r["decode_flops"]
        r["decode_efficiency"] = r["decode_speedup"] / r["decode_flop_reduction"]


def print_table(rows: list[dict]) -> None:
    print("\n| shape | batch | variant | widths | removed | prefill s | speedup | FLOP red. | eff. | "
          "decode tok/s | speedup | FLOP red. | eff. | peak MB |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (r["shape"], r["batch"])):
        print(f"| {r['shape']} | {r['batch']} | {r['variant']} | {r['widths']} | {r['ratio']:.1%} | "
              f"{r['prefill_s']:.3f} | {r['prefill_speedup']:.2f} | {r['prefill_flop_reduction']:.2f} | "
              f"{r['prefill_efficiency']:.2f} | {r['decode_tok_s']:.1f} | {r['decode_speedup']:.2f} | "
              f"{r['decode_flop_reduction']:.2f} | {r['decode_efficiency']:.2f} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()
