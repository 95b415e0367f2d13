"""Models (default: the demo) in llama.cpp against PyTorch, per GGUF quant, each variant in its own process.

For each --models entry and each --quants entry: `vlmprune export --format gguf`, then the same easy-VQA
questions answered by llama.cpp (xllamacpp's chat API, greedy) and by the PyTorch model (vlmprune's
evaluator, greedy): exact-match accuracy, agreement of the answers with PyTorch's, bytes on disk, the
answering process's peak RSS, prompt (prefill) and decode tokens/s. Every variant runs in a fresh
process (its own peak RSS) with the same number of threads: PyTorch's speed is measured on one
question's prompt (the evaluator's `measure`: the whole prompt, vision included, then greedy decode with
the KV cache), llama.cpp's is its own timings summed over the answers. Results go to --output (JSON)
and a Markdown table on stdout (speed ratios against the model's PyTorch row).

    .venv/bin/python benchmarks/gguf_export.py --limit 100 --quants f16,q8_0,q4_0 --models demo,runs/pruned \
        [--pytorch fp32,bf16,int8]

Keep --limit small on a shared machine: on one (loaded) core, 100 questions took about a minute per
variant (PyTorch batched 16, llama.cpp one at a time), plus an export per quant.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from pathlib import Path


def _pytorch_row(model_dir: str, task_file: str, limit: int, threads: int, dtype: str = "float32") -> dict:
    """PyTorch's answers and speed; ``dtype`` float32 / bfloat16 loads in that dtype, int8 is a directory
    `vlmprune quantize --scheme int8` wrote (torchao weight-only, fp32 activations)."""
    import torch

    from vlmprune.checkpoint import load, load_processor
    from vlmprune.evaluate.efficiency import measure
    from vlmprune.evaluate.tasks import generate_answers, load_task, prompt_batch
    from vlmprune.measure import peak_rss_kib, rss_kib

    torch.set_num_threads(threads)
    items = load_task(task_file, limit=limit)
    before = rss_kib() / 1024  # the interpreter and torch, before the model
    net = load(model_dir, dtype=torch.bfloat16) if dtype == "bfloat16" else load(model_dir)
    processor = load_processor(model_dir)
    started = time.perf_counter()
    answers = generate_answers(net, processor, items, batch_size=16, max_new_tokens=10, desc="pytorch")
    seconds = time.perf_counter() - started
    inputs = dict(prompt_batch(processor, items[:1]))
    speed = measure(net, inputs, decode_tokens=16, repeats=3)
    prompt = int(inputs["input_ids"].shape[1])
    return {"answers": answers, "seconds": seconds, "peak_rss_mb": peak_rss_kib() / 1024, "rss_before_mb": before,
            "prompt_tok_s": prompt / speed["prefill_s"], "decode_tok_s": speed["decode_tokens_per_s"],
            "bytes": _weight_bytes(net) if dtype == "bfloat16"  # the checkpoint on disk is float32
            else sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))}


def _weight_bytes(net) -> int:
    """Bytes of the loaded model's distinct tensors (tied ones once)."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in net.state_dict().values()}
    return sum(seen.values())


def _llama_row(folder: str, task_file: str, limit: int, threads: int) -> dict:
    from vlmprune.evaluate.gguf import Throughput, answer_items
    from vlmprune.evaluate.tasks import load_task
    from vlmprune.export.runtime import LlamaCppModel
    from vlmprune.measure import peak_rss_kib, rss_kib

    items = load_task(task_file, limit=limit)
    before = rss_kib() / 1024
    runner = LlamaCppModel(folder, threads=threads)
    throughput = Throughput()
    started = time.perf_counter()
    answers = answer_items(runner, items, 10, throughput)
    return {"answers": answers, "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_kib() / 1024,
            "rss_before_mb": before,
            "prompt_tok_s": throughput.prompt_per_s, "decode_tok_s": throughput.decode_per_s}


