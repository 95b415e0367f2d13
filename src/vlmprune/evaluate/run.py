"""`vlmprune evaluate`: score a model on tasks, optionally measure its efficiency, print a table."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vlmprune.errors import VlmpruneError
from vlmprune.evaluate.efficiency import efficiency
from vlmprune.evaluate.tasks import BUILTIN_TASKS, evaluate, load_task, prompt_batch


def evaluate_model_dir(model: str | Path, tasks: list[str], limit: int | None = None, task_file: str | None = None,
                       data_dir: str | None = None, batch_size: int = 32, with_efficiency: bool = False,
                       output: str | Path | None = None, console: Console | None = None) -> dict:
    """Load ``model`` (pruned or not), evaluate it, write JSON to ``output`` and print tables."""
    from vlmprune.io import load
    from vlmprune.pipeline import load_processor

    unknown = [t for t in tasks if t not in BUILTIN_TASKS]
    if unknown:
        raise VlmpruneError(f"unknown task(s) {unknown}; built-in tasks: {', '.join(BUILTIN_TASKS)} "
                            f"(or pass your own LLaVA-format test file with --task-file)")
    if not tasks and not task_file:
        raise VlmpruneError("nothing to evaluate: give --tasks and/or --task-file")
    if data_dir is None and tasks:
        from vlmprune.demo.datasets import demo_data

        data_dir = str(demo_data()["root"])
    net, processor = load(model), load_processor(model)
    result = evaluate(net, processor, tasks=tasks, data_dir=data_dir, limit=limit, task_file=task_file,
                      batch_size=batch_size)
    result["model"] = str(model)
    if with_efficiency:
        first = next(iter(result["tasks"]))
        path = Path(task_file) if first == Path(task_file or "").stem else Path(data_dir) / first / "test.json"
        result["efficiency"] = efficiency(net, dict(prompt_batch(processor, load_task(path, limit=1))))
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(result, indent=1))
    print_result(result, console or Console())
    return result


def print_result(result: dict, console: Console) -> None:
    table = Table(title=f"vlmprune evaluate: {result.get('model', '')}")
    for col, justify in (("task", "left"), ("type", "left"), ("accuracy", "right"), ("correct / count", "right")):
        table.add_column(col, justify=justify)
    for name, res in result["tasks"].items():
        table.add_row(name, "all", f"{res['accuracy']:.1%}", f"{res['correct']} / {res['count']}")
        for kind, r in res["per_type"].items():
            table.add_row("", kind, f"{r['accuracy']:.1%}", f"{r['correct']} / {r['count']}")
    table.add_row("mean", "", f"{result['accuracy']:.1%}", "")
    console.print(table)
    eff = result.get("efficiency")
    if eff:
        t = Table(title="efficiency (one prompt, batch 1)")
        t.add_column("measure")
        t.add_column("value", justify="right")
        for part, n in eff["parameters"].items():
            t.add_row(f"parameters: {part}", f"{n:,}")
        t.add_row("FLOPs per sample (prefill)", f"{eff['flops_per_sample'] / 1e9:.2f} G")
        t.add_row("prompt tokens", str(eff["prompt_tokens"]))
        t.add_row("prefill latency", f"{1000 * eff['prefill_s']:.1f} ms")
        t.add_row("decode speed", f"{eff['decode_tokens_per_s']:.1f} tokens/s")
        t.add_row("peak memory", f"{eff['peak_memory_mb']:.0f} MB")
        if "weight_bytes" in eff:  # stored sizes: quantized weights at their packed size
            t.add_row("weights in memory (language model)", f"{eff['weight_bytes']['language_model'] / 2**20:,.1f} MB")
            t.add_row("weights in memory (total)", f"{eff['weight_bytes']['total'] / 2**20:,.1f} MB")
        if eff.get("disk_bytes") is not None:
            t.add_row("weights on disk", f"{eff['disk_bytes'] / 2**20:,.1f} MB")
        console.print(t)
