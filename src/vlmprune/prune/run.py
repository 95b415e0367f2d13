"""The prune stage: calibrate -> score -> plan -> cut -> write, each step a verb that returns a value.

``score`` runs a registered criterion (collecting the statistics it names);
:func:`vlmprune.planning.solve.plan_for` turns scores into a plan for a ratio; ``prune`` is the whole
command on a :class:`PruneConfig` and returns a :class:`PruneResult` (nothing here prints: the CLI
presents results).
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmprune import calibrate, phases
from vlmprune.adapters import get_adapter
from vlmprune.checkpoint import load, load_processor, save_model
from vlmprune.config import (
    RESOLVED_CONFIG,
    CalibrationOptions,
    CompensationOptions,
    PruneConfig,
    build,
    check_ratio,
    parse_device_map,
    parse_max_memory,
    parse_target,
    to_yaml,
)
from vlmprune.data.collate import warn_too_long
from vlmprune.dispatch import is_dispatched, materialize_
from vlmprune.errors import VlmpruneError
from vlmprune.importance.layer import LayerScores
from vlmprune.importance.registry import get_collector, get_criterion
from vlmprune.importance.scores import SCORES_FILE, Scores
from vlmprune.importance.structures import WidthScores
from vlmprune.paths import check_not_quantized, claim_output, sibling
from vlmprune.planning.plan import PLAN_FILE, LayerShape, PruningPlan
from vlmprune.planning.search import search as auto_search
from vlmprune.planning.solve import ModelBudget, achieved, layers_to_drop, plan_for, stock_plan
from vlmprune.planning.targets import footprint, latency_profile, measure_prefill, predict_latency, ratio_for
from vlmprune.plots import plot_layer_scores, plot_search, plot_width_scores
from vlmprune.record import RUN_FILE, PruneRecord, RunRecord
from vlmprune.summary import ModelSummary, differences, layer_shapes, same_weights, source_record, summarize
from vlmprune.surgery.apply import apply_plan_, loads_stock
from vlmprune.surgery.compensate import check_mode, compensate_

log = logging.getLogger(__name__)

SEARCH_FILE = "search.json"


@dataclass
class ScoringContext:
    """What a criterion may read besides its statistics."""

    model: nn.Module
    adapter: Any
    shapes: list[LayerShape]
    seed: int = 0


def score(model: nn.Module, method: str, criterion: str | None = None, batches=None, tokens: str | None = None,
          seed: int = 0) -> Scores:
    """Score ``model`` with a registered criterion (collecting the statistics it needs from ``batches``)."""
    crit = get_criterion(method, criterion)
    tokens = tokens or crit.default_tokens
    if crit.stats is not None and not batches:
        raise VlmpruneError(f"criterion {crit.name!r} needs calibration data (--calibration)")
    stats = None
    if crit.stats:
        with phases.phase("calibration"):
            stats = get_collector(crit.stats)(model, batches, tokens)
    if is_dispatched(model):
        with phases.phase("load"):
            materialize_(model)  # offloaded weights come in once: criteria read weights, the cut follows
    with phases.phase("scoring"):
        adapter = get_adapter(model)
        values = crit(stats, ScoringContext(model, adapter, layer_shapes(model, adapter), seed))
        del stats
        phases.trim_malloc()  # calibration's activations and statistics are gone: give their memory back
    if method == "layer" and not isinstance(values, LayerScores):
        values = LayerScores(torch.as_tensor(values, dtype=torch.float64))
    if method == "width" and not isinstance(values, WidthScores):
        raise VlmpruneError(f"width criterion {crit.name!r} returned {type(values).__name__}, not WidthScores")
    return Scores(method, crit.name, tokens, values, source_record(model))


def score_and_plan(model: nn.Module, method: str, ratio: float, criterion: str | None = None, batches=None,
                   tokens: str | None = None, attention: str = "groups", mlp_multiple: int | None = None,
                   layers: str | None = None, global_ranking: bool = False, seed: int = 0):
    """``score`` then ``plan_for`` on a model in memory; returns (plan, scores)."""
    check_ratio(ratio)
    if method == "layer":  # a ratio that drops no layer (or all) fails before calibration
        layers_to_drop(len(layer_shapes(model)), ModelBudget.of(model), ratio)
    scores = score(model, method, criterion, batches, tokens, seed)
    return plan_for(model, scores, ratio, attention, mlp_multiple, layers, global_ranking), scores


@dataclass
class PruneResult:
    """What ``prune`` did: where the model went, the plan, and the model before and after."""

    output: Path
    plan: PruningPlan
    before: ModelSummary
    after: ModelSummary
    scores: Scores | None = None
    cost: dict | None = None  # wall time and peak RSS per phase (vlmprune.phases), as in the record's "cost"
    record: RunRecord | None = None  # what run.json beside the model says

    @property
    def removed(self) -> float:
        return 1 - self.after.parameters["total"] / self.before.parameters["total"]

    @property
    def removed_language_model(self) -> float:
        return 1 - self.after.parameters["language_model"] / self.before.parameters["language_model"]


def prune(config: PruneConfig | None = None, **options) -> PruneResult:
    """Prune a model as ``config`` (or keyword options of :class:`PruneConfig`) says and write it.

    With ``plan``: apply it. Otherwise calibrate (unless ``scores`` gives an earlier run's scores
    or the criterion needs no data), score, plan for ``ratio``, cut, and write the model with
    ``pruning_plan.json`` (what is removed), ``run.json`` (the run record), ``scores.json``,
    ``importance.png`` and ``resolved_config.yaml``. Every
    input is checked and the output claimed before the model loads; nothing is written unless
    pruning succeeds.
    """
    cfg = config if config is not None else build(PruneConfig, options)
    if config is not None and options:
        raise VlmpruneError("give a PruneConfig or keyword options, not both")
    cfg.check_paths()
    check_not_quantized(cfg.model, "prune")
    if cfg.plan is not None:  # a malformed plan or scores file fails before the model loads (read again after)
        PruningPlan.load(cfg.plan)
    if cfg.scores is not None:
        Scores.load(cfg.scores)
    with contextlib.ExitStack() as stack:
        stack.enter_context(phases.recording())  # joins the CLI's recording, which also counts the imports
        out = stack.enter_context(claim_output(cfg.output, cfg.inputs(), cfg.overwrite))
        extra = [stack.enter_context(claim_output(rank_output(cfg.output, r), cfg.inputs(), cfg.overwrite))
                 for r in range(2, cfg.planning.top_k + 1)]
        return _prune(cfg, out, extra)


def _calibration_batches(cal: CalibrationOptions, processor, held_out: bool = False):
    """The calibration batches ``cal`` describes; ``held_out``: a quarter as many, drawn with the next seed (what
    the auto search ranks its candidates on)."""
    if held_out:
        return calibrate.calibration_batches(processor, cal.path, cal.image_folder, max(2, cal.num_samples // 4),
                                             cal.seed + 1, cal.batch_size, cal.max_length, cal.split)
    return calibrate.calibration_batches(processor, cal.path, cal.image_folder, cal.num_samples, cal.seed,
                                         cal.batch_size, cal.max_length, cal.split)


def _fit(comp: CompensationOptions, net: nn.Module, plan: PruningPlan, batches) -> dict:
    """:func:`compensate_` as the compensation options say."""
    return compensate_(net, plan, batches, comp.mode, comp.sequential, comp.ridge, select=comp.select,
                       layers_fit=comp.layers)


def _compensate(cfg: PruneConfig, net: nn.Module, plan: PruningPlan, batches) -> dict:
    """Fit the kept weights to stand in for what the plan removes (the statistics are collected anew,
    also for --plan and --scores: neither carries activations)."""
    check_mode(net, plan, cfg.compensation.mode)
    if batches is None:
        with phases.phase("data"):
            batches = _calibration_batches(cfg.calibration, load_processor(cfg.model, cfg.load.trust_remote_code))
    with phases.phase("compensation"):
        comp = cfg.compensation
        record = _fit(comp, net, plan, batches)
    width = [e for layer in record["layers"].values() for e in layer.values()]
    if width:
        log.info("compensation (%s): consumer output error %.3g -> %.3g (mean over %d projections)", comp.mode,
                 sum(e["error_before"] for e in width) / len(width), sum(e["error_after"] for e in width) / len(width),
                 len(width))
    for run in record["dropped_runs"]:
        if "error_after" in run:
            log.info("compensation: dropped layers %s -> a linear map in layer %d's MLP output (error %.3g -> %.3g)",
                     run["layers"], run["into"], run["error_before"], run["error_after"])
    return record


def rank_output(output: str | Path, rank: int) -> Path:
    """Where ``--top-k`` writes the candidate of this rank (the best goes to the output itself)."""
    output = Path(output)
    return output.with_name(f"{output.name}-rank{rank}")


def _prune(cfg: PruneConfig, out: Path, ranked_outputs: list[Path] = ()) -> PruneResult:
    with contextlib.ExitStack() as stack:
        dispatch = {}
        if cfg.load.device_map is not None:
            folder = cfg.load.offload_folder or stack.enter_context(
                tempfile.TemporaryDirectory(prefix=sibling(out, "offload-").name, dir=out.parent))
            dispatch = {"device_map": parse_device_map(cfg.load.device_map),
                        "max_memory": parse_max_memory(cfg.load.max_memory), "offload_folder": folder}
        with phases.phase("load"):
            net = load(cfg.model, **cfg.load.kwargs(), **dispatch)
            if cfg.load.device:
                net.to(cfg.load.device)
            if cfg.load.device_map is not None and (cfg.plan is not None or cfg.scores is not None):
                materialize_(net)  # nothing to calibrate: the weights come in once for the cut
            phases.trim_malloc()  # what loading freed (read buffers, the skeleton's init) goes back
        return _prune_loaded(cfg, out, net, ranked_outputs)


@dataclass
class _Run:
    """What the steps of one prune pass along: the model, the plan and its record as they take shape."""

    cfg: PruneConfig
    net: nn.Module
    before: ModelSummary
    weight_bytes: int
    target: Any = None
    scores: Scores | None = None
    batches: Any = None
    processor: Any = None
    plan: PruningPlan | None = None
    record: PruneRecord | None = None
    search: dict | None = None
    tried: list | None = None
    after: ModelSummary | None = None
    cost: dict | None = None
    given_plan_notes: dict | None = None  # --plan: the plan's own notes (what it said it removes, among them)


def _prune_loaded(cfg: PruneConfig, out: Path, net: nn.Module, ranked_outputs: list[Path] = ()) -> PruneResult:
    """The prune of a loaded model, step by step: a given plan, or scores (computed or --scores) planned for a
    ratio or a target (or the auto search); the record annotated (inputs, target, loading); the compensation
    fit; the cut; the measurements; the model and its records written; the --top-k runners-up."""
    run = _start(cfg, net)
    if cfg.plan is not None:
        with phases.phase("planning"):
            _given_plan(run, PruningPlan.load(cfg.plan))
    else:
        method = _load_scores(run)
        _calibration_data(run, method)
        if method == "auto":
            _plan_auto(run)
        else:
            _plan_ratio(run, method)
        _annotate_inputs(run)
    _annotate_loading(run)
    if cfg.compensation.mode != "none":
        run.record.compensation = _compensate(cfg, net, run.plan, run.batches)
    _cut(run)
    _measure(run)
    _write(run, out)
    _write_ranked(run, ranked_outputs)
    return PruneResult(out, run.plan, run.before, run.after, run.scores, run.cost, RunRecord(prune=run.record))


def _start(cfg: PruneConfig, net: nn.Module) -> _Run:
    """The model before the cut, its weight bytes (for the cost record) and the parsed --target."""
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in net.parameters()}.values())
    target = cfg.planning.target
    return _Run(cfg, net, summarize(net), weight_bytes, parse_target(target) if target else None)


def _take_plan(run: _Run, plan: PruningPlan) -> None:
    """The plan becomes only what is removed; the planner's notes on it start the run's record."""
    run.record = PruneRecord.from_notes(plan.extra)
    run.plan = PruningPlan(drop_layers=plan.drop_layers, layers=plan.layers)


# notes of a plan that are measurements of the run that wrote it, not of this one: a given plan's run measures anew
_MEASURED_NOTES = ("achieved", "proxy_kl", "rank", "search", "source", "loads_with", "loads_with_reason", "parameters",
                   "cost", "compensation", "target")


def _given_plan(run: _Run, plan: PruningPlan) -> None:
    """--plan: checked against the model it was made for (its ``source`` note, or the run.json beside it);
    the run record keeps the plan's notes on how it was made, and measures what it removes from this model."""
    _check_plan_source(run, plan)
    _take_plan(run, PruningPlan(plan.drop_layers, plan.layers,
                                {k: v for k, v in plan.extra.items() if k not in _MEASURED_NOTES}))
    run.given_plan_notes = plan.extra


