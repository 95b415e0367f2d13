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
import re
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vlmprune.config import (
    CalibrationOptions,
    CompensationOptions,
    EvalConfig,
    EvalOptions,
    PruneConfig,
    RecoverConfig,
    WidthOptions,
    build,
    check_keys,
    deep_merge,
    options_of,
    parse_overrides,
    read_yaml,
)
from vlmprune.errors import VlmpruneError
from vlmprune.paths import STUDY, claim_output, write_marker
from vlmprune.planning.plan import PLAN_FILE
from vlmprune.readers import read_json, read_yaml_file
from vlmprune.record import PruneRecord, RunRecord
from vlmprune.vocab import COMPENSATE_FITS

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
    # how a grid's `compensate` axis fits (vlmprune prune)
    "compensation": {"sequential": True, "ridge": None, "select": False, "layers": "map"},
    "evaluation": {"tasks": ["easyvqa", "digits"], "limit": None, "task_file": None, "batch_size": 32,
                   "data_dir": None, "max_new_tokens": 10},
    "recovery": {},
    "recipes": {"none": None},
    "grid": [],
    "keep_models": False,
    "max_cells": 200,  # a larger grid is refused unless this is raised (each cell prunes, trains, evaluates)
}

# What a rerun on the same run directory may change (everything else would mix the cells already done with
# results of another setup): the name, keeping models, the cell limit, new grid cells and new recipes.
SAFE_TO_CHANGE = ("name", "output", "keep_models", "max_cells", "grid", "recipes")
# Config keys that hold paths (compared resolved: ./m and /abs/m are the same teacher).
_PATH_KEYS = ("teacher", "train_data", "image_folder", "evaluation.data_dir", "evaluation.task_file",
              "evaluation.lmms_include")
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # recipe names and cell ids: path components


# The sections that are option groups of the stages, typed as those groups: the keys each may hold (what the
# study fills in itself left out), and the stand-ins the check needs (a grid's `compensate` axis gives the mode).
_SECTIONS = {"calibration": (CalibrationOptions, ("path", "image_folder", "seed"), {}),
             "width": (WidthOptions, (), {}),
             "compensation": (CompensationOptions, ("mode",), {"mode": "ls"}),
             "evaluation": (EvalOptions, (), {})}
_RECOVERY_KEYS = tuple(o.key for o in options_of(RecoverConfig)
                       if o.key not in ("student", "teacher", "data", "image_folder", "output", "overwrite", "resume"))


def study_sections(config: dict[str, Any]) -> dict[str, Any]:
    """The study's ``calibration:``, ``width:``, ``compensation:`` and ``evaluation:`` sections as the stages'
    option groups (null values are the group's defaults), checked as the stages check them."""
    out = {}
    for section, (cls, filled, stand_in) in _SECTIONS.items():
        values = config[section]
        if not isinstance(values, dict):
            raise VlmpruneError(f"'{section}' must be a mapping of option: value")
        check_keys(values, [f.name for f in dataclasses.fields(cls) if f.name not in filled], f"{section}.")
        given = {k: v for k, v in values.items() if v is not None}
        try:
            out[section] = cls(**{**stand_in, **given})
        except TypeError as exc:
            raise VlmpruneError(f"'{section}': {exc}") from None
    return out


