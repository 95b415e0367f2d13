"""``vlmprune evaluate`` on an export directory: the same tasks and exact-match rules as for Hugging Face
models, answered by llama.cpp (a GGUF pair, ``vlmprune.export.runtime``) or by the ExecuTorch runtime (a
``.pte``, ``vlmprune.export.pte_runtime``), so the three compare side by side."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from vlmprune.config import as_dict
from vlmprune.errors import VlmpruneError
from vlmprune.evaluate.tasks import load_task, score
from vlmprune.export.pte_runtime import PteModel, is_pte_dir
from vlmprune.export.runtime import LlamaCppModel


@dataclasses.dataclass
class Throughput:
    """The runtime's timings summed over answers: prompt and decode tokens and milliseconds (llama.cpp's
    own, or the ExecuTorch runner's in llama.cpp's keys)."""

    prompt_tokens: int = 0
    prompt_ms: float = 0.0
    generated: int = 0
    decode_ms: float = 0.0

    def add(self, timings: dict) -> None:
        self.prompt_tokens += timings.get("prompt_n", 0)
        self.prompt_ms += timings.get("prompt_ms", 0.0)
        self.generated += timings.get("predicted_n", 0)
        self.decode_ms += timings.get("predicted_ms", 0.0)

    @property
    def prompt_per_s(self) -> float | None:
        return 1000 * self.prompt_tokens / self.prompt_ms if self.prompt_ms else None

    @property
    def decode_per_s(self) -> float | None:
        return 1000 * self.generated / self.decode_ms if self.decode_ms else None


def answer_items(runner: LlamaCppModel | PteModel, items: list[dict], max_new_tokens: int,
                 throughput: Throughput) -> list[str]:
    """The runtime's answer to every task item (image + question), its timings added to ``throughput``."""
    predictions = []
    for it in items:
        text, info = runner.answer(it["image"], it["question"], max_new_tokens)
        predictions.append(text)
        throughput.add(info["timings"])
    return predictions


def evaluate_gguf_dir(cfg) -> dict:
    """``vlmprune evaluate`` for an export directory (GGUF or ExecuTorch): the built-in tasks and/or
    --task-file, exact match."""
    pte = is_pte_dir(cfg.model)
    what, runtime = ("an ExecuTorch export", "the ExecuTorch runtime") if pte else ("the GGUF export", "llama.cpp")
    if cfg.evaluation.lmms_tasks:
        raise VlmpruneError(f"--lmms-tasks runs Hugging Face models only; evaluate {what} on --tasks or --task-file")
    if cfg.efficiency:
        raise VlmpruneError(f"--efficiency measures PyTorch models; {runtime}'s own timings are in the result "
                            f"('timings') of an export's evaluation")
    if cfg.load.device is not None or cfg.load.dtype not in (None, "auto"):
        raise VlmpruneError(f"--device and --dtype load a Hugging Face checkpoint; {what} runs in {runtime} in the "
                            f"types it was exported with")
    runner = PteModel(cfg.model) if pte else LlamaCppModel(cfg.model)
    files = {name: Path(cfg.evaluation.data_dir) / name / "test.json" for name in (cfg.evaluation.tasks or [])}
    if cfg.evaluation.task_file is not None:
        files[Path(cfg.evaluation.task_file).stem] = Path(cfg.evaluation.task_file)
    result: dict = {"tasks": {}, "data_dir": cfg.evaluation.data_dir,
                    "runtime": "ExecuTorch (XNNPACK)" if pte else "llama.cpp (xllamacpp)"}
    throughput = Throughput()
    started = time.perf_counter()
    for name, path in files.items():
        items = load_task(path, limit=cfg.evaluation.limit)
        predictions = answer_items(runner, items, cfg.evaluation.max_new_tokens, throughput)
        res = score((p, it["answer"], it["type"]) for p, it in zip(predictions, items))
        res["examples"] = [{"id": it["id"], "question": it["question"], "answer": it["answer"], "prediction": p}
                           for p, it in list(zip(predictions, items))[:20]]
        res["predictions"] = predictions
        res["limit"] = cfg.evaluation.limit
        result["tasks"][name] = res
    accs = [r["accuracy"] for r in result["tasks"].values()]
    result["accuracy"] = sum(accs) / len(accs) if accs else 0.0
    result["timings"] = {"wall_s": time.perf_counter() - started, "prompt_tokens": throughput.prompt_tokens,
                         "prompt_tokens_per_s": throughput.prompt_per_s, "generated_tokens": throughput.generated,
                         "decode_tokens_per_s": throughput.decode_per_s}
    folder = Path(cfg.model)
    result["disk_bytes"] = sum(f.stat().st_size for f in folder.glob("*.pte" if pte else "*.gguf"))
    record = folder / "export.json"
    if record.is_file():
        result["export"] = json.loads(record.read_text())
    result["model"] = str(cfg.model)
    result["config"] = as_dict(cfg)
    return result
