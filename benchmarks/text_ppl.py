"""Text perplexity of the demo language model after pruning (no recovery), per criterion and mode.

    PYTHONPATH=src .venv/bin/python benchmarks/text_ppl.py [--runs width] [--samples 32] \
        [--eval-windows 40] [--out benchmarks/results/text_ppl.jsonl]

Corpus: the docstrings of Python's own standard library (they ship with every interpreter, so the
benchmark needs nothing downloaded). Calibration and evaluation come from disjoint modules
(CALIBRATION_MODULES / EVAL_MODULES), so the evaluated text is held out from the scoring.
Calibration records are text-only LLaVA conversations (first half of a docstring as the question,
the rest as the answer) that go through the real `vlmprune prune` command and its chat template;
evaluation is plain next-token cross-entropy over consecutive 256-token windows of raw text.

Every prune is `vlmprune prune` in its own process: "prune s" is that command's wall time (load,
calibration, planning, plot, save) and "peak RSS" the process's own peak, from the cost record it
writes into run.json (os.wait4's ru_maxrss where there is none: the recorder resets the
kernel's peak counter per phase, which also resets what wait4 reports).
The ratio removes ~20% of the language model's non-embedding parameters (decoder layers), given
to --ratio as the equivalent fraction of the whole model. Rows go to a JSONL file; a row already
there is not run again (the script resumes), and the table is printed from all rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import EVAL_MODULES, demo_model, docstrings, run_vlmprune, write_calibration  # noqa: E402

WINDOW = 256
WIDTH_RUNS = [(c, a) for c in ("taylor", "activation", "wanda", "magnitude", "random")
              for a in ("groups", "heads", "none")]
LAYER_RUNS = [(c, None) for c in ("block_influence", "angular", "last")]


def eval_windows(tokenizer, n: int) -> list[torch.Tensor]:
    ids = tokenizer("\n\n".join(docstrings(EVAL_MODULES)))["input_ids"]
    windows = [torch.tensor(ids[i : i + WINDOW]) for i in range(0, len(ids) - WINDOW + 1, WINDOW)]
    if len(windows) < n:
        raise SystemExit(f"the evaluation text has only {len(windows)} windows of {WINDOW} tokens")
    return windows[:n]


@torch.no_grad()
def perplexity(model, windows: list[torch.Tensor]) -> float:
    nll, count = 0.0, 0
    for w in windows:
        logits = model(input_ids=w[None]).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
        count += len(w) - 1
    return math.exp(nll / count)


def run_prune(argv: list[str], log: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one `vlmprune prune` process."""
    return run_vlmprune(["prune", *argv], log)