def check_study_config(config: dict[str, Any], origin: str) -> None:
    """Refuse unknown keys at any depth and bad values, before any cell runs."""
    check_keys(config, DEFAULTS, "")
    for section, known in (("criterion", ("layer", "width")), ("recovery", _RECOVERY_KEYS)):
        if not isinstance(config[section], dict):
            raise VlmpruneError(f"{origin}: '{section}' must be a mapping of option: value")
        check_keys(config[section], known, f"{section}.")
    if not isinstance(config["recipes"], dict) or not config["recipes"]:
        raise VlmpruneError(f"{origin}: 'recipes' must map recipe names to recovery options (or null)")
    for name, recipe in config["recipes"].items():
        if not isinstance(name, str) or not SAFE_ID.match(name) or ".." in name:
            raise VlmpruneError(f"{origin}: recipe name {name!r} becomes part of folder names: use letters, digits "
                                f"and _ . + - only (starting with a letter or digit)")
        if recipe is None:
            continue
        if not isinstance(recipe, dict):
            raise VlmpruneError(f"{origin}: recipe {name!r} must be a mapping of recovery options or null")
        check_keys(recipe, _RECOVERY_KEYS, f"recipes.{name}.")
        # values checked now, with stand-ins for the paths each cell fills in
        build(RecoverConfig, {**config["recovery"], **recipe, "student": "-", "data": "-", "output": "-",
                              "teacher": "-"})
    sections = study_sections(config)
    for method in ("layer", "width"):
        build(PruneConfig, {"model": "-", "output": "-", "method": method, "ratio": 0.5,
                            "criterion": config["criterion"].get(method), "calibration": sections["calibration"],
                            **({"width": sections["width"]} if method == "width" else {})})
    evaluation = build(EvalConfig, evaluation=sections["evaluation"])
    evaluation.check_paths(model=False)
    if evaluation.evaluation.task_file is not None:  # a task file that is not JSON fails here, not in every cell
        from vlmprune.evaluate.tasks import load_task

        load_task(evaluation.evaluation.task_file, limit=1)
    if not isinstance(config["grid"], list) or not all(isinstance(b, dict) for b in config["grid"]):
        raise VlmpruneError(f"{origin}: 'grid' must be a list of blocks, each a mapping of axis: value or [values]")
    for block in config["grid"]:  # the values, against their choices, before any becomes a folder name
        _check_axes({k: v if isinstance(v, list) else [v] for k, v in block.items()}, config)
    cells = _safe(expand_grid(config), origin)
    limit = config["max_cells"]
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise VlmpruneError(f"{origin}: max_cells must be an integer >= 1, got {limit!r}")
    if len(cells) > limit:
        pruned = len({c.prune_id for c in cells})
        trained = sum(1 for c in cells if config["recipes"][c.recipe] is not None)
        raise VlmpruneError(f"{origin}: the grid has {len(cells):,} cells, more than max_cells={limit}: "
                            f"{pruned:,} pruned models (each kept under pruned/), {trained:,} recovery runs and "
                            f"{len(cells):,} evaluations{_size_estimate(config['teacher'], pruned)}. Narrow the "
                            f"grid, or set max_cells={len(cells)} if you mean it")


def _size_estimate(teacher: Any, models: int) -> str:
    """', up to N GB ...' for ``models`` copies of the teacher ('' when the teacher is not a local folder)."""
    folder = Path(str(teacher)).expanduser()
    if not folder.is_dir():
        return ""
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return f", up to {models * size / 2**30:,.1f} GB of pruned weights on disk" if size else ""


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
        bad = [c for c in compensations if c not in COMPENSATE_FITS]
        if bad:
            raise VlmpruneError(f"grid names compensate {bad}; modes: {', '.join(COMPENSATE_FITS)}")
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
            # auto: the width criterion names the cell; the depth part uses criterion.layer
            default = config["criterion"]["width" if method == "auto" else method]
            for criterion in axes.get("criterion", [default]):
                cell = Cell(method, criterion, ratio, recipe,
                            None if config["recipes"][recipe] is None else float(fraction or 1.0), scheme, target,
                            compensate)
                cells.setdefault(cell.id, cell)
    return list(cells.values())


def _safe(cells: list[Cell], origin: str) -> list[Cell]:
    """``cells``, after refusing any whose id is not a safe folder name (it becomes cells/<id>)."""
    for cell in cells:
        if not SAFE_ID.match(cell.id) or ".." in cell.id:
            raise VlmpruneError(f"{origin}: grid cell id {cell.id!r} is not a safe folder name (letters, digits "
                                f"and _ . + - only): check the grid's values")
    return cells


