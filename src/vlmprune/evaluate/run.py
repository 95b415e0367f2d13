"""The evaluate stage: load a model directory, score it on tasks, measure efficiency; return the results."""

from __future__ import annotations

import json
from pathlib import Path

from vlmprune.checkpoint import load, load_processor
from vlmprune.config import EvalConfig, as_dict, build
from vlmprune.errors import VlmpruneError
from vlmprune.evaluate.efficiency import disk_bytes, efficiency, weight_bytes_by_part
from vlmprune.evaluate.tasks import evaluate, load_task, prompt_batch
from vlmprune.paths import check_output_file, write_output_file
from vlmprune.readers import read_json
from vlmprune.summary import count_parameters


def evaluate_model_dir(config: EvalConfig | None = None, **options) -> dict:
    """Evaluate ``config.model`` (pruned or not) as ``config`` (or keyword options of :class:`EvalConfig`) says.

    Returns ``{"tasks": {...}, "accuracy": mean, "parameters": {...}, "model": path, "config": {...}}``
    (plus ``"efficiency"``); writes it to ``config.output`` when given (atomically).
    """
    cfg = config if config is not None else build(EvalConfig, options)
    from vlmprune.export.pte_runtime import is_pte_dir
    from vlmprune.export.runtime import is_gguf_dir

    # a `vlmprune export` directory: the same tasks, in llama.cpp (GGUF) or the ExecuTorch runtime (.pte)
    if is_gguf_dir(cfg.model) or is_pte_dir(cfg.model):
        from vlmprune.evaluate.gguf import evaluate_gguf_dir

        cfg.check_paths(model=False)
        check_results_output(cfg)
        return _written(evaluate_gguf_dir(cfg), cfg.output)
    cfg.check_paths()
    check_results_output(cfg)
    if cfg.evaluation.task_file is not None:
        load_task(cfg.evaluation.task_file, limit=1)  # every record and image checked before the model loads
    if cfg.evaluation.lmms_tasks:
        from vlmprune.evaluate.lmms import require_lmms

        require_lmms()  # before the model loads
    e = cfg.evaluation
    net, processor = load(cfg.model, dtype=cfg.load.dtype), load_processor(cfg.model)
    if cfg.load.device:
        net.to(cfg.load.device)
    result = {"tasks": {}, "data_dir": e.data_dir, "accuracy": 0.0}
    if e.tasks or e.task_file:
        result = evaluate(net, processor, tasks=e.tasks, data_dir=e.data_dir, limit=e.limit, task_file=e.task_file,
                          batch_size=e.batch_size, max_new_tokens=e.max_new_tokens)
    if e.lmms_tasks:  # lmms-eval tasks through the vlmprune plugin, merged beside the built-in ones
        from vlmprune.evaluate.lmms import run_lmms_tasks

        entries = run_lmms_tasks(net, processor, e.lmms_tasks, limit=e.limit, batch_size=e.batch_size,
                                 max_new_tokens=e.max_new_tokens, data_dir=e.data_dir, include=e.lmms_include)
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
        path = Path(e.task_file) if e.task_file else Path(result["data_dir"]) / e.tasks[0] / "test.json"
        result["efficiency"] = efficiency(net, dict(prompt_batch(processor, load_task(path, limit=1))))
    result["config"] = as_dict(cfg)
    return _written(result, cfg.output)


def is_results_file(path: Path) -> bool:
    """Whether ``path`` holds results ``vlmprune evaluate`` wrote (what ``--overwrite`` may replace)."""
    try:
        if path.stat().st_size > 64 * 2**20:
            return False
        data = read_json(path)
    except VlmpruneError:
        return False
    return isinstance(data, dict) and {"tasks", "accuracy", "model"} <= set(data) and isinstance(data["tasks"], dict)


def check_results_output(cfg: EvalConfig) -> None:
    """``--output`` may not be an input of the run (the task file, a file of the model, data or lmms-eval folder),
    and replaces an existing file only with ``--overwrite`` and only when it holds results vlmprune evaluate wrote."""
    if cfg.output is not None:
        e = cfg.evaluation
        inputs = [("model directory", cfg.model), ("task file", e.task_file), ("data directory", e.data_dir),
                  ("lmms-eval include folder", e.lmms_include)]
        check_output_file(cfg.output, inputs, cfg.overwrite, ours=is_results_file)


def _written(result: dict, output: str | None) -> dict:
    if output:
        write_output_file(Path(output).expanduser().resolve(), json.dumps(result, indent=1))
    return result
