"""Quantized demo model: accuracy, bytes on disk, peak RSS, prefill latency and decode speed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quantize.py --limit 100

Writes one quantized checkpoint per scheme with `vlmprune.quantize.quantize_model_dir` (a scheme
this machine cannot run is recorded with its refusal), then measures every variant in its own
subprocess so that peak RSS belongs to that model alone: accuracy on the same seeded subsets of
easy-VQA and digits (`vlmprune.evaluate` machinery), weight bytes (disk, language model in memory),
RSS after loading, peak RSS of the whole process (load + evaluation + timing), and prefill latency /
decode tokens per second on one prompt (batch 1, `vlmprune.evaluate.efficiency.measure`). One JSON
line per variant goes to --out; a Markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# a variant is a scheme, optionally loaded in another dtype first ("@bf16": everything the scheme
# keeps -- vision tower, projector, embeddings, lm_head, norms -- is stored in bfloat16, the dtype
# edge deployments run in); "fp32" and "bf16" are the unquantized model
VARIANTS = ["fp32", "bf16", "int8", "int8@bf16", "int8-dynamic", "nf4", "int4"]
DTYPES = {"fp32": None, "bf16": "bfloat16"}


def split_variant(variant: str) -> tuple[str | None, str | None]:
    """'int8@bf16' -> ('int8', 'bfloat16'); 'bf16' -> (None, 'bfloat16'); 'int8' -> ('int8', None)."""
    if variant in DTYPES:
        return None, DTYPES[variant]
    scheme, _, dtype = variant.partition("@")
    if dtype and dtype not in DTYPES:
        raise SystemExit(f"variant {variant!r}: the dtype after @ must be one of {', '.join(DTYPES)}")
    return scheme, DTYPES.get(dtype)


def rss_mb(key: str) -> float:
    """VmRSS or VmHWM of this process in MB, from vlmprune's one /proc reader."""
    from vlmprune.measure import status_kib

    return status_kib(key).get(key, float("nan")) / 1024