def _check_axes(axes: dict[str, list], config: dict) -> None:
    """Every value of a grid block against its known choices (they become the cells' folder names)."""
    from vlmprune.config import check_ratio
    from vlmprune.importance.registry import criteria
    from vlmprune.vocab import PRUNE_METHODS

    for method in axes.get("method", []):
        if method not in PRUNE_METHODS:
            raise VlmpruneError(f"grid names method {method!r}; methods: {', '.join(PRUNE_METHODS)}")
    for method in axes.get("method", ["layer"]):
        part = "width" if method == "auto" else method
        named = [(criterion, part) for criterion in axes.get("criterion", [config["criterion"][part]])]
        if method == "auto":  # its depth part
            named.append((config["criterion"]["layer"], "layer"))
        for criterion, kind in named:
            known = [c.name for c in criteria(kind)]
            if criterion not in known:
                raise VlmpruneError(f"grid names criterion {criterion!r} for method {kind}; its criteria: "
                                    f"{', '.join(known)} (`vlmprune criteria` lists them)")
    for ratio in axes.get("ratio", []):
        try:
            check_ratio(ratio)
        except VlmpruneError:
            raise VlmpruneError(f"grid ratio {ratio!r}: a ratio is a fraction of the model's parameters in (0, 1)") \
                from None
    for fraction in axes.get("fraction", []):
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                     or not 0 < fraction <= 1):
            raise VlmpruneError(f"grid fraction {fraction!r}: a data fraction is a number in (0, 1]")
    for recipe in axes.get("recipe", []):
        if not isinstance(recipe, str) or recipe not in config["recipes"]:
            raise VlmpruneError(f"grid names recipe {recipe!r}, not defined under 'recipes' "
                                f"({', '.join(map(str, config['recipes']))})")
    for target in axes.get("target", []):
        if not isinstance(target, str):
            raise VlmpruneError(f"grid target {target!r}: a target is text such as params=0.7 or memory=450MB")


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


def _evaluate(model: str | Path, evaluation: EvalOptions) -> dict:
    from vlmprune.evaluate.run import evaluate_model_dir

    result = evaluate_model_dir(build(EvalConfig, model=str(model), evaluation=evaluation))
    result.pop("config", None)
    return result


@dataclass
class _Study:
    """What the phases of a study's cells share: the config, the run directory, the inputs, the tally."""

    config: dict
    run: Path
    evaluation: dict
    sections: dict  # the typed sections (study_sections)
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
    with claim_output(config["output"], _inputs(config), kind=STUDY, resume=True) as run:
        return _run_study(config, run)


def _inputs(config: dict) -> list[tuple[str, Any]]:
    evaluation = config["evaluation"]
    return [("teacher", config["teacher"]), ("training data", config["train_data"]),
            ("image folder", config["image_folder"]), ("evaluation data directory", evaluation.get("data_dir")),
            ("evaluation task file", evaluation.get("task_file")),
            ("lmms-eval include folder", evaluation.get("lmms_include"))]


def _run_study(config: dict, run: Path) -> StudyResult:
    study = _Study(config, run, dict(config["evaluation"]), study_sections(config), StudyResult(Path(config["output"])))
    check_rerun(run, config)
    cells = run_order(_safe(expand_grid(config), "the study config"), config)
    (run / "cells").mkdir(parents=True, exist_ok=True)
    write_marker(run, STUDY)
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    original = study.run / "original"
    if not (original / "eval.json").exists():
        original.mkdir(exist_ok=True)
        log.info("[study] evaluating the original model %s", study.teacher)
        scores = _evaluate(study.teacher, study.sections["evaluation"])
        _write_json(original / "eval.json", {"model": study.teacher, **scores})
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
    if cell_dir.exists() or cell_dir.is_symlink():
        _remove(study.run, cell_dir)  # an unfinished or failed attempt: start the cell over
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


