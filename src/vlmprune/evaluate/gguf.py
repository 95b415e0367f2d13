"""``vlmprune evaluate`` on a GGUF export directory: the same tasks and exact-match rules as for Hugging
Face models, answered by llama.cpp (``vlmprune.export.runtime``), so the two compare side by side."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from vlmprune.errors import VlmpruneError
from vlmprune.evaluate.tasks import load_task, score
from vlmprune.export.runtime import LlamaCppModel


def evaluate_gguf_dir(cfg) -> dict:
    """``vlmprune evaluate`` for a GGUF export: the built-in tasks and/or --task-file, exact match."""
    if cfg.lmms_tasks:
        raise VlmpruneError("--lmms-tasks runs Hugging Face models only; evaluate the GGUF export on --tasks or "
                            "--task-file")
    if cfg.efficiency:
        raise VlmpruneError("--efficiency measures PyTorch models; llama.cpp's own timings are in the result "
                            "('timings') of a GGUF evaluation")
    runner = LlamaCppModel(cfg.model)
    files = {name: Path(cfg.data_dir) / name / "test.json" for name in (cfg.tasks or [])}
    if cfg.task_file is not None:
        files[Path(cfg.task_file).stem] = Path(cfg.task_file)
    result: dict = {"tasks": {}, "data_dir": cfg.data_dir, "runtime": "llama.cpp (xllamacpp)"}
    prompt_tokens = generated = 0
    prompt_ms = decode_ms = 0.0
    started = time.perf_counter()
    for name, path in files.items():
        items = load_task(path, limit=cfg.limit)
        predictions = []
        for it in items:
            text, info = runner.answer(it["image"], it["question"], cfg.max_new_tokens)
            predictions.append(text)
            t = info["timings"]
            prompt_tokens += t.get("prompt_n", 0)
            generated += t.get("predicted_n", 0)
            prompt_ms += t.get("prompt_ms", 0.0)
            decode_ms += t.get("predicted_ms", 0.0)
        res = score((p, it["answer"], it["type"]) for p, it in zip(predictions, items))
        res["examples"] = [{"id": it["id"], "question": it["question"], "answer": it["answer"], "prediction": p}
                           for p, it in list(zip(predictions, items))[:20]]
        res["predictions"] = predictions
        res["limit"] = cfg.limit
        result["tasks"][name] = res
    accs = [r["accuracy"] for r in result["tasks"].values()]
    result["accuracy"] = sum(accs) / len(accs) if accs else 0.0
    result["timings"] = {"wall_s": time.perf_counter() - started, "prompt_tokens": prompt_tokens,
                         "prompt_tokens_per_s": 1000 * prompt_tokens / prompt_ms if prompt_ms else None,
                         "generated_tokens": generated,
                         "decode_tokens_per_s": 1000 * generated / decode_ms if decode_ms else None}
    folder = Path(cfg.model)
    result["disk_bytes"] = sum(f.stat().st_size for f in folder.glob("*.gguf"))
    record = folder / "export.json"
    if record.is_file():
        result["export"] = json.loads(record.read_text())
    result["model"] = str(cfg.model)
    result["config"] = dataclasses.asdict(cfg)
    return result