def widths(model) -> str:
    from vlmprune.summary import layer_shapes

    shapes = layer_shapes(model)
    s = shapes[0]
    return f"{len(shapes)}L h{s.num_heads}/kv{s.num_kv_heads} mlp{s.intermediate_size}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="width", help="width, layer, all, or criterion:mode,... (e.g. taylor:heads)")
    parser.add_argument("--lm-fraction", type=float, default=0.2,
                        help="share of the LM's decoder-layer parameters to remove")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples (--num-samples)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=40, help=f"evaluation windows of {WINDOW} tokens")
    parser.add_argument("--seeds", default="0", help="seeds for the random criterion (one row each)")
    parser.add_argument("--compensate", default="none", help="none, ls or bias (vlmprune prune --compensate); "
                        "comma-separated for several")
    parser.add_argument("--sequential", action="store_true", help="with --compensate: --compensate-sequential")
    parser.add_argument("--ridge", type=float, default=None, help="with --compensate: --compensate-ridge")
    parser.add_argument("--model", default=None, help="a model directory instead of the demo model")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vlmprune-text-ppl"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "text_ppl.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    import transformers

    from vlmprune.checkpoint import load
    from vlmprune.planning.solve import ModelBudget
    from vlmprune.record import RunRecord

    args.workdir.mkdir(parents=True, exist_ok=True)
    demo = args.model or str(demo_model())
    calibration = args.workdir / "calibration.json"
    n_records = write_calibration(calibration)
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo)
    windows = eval_windows(tokenizer, args.eval_windows)

    dense = load(demo).eval()
    budget = ModelBudget.of(dense)
    decoder = sum(budget.layer_params)
    ratio = args.lm_fraction * decoder / budget.total
    weight_mib = sum(p.numel() * p.element_size() for p in dense.parameters()) / 2**20

    done = {}
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            row = json.loads(line)
            done[row_key(row)] = row
    if ("dense", None, None, None, "none") not in done:
        row = {"method": "dense", "criterion": None, "attention": None, "seed": None, "widths": widths(dense),
               "ppl": perplexity(dense, windows), "eval_tokens": len(windows) * WINDOW,
               "calibration_records": n_records, "weight_mib": weight_mib}
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[("dense", None, None, None, "none")] = row
    del dense

    runs = [("width", c, a) for c, a in WIDTH_RUNS] if args.runs in ("width", "all") else []
    runs += [("layer", c, a) for c, a in LAYER_RUNS] if args.runs in ("layer", "all") else []
    if not runs:  # criterion:mode items are width runs, a bare criterion is a layer run
        runs = [("width", *item.split(":")) if ":" in item else ("layer", item, None) for item in args.runs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    compensations = [c for c in args.compensate.split(",") if c]
    for method, criterion, attention in runs:
        for seed, compensate in [(s, c) for s in (seeds if criterion == "random" else [0]) for c in compensations]:
            comp = compensate if compensate == "none" else (
                compensate + ("+seq" if args.sequential else "") + (f"@{args.ridge:g}" if args.ridge else ""))
            key = (method, criterion, attention, seed, comp)
            if key in done:
                continue
            out_dir = args.workdir / f"{method}-{criterion}-{attention}-{seed}-{comp}"
            argv = ["--model", demo, "--method", method, "--criterion", criterion, "--ratio", f"{ratio:.6f}",
                    "--output", str(out_dir), "--overwrite", "--seed", str(seed)]
            # a compensated run re-plans from the plain run's scores (the same cut; only the fit is new)
            scored = args.workdir / f"{method}-{criterion}-{attention}-{seed}-none" / "scores.json"
            if compensate != "none" and scored.exists():
                argv += ["--scores", str(scored)]
            if criterion not in ("last", "magnitude", "random"):
                argv += ["--calibration", str(calibration), "--num-samples", str(args.samples),
                         "--max-length", str(args.max_length)]
            if attention:
                argv += ["--attention", attention]
            argv += ["--compensate", compensate]  # none is explicit: with --calibration the default fits
            if compensate != "none":
                if "--calibration" not in argv:
                    argv += ["--calibration", str(calibration), "--num-samples", str(args.samples),
                             "--max-length", str(args.max_length)]
                argv += [] if args.sequential else ["--no-compensate-sequential"]
                argv += ["--compensate-ridge", str(args.ridge)] if args.ridge else []
            seconds, peak, code = run_prune(argv, args.workdir / f"{out_dir.name}.log")
            if code != 0:
                print(f"{key}: vlmprune prune failed (exit {code}); see {args.workdir / (out_dir.name + '.log')}")
                continue
            model = load(out_dir).eval()
            plan = RunRecord.load(out_dir).prune
            peak = (plan.cost or {}).get("peak_rss_mib") or peak
            decoder_after = sum(sum(p.numel() for p in layer.parameters())
                                for layer in model.model.language_model.layers)
            row = {"method": method, "criterion": criterion, "attention": attention, "seed": seed, "compensate": comp,
                   "widths": widths(model), "removed_total": plan.achieved["ratio"],
                   "removed_decoder": 1 - decoder_after / decoder, "ppl": perplexity(model, windows),
                   "prune_s": seconds, "peak_rss_mib": peak, "peak_over_weights": peak / weight_mib}
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done[key] = row
            print(json.dumps(row), flush=True)
            del model
    print_table(list(done.values()))


def row_key(row: dict) -> tuple:
    return row["method"], row["criterion"], row["attention"], row["seed"], row.get("compensate", "none")


def closure(ppl_comp: float, ppl_plain: float, ppl_dense: float) -> float:
    """Log-gap closure C = 1 - ln(PPL_comp / PPL_dense) / ln(PPL_plain / PPL_dense) (same cut, same calibration)."""
    return 1 - math.log(ppl_comp / ppl_dense) / math.log(ppl_plain / ppl_dense)


def print_table(rows: list[dict]) -> None:
    dense = next(r for r in rows if r["method"] == "dense")
    plain = {row_key(r)[:4]: r for r in rows if r["method"] != "dense" and row_key(r)[4] == "none"}
    print(f"dense: {dense['widths']}, PPL {dense['ppl']:.2f} on {dense['eval_tokens']:,} tokens")
    print("| method | criterion | attention | compensate | widths | removed (decoder) | PPL | x dense | C | prune s "
          "| peak RSS MiB | / weights |")
    print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["method"] == "dense":
            continue
        name = r["criterion"] + (f" (seed {r['seed']})" if r["criterion"] == "random" else "")
        comp = r.get("compensate", "none")
        base = plain.get(row_key(r)[:4])
        c = "" if comp == "none" or base is None else f"{closure(r['ppl'], base['ppl'], dense['ppl']):.2f}"
        print(f"| {r['method']} | {name} | {r['attention'] or ''} | {comp} | {r['widths']} "
              f"| {r['removed_decoder']:.2%} | "
              f"{r['ppl']:.2f} | {r['ppl'] / dense['ppl']:.2f} | {c} | {r['prune_s']:.0f} | {r['peak_rss_mib']:.0f} | "
              f"{r['peak_over_weights']:.2f} |")


if __name__ == "__main__":
    main()
