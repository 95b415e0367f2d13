"""How well a latency target is met: predicted against measured prefill of the final model.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/latency_target.py [--model DIR] [--seq 256] \
        [--fractions 0.8,0.6] [--runs width:magnitude,layer:last] [--json out.jsonl]

The model (default: the embedded demo model) is timed once (text prefill of ``--seq`` tokens,
batch 1, median of 5); each run then prunes it with ``--target latency=F x that time`` through the
``vlmprune prune`` command (data-free criteria by default, so no calibration set is needed: how
fast a plan runs depends on its shapes, not on which structures were chosen). The command builds
(or reads from the cache) the per-layer profile, plans on it, and times the final model; this
script prints the prediction, the measurement and the error from the plan it wrote.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory (default: the embedded demo model)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--fractions", default="0.8,0.6", help="targets as fractions of the model's prefill time")
    parser.add_argument("--runs", default="width:magnitude,layer:last", help="method:criterion, comma-separated")
    parser.add_argument("--json", type=Path, help="append one JSON row per run")
    args = parser.parse_args()

    import vlmprune
    from vlmprune.cli import main as cli
    from vlmprune.planning.targets import measure_prefill
    from vlmprune.record import RunRecord

    model_dir = args.model
    if model_dir is None:
        from vlmprune.demo.assemble import build_demo_model

        model_dir = str(build_demo_model())
    full = measure_prefill(vlmprune.load(model_dir), args.seq, 1, repeats=5)
    print(f"{model_dir}: prefill of {args.seq} tokens, batch 1: {1000 * full:.1f} ms (median of 5)")
    print("| method | criterion | target | required ms | predicted ms | measured ms | error | met |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for run in args.runs.split(","):
        method, criterion = run.split(":")
        for fraction in (float(f) for f in args.fractions.split(",")):
            goal_ms = 1000 * fraction * full
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "pruned"
                rc = cli(["prune", "--model", model_dir, "--method", method, "--criterion", criterion,
                          "--target", f"latency={goal_ms:.3f}ms,seq={args.seq}", "--output", str(out)])
                if rc != 0:
                    print(f"| {method} | {criterion} | {fraction:.0%} | {goal_ms:.1f} | failed (exit {rc}) | | | |")
                    continue
                t = RunRecord.load(out).prune.target
            row = {"method": method, "criterion": criterion, "fraction": fraction, "seq": args.seq,
                   "full_s": full, "required_s": t["required"], "predicted_s": t["predicted_s"],
                   "measured_s": t["measured_s"], "error": t["prediction_error"]}
            print(f"| {method} | {criterion} | {fraction:.0%} | {goal_ms:.1f} | {1000 * t['predicted_s']:.1f} | "
                  f"{1000 * t['measured_s']:.1f} | {t['prediction_error']:+.1%} | "
                  f"{'yes' if t['measured_s'] <= t['required'] else 'no'} |", flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