def measure_one(model_dir: str, variant: str, limit: int, batch_size: int, decode_tokens: int, repeats: int) -> dict:
    """Everything about one checkpoint, in this (fresh) process."""
    import torch

    from vlmprune.checkpoint import load, load_processor
    from vlmprune.demo.datasets import demo_data
    from vlmprune.evaluate.efficiency import disk_bytes, measure, weight_bytes_by_part
    from vlmprune.evaluate.tasks import evaluate, load_task, prompt_batch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    paths = demo_data()
    rss_start = rss_mb("VmRSS")
    t0 = time.perf_counter()
    model, processor = load(model_dir), load_processor(model_dir)  # as stored: its dtype, its quantization
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb("VmRSS")
    t0 = time.perf_counter()
    result = {"accuracy": None, "tasks": {}}
    if limit:  # --limit 0: timing only (a back-to-back speed comparison without the long evaluation)
        result = evaluate(model, processor, tasks=["easyvqa", "digits"], data_dir=str(paths["root"]), limit=limit,
                          batch_size=batch_size, max_new_tokens=6)
    eval_s = time.perf_counter() - t0
    inputs = dict(prompt_batch(processor, load_task(paths["easyvqa"], limit=1)))
    speed = measure(model, inputs, decode_tokens=decode_tokens, repeats=repeats)
    # CPU seconds of this single-threaded process: comparable between variants even while other
    # jobs load the machine (wall time above is not, then)
    cpu = measure(model, inputs, decode_tokens=decode_tokens, repeats=repeats, clock=time.process_time)
    speed["cpu_prefill_s"], speed["cpu_decode_tokens_per_s"] = cpu["prefill_s"], cpu["decode_tokens_per_s"]
    return {
        "variant": variant,
        "accuracy": result["accuracy"],
        "per_task": {name: r["accuracy"] for name, r in result["tasks"].items()},
        "questions": {name: r["count"] for name, r in result["tasks"].items()},
        "disk_bytes": disk_bytes(model),
        "weight_bytes": weight_bytes_by_part(model),
        "rss_before_load_mb": rss_start,
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": rss_mb("VmHWM"),
        "load_s": load_s,
        "eval_s": eval_s,
        "prompt_tokens": int(inputs["input_ids"].shape[1]),
        **speed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="schemes of `vlmprune quantize`, SCHEME@bf16 to quantize the model loaded in bfloat16, "
                         "fp32/bf16 for the unquantized model")
    ap.add_argument("--limit", type=int, default=100, help="questions per task (seeded subset); 0: timing only")
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", default="/tmp/vlmprune-quantize-bench", help="where the quantized checkpoints go")
    ap.add_argument("--out", default="benchmarks/results/quantize.jsonl")
    ap.add_argument("--plan", help="also measure the demo model pruned by this pruning_plan.json, with every scheme")
    ap.add_argument("--plan-name", default="pruned", help="the pruned model's name in the table")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                    help="also measure this checkpoint (e.g. a pruned and recovered one), with every variant; "
                         "repeatable")
    ap.add_argument("--only-plan", action="store_true",
                    help="skip the unpruned model (rows already measured); measure only --plan / --model")
    ap.add_argument("--table", action="store_true", help="only print the table of the rows already in --out")
    ap.add_argument("--one", nargs=2, metavar=("MODEL_DIR", "SCHEME"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:  # the child: measure one checkpoint and print its JSON line
        print("RESULT " + json.dumps(measure_one(args.one[0], args.one[1], args.limit, args.batch_size,
                                                 args.decode_tokens, args.repeats)), flush=True)
        return

    if args.table:
        print(table([json.loads(line) for line in Path(args.out).read_text().splitlines() if line.strip()]))
        return

    from vlmprune.demo.assemble import build_demo_model
    from vlmprune.demo.datasets import demo_data
    from vlmprune.errors import VlmpruneError
    from vlmprune.quantize import quantize_model_dir

    teacher = str(build_demo_model())
    demo_data()  # written once, before the children read it
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bases = [] if args.only_plan else [("original", teacher)]
    if args.plan:
        from vlmprune.prune.run import prune

        pruned = Path(args.work) / args.plan_name
        if not (pruned / "pruning_plan.json").exists():
            prune(model=teacher, plan=args.plan, output=str(pruned), overwrite=True)
        bases.append((args.plan_name, str(pruned)))
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not (Path(path) / "config.json").is_file():
            raise SystemExit(f"--model {spec!r}: expected NAME=DIR of a saved model")
        bases.append((name, path))
    variants = args.variants.split(",")
    for variant in variants:
        split_variant(variant)
    rows = []
    for (name, source), variant in [(b, v) for b in bases for v in variants]:
        row = {"model": name, "variant": variant}
        model_dir = source
        scheme, dtype = split_variant(variant)
        if scheme is None and dtype is not None:  # the float model stored in another dtype
            import torch

            from vlmprune.checkpoint import load, save_model
            from vlmprune.planning.plan import PLAN_FILE, PruningPlan
            from vlmprune.record import RunRecord

            model_dir = Path(args.work) / f"{name}-{variant}"
            plan = PruningPlan.load(Path(source) / PLAN_FILE) if (Path(source) / PLAN_FILE).exists() else None
            save_model(load(source, dtype=getattr(torch, dtype)), model_dir, plan=plan, source=source, overwrite=True,
                       extras=RunRecord.load(source, missing_ok=True).save)
        elif scheme is not None:
            t0 = time.perf_counter()
            try:
                model_dir, record = quantize_model_dir(source, scheme, Path(args.work) / f"{name}-{variant}",
                                                       overwrite=True, dtype=dtype)
            except VlmpruneError as exc:
                row["refused"] = str(exc)
                print(f"{variant}: refused: {exc}", flush=True)
                rows.append(row)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                continue
            row["quantize_s"] = time.perf_counter() - t0
            row["record"] = record
        cmd = [sys.executable, __file__, "--one", str(model_dir), variant, "--limit", str(args.limit),
               "--batch-size", str(args.batch_size), "--decode-tokens", str(args.decode_tokens),
               "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            row["failed"] = proc.stderr[-2000:]
            print(f"{variant}: failed\n{proc.stderr[-2000:]}", flush=True)
        else:
            row.update({k: v for k, v in json.loads(lines[-1][len("RESULT "):]).items() if k != "variant"})
            print(f"{variant}: {json.dumps(row)}", flush=True)
        rows.append(row)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    print(table(rows))


def table(rows: list[dict]) -> str:
    """Markdown: one line per row; ratios against the fp32 row of the same model."""
    fp32 = {r.get("model", "original"): r for r in rows if r["variant"] == "fp32" and "disk_bytes" in r}
    head = ("| model | variant | easy-VQA | digits | mean | vs fp32 | disk MB | LM weights MB | LM vs fp32 "
            "| RSS after load MB | peak RSS MB | prefill ms | decode tok/s | CPU prefill ms | CPU decode tok/s |")
    lines = [head, "|---|---|" + "---:|" * 13]
    for r in rows:
        model = r.get("model", "original")
        base = fp32.get(model)
        if "disk_bytes" not in r:
            lines.append(f"| {model} | {r['variant']} | {'refused' if 'refused' in r else 'failed'} |" + " |" * 12)
            continue
        lm = r["weight_bytes"]["language_model"]
        lm_vs_fp32 = f"{lm / base['weight_bytes']['language_model']:.2f}x" if base else ""
        pct = lambda v: "" if v is None else f"{v:.1%}"  # noqa: E731
        retention = pct(r["accuracy"] / base["accuracy"]) if base and r["accuracy"] is not None else ""
        cpu_prefill = f"{1000 * r['cpu_prefill_s']:.1f}" if "cpu_prefill_s" in r else ""
        cpu_decode = f"{r['cpu_decode_tokens_per_s']:.1f}" if "cpu_decode_tokens_per_s" in r else ""
        lines.append(
            f"| {model} | {r['variant']} | {pct(r['per_task'].get('easyvqa'))} | {pct(r['per_task'].get('digits'))} "
            f"| {pct(r['accuracy'])} "
            f"| {retention} | {r['disk_bytes'] / 2**20:,.1f} "
            f"| {lm / 2**20:,.1f} | {lm_vs_fp32} "
            f"| {r['rss_after_load_mb']:,.0f} | {r['peak_rss_mb']:,.0f} | {1000 * r['prefill_s']:.1f} "
            f"| {r['decode_tokens_per_s']:.1f} | {cpu_prefill} | {cpu_decode} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