def _check_plan_source(run: _Run, plan: PruningPlan) -> None:
    cfg = run.cfg
    source, where = plan.extra.get("source"), "the plan's 'source' field"
    if source is None:
        beside = Path(cfg.plan) if Path(cfg.plan).is_dir() else Path(cfg.plan).parent
        if (beside / RUN_FILE).is_file():
            with contextlib.suppress(VlmpruneError):  # an unreadable record checks nothing; the plan itself is read
                record = RunRecord.load(beside)
                if record.prune is not None:
                    source, where = record.prune.source, f"{beside / RUN_FILE} (prune.source)"
    if not isinstance(source, dict) or "fingerprint" not in source:
        return
    here = source_record(run.net)
    if source["fingerprint"] == here["fingerprint"]:
        return
    what = "; ".join(differences(here, source, where)) or f"architecture fingerprint {source['fingerprint']} vs " \
                                                          f"{here['fingerprint']}"
    raise VlmpruneError(f"--plan {cfg.plan} was made for another model than {cfg.model}: {what}. A plan's indices "
                        f"are those of the model it was made for: plan for {cfg.model} (prune with --ratio or "
                        f"--target), or remove the plan's 'source' field (and the run.json beside it) to apply it "
                        f"anyway")


def _load_scores(run: _Run) -> str:
    """--scores: an earlier run's scores of this very model (checked); returns the method to plan with."""
    cfg = run.cfg
    if cfg.scores is None:
        return cfg.planning.method
    scores = run.scores = Scores.load(cfg.scores)
    if cfg.planning.method is not None and cfg.planning.method != scores.method:
        raise VlmpruneError(f"--scores holds {scores.method} scores ({scores.criterion}); "
                            f"--method is {cfg.planning.method}")
    if cfg.planning.criterion is not None and cfg.planning.criterion != scores.criterion:
        raise VlmpruneError(f"--scores holds {scores.criterion} scores; --criterion is {cfg.planning.criterion}")
    here = source_record(run.net)
    recorded = scores.model
    if recorded.get("fingerprint") != here["fingerprint"]:
        what = "; ".join(differences(here, recorded, "the scores file")) or (
            f"architecture fingerprint {recorded.get('fingerprint')} vs {here['fingerprint']}")
        raise VlmpruneError(f"--scores {cfg.scores} were computed on another model than {cfg.model}: {what}. Use "
                            f"the scores.json of a prune of {cfg.model}, or prune without --scores")
    same = same_weights(here["weights"], recorded.get("weights"))
    if same is False:
        raise VlmpruneError(f"--scores {cfg.scores} were computed on another model than {cfg.model}: the "
                            f"architecture is the same but the weights differ (a sample of the embedding and the "
                            f"first and last layers' weights). Use the scores.json of a prune of {cfg.model}, or "
                            f"prune without --scores")
    if same is None and here["weights"] is not None:
        log.warning("--scores %s records no sample of the weights (written by an older vlmprune): only the "
                    "architecture was checked; they must be scores of %s", cfg.scores, cfg.model)
    scores.check(run.before.layers, f"--scores {cfg.scores}")
    return scores.method