def _remove(run: Path, path: Path) -> None:
    """Delete ``path``, a folder of the run directory: never anything that resolves outside it."""
    inside = run.resolve()
    target = path.resolve()
    if path.is_symlink() or target == inside or not target.is_relative_to(inside):
        raise VlmpruneError(f"{path} resolves to {target}, outside the run directory {inside} (or to the run "
                            f"directory itself): a study deletes only its own cells; remove it yourself")
    shutil.rmtree(target)


def _normalised(config: dict) -> dict:
    """The config as YAML would read it back, with path values resolved (so ./m and /abs/m compare equal)."""
    plain = yaml.safe_load(yaml.safe_dump(config, sort_keys=False))
    for key in _PATH_KEYS:
        *parents, last = key.split(".")
        node = plain
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(last), str):
            node[last] = str(Path(node[last]).expanduser().resolve())
    return plain


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(key), new.get(key), f"{where}{key}.")]
    return [] if old == new else [f"{where.rstrip('.')}: {old!r} -> {new!r}"]


def check_rerun(run: Path, config: dict) -> None:
    """A rerun on an earlier run directory continues its done cells: refuse a config that differs from the run's
    in anything but :data:`SAFE_TO_CHANGE` (recipes only by new ones), naming the difference."""
    saved = run / "resolved_config.yaml"
    if not saved.is_file():
        return
    try:
        earlier = read_yaml_file(saved)
    except VlmpruneError as exc:
        raise VlmpruneError(f"{exc}; the run directory is damaged: choose another output") from None
    if not isinstance(earlier, dict):
        raise VlmpruneError(f"{saved} does not hold a study config; the run directory is damaged: choose another "
                            f"output")
    old, new = _normalised(earlier), _normalised(config)
    changed = [d for key in sorted(set(old) | set(new), key=str) if key not in SAFE_TO_CHANGE
               for d in _differences(old.get(key), new.get(key), f"{key}.")]
    old_recipes, new_recipes = old.get("recipes") or {}, new.get("recipes") or {}
    changed += [f"recipes.{name}: {old_recipes[name]!r} -> {new_recipes[name]!r}" for name in old_recipes
                if name in new_recipes and old_recipes[name] != new_recipes[name]]
    if changed:
        raise VlmpruneError(f"{run} holds a study run with another setup, and a rerun continues its done cells: "
                            f"{'; '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}. Only "
                            f"{', '.join(SAFE_TO_CHANGE[:-2])}, new grid cells and new recipes may change; give "
                            f"another output for the new setup (or restore the options)")


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
    sections = study.sections
    calibration = dataclasses.replace(sections["calibration"], path=study.data, image_folder=study.folder,
                                      seed=config["seed"])
    options = {"model": study.teacher, "output": str(pruned), "overwrite": True, "ratio": cell.ratio,
               "target": cell.target}
    if cell.method in ("width", "auto"):
        options["width"] = sections["width"]
    if cell.method == "auto":
        options["layer_criterion"] = config["criterion"]["layer"]
        shared = []  # auto scores two criteria and searches: nothing to share
    options["compensation"] = dataclasses.replace(sections["compensation"], mode=cell.compensate)
    if cell.compensate != "none":  # the fits need the calibration data, even where scores are shared
        options["calibration"] = calibration
    if shared:  # one calibration serves every ratio of a method and criterion (and every compensation)
        options["scores"] = str(shared[0])
    else:
        options.update(method=cell.method, criterion=cell.criterion, calibration=calibration)
    prune(build(PruneConfig, options))
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
    evaluated = _evaluate(model_dir, study.sections["evaluation"])
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
        for folder in (cell_dir / "model", cell_dir / "quantized"):
            if folder.exists():
                _remove(study.run, folder)
    _write_json(cell_dir / "status.json", {"status": "done", "seconds": time.time() - t0})
    study.result.done += 1
    log.info("[study] %s: mean accuracy %s (%.0f s)", cell.id, "n/a" if evaluated["accuracy"] is None
             else f"{evaluated['accuracy']:.3f}", time.time() - t0)
