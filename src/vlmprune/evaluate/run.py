"""The evaluate stage: load a model directory, score it on tasks, measure efficiency; return the results."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from vlmprune.checkpoint import load, load_processor
from vlmprune.config import EvalConfig
from vlmprune.errors import VlmpruneError
from vlmprune.evaluate.efficiency import disk_bytes, efficiency, weight_bytes_by_part
from vlmprune.evaluate.tasks import evaluate, load_task, prompt_batch
from vlmprune.summary import count_parameters


def evaluate_model_dir(config: EvalConfig | None = None, **options) -> dict:
    """Evaluate ``config.model`` (pruned or not) as ``config`` (or keyword options of :class:`EvalConfig`) says.

    Returns ``{"tasks": {...}, "accuracy": mean, "parameters": {...}, "model": path, "config": {...}}``
    (plus ``"efficiency"``); writes it to ``config.output`` when given (atomically).
    """
    cfg = config if config is not None else EvalConfig(**options)
    from vlmprune.export.pte_runtime import is_pte_dir
    from vlmprune.export.runtime import is_gguf_dir

    # a `vlmprune export` directory: the same tasks, in llama.cpp (GGUF) or the ExecuTorch runtime (.pte)
    if is_gguf_dir(cfg.model) or is_pte_dir(cfg.model):
        from vlmprune.evaluate.gguf import evaluate_gguf_dir

        cfg.check_paths(model=False)
        return _written(evaluate_gguf_dir(cfg), cfg.output)
    cfg.check_paths()
    if cfg.task_file is not None:
        load_task(cfg.task_file, limit=1)  # every record and image checked before the model loads
    if cfg.lmms_tasks:
        from vlmprune.evaluate.lmms import require_lmms

        require_lmms()  # before the model loads
    net, processor = load(cfg.model, dtype=cfg.dtype), load_processor(cfg.model)
    if cfg.device:
        net.to(cfg.device)
    result = {"tasks": {}, "data_dir": cfg.data_dir, "accuracy": 0.0}
    if cfg.tasks or cfg.task_file:
        result = evaluate(net, processor, tasks=cfg.tasks, data_dir=cfg.data_dir, limit=cfg.limit,
                          task_file=cfg.task_file, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens)
    if cfg.lmms_tasks:  # lmms-eval tasks through the vlmprune plugin, merged beside the built-in ones
        from vlmprune.evaluate.lmms import run_lmms_tasks

        entries = run_lmms_tasks(net, processor, cfg.lmms_tasks, limit=cfg.limit, batch_size=cfg.batch_size,
                                 max_new_tokens=cfg.max_new_tokens, data_dir=cfg.data_dir, include=cfg.lmms_include)
        clash = sorted(set(entries) & set(result["tasks"]))
        if clash:
            raise VlmpruneError(f"lmms-eval task(s) {clash} have the names of built-in tasks; rename them")
        result["tasks"].update(entries)
        # the mean over tasks scored as fractions (MME sums and percent scores are kept out of it)
        fractions = [r["accuracy"] for r in result["tasks"].values() if r.get("scale", "fraction") == "fraction"]
        result["accuracy"] = sum(fractions) / len(fractions) if fractions else None
    result["parameters"] = count_parameters(net)
    # sizes as stored (quantized weights at their packed size): the edge-device view of a model
    result["weight_bytes"] = weight_bytes_by_part(net)
    result["disk_bytes"] = disk_bytes(net)
    result["model"] = str(cfg.model)
    if cfg.efficiency:
        path = Path(cfg.task_file) if cfg.task_file else Path(result["data_dir"]) / cfg.tasks[0] / "test.json"
        result["efficiency"] = efficiency(net, dict(prompt_batch(processor, load_task(path, limit=1))))
    result["config"] = dataclasses.asdict(cfg)
    return _written(result, cfg.output)


def _written(result: dict, output: str | None) -> dict:
    if output:
        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out)  # readers never see half a file
    return result
