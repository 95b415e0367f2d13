"""The demo model (or any LLaVA-style model directory) in llama.cpp against PyTorch, per GGUF quant.

For each --quants entry: `vlmprune export --format gguf`, then the same easy-VQA questions answered by
llama.cpp (xllamacpp's chat API, greedy) and by the PyTorch model (vlmprune's evaluator, greedy):
exact-match accuracy, agreement of the answers with PyTorch's, bytes on disk, llama.cpp's prompt and
decode tokens/s (its own timings). Results go to --output (JSON) and a Markdown table on stdout.

    .venv/bin/python benchmarks/gguf_export.py --limit 100 --quants f16,q8_0,q4_0

Keep --limit small on a shared machine: PyTorch answers ~5 questions/s on 2 cores, llama.cpp ~20.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory (default: the demo model, built if missing)")
    parser.add_argument("--task-file", help="LLaVA-format test file (default: easy-VQA's test split)")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--quants", default="f16,q8_0,q4_0")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all cores but one)")
    parser.add_argument("--output", default="benchmarks/results/gguf_export.json")
    args = parser.parse_args()

    from vlmprune.checkpoint import load, load_processor
    from vlmprune.evaluate.gguf import Throughput, answer_items
    from vlmprune.evaluate.tasks import generate_answers, load_task, score
    from vlmprune.export import export_gguf
    from vlmprune.export.runtime import LlamaCppModel

    model_dir = args.model
    if model_dir is None:
        from vlmprune.demo.assemble import build_demo_model

        model_dir = str(build_demo_model(None))
    task_file = args.task_file
    if task_file is None:
        from vlmprune.demo.datasets import demo_data

        task_file = str(Path(demo_data()["root"]) / "easyvqa" / "test.json")
    items = load_task(task_file, limit=args.limit)

    net, processor = load(model_dir), load_processor(model_dir)
    started = time.perf_counter()
    reference = generate_answers(net, processor, items, batch_size=16, max_new_tokens=10, desc="pytorch")
    rows = [{"variant": "pytorch fp32", "seconds": time.perf_counter() - started,
             **_summary(score((p, it["answer"], it["type"]) for p, it in zip(reference, items)), reference, reference),
             "bytes": sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))}]
    del net

    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
        for quant in args.quants.split(","):
            out = Path(tmp) / quant
            record = export_gguf(model_dir, out, quant=quant)
            runner = LlamaCppModel(out, threads=args.threads)
            throughput = Throughput()
            started = time.perf_counter()
            answers = answer_items(runner, items, 10, throughput)
            seconds = time.perf_counter() - started
            del runner
            rows.append({"variant": f"llama.cpp {quant}", "seconds": seconds,
                         **_summary(score((p, it["answer"], it["type"]) for p, it in zip(answers, items)), answers,
                                    reference),
                         "bytes": record["text"]["bytes"] + record.get("mmproj", {}).get("bytes", 0),
                         "text_bytes": record["text"]["bytes"], "fallbacks": len(record["text"]["fallbacks"]),
                         "prompt_tok_s": throughput.prompt_per_s, "decode_tok_s": throughput.decode_per_s,
                         "image_tokens": record.get("mmproj", {}).get("image_tokens"),
                         "image_tokens_in_model": record.get("mmproj", {}).get("image_tokens_in_model")})
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model_dir, "task_file": task_file, "limit": args.limit, "rows": rows},
                              indent=1))
    print("| variant | accuracy | agrees with PyTorch | MB on disk | prompt tok/s | decode tok/s | s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        speed = [f"{r[k]:.0f}" if r.get(k) else "" for k in ("prompt_tok_s", "decode_tok_s")]
        print(f"| {r['variant']} | {r['accuracy']:.1%} | {r['agreement']:.1%} | {r['bytes'] / 2**20:.1f} | "
              f"{speed[0]} | {speed[1]} | {r['seconds']:.1f} |")



def _summary(scored: dict, answers: list[str], reference: list[str]) -> dict:
    from vlmprune.evaluate.tasks import normalize_answer

    same = sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(answers, reference))
    return {"accuracy": scored["accuracy"], "correct": scored["correct"], "count": scored["count"],
            "agreement": same / len(reference) if reference else 0.0}


if __name__ == "__main__":
    main()
