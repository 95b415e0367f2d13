"""Compensation's gap closure on text: the same cut with and without `--compensate`, in one process.

    PYTHONPATH=src .venv/bin/python benchmarks/compensation.py [--model DIR] [--fractions 0.2,0.5] \
        [--runs taylor:groups,wanda:heads,block_influence,...] [--variants none,ls,ls+seq,ls+seq@0.1] \
        [--compensate-samples 106] [--out benchmarks/results/compensation.jsonl]

Each criterion scores the model once (on the `text_ppl.py` calibration records: docstrings of Python's
standard library, text-only LLaVA conversations through the model's chat template); each fraction is
planned from those scores (`plan_for`, as `vlmprune prune --scores` does); each variant compensates a copy
of the model (`compensate_`, the code behind `vlmprune prune --compensate`) on the same calibration
batches (or on a seeded draw of `--compensate-samples` records, same plan: those rows' variants end in `/rN`)
and cuts it (`apply_plan_`). Perplexity is `text_ppl.py`'s: held-out docstrings, 256-token
windows. The log-gap closure of a variant is C = 1 - ln(PPL_comp / PPL_dense) / ln(PPL_plain / PPL_dense)
(same kept structures, same calibration). Rows go to a JSONL file (a row already there is not rerun).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import demo_model, write_calibration  # noqa: E402
from text_ppl import closure, eval_windows, perplexity  # noqa: E402

LAYER_CRITERIA = ("block_influence", "angular", "last")


def variant_options(name: str) -> dict | None:
    """none | ls | ls+seq | ls+seq+sel | ls+scale | ls+mapscale | bias | ...@RIDGE ->
    compensate_ keyword options (None: the plain cut). seq: --compensate-sequential, sel: --compensate-select,
    scale / mapscale: --compensate-layers scale / map+scale."""
    if name == "none":
        return None
    mode, _, ridge = name.partition("@")
    base, *flags = mode.split("+")
    options = {"mode": base, "sequential": "seq" in flags, "select": "sel" in flags}
    if "scale" in flags:
        options["layers_fit"] = "scale"
    elif "mapscale" in flags:
        options["layers_fit"] = "map+scale"
    if ridge:
        options["ridge"] = float(ridge)
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the demo model)")
    parser.add_argument("--runs", default="taylor:groups,taylor:heads,wanda:groups,wanda:heads,activation:groups,"
                        "activation:heads,taylor:none,wanda:none,activation:none,block_influence,angular")
    parser.add_argument("--fractions", default="0.2", help="shares of the decoder layers' parameters to remove")
    parser.add_argument("--variants", default="none,ls,ls+seq")
    parser.add_argument("--samples", type=int, default=32, help="calibration records the criteria score on")
    parser.add_argument("--compensate-samples", type=int, default=None,
                        help="calibration records the compensation fits on (default: --samples; the corpus has 106)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=40)
    parser.add_argument("--label", default="", help="a name for these rows (e.g. the model)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vlmprune-compensation"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compensation.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    import transformers

    from vlmprune import calibrate
    from vlmprune.checkpoint import load, load_processor
    from vlmprune.planning.solve import ModelBudget, plan_for
    from vlmprune.prune.run import score
    from vlmprune.surgery.apply import apply_plan_
    from vlmprune.surgery.compensate import compensate_

    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or str(demo_model())
    label = args.label or Path(model_dir).name
    calibration = args.workdir / "calibration.json"
    write_calibration(calibration)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    windows = eval_windows(tokenizer, args.eval_windows)
    model = load(model_dir, dtype="float32").eval()
    batches = calibrate.calibration_batches(load_processor(model_dir), str(calibration), None, args.samples, 0, 1,
                                            args.max_length)
    fit_batches = batches
    if args.compensate_samples and args.compensate_samples != args.samples:
        fit_batches = calibrate.calibration_batches(load_processor(model_dir), str(calibration), None,
                                                    args.compensate_samples, 0, 1, args.max_length)
    budget = ModelBudget.of(model)
    decoder = sum(budget.layer_params)

    done = {}
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            row = json.loads(line)
            done[(row["label"], row["criterion"], row["attention"], row["fraction"], row["variant"])] = row

    def record(row: dict) -> None:
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[(row["label"], row["criterion"], row["attention"], row["fraction"], row["variant"])] = row
        print(json.dumps(row), flush=True)

    if (label, None, None, 0.0, "dense") not in done:
        record({"label": label, "criterion": None, "attention": None, "fraction": 0.0, "variant": "dense",
                "ppl": perplexity(model, windows)})
    dense = done[(label, None, None, 0.0, "dense")]["ppl"]
    fractions = [float(f) for f in args.fractions.split(",")]
    suffix = "" if fit_batches is batches else f"/r{args.compensate_samples}"  # rows fitted on other records
    variants = [v if v == "none" else v + suffix for v in args.variants.split(",")]
    for run in args.runs.split(","):
        criterion, _, attention = run.partition(":")
        method = "layer" if criterion in LAYER_CRITERIA else "width"
        todo = [(f, v) for f in fractions for v in variants
                if (label, criterion, attention or None, f, v) not in done]
        if not todo:
            continue
        t0 = time.perf_counter()
        scores = score(model, method, criterion, batches)
        score_s = time.perf_counter() - t0
        for fraction, variant in todo:
            # a fresh plan per variant: --compensate-select rewrites the one it is given
            plan = plan_for(model, scores, fraction * decoder / budget.total, attention or "groups")
            pruned = copy.deepcopy(model)
            options = variant_options(variant.split("/")[0])
            t0 = time.perf_counter()
            comp = None if options is None else compensate_(pruned, plan, fit_batches, options.pop("mode"), **options)
            comp_s = time.perf_counter() - t0
            apply_plan_(pruned, plan)
            ppl = perplexity(pruned, windows)
            del pruned
            row = {"label": label, "criterion": criterion, "attention": attention or None, "fraction": fraction,
                   "variant": variant, "ppl": ppl, "dense_ppl": dense, "removed_total": plan.extra["achieved"]["ratio"],
                   "drop_layers": plan.drop_layers, "score_s": score_s, "compensate_s": comp_s,
                   "calibration_tokens": None if comp is None else comp["calibration_tokens"]}
            plain = done.get((label, criterion, attention or None, fraction, "none"))
            if options is not None and plain is not None:
                row["closure"] = closure(ppl, plain["ppl"], dense)
            record(row)
    print_table([r for r in done.values() if r["label"] == label])


def print_table(rows: list[dict]) -> None:
    dense = next(r["ppl"] for r in rows if r["variant"] == "dense")
    print(f"\ndense PPL {dense:.2f}")
    print("| criterion | attention | removed (decoder) | variant | PPL | x dense | C |")
    print("|---|---|---:|---|---:|---:|---:|")
    for r in rows:
        if r["variant"] == "dense":
            continue
        c = "" if r.get("closure") is None else f"{r['closure']:.2f}"
        print(f"| {r['criterion']} | {r['attention'] or ''} | {r['fraction']:.0%} | {r['variant']} | {r['ppl']:.2f} | "
              f"{r['ppl'] / dense:.2f} | {c} |")


if __name__ == "__main__":
    main()