def _in_process(fn, *args) -> dict:
    """``fn(*args)`` in a fresh process (spawned: its peak RSS is its own)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="demo", help="comma-separated model directories; 'demo' is the demo "
                                                          "model (built if missing)")
    parser.add_argument("--task-file", help="LLaVA-format test file (default: easy-VQA's test split)")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--quants", default="f16,q8_0,q4_0")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of PyTorch and llama.cpp alike (default: all cores but one)")
    parser.add_argument("--pytorch", default="fp32", help="PyTorch rows: fp32, bf16, int8 (`vlmprune quantize "
                                                          "--scheme int8`); ratios are against fp32")
    parser.add_argument("--output", default="benchmarks/results/gguf_export.json")
    args = parser.parse_args()

    from vlmprune.evaluate.tasks import load_task, normalize_answer, score
    from vlmprune.export import export_gguf

    threads = args.threads or max(1, len(os.sched_getaffinity(0)) - 1)
    task_file = args.task_file
    if task_file is None:
        from vlmprune.demo.datasets import demo_data

        task_file = str(Path(demo_data()["root"]) / "easyvqa" / "test.json")
    items = load_task(task_file, limit=args.limit)

    def summary(answers: list[str], reference: list[str]) -> dict:
        scored = score((p, it["answer"], it["type"]) for p, it in zip(answers, items))
        same = sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(answers, reference))
        return {"accuracy": scored["accuracy"], "correct": scored["correct"], "count": scored["count"],
                "agreement": same / len(reference) if reference else 0.0}

    rows = []
    for model_dir in args.models.split(","):
        if model_dir == "demo":
            from vlmprune.demo.assemble import build_demo_model

            model_dir = str(build_demo_model(None))
        name = Path(model_dir).name
        base = _in_process(_pytorch_row, model_dir, task_file, args.limit, threads)
        reference = base.pop("answers")
        rows.append({"model": name, "variant": "pytorch fp32", **base, **summary(reference, reference)})
        with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
            for kind in [k for k in args.pytorch.split(",") if k != "fp32"]:
                if kind == "int8":
                    from vlmprune.quantize import quantize_model_dir

                    source, _ = quantize_model_dir(model_dir, "int8", Path(tmp) / "int8")
                    row = _in_process(_pytorch_row, str(source), task_file, args.limit, threads, "int8")
                else:
                    row = _in_process(_pytorch_row, model_dir, task_file, args.limit, threads, "bfloat16")
                answers = row.pop("answers")
                rows.append({"model": name, "variant": f"pytorch {kind}", **row, **summary(answers, reference),
                             "prompt_x": row["prompt_tok_s"] / base["prompt_tok_s"],
                             "decode_x": row["decode_tok_s"] / base["decode_tok_s"]})
            for quant in args.quants.split(","):
                out = Path(tmp) / quant
                record = export_gguf(model_dir, out, quant=quant)
                row = _in_process(_llama_row, str(out), task_file, args.limit, threads)
                answers = row.pop("answers")
                mmproj = record.get("mmproj", {})
                rows.append({"model": name, "variant": f"llama.cpp {quant}", **row, **summary(answers, reference),
                             "bytes": record["text"]["bytes"] + mmproj.get("bytes", 0),
                             "text_bytes": record["text"]["bytes"], "arch": record["text"]["arch"],
                             "fallbacks": len(record["text"]["fallbacks"]),
                             "image_tokens": mmproj.get("image_tokens"),
                             "image_tokens_in_model": mmproj.get("image_tokens_in_model"),
                             "prompt_x": row["prompt_tok_s"] / base["prompt_tok_s"],
                             "decode_x": row["decode_tok_s"] / base["decode_tok_s"]})
        _write(args, task_file, threads, rows)
    print(f"threads: {threads}, {args.limit} questions of {task_file}")
    print("| model | variant | accuracy | agrees with PyTorch | MB on disk | peak RSS MB | prompt tok/s (x PyTorch) "
          "| decode tok/s (x PyTorch) | s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = {k: f" ({r[k]:.1f}x)" if k in r else "" for k in ("prompt_x", "decode_x")}
        print(f"| {r['model']} | {r['variant']} | {r['accuracy']:.1%} | {r['agreement']:.1%} | "
              f"{r['bytes'] / 2**20:.1f} | {r['peak_rss_mb']:.0f} | {r['prompt_tok_s']:.0f}{ratio['prompt_x']} | "
              f"{r['decode_tok_s']:.1f}{ratio['decode_x']} | {r['seconds']:.1f} |")


def _write(args, task_file: str, threads: int, rows: list[dict]) -> None:
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"models": args.models, "task_file": task_file, "limit": args.limit,
                               "threads": threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
