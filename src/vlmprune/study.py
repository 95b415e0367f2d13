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

import dataclasses
import itertools
import json
import logging
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlmprune.config import (
    COMPENSATE_MODES,
    EvalConfig,
    PruneConfig,
    RecoverConfig,
    build,
    check_keys,
    deep_merge,
    parse_overrides,
    read_yaml,
)
from vlmprune.errors import VlmpruneError
from vlmprune.planning.plan import PLAN_FILE
from vlmprune.readers import read_json
from vlmprune.record import PruneRecord, RunRecord

log = logging.getLogger(__name__)

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
    "compensation": {"sequential": False, "ridge": None},  # how a grid's `compensate` axis fits (vlmprune prune)
    "evaluation": {"tasks": ["easyvqa", "digits"], "limit": None, "task_file": None, "batch_size": 32,
                   "data_dir": None, "max_new_tokens": 10},
    "recovery": {},
    "recipes": {"none": None},
    "grid": [],
    "keep_models": False,
}


# Keys a study config may hold under each section (checked at any depth when the config loads).
_CALIBRATION_KEYS = ("num_samples", "batch_size", "max_length", "split")
_EVALUATION_KEYS = tuple(f.name for f in dataclasses.fields(EvalConfig)
                         if f.name not in ("model", "output", "efficiency"))
_RECOVERY_KEYS = tuple(f.name for f in dataclasses.fields(RecoverConfig)
                       if f.name not in ("student", "teacher", "data", "image_folder", "output", "overwrite", "resume"))


def check_study_config(config: dict[str, Any], origin: str) -> None:
    """Refuse unknown keys at any depth and bad values, before any cell runs."""
    check_keys(config, DEFAULTS, "")
    for section, known in (("calibration", _CALIBRATION_KEYS), ("criterion", ("layer", "width")),
                           ("width", ("attention", "mlp_multiple")), ("compensation", ("sequential", "ridge")),
                           ("evaluation", _EVALUATION_KEYS),
                           ("recovery", _RECOVERY_KEYS)):
        if not isinstance(config[section], dict):
            raise VlmpruneError(f"{origin}: '{section}' must be a mapping of option: value")
        check_keys(config[section], known, f"{section}.")
    if not isinstance(config["recipes"], dict) or not config["recipes"]:
        raise VlmpruneError(f"{origin}: 'recipes' must map recipe names to recovery options (or null)")
    for name, recipe in config["recipes"].items():
        if recipe is None:
            continue
        if not isinstance(recipe, dict):
            raise VlmpruneError(f"{origin}: recipe {name!r} must be a mapping of recovery options or null")
        check_keys(recipe, _RECOVERY_KEYS, f"recipes.{name}.")
        # values checked now, with stand-ins for the paths each cell fills in
        build(RecoverConfig, {**config["recovery"], **recipe, "student": "-", "data": "-", "output": "-",
                              "teacher": "-"})
    calibration = {k: v for k, v in config["calibration"].items() if v is not None}
    width = {k: v for k, v in config["width"].items() if v is not None}
    for method in ("layer", "width"):
        build(PruneConfig, {"model": "-", "output": "-", "method": method, "ratio": 0.5,
                            "criterion": config["criterion"].get(method), **calibration,
                            **(width if method == "width" else {})})
    evaluation = build(EvalConfig, {k: v for k, v in config["evaluation"].items() if v is not None})
    evaluation.check_paths(model=False)
    if evaluation.task_file is not None:  # a task file that is not JSON fails here, not in every cell
        from vlmprune.evaluate.tasks import load_task

        load_task(evaluation.task_file, limit=1)
    expand_grid(config)


