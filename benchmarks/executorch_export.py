"""The demo model (or any LLaVA-style model directory) as an ExecuTorch program against PyTorch, per variant.

For each --variants entry (dtype:quant, e.g. float32:none, float32:int8): `vlmprune export --format
executorch` (export and lowering time, .pte bytes), then the same easy-VQA questions answered by the program
(ExecuTorch's Python runtime, XNNPACK, greedy, one question at a time) and by the PyTorch model (vlmprune's
evaluator, greedy, batched): exact-match accuracy, agreement with PyTorch's answers, prefill and decode
tokens/s of both (PyTorch measured one question at a time too, on a subset), and the peak RSS of each run
(a fresh process per variant, so the peaks do not mix). Results go to --output (JSON) and a Markdown table
on stdout.

    nice -n 10 .venv/bin/python benchmarks/executorch_export.py --limit 100 --variants float32:none,float32:int8 \
        [--gguf q8_0]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pytorch_row(model_dir: str, items: list[dict], speed_items: int) -> dict:
    """PyTorch's answers (batched, as `vlmprune evaluate`) and its prefill / decode speed one question at a time."""
    import torch
    from PIL import Image

    from vlmprune.checkpoint import load, load_processor
    from vlmprune.data.collate import chat_inputs
    from vlmprune.evaluate.tasks import generate_answers, score

    net, processor = load(model_dir, dtype=torch.float32), load_processor(model_dir)
    started = time.perf_counter()
    answers = generate_answers(net, processor, items, batch_size=16, max_new_tokens=10, desc="pytorch")
    seconds = time.perf_counter() - started
    prompt_n = prompt_s = decode_n = decode_s = 0.0
    for it in items[:speed_items]:
        inputs = chat_inputs(processor, [([Image.open(it["image"]).convert("RGB")], it["question"])])
        with torch.no_grad():
            t = time.perf_counter()
            net(**inputs)
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            out = net.generate(**inputs, max_new_tokens=10, do_sample=False)
            total = time.perf_counter() - t
        prompt_s += prefill
        prompt_n += inputs["input_ids"].shape[1]
        # decode: generate's time less its prefill (the first new token comes from the prefill)
        decode_s += max(total - prefill, 0.0)
        decode_n += max(out.shape[1] - inputs["input_ids"].shape[1] - 1, 0)
    scored = score((p, it["answer"], it["type"]) for p, it in zip(answers, items))
    return {"variant": "PyTorch float32", "answers": answers, "accuracy": scored["accuracy"], "seconds": seconds,
            "bytes": sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")),
            "prompt_tok_s": prompt_n / prompt_s if prompt_s else None,
            "decode_tok_s": decode_n / decode_s if decode_s else None, "peak_rss_mb": _peak_rss_mb()}


def pte_row(model_dir: str, items: list[dict], dtype: str, quant: str, folder: Path, threads: int | None) -> dict:
    from vlmprune.evaluate.gguf import Throughput, answer_items
    from vlmprune.evaluate.tasks import score
    from vlmprune.export import export_executorch
    from vlmprune.export.pte_runtime import PteModel

    started = time.perf_counter()
    record = export_executorch(model_dir, folder, dtype=dtype, quant=quant)
    export_s = time.perf_counter() - started
    export_rss = _peak_rss_mb()
    runner = PteModel(folder, threads=threads)
    throughput = Throughput()
    started = time.perf_counter()
    answers = answer_items(runner, items, 10, throughput)
    seconds = time.perf_counter() - started
    scored = score((p, it["answer"], it["type"]) for p, it in zip(answers, items))
    runner_check = multimodal_runner_agreement(folder, runner, items[:10], answers[:10])
    timings = record["timings_s"]
    return {"variant": f"ExecuTorch {dtype} {quant}", "answers": answers, "accuracy": scored["accuracy"],
            "seconds": seconds, "bytes": record["bytes"], "export_s": export_s,
            "torch_export_s": sum(v for k, v in timings.items() if k.startswith("export")),
            "lowering_s": timings.get("lower to XNNPACK"), "check": record["check"],
            "quantization": record["quantization"], "prompt_tok_s": throughput.prompt_per_s,
            "decode_tok_s": throughput.decode_per_s, "export_peak_rss_mb": export_rss, "runner": runner_check,
            "peak_rss_mb": _peak_rss_mb()}