def _calibration_data(run: _Run, method: str) -> None:
    """A layer ratio that drops no layer (or all) fails first; then the calibration batches, where needed."""
    cfg = run.cfg
    if method == "layer" and cfg.planning.ratio is not None:
        layers_to_drop(len(run.before.layers), ModelBudget.of(run.net), cfg.planning.ratio)  # before any calibration
    if (run.scores is None or cfg.compensation.mode != "none") and cfg.calibration.path is not None:
        with phases.phase("data"):
            run.processor = load_processor(cfg.model, cfg.load.trust_remote_code)
            run.batches = _calibration_batches(cfg.calibration, run.processor)
            warn_too_long(run.batches.collator, run.batches.samples, run.net.config, "calibration")


def _ratio_of(run: _Run, plan_at) -> float:
    """The ratio to plan for: --ratio, or the one that meets --target (``plan_at(ratio)`` plans a candidate)."""
    return run.cfg.planning.ratio if run.target is None else ratio_for(run.net, run.target, plan_at)


def _plan_ratio(run: _Run, method: str) -> None:
    """Score (unless --scores gave them) and plan for the ratio; --stock may keep attention whole."""
    cfg, net = run.cfg, run.net
    if run.scores is None:
        run.scores = score(net, method, cfg.planning.criterion, run.batches, cfg.calibration.tokens,
                           cfg.calibration.seed)
    scores = run.scores
    with phases.phase("planning"):
        w = cfg.width
        ratio = _ratio_of(run, lambda r: plan_for(net, scores, r, w.attention, w.mlp_multiple, w.layers,
                                                   w.global_ranking))
        _take_plan(run, (stock_plan if cfg.planning.stock else plan_for)(net, scores, ratio, w.attention,
                                                                         w.mlp_multiple, w.layers, w.global_ranking))


