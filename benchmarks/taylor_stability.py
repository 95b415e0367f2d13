"""Is widthwise Taylor importance stable on the demo teacher? One line of JSON per setting.

    .venv/bin/python benchmarks/taylor_stability.py answer:64:0 answer:128:0 text:128:0 answer:128:1 text:128:1

Each setting is TOKENS:NUM_SAMPLES:SEED. For each: draw the calibration samples from the demo
training data (batches of 8), compute the Taylor scores batch by batch, record every batch's loss,
the largest batch's share of the score mass and the effective number of batches behind the scores,
plan a widthwise cut (kv groups, --ratio of the parameters), apply it to a copy of the teacher and
evaluate it without recovery on fixed subsets of easy-VQA and digits. Plans are saved beside --out
so two settings can be compared structure by structure.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from vlmprune import calibrate
from vlmprune.adapters import get_adapter
from vlmprune.calibrate import calibration_batches
from vlmprune.checkpoint import load, load_processor
from vlmprune.config import parse_layer_range
from vlmprune.demo.assemble import build_demo_model
from vlmprune.demo.datasets import demo_data
from vlmprune.evaluate.tasks import evaluate
from vlmprune.importance import width as width_criteria
from vlmprune.planning.solve import ModelBudget, plan_width
from vlmprune.summary import layer_shapes
from vlmprune.surgery.apply import apply_plan_


def total(per_batch):
    out = copy.deepcopy(per_batch[0])
    for sums in per_batch[1:]:
        for o, s in zip(out, sums):
            for name in ("q_rows", "kv_rows", "o_cols", "mlp_rows", "mlp_cols"):
                getattr(o, name).add_(getattr(s, name))
    return out


def mass(sums) -> float:
    return sum(float(s.q_rows.sum() + s.kv_rows.sum() + s.o_cols.sum() + s.mlp_rows.sum() + s.mlp_cols.sum())
               for s in sums)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("settings", nargs="+", help="TOKENS:NUM_SAMPLES:SEED, e.g. text:128:0")
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--limit", type=int, default=200, help="questions per evaluation task")
    ap.add_argument("--out", default="benchmarks/results/taylor_stability.jsonl")
    args = ap.parse_args()
    teacher, paths = str(build_demo_model()), demo_data()
    model, processor = load(teacher), load_processor(teacher)
    adapter = get_adapter(model)
    shapes, budget = layer_shapes(model, adapter), ModelBudget.of(model, adapter)
    image_id = calibrate.image_token_id(model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for setting in args.settings:
        tokens, n, seed = setting.split(":")
        t0 = time.time()
        batches = list(calibration_batches(processor, str(paths["train"]), str(paths["root"]), int(n), int(seed), 8))
        losses, per_batch = [], []
        for batch in batches:
            with torch.no_grad():
                labels = calibrate._labels_for(batch, tokens, image_id)
                losses.append(float(calibrate._answer_loss(model, calibrate._model_inputs(batch, "cpu"), labels)))
            per_batch.append(calibrate.collect_taylor(model, [batch], tokens))
        masses = [mass(s) for s in per_batch]
        scores = width_criteria.taylor(total(per_batch), shapes)
        plan = plan_width(scores, shapes, budget, args.ratio, "groups", None, parse_layer_range(None, len(shapes)),
                          False)
        pruned = copy.deepcopy(model)
        apply_plan_(pruned, plan)
        result = evaluate(pruned, processor, tasks=["easyvqa", "digits"], data_dir=str(paths["root"]),
                          limit=args.limit, batch_size=50, max_new_tokens=6)
        row = {"tokens": tokens, "num_samples": int(n), "seed": int(seed), "ratio": args.ratio,
               "batch_losses": [round(x, 4) for x in losses],
               "largest_batch_share": round(max(masses) / sum(masses), 3),
               "effective_batches": round(calibrate.effective_batches(masses), 1),
               "accuracy": result["accuracy"], "tasks": {t: r["accuracy"] for t, r in result["tasks"].items()},
               "seconds": round(time.time() - t0)}
        (out.parent / f"taylor_plan_{tokens}_{n}_{seed}.json").write_text(json.dumps(plan.to_dict()))
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
