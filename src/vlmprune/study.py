"""`vlmprune study`: the study's grid (method x ratio x recovery recipe x data fraction) as one
resumable command.

A run directory holds::

    resolved_config.yaml       the config with overrides applied
    original/eval.json         the unpruned model's scores (the retention baseline)
    pruned/<prune id>/         pruned models, shared by cells that differ only in recovery
    recovered/<cell id>/       recovered models of quantized cells, shared by cells that differ only
                               in the quantization scheme (kept: the next scheme needs them)
    cells/<cell id>/           cell.json (resolved cell), eval.json, status.json (done | failed)

A cell whose status.json says "done" is skipped on the next run, so an interrupted study resumes
where it stopped; a failed cell records its error and the others go on.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlmprune.errors import VlmpruneError

DEFAULTS: dict[str, Any] = {
    "name": "study",
    "output": None,
    "teacher": "demo",
    "train_data": "demo",
    "demo_data_limit": None,  # images per split of the demo data sets (reduced mode)
    "image_folder": None,
    "seed": 0,
    "calibration": {"num_samples": 128, "batch_size": 4, "max_length": None},
    "criterion": {"layer": "block_influence", "width": "taylor"},
    "width": {"attention": "groups", "mlp_multiple": None},
    "evaluation": {"tasks": ["easyvqa", "digits"], "limit": None, "task_file": None, "batch_size": 32,
                   "data_dir": None, "max_new_tokens": 10},
    "recovery": {},
    "recipes": {"none": None},
    "grid": [],
    "keep_models": False,
}


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["evaluation.limit=100", "teacher=/m"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise VlmpruneError(f"overrides are key=value (dotted keys for nested options), got {item!r}")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def _merge(base: dict, extra: dict, path: str = "") -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if key not in base and path == "" and key not in DEFAULTS:
            raise VlmpruneError(f"unknown study option {key!r}; known: {', '.join(DEFAULTS)}")
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = _merge(base[key], value, f"{path}{key}.")
        else:
            merged[key] = value
    return merged


def load_study_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise VlmpruneError(f"study config not found: {path}") from None
    if not isinstance(loaded, dict):
        raise VlmpruneError(f"{path} must hold a mapping of option: value")
    config = _merge(_merge(DEFAULTS, loaded), parse_overrides(overrides or []))
    if not config["grid"]:
        raise VlmpruneError(f"{path} defines no grid: add 'grid: [{{method: [...], ratio: [...], recipe: [...]}}]'")
    if not config["output"]:
        config["output"] = f"runs/study-{config['name']}"
    return config


@dataclass(frozen=True)
class Cell:
    method: str
    criterion: str
    ratio: float
    recipe: str
    fraction: float | None
    quantization: str | None = None  # a `vlmprune quantize` scheme applied last, None for float

    @property
    def prune_id(self) -> str:
        return f"{self.method}-{self.criterion}-r{self.ratio:g}"

    @property
    def float_id(self) -> str:
        """The id of the same cell without quantization (its recovered model is shared)."""
        tail = "" if self.fraction is None else f"-f{self.fraction:g}"
        return f"{self.prune_id}-{self.recipe}{tail}"

    @property
    def id(self) -> str:
        return self.float_id + ("" if self.quantization is None else f"-q{self.quantization}")

    def to_dict(self) -> dict:
        return {"id": self.id, "method": self.method, "criterion": self.criterion, "ratio": self.ratio,
                "recipe": self.recipe, "fraction": self.fraction, "quantization": self.quantization}


def expand_grid(config: dict) -> list[Cell]:
    """Every cell of every grid block (the product of its axes), in order, without duplicates."""
    cells: dict[str, Cell] = {}
    for block in config["grid"]:
        axes = {k: v if isinstance(v, list) else [v] for k, v in block.items()}
        unknown = set(axes) - {"method", "ratio", "recipe", "fraction", "criterion", "quantization"}
        if unknown:
            raise VlmpruneError(f"grid axes are method, criterion, ratio, recipe, fraction, quantization; "
                                f"got {sorted(unknown)}")
        schemes = [None if q in (None, "none") else str(q) for q in axes.get("quantization", [None])]
        from vlmprune.quantize import SCHEMES

        bad = [q for q in schemes if q is not None and q not in SCHEMES]
        if bad:
            raise VlmpruneError(f"grid names quantization {bad}; schemes: none, {', '.join(SCHEMES)}")
        for method, ratio, recipe, fraction, scheme in itertools.product(
                axes.get("method", ["layer"]), axes.get("ratio", [0.2]), axes.get("recipe", ["none"]),
                axes.get("fraction", [None]), schemes):
            if recipe not in config["recipes"]:
                raise VlmpruneError(f"grid names recipe {recipe!r}, not defined under 'recipes' ({', '.join(config['recipes'])})")
            for criterion in axes.get("criterion", [config["criterion"][method]]):
                cell = Cell(method, criterion, float(ratio), recipe,
                            None if config["recipes"][recipe] is None else float(fraction or 1.0), scheme)
                cells.setdefault(cell.id, cell)
    return list(cells.values())


def run_order(cells: list[Cell], config: dict) -> list[Cell]:
    """Cheapest cells first (no recovery, then projector-only, then by data fraction), so that a
    run interrupted after a few hours has covered as much of the grid as it could."""

    def cost(item: tuple[int, Cell]) -> tuple:
        n, cell = item
        recipe = config["recipes"][cell.recipe]
        kind = 0 if recipe is None else 1 if recipe.get("train") == "projector" else 2
        return (kind, cell.fraction or 0.0, n)

    return [cell for _, cell in sorted(enumerate(cells), key=cost)]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # readers never see half a file


def _status(cell_dir: Path) -> dict | None:
    try:
        return json.loads((cell_dir / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def resolve_inputs(config: dict) -> tuple[str, str, str | None, dict]:
    """Teacher model, training data and its image folder, and evaluation options, with 'demo' resolved."""
    teacher, data, folder = config["teacher"], config["train_data"], config["image_folder"]
    evaluation = dict(config["evaluation"])
    if teacher == "demo":
        from vlmprune.demo.assemble import build_demo_model

        teacher = str(build_demo_model())
    if data == "demo":
        from vlmprune.demo.datasets import demo_data

        paths = demo_data(limit=config["demo_data_limit"])
        data, folder = str(paths["train"]), str(paths["root"])
        evaluation["data_dir"] = evaluation.get("data_dir") or str(paths["root"])
    return teacher, data, folder, evaluation


def evaluate_model(path: str | Path, evaluation: dict) -> dict:
    from vlmprune.evaluate.tasks import evaluate
    from vlmprune.inspect import count_parameters
    from vlmprune.io import load
    from vlmprune.pipeline import load_processor

    from vlmprune.evaluate.efficiency import disk_bytes, weight_bytes_by_part

    model = load(path)
    result = evaluate(model, load_processor(path), tasks=evaluation.get("tasks") or [],
                      data_dir=evaluation.get("data_dir"), limit=evaluation.get("limit"),
                      task_file=evaluation.get("task_file"), batch_size=evaluation.get("batch_size", 32),
                      max_new_tokens=evaluation.get("max_new_tokens", 10))
    result["parameters"] = count_parameters(model)
    # sizes as stored (quantized weights at their packed size): the edge-device view of a cell
    result["weight_bytes"] = weight_bytes_by_part(model)
    result["disk_bytes"] = disk_bytes(model)
    return result


def run_study(config: dict, console=None) -> Path:
    """Run every cell not yet done; return the run directory (then `vlmprune report` it)."""
    from vlmprune import pipeline
    from vlmprune.recover import load_config as recover_config
    from vlmprune.recover import recover

    def say(message: str) -> None:  # plain text: rich would read "[study]" as a markup tag and drop it
        if console is None:
            print(message)
        else:
            console.print(message, markup=False, highlight=False)

    run = Path(config["output"])
    (run / "cells").mkdir(parents=True, exist_ok=True)
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cells = run_order(expand_grid(config), config)
    teacher, data, folder, evaluation = resolve_inputs(config)
    original = run / "original"
    if not (original / "eval.json").exists():
        original.mkdir(exist_ok=True)
        say(f"[study] evaluating the original model {teacher}")
        _write_json(original / "eval.json", {"model": teacher, **evaluate_model(teacher, evaluation)})
    started = time.time()
    for n, cell in enumerate(cells, 1):
        cell_dir = run / "cells" / cell.id
        status = _status(cell_dir)
        if status and status.get("status") == "done":
            say(f"[study] {n}/{len(cells)} {cell.id}: done, skipped")
            continue
        if cell_dir.exists():
            shutil.rmtree(cell_dir)  # an unfinished or failed attempt: start the cell over
        cell_dir.mkdir(parents=True)
        _write_json(cell_dir / "cell.json", {**cell.to_dict(), "teacher": teacher, "train_data": data,
                                             "recipe_config": config["recipes"][cell.recipe],
                                             "recovery": config["recovery"], "evaluation": evaluation})
        say(f"[study] {n}/{len(cells)} {cell.id}: running")
        t0 = time.time()
        try:
            pruned = run / "pruned" / cell.prune_id
            if not (pruned / "pruning_plan.json").exists():
                pipeline.prune(teacher, cell.method, cell.ratio, pruned, criterion=cell.criterion, calibration=data,
                               image_folder=folder, seed=config["seed"], overwrite=True,
                               attention=config["width"]["attention"], mlp_multiple=config["width"]["mlp_multiple"],
                               **{k: v for k, v in config["calibration"].items() if v is not None}, quiet=True)
            model_dir = pruned
            recipe = config["recipes"][cell.recipe]
            if recipe is not None:
                model_dir = cell_dir / "model"
                if cell.quantization is not None:  # shared with the cell's other schemes
                    model_dir = run / "recovered" / cell.float_id
            if recipe is not None and not (model_dir / "sample_ids.json").exists():
                options = {**config["recovery"], **recipe, "student": str(pruned), "teacher": teacher, "data": data,
                           "image_folder": folder, "output": str(model_dir), "fraction": cell.fraction,
                           "seed": config["seed"], "overwrite": True}
                recover(recover_config(None, options))
            quantization = None
            if cell.quantization is not None:
                from vlmprune.quantize import quantize_model_dir

                model_dir, quantization = quantize_model_dir(model_dir, cell.quantization, cell_dir / "quantized",
                                                             overwrite=True)
            result = evaluate_model(model_dir, evaluation)
            if quantization is not None:
                result["quantization"] = quantization
            plan = json.loads((pruned / "pruning_plan.json").read_text())
            result["achieved"] = plan.get("achieved")
            _write_json(cell_dir / "eval.json", result)
            if (recipe is not None or cell.quantization is not None) and not config["keep_models"]:
                shutil.rmtree(cell_dir / "model", ignore_errors=True)
                shutil.rmtree(cell_dir / "quantized", ignore_errors=True)
            _write_json(cell_dir / "status.json", {"status": "done", "seconds": time.time() - t0})
            say(f"[study] {cell.id}: mean accuracy {result['accuracy']:.3f} ({time.time() - t0:.0f} s)")
        except Exception as exc:  # a failed cell is recorded and the grid goes on
            _write_json(cell_dir / "status.json", {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                                   "traceback": traceback.format_exc(), "seconds": time.time() - t0})
            say(f"[study] {cell.id}: FAILED: {exc}")
    say(f"[study] {len(cells)} cells in {time.time() - started:.0f} s this run; report: vlmprune report {run}")
    return run