def _plan_auto(run: _Run) -> None:
    """--method auto: score layers and widths, plan candidates, keep the best on held-out batches."""
    cfg, net = run.cfg, run.net
    if run.batches is None:
        raise VlmpruneError("--method auto ranks candidates on held-out calibration data: pass --calibration")
    with phases.phase("data"):
        held_out = _calibration_batches(cfg.calibration, run.processor, held_out=True)
    layer_scores = score(net, "layer", cfg.planning.layer_criterion, run.batches, None, cfg.calibration.seed)
    scores = run.scores = score(net, "width", cfg.planning.criterion, run.batches, cfg.calibration.tokens,
                                cfg.calibration.seed)
    with phases.phase("planning"):  # candidates planned and ranked on the held-out batches
        fit = None if cfg.compensation.mode == "none" else (  # candidates compared as compensated models
            lambda m, p: _fit(cfg.compensation, m, p, run.batches))
        best, run.tried = auto_search(net, layer_scores.values, scores.values, lambda plan_at: _ratio_of(run, plan_at),
                                      held_out, cfg.width.attention, cfg.width.mlp_multiple, fit)
    budget, shapes = ModelBudget.of(net), layer_shapes(net)
    run.search = {"target": cfg.planning.target or f"ratio={cfg.planning.ratio}",
                  "layer_criterion": layer_scores.criterion,
                  "width_criterion": scores.criterion, "chosen": run.tried.index(best),
                  "candidates": [c.to_dict(budget, shapes) for c in run.tried]}
    _take_plan(run, best.plan)
    run.record = replace(run.record, method="auto", criterion=scores.criterion, tokens=scores.tokens,
                         layer_criterion=layer_scores.criterion, ratio_target=best.ratio, attention=cfg.width.attention,
                         mlp_multiple=cfg.width.mlp_multiple, achieved=achieved(run.plan, budget, shapes),
                         proxy_kl=best.proxy, search=SEARCH_FILE)