def load_study_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The study config at ``path`` over the defaults, with dotted ``key=value`` overrides, checked."""
    config = deep_merge(deep_merge(DEFAULTS, read_yaml(path)), parse_overrides(overrides or []))
    if not config["grid"]:
        raise VlmpruneError(f"{path} defines no grid: add 'grid: [{{method: [...], ratio: [...], recipe: [...]}}]'")
    if not config["output"]:
        config["output"] = f"runs/study-{config['name']}"
    check_study_config(config, str(path))
    return config


@dataclass(frozen=True)
class Cell:
    method: str
    criterion: str
    ratio: float | None  # None when the cell prunes to a deployment target instead
    recipe: str
    fraction: float | None
    quantization: str | None = None  # a `vlmprune quantize` scheme applied last, None for float
    target: str | None = None        # `vlmprune prune --target` (params=0.7, memory=450MB,seq=1024, ...)
    compensate: str = "none"         # `vlmprune prune --compensate`: what the kept weights take over

    @property
    def prune_id(self) -> str:
        tail = "" if self.compensate == "none" else f"+{self.compensate}"
        if self.target is not None:  # memory=450MB,seq=1024 -> t-memory450MB-seq1024
            return f"{self.method}-{self.criterion}-t-{self.target.replace('=', '').replace(',', '-')}{tail}"
        return f"{self.method}-{self.criterion}-r{self.ratio:g}{tail}"

    @property
    def size(self) -> str:
        """What the cell cuts to, as a user wrote it: a ratio or a target."""
        return self.target if self.target is not None else f"ratio={self.ratio:g}"

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
                "target": self.target, "recipe": self.recipe, "fraction": self.fraction,
                "quantization": self.quantization, "compensate": self.compensate}


def expand_grid(config: dict) -> list[Cell]:
    """Every cell of every grid block (the product of its axes), in order, without duplicates."""
    cells: dict[str, Cell] = {}
    for block in config["grid"]:
        axes = {k: v if isinstance(v, list) else [v] for k, v in block.items()}
        unknown = set(axes) - {"method", "ratio", "target", "recipe", "fraction", "criterion", "quantization",
                               "compensate"}
        if unknown:
            raise VlmpruneError(f"grid axes are method, criterion, ratio or target, recipe, fraction, quantization, "
                                f"compensate; got {sorted(unknown)}")
        compensations = [str(c) for c in axes.get("compensate", ["none"])]
        bad = [c for c in compensations if c not in COMPENSATE_MODES]
        if bad:
            raise VlmpruneError(f"grid names compensate {bad}; modes: {', '.join(COMPENSATE_MODES)}")
        if "ratio" in axes and "target" in axes:
            raise VlmpruneError(f"a grid block takes ratio or target, not both: {block}; write two blocks")
        from vlmprune.config import parse_target

        for spec in axes.get("target", []):
            if parse_target(str(spec)).kind == "latency":
                raise VlmpruneError(f"grid target {spec}: a latency target times the model on the machine that runs "
                                    f"the cell; use params= or memory= targets in a study")
        sizes = ([(None, str(t)) for t in axes["target"]] if "target" in axes
                 else [(float(r), None) for r in axes.get("ratio", [0.2])])
        schemes = [None if q in (None, "none") else str(q) for q in axes.get("quantization", [None])]
        from vlmprune.quantize import SCHEMES

        bad = [q for q in schemes if q is not None and q not in SCHEMES]
        if bad:
            raise VlmpruneError(f"grid names quantization {bad}; schemes: none, {', '.join(SCHEMES)}")
        for method, (ratio, target), recipe, fraction, scheme, compensate in itertools.product(
                axes.get("method", ["layer"]), sizes, axes.get("recipe", ["none"]),
                axes.get("fraction", [None]), schemes, compensations):
            if recipe not in config["recipes"]:
                raise VlmpruneError(f"grid names recipe {recipe!r}, not defined under 'recipes' "
                                    f"({', '.join(config['recipes'])})")
            # auto: the width criterion names the cell; the depth part uses criterion.layer
            default = config["criterion"]["width" if method == "auto" else method]
            for criterion in axes.get("criterion", [default]):
                cell = Cell(method, criterion, ratio, recipe,
                            None if config["recipes"][recipe] is None else float(fraction or 1.0), scheme, target,
                            compensate)
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
        return read_json(cell_dir / "status.json")
    except VlmpruneError:
        return None


@dataclass
class StudyResult:
    """What ``run_study`` did: the run directory and how many cells are done, were skipped, failed."""

    run: Path
    done: int = 0
    skipped: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)


def _evaluate(model: str | Path, evaluation: dict) -> dict:
    from vlmprune.evaluate.run import evaluate_model_dir

    result = evaluate_model_dir(EvalConfig(model=str(model), **{k: v for k, v in evaluation.items() if v is not None}))
    result.pop("config", None)
    return result


@dataclass
class _Study:
    """What the phases of a study's cells share: the config, the run directory, the inputs, the tally."""

    config: dict
    run: Path
    evaluation: dict
    result: StudyResult

    @property
    def teacher(self) -> str:
        return self.config["teacher"]

    @property
    def data(self) -> str:
        return self.config["train_data"]

    @property
    def folder(self) -> str | None:
        return self.config["image_folder"]


