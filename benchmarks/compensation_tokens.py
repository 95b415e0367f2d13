"""Which calibration tokens the compensation fits should count, measured on the demo's image tasks.

    PYTHONPATH=src .venv/bin/python benchmarks/compensation_tokens.py [--tokens all,text,answer,image] \
        [--method layer] [--ratio 0.3] [--limit 300] [--out benchmarks/results/compensation_tokens.jsonl]

The study's protocol (configs/study/compensate.yaml: 128 calibration samples of the demo's training data,
seed 0, batch 8; block influence for layers, Taylor kv groups for width), cut once, then for each token
kind a copy of the model is compensated (`compensate_(..., tokens=KIND)`, sequential, `ls`) on statistics
of only those positions, cut, saved and evaluated (easy-VQA's first ``--limit`` test questions and the
360 digits questions, exact match). `all` is what `vlmprune prune --compensate ls` does.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import demo_model  # noqa: E402

import vlmprune  # noqa: E402
from vlmprune.calibrate import calibration_batches  # noqa: E402
from vlmprune.checkpoint import load_processor, save_model  # noqa: E402
from vlmprune.evaluate.run import evaluate_model_dir  # noqa: E402
from vlmprune.prune.run import score_and_plan  # noqa: E402
from vlmprune.surgery.apply import apply_plan_  # noqa: E402
from vlmprune.surgery.compensate import compensate_  # noqa: E402

DATA = Path.home() / ".cache/vlmprune/data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="all,text,answer,image")
    parser.add_argument("--method", default="layer")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--limit", type=int, default=300, help="easy-VQA questions (digits: all 360)")
    parser.add_argument("--out", default="benchmarks/results/compensation_tokens.jsonl")
    args = parser.parse_args()
    demo = demo_model()
    model = vlmprune.load(demo)
    processor = load_processor(str(demo))
    batches = calibration_batches(processor, DATA / "train.json", DATA, 128, 0, 8)
    criterion = "block_influence" if args.method == "layer" else "taylor"
    plan, _ = score_and_plan(model, args.method, args.ratio, criterion, batches)
    for kind in args.tokens.split(","):
        t0 = time.perf_counter()
        net, cut = copy.deepcopy(model), copy.deepcopy(plan)
        record = compensate_(net, cut, batches, "ls", sequential=True, tokens=kind)
        apply_plan_(net, cut)
        fit_s = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            save_model(net, Path(tmp) / "m", cut, source=demo)
            scores = {}
            for task, limit in (("easyvqa", args.limit), ("digits", None)):
                result = evaluate_model_dir(model=str(Path(tmp) / "m"), tasks=task, limit=limit, batch_size=64,
                                            data_dir=str(DATA))
                scores[task] = result["tasks"][task]["accuracy"]
        runs = record.get("dropped_runs", [])
        row = {"method": args.method, "criterion": criterion, "ratio": args.ratio, "tokens": kind,
               "calibration_tokens": record["calibration_tokens"], "limit": args.limit, **scores,
               "runs": [{k: r.get(k) for k in ("layers", "error_before", "error_after")} for r in runs],
               "fit_s": fit_s}
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