def _annotate_inputs(run: _Run) -> None:
    """The record says what the plan came from, and what it makes of --target (footprint, predicted latency)."""
    cfg, net, plan = run.cfg, run.net, run.plan
    run.record = replace(run.record, source_model=str(cfg.model),
                         calibration=str(cfg.calibration.path) if cfg.calibration.path else None,
                         num_samples=cfg.calibration.num_samples, seed=cfg.calibration.seed)
    target = run.target
    if target is None:
        return
    with phases.phase("planning"):  # the target's footprint (and latency profile)
        fp = footprint(net, target, plan)
        record = {"spec": target.spec, "kind": target.kind, "required": target.value,
                  "parameters": fp.parameters, "weight_bytes": fp.weight_bytes, "kv_bytes": fp.kv_bytes,
                  "seq": target.seq, "batch": target.batch, "dtype_bytes": target.dtype_bytes}
        if target.kind == "latency":
            profile = latency_profile(net, target)
            record["predicted_s"] = predict_latency(profile, run.before.layers, plan)
            record["profile"] = profile
        else:
            record["achieved"] = fp.value(target)
        run.record.target = record


def _annotate_loading(run: _Run) -> None:
    """Say before the cut whether plain ``from_pretrained`` will load the result (--stock insists on it)."""
    run.record.source = source_record(run.net)
    with phases.phase("planning"):
        obstacle = loads_stock(run.net, run.plan)  # said before the cut, recorded in the run record
    if obstacle and run.cfg.planning.stock:
        raise VlmpruneError(f"--stock: the pruned model could not load with plain from_pretrained: {obstacle}; "
                            f"drop --stock (and load it with vlmprune.load), or ask for other shapes")
    run.record.loads_with = "vlmprune.load" if obstacle else "from_pretrained"
    if obstacle:
        run.record.loads_with_reason = obstacle
        log.warning("the pruned model will need vlmprune.load (plain from_pretrained refuses it): %s", obstacle)
    else:
        log.info("the pruned model will load with plain from_pretrained")


def _cut(run: _Run) -> None:
    with phases.phase("surgery"):
        apply_plan_(run.net, run.plan)
    run.after = summarize(run.net)