def run_study(config: dict) -> StudyResult:
    """Run every cell not yet done; return the run directory and the cells' fate (then `vlmprune report` it).

    ``teacher`` and ``train_data`` must be concrete paths here (the demo launcher resolves ``demo``).
    Cells that differ only in ratio or target share one calibration: the first writes ``scores.json``
    and the others plan from it (``vlmprune prune --scores``).
    """
    study = _Study(config, Path(config["output"]), dict(config["evaluation"]), StudyResult(Path(config["output"])))
    (study.run / "cells").mkdir(parents=True, exist_ok=True)
    (study.run / "resolved_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cells = run_order(expand_grid(config), config)
    original = study.run / "original"
    if not (original / "eval.json").exists():
        original.mkdir(exist_ok=True)
        log.info("[study] evaluating the original model %s", study.teacher)
        _write_json(original / "eval.json", {"model": study.teacher, **_evaluate(study.teacher, study.evaluation)})
    started = time.time()
    for n, cell in enumerate(cells, 1):
        _run_cell(study, cell, f"{n}/{len(cells)}")
    result = study.result
    log.info("[study] %d cells in %.0f s this run (%d done, %d skipped, %d failed); report: vlmprune report %s",
             len(cells), time.time() - started, result.done, result.skipped, len(result.failed), study.run)
    return result


def _run_cell(study: _Study, cell: Cell, position: str) -> None:
    """One cell, unless done before: prune (or reuse), recover (or reuse), quantize, evaluate, record.
    A failed cell records its error and the grid goes on."""
    cell_dir = study.run / "cells" / cell.id
    status = _status(cell_dir)
    if status and status.get("status") == "done":
        log.info("[study] %s %s: done, skipped", position, cell.id)
        study.result.skipped += 1
        return
    if cell_dir.exists():
        shutil.rmtree(cell_dir)  # an unfinished or failed attempt: start the cell over
    cell_dir.mkdir(parents=True)
    config = study.config
    _write_json(cell_dir / "cell.json", {**cell.to_dict(), "teacher": study.teacher, "train_data": study.data,
                                         "recipe_config": config["recipes"][cell.recipe],
                                         "recovery": config["recovery"], "evaluation": study.evaluation})
    log.info("[study] %s %s: running", position, cell.id)
    t0 = time.time()
    try:
        pruned = _prune_cell(study, cell)
        model_dir = _recover_cell(study, cell, cell_dir, pruned)
        model_dir, quantization = _quantize_cell(cell, cell_dir, model_dir)
        evaluated = _evaluate_cell(study, model_dir, pruned, quantization)
        _record_cell(study, cell, cell_dir, evaluated, t0)
    except Exception as exc:  # a failed cell is recorded and the grid goes on
        _write_json(cell_dir / "status.json", {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                               "traceback": traceback.format_exc(), "seconds": time.time() - t0})
        study.result.failed.append(cell.id)
        log.warning("[study] %s: FAILED: %s", cell.id, exc)


def _prune_cell(study: _Study, cell: Cell) -> Path:
    """The cell's pruned model, shared by the cells of the same prune id; written unless there already.
    One calibration serves every ratio of a method and criterion (the others plan from its scores.json)."""
    from vlmprune.prune.run import SCORES_FILE, prune

    config, run = study.config, study.run
    pruned = run / "pruned" / cell.prune_id
    if (pruned / PLAN_FILE).exists():
        return pruned
    shared = [p / SCORES_FILE for p in (run / "pruned").glob(f"{cell.method}-{cell.criterion}-[rt]*")
              if (p / SCORES_FILE).is_file()]
    options = {k: v for k, v in config["calibration"].items() if v is not None}
    if cell.method in ("width", "auto"):
        options.update(attention=config["width"]["attention"], mlp_multiple=config["width"]["mlp_multiple"])
    if cell.method == "auto":
        options["layer_criterion"] = config["criterion"]["layer"]
        shared = []  # auto scores two criteria and searches: nothing to share
    if cell.compensate != "none":  # the fits need the calibration data, even where scores are shared
        options.update(compensate=cell.compensate, calibration=study.data, image_folder=study.folder,
                       seed=config["seed"], compensate_sequential=bool(config["compensation"]["sequential"]))
        if config["compensation"]["ridge"] is not None:
            options["compensate_ridge"] = config["compensation"]["ridge"]
    if shared:  # one calibration serves every ratio of a method and criterion (and every compensation)
        if cell.compensate == "none":
            options = {k: v for k, v in options.items() if k in ("attention", "mlp_multiple")}
        prune(PruneConfig(model=study.teacher, output=str(pruned), scores=str(shared[0]), ratio=cell.ratio,
                          target=cell.target, overwrite=True, **options))
    else:
        options.update(calibration=study.data, image_folder=study.folder, seed=config["seed"])
        prune(PruneConfig(model=study.teacher, output=str(pruned), method=cell.method, ratio=cell.ratio,
                          target=cell.target, criterion=cell.criterion, overwrite=True, **options))
    return pruned


def _recover_cell(study: _Study, cell: Cell, cell_dir: Path, pruned: Path) -> Path:
    """The model the cell evaluates: the pruned one, or it recovered by the cell's recipe (a quantized cell's
    recovered model is shared with the cell's other schemes, and kept for them)."""
    from vlmprune.recover import recover

    config = study.config
    recipe = config["recipes"][cell.recipe]
    if recipe is None:
        return pruned
    model_dir = cell_dir / "model"
    if cell.quantization is not None:  # shared with the cell's other schemes
        model_dir = study.run / "recovered" / cell.float_id
    if not (model_dir / "sample_ids.json").exists():
        options = {**config["recovery"], **recipe, "student": str(pruned), "teacher": study.teacher,
                   "data": study.data, "image_folder": study.folder, "output": str(model_dir),
                   "fraction": cell.fraction, "seed": config["seed"], "overwrite": True}
        recover(build(RecoverConfig, options))
    return model_dir


def _quantize_cell(cell: Cell, cell_dir: Path, model_dir: Path) -> tuple[Path, dict | None]:
    """The cell's quantization scheme applied to its model (nothing without one); returns the model and the record."""
    if cell.quantization is None:
        return model_dir, None
    from vlmprune.quantize import quantize_model_dir

    return quantize_model_dir(model_dir, cell.quantization, cell_dir / "quantized", overwrite=True)


def _evaluate_cell(study: _Study, model_dir: Path, pruned: Path, quantization: dict | None) -> dict:
    """The tasks' scores, with the quantization and, from the pruned model's run record, the achieved
    ratio and target."""
    evaluated = _evaluate(model_dir, study.evaluation)
    if quantization is not None:
        evaluated["quantization"] = quantization
    record = RunRecord.load(pruned).prune or PruneRecord()
    evaluated["achieved"] = record.achieved
    if record.target is not None:
        evaluated["target"] = record.target
    return evaluated


def _record_cell(study: _Study, cell: Cell, cell_dir: Path, evaluated: dict, t0: float) -> None:
    """eval.json, then (models removed unless kept) status.json: the cell is done."""
    _write_json(cell_dir / "eval.json", evaluated)
    if (study.config["recipes"][cell.recipe] is not None or cell.quantization is not None) \
            and not study.config["keep_models"]:
        shutil.rmtree(cell_dir / "model", ignore_errors=True)
        shutil.rmtree(cell_dir / "quantized", ignore_errors=True)
    _write_json(cell_dir / "status.json", {"status": "done", "seconds": time.time() - t0})
    study.result.done += 1
    log.info("[study] %s: mean accuracy %s (%.0f s)", cell.id, "n/a" if evaluated["accuracy"] is None
             else f"{evaluated['accuracy']:.3f}", time.time() - t0)
