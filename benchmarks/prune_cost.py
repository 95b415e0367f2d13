"""Cost of scoring: wall time and peak resident memory of each criterion on 64 calibration samples.

    .venv/bin/python benchmarks/prune_cost.py [--samples 64] [--batch-size 8] [--json out.json]

The model is LLaVA-style with a SmolLM2-135M-shaped language model (30 layers, hidden 576, 9 heads,
3 kv heads, MLP 1536) and random weights. Each criterion runs in a fresh process; the kernel's peak-RSS
counter is reset after the model and batches exist, so the peak is the scoring's own.
"peak / weights" = (peak RSS during scoring - RSS before the model existed) / weight bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CRITERIA = {"layer": ["block_influence", "angular", "skip_loss", "last"],
            "width": ["taylor", "magnitude", "activation", "wanda", "random"]}


def activations_only(model, batches) -> None:
    """Forward + backward of the answer loss with every weight frozen: the memory of the
    activations autograd keeps, and nothing else (the reference for Taylor's budget)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_())
    for batch in batches:
        model(**batch).loss.backward()


def worker(method: str, criterion: str, samples: int, batch_size: int) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from common import build_llava, fake_batch

    from vlmprune.evaluate.efficiency import peak_mb, reset_peak
    from vlmprune.prune.run import score_and_plan

    base = reset_peak("cpu")
    model = build_llava("smollm2-135m")
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    batches = [fake_batch(model, batch_size, seed=i) for i in range(max(samples // batch_size, 1))]
    reset_peak("cpu")
    t0 = time.perf_counter()
    if method == "reference":
        activations_only(model, batches)
    else:
        score_and_plan(model, method, 0.2, criterion, batches)
    seconds = time.perf_counter() - t0
    peak = peak_mb("cpu")
    return {"method": method, "criterion": criterion, "seconds": seconds, "weights_mb": weights,
            "rss_before_model_mb": base, "peak_rss_mb": peak,
            "peak_over_weights": (peak - base) / weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--criteria", help="comma-separated subset")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, criterion = args.worker.split(":")
        print(json.dumps(worker(method, criterion, args.samples, args.batch_size)))
        return
    wanted = set(args.criteria.split(",")) if args.criteria else None
    rows = []
    for method, names in {**CRITERIA, "reference": ["activations"]}.items():
        for criterion in names:
            if wanted and criterion not in wanted:
                continue
            out = subprocess.run([sys.executable, __file__, "--worker", f"{method}:{criterion}", "--samples",
                                  str(args.samples), "--batch-size", str(args.batch_size)],
                                 capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{method:5s} {criterion:16s} {r['seconds']:8.1f} s  peak {r['peak_rss_mb']:7.0f} MB  "
                  f"({r['peak_over_weights']:.2f}x weights of {r['weights_mb']:.0f} MB)", flush=True)
    print(f"\n| method | criterion | wall time (s) | peak RSS (MB) | peak / weight bytes |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['criterion']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_over_weights']:.2f} |")
    print(f"\n{args.samples} samples, batch {args.batch_size}, {rows[0]['weights_mb']:.0f} MB of float32 weights; "
          f"RSS before the model: {rows[0]['rss_before_model_mb']:.0f} MB")
    by_name = {r["criterion"]: r for r in rows}
    if "taylor" in by_name and "activations" in by_name:
        t, a = by_name["taylor"], by_name["activations"]
        weights = t["weights_mb"]
        activations = a["peak_rss_mb"] - a["rss_before_model_mb"] - weights
        used = t["peak_rss_mb"] - t["rss_before_model_mb"]
        budget = 2.0 * weights + activations
        print(f"taylor: {used:.0f} MB above the bare process; budget 2.0 x {weights:.0f} MB weights + "
              f"{activations:.0f} MB activations (frozen forward+backward at batch {args.batch_size}) = {budget:.0f} MB "
              f"-> {'OK' if used <= budget else 'OVER'} ({used / budget:.2f} of budget)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