def _measure(run: _Run) -> None:
    """Parameters before and after; a latency target's prediction checked on the final model; the planned
    ratio checked against the measured one."""
    record, before, after = run.record, run.before, run.after
    record.parameters = {"before": before.parameters, "after": after.parameters}
    if (record.target or {}).get("kind") == "latency":  # the prediction, checked on the final model
        t = record.target
        t["achieved"] = t["measured_s"] = measure_prefill(run.net, t["seq"], t["batch"])
        t["prediction_error"] = t["predicted_s"] / t["measured_s"] - 1
        log.info("prefill latency at seq %d, batch %d: predicted %.1f ms, measured %.1f ms (target %.1f ms)",
                 t["seq"], t["batch"], 1000 * t["predicted_s"], 1000 * t["measured_s"], 1000 * t["required"])
    measured = 1 - after.parameters["total"] / before.parameters["total"]
    if run.given_plan_notes is not None:  # --plan: what it removes from this model, measured
        removed = before.parameters["total"] - after.parameters["total"]
        record.achieved = {"params_removed": removed, "ratio": measured,
                           "ratio_language_model": removed / before.parameters["language_model"]}
        said = run.given_plan_notes.get("achieved")
        said = said.get("ratio") if isinstance(said, dict) else None
        if isinstance(said, (int, float)) and not isinstance(said, bool) and abs(said - measured) > 1e-9:
            log.warning("the plan's notes say it removes %.4f%% of the model, but it removes %.4f%% of %s (edited "
                        "by hand?); run.json records what it removes", 100 * said, 100 * measured, run.cfg.model)
    if record.achieved is not None and abs(measured - record.achieved["ratio"]) > 1e-9:
        raise AssertionError(f"planned ratio {record.achieved['ratio']} != measured {measured}")


def _write(run: _Run, out: Path) -> None:
    """The model, with the resolved config, the scores, the plots, the plan and, last, the run record."""
    cfg, scores, search, plan = run.cfg, run.scores, run.search, run.plan

    def extras(directory: Path) -> None:
        with phases.phase("records"):
            (directory / RESOLVED_CONFIG).write_text(to_yaml(cfg))
            if scores is not None:
                scores.save(directory / SCORES_FILE)
                if search is not None:
                    (directory / SEARCH_FILE).write_text(json.dumps(search, indent=1))
                    plot_search(search["candidates"], search["chosen"], directory / "search.png", search["target"])
                title = scores.criterion
                if scores.method == "layer" and search is None:
                    plot_layer_scores(scores.values.layers.tolist(), plan.drop_layers, directory / "importance.png",
                                      title)
                else:
                    plot_width_scores(scores.values, plan, directory / "importance.png", title, cfg.width.attention)
            plan.save(directory / PLAN_FILE)
            # the record goes last, with what the run cost up to here (the ranked --top-k outputs come after)
            recorder = phases.current()
            if recorder is not None:
                run.cost = run.record.cost = recorder.record(run.weight_bytes)
            RunRecord(prune=run.record).save(directory)

    with phases.phase("save"):
        save_model(run.net, out, source=cfg.model, overwrite=cfg.overwrite, extras=extras, inputs=cfg.inputs())


def _write_ranked(run: _Run, ranked_outputs: list[Path]) -> None:
    """--top-k: the runners-up of the auto search, each cut from a fresh copy of the model."""
    cfg, search = run.cfg, run.search
    if search is None or not ranked_outputs:
        return
    order = sorted(range(len(search["candidates"])), key=lambda i: search["candidates"][i]["proxy_kl"])
    for rank, (index, path) in enumerate(zip(order[1:], ranked_outputs), 2):
        row = search["candidates"][index]
        other = PruningPlan(drop_layers=run.tried[index].plan.drop_layers, layers=run.tried[index].plan.layers)
        copy_of = load(cfg.model, **cfg.load.kwargs())
        # ranked as a compensated model, written as one
        compensation = _compensate(cfg, copy_of, other, None) if cfg.compensation.mode != "none" else None
        apply_plan_(copy_of, other)
        record = replace(run.record, achieved=row["achieved"], proxy_kl=row["proxy_kl"], rank=rank,
                         ratio_target=row["ratio_target"], target=None, cost=None, compensation=compensation,
                         search=None,
                         parameters={"before": run.before.parameters, "after": summarize(copy_of).parameters})
        save_model(copy_of, path, plan=other, source=cfg.model, overwrite=cfg.overwrite, inputs=cfg.inputs(),
                   extras=RunRecord(prune=record).save)
        del copy_of