def gguf_row(model_dir: str, items: list[dict], quant: str, folder: Path, threads: int | None) -> dict:
    """The same questions through llama.cpp (`vlmprune export --format gguf --quant QUANT`), for a ratio
    between the two edge runtimes within one run."""
    from vlmprune.evaluate.gguf import Throughput, answer_items
    from vlmprune.evaluate.tasks import score
    from vlmprune.export import export_gguf
    from vlmprune.export.runtime import LlamaCppModel

    record = export_gguf(model_dir, folder, quant=quant)
    runner = LlamaCppModel(folder, threads=threads)
    throughput = Throughput()
    started = time.perf_counter()
    answers = answer_items(runner, items, 10, throughput)
    scored = score((p, it["answer"], it["type"]) for p, it in zip(answers, items))
    return {"variant": f"llama.cpp {quant}", "answers": answers, "accuracy": scored["accuracy"],
            "seconds": time.perf_counter() - started,
            "bytes": record["text"]["bytes"] + record.get("mmproj", {}).get("bytes", 0),
            "prompt_tok_s": throughput.prompt_per_s, "decode_tok_s": throughput.decode_per_s,
            "peak_rss_mb": _peak_rss_mb()}


def multimodal_runner_agreement(folder: Path, runner, items: list[dict], answers: list[str]) -> dict:
    """ExecuTorch's own C++ MultimodalRunner (greedy) on the same .pte: do its answers equal the Python loop's?"""
    from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner
    from PIL import Image

    from vlmprune.export.pte_runtime import prompt_inputs

    try:
        mm = MultimodalRunner(str(folder / "model.pte"), str(folder / "tokenizer.json"))
        tokenizer = runner.processor.tokenizer
        texts = []
        for it in items:
            inputs = prompt_inputs(runner.processor, Image.open(it["image"]).convert("RGB"), it["question"])
            mm.reset()
            text = mm.generate_text_hf(inputs, GenerationConfig(max_new_tokens=10, temperature=0.0, echo=False),
                                       runner.image_token_id)
            texts.append(text.replace(tokenizer.eos_token or "\0", "").strip())
        same = sum(a == b for a, b in zip(texts, answers))
        return {"questions": len(items), "identical": same, "runner_answers": texts}
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal: the Python loop is what the table measures
        return {"error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory (default: the demo model, built if missing)")
    parser.add_argument("--task-file", help="LLaVA-format test file (default: easy-VQA's test split)")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--speed-items", type=int, default=20, help="questions PyTorch's speed is measured on")
    parser.add_argument("--variants", default="float32:none,float32:int8")
    parser.add_argument("--gguf", default="", help="llama.cpp rows in the same run, e.g. q8_0 (GGUF quants)")
    parser.add_argument("--threads", type=int, default=None, help="XNNPACK threads (default: ExecuTorch's)")
    parser.add_argument("--output", default="benchmarks/results/executorch_export.json")
    parser.add_argument("--rows-dir", help="keep each variant's row here (JSON) and reuse the rows already there")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one row in this process, JSON to this file
    args = parser.parse_args()

    from vlmprune.evaluate.tasks import load_task, normalize_answer

    model_dir = args.model
    if model_dir is None:
        from vlmprune.demo.assemble import build_demo_model

        model_dir = str(build_demo_model(None))
    task_file = args.task_file
    if task_file is None:
        from vlmprune.demo.datasets import demo_data

        task_file = str(Path(demo_data()["root"]) / "easyvqa" / "test.json")
    items = load_task(task_file, limit=args.limit)

    if args.one:  # a child: one variant, its own peak RSS
        spec = json.loads(args.one)
        if spec["variant"] == "pytorch":
            row = pytorch_row(model_dir, items, args.speed_items)
        elif spec["variant"] == "gguf":
            with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
                row = gguf_row(model_dir, items, spec["quant"], Path(tmp) / "out", args.threads)
        else:
            from vlmprune.errors import VlmpruneError

            with tempfile.TemporaryDirectory(prefix="pte-bench-") as tmp:
                try:
                    row = pte_row(model_dir, items, spec["dtype"], spec["quant"], Path(tmp) / "out", args.threads)
                except VlmpruneError as exc:  # refused by the export (its check, or a blocker): a row saying so
                    row = {"variant": f"ExecuTorch {spec['dtype']} {spec['quant']}", "refused": str(exc)}
        Path(spec["to"]).write_text(json.dumps(row))
        return

    rows = []
    with tempfile.TemporaryDirectory(prefix="pte-bench-rows-") as tmp:
        rows_dir = Path(args.rows_dir or tmp)
        rows_dir.mkdir(parents=True, exist_ok=True)
        specs = [{"variant": "pytorch"}] + [dict(zip(("dtype", "quant"), v.split(":")), variant="pte")
                                           for v in args.variants.split(",") if v]
        specs += [{"variant": "gguf", "quant": q} for q in args.gguf.split(",") if q]
        for spec in specs:
            key = {"pytorch": "pytorch", "gguf": f"gguf-{spec.get('quant')}"}.get(
                spec["variant"], f"{spec.get('dtype')}-{spec.get('quant')}")
            spec["to"] = str(rows_dir / f"{key}.json")
            if not Path(spec["to"]).is_file():  # a row kept in --rows-dir is not measured again
                argv = [sys.executable, __file__, "--model", model_dir, "--task-file", task_file, "--limit",
                        str(args.limit), "--speed-items", str(args.speed_items), "--one", json.dumps(spec)]
                if args.threads:
                    argv += ["--threads", str(args.threads)]
                subprocess.run(argv, check=True)
            rows.append(json.loads(Path(spec["to"]).read_text()))
            print(f"done: {rows[-1]['variant']}", file=sys.stderr, flush=True)
    reference = rows[0]["answers"]
    for r in rows:
        if "refused" in r:
            continue
        r["agreement"] = sum(normalize_answer(a) == normalize_answer(b)
                             for a, b in zip(r["answers"], reference)) / len(reference)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model_dir, "task_file": task_file, "limit": args.limit, "rows": rows},
                              indent=1))
    torch_speed = rows[0]
    print("| variant | accuracy | agrees with PyTorch | MB on disk | prefill tok/s (x PyTorch) | decode tok/s "
          "(x PyTorch) | peak RSS MB | export + lowering s | logits rel. diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "refused" in r:
            print(f"| {r['variant']} | refused: {r['refused'][:200]} | | | | | | | |")
            continue

        def speed(key, r=r):
            if not r.get(key):
                return ""
            ratio = f" ({r[key] / torch_speed[key]:.1f}x)" if r is not torch_speed and torch_speed.get(key) else ""
            return f"{r[key]:.0f}{ratio}"

        build = f"{r['torch_export_s']:.0f} + {r['lowering_s']:.0f}" if "lowering_s" in r else ""
        diff = f"{r['check']['rel_diff']:.1e}" if "check" in r else ""
        print(f"| {r['variant']} | {r['accuracy']:.1%} | {r['agreement']:.1%} | {r['bytes'] / 2**20:.1f} | "
              f"{speed('prompt_tok_s')} | {speed('decode_tok_s')} | {r['peak_rss_mb']:.0f} | {build} | {diff} |")


if __name__ == "__main__":
    main()
