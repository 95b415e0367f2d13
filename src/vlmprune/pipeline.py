"""End-to-end verbs that read and write run directories (the CLI calls these)."""

from __future__ import annotations

from pathlib import Path

from vlmprune import calibrate
from vlmprune.adapters import get_adapter
from vlmprune.errors import VlmpruneError
from vlmprune.importance import layer as L
from vlmprune.importance import width as W
from vlmprune.importance.structures import layer_params
from vlmprune.inspect import summarize
from vlmprune.io import load, load_processor, save_model
from vlmprune.plan import PruningPlan
from vlmprune.plots import plot_layer_scores, plot_width_scores
from vlmprune.planning import (ModelBudget, achieved, check_ratio, layers_to_drop, parse_layer_range, plan_layers,
                               plan_width)
from vlmprune.prune import apply_plan_
from vlmprune.prune.apply import layer_shapes


def prune_from_plan(model: str | Path, plan: str | Path | PruningPlan, output: str | Path, overwrite: bool = False,
                    trust_remote_code: bool = False, quiet: bool = False) -> Path:
    """Apply a hand-written or saved plan to a model and write the pruned checkpoint."""
    plan = plan if isinstance(plan, PruningPlan) else PruningPlan.load(plan)
    net = load(model, trust_remote_code=trust_remote_code)
    before = summarize(net)
    apply_plan_(net, plan)
    after = summarize(net)
    plan.extra.setdefault("parameters", {"before": before.parameters, "after": after.parameters})
    out = save_model(net, output, plan=plan, source=model, overwrite=overwrite)
    if not quiet:
        from vlmprune.cli import console, print_summary

        print_summary(after, title=f"pruned model -> {out}")
        removed = 1 - after.parameters["total"] / before.parameters["total"]
        removed_lm = 1 - after.parameters["language_model"] / before.parameters["language_model"]
        console.print(f"removed {removed:.2%} of all parameters ({removed_lm:.2%} of the language model)")
    return out


LAYER_CRITERIA = ("block_influence", "angular", "skip_loss", "last")
WIDTH_CRITERIA = ("taylor", "magnitude", "activation", "wanda", "random")
DEFAULT_TOKENS = {"block_influence": "all", "angular": "all", "skip_loss": "answer", "last": "all",
                  "taylor": "text", "magnitude": "all", "activation": "all", "wanda": "all", "random": "all"}


def check_criterion(method: str, criterion: str | None) -> str:
    choices = {"layer": LAYER_CRITERIA, "width": WIDTH_CRITERIA}.get(method)
    if choices is None:
        raise VlmpruneError(f"--method must be 'layer' or 'width', got {method!r}")
    criterion = criterion or choices[0]
    if criterion not in choices:
        raise VlmpruneError(f"unknown {method} criterion {criterion!r}; choose one of {', '.join(choices)}")
    return criterion


def plan_from_scores(model, method: str, ratio: float, criterion: str | None = None, batches=None,
                     tokens: str | None = None, attention: str = "groups", mlp_multiple: int | None = None,
                     layers: str | None = None, global_ranking: bool = False, seed: int = 0,
                     magnitude_p: int = 1):
    """Score the model on calibration batches and turn the scores into a plan for ``ratio``.

    Returns (plan, scores) where plan.extra records the method, criterion, options, every score
    and the achieved ratios.
    """
    criterion = check_criterion(method, criterion)
    check_ratio(ratio)
    tokens = tokens or DEFAULT_TOKENS[criterion]
    adapter = get_adapter(model)
    shapes = layer_shapes(model, adapter)
    budget = ModelBudget.of(model, adapter)
    needs_data = criterion not in ("last", "magnitude", "random")
    if needs_data and not batches:
        raise VlmpruneError(f"criterion {criterion!r} needs calibration data (--calibration)")
    extra = {"method": method, "criterion": criterion, "tokens": tokens, "ratio_target": ratio}
    if method == "layer":
        n = layers_to_drop(len(shapes), budget, ratio)
        block_start = None
        if criterion == "block_influence":
            scores = L.block_influence(calibrate.collect_hidden_states(model, batches, tokens))
        elif criterion == "angular":
            stats = calibrate.collect_hidden_states(model, batches, tokens)
            block_start, _ = L.angular_block(stats, n)
            scores = L.angular(stats)
        elif criterion == "skip_loss":
            scores = L.skip_loss(calibrate.collect_skip_losses(model, batches, tokens))
        else:
            scores = L.last(len(shapes))
        plan = PruningPlan(drop_layers=plan_layers(scores, budget, ratio, block_start))
        extra["scores"] = {"layers": [float(f"{v:.6g}") for v in scores.tolist()]}
        score_obj = scores
    else:
        chosen = parse_layer_range(layers, len(shapes))
        if criterion == "taylor":
            scores = W.taylor(calibrate.collect_taylor(model, batches, tokens), shapes)
        elif criterion == "magnitude":
            params = [(role, p) for i, layer in enumerate(adapter.layers(model))
                      for p, role in layer_params(layer, adapter, i).items()]
            scores = W.magnitude(params, shapes, p=magnitude_p)
        elif criterion in ("activation", "wanda"):
            stats = calibrate.collect_activations(model, batches, tokens)
            if criterion == "activation":
                scores = W.activation(stats, shapes)
            else:
                lay = adapter.layout
                o_w = [getattr(adapter.attention(x), lay.o).weight for x in adapter.layers(model)]
                d_w = [getattr(adapter.mlp(x), lay.down).weight for x in adapter.layers(model)]
                scores = W.wanda(stats, o_w, d_w, shapes)
        else:
            scores = W.random(shapes, seed)
        plan = plan_width(scores, shapes, budget, ratio, attention, mlp_multiple, chosen, global_ranking)
        extra.update({"attention": attention, "mlp_multiple": mlp_multiple, "layer_range": layers,
                      "global": global_ranking, "scores": scores.to_dict()})
        score_obj = scores
    extra["achieved"] = achieved(plan, budget, shapes)
    plan.extra.update(extra)
    return plan, score_obj


class Batches:
    """Re-iterable calibration batches: samples collated on the fly (images opened per batch)."""

    def __init__(self, samples, collator, batch_size: int = 1):
        if batch_size < 1:
            raise VlmpruneError(f"--batch-size must be >= 1, got {batch_size}")
        self.samples, self.collator, self.batch_size = samples, collator, batch_size

    def __len__(self) -> int:
        return (len(self.samples) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for start in range(0, len(self.samples), self.batch_size):
            yield self.collator(self.samples[start : start + self.batch_size])


def calibration_batches(processor, data, image_folder=None, num_samples: int | None = 128, seed: int = 0,
                        batch_size: int = 1, max_length: int | None = None, split: str = "train") -> Batches:
    """Read a LLaVA-format file or HF dataset, draw a seeded sample, and collate lazily."""
    from vlmprune.data import Collator, read_samples, select

    samples = select(read_samples(data, image_folder, split=split), num_samples=num_samples, seed=seed)
    return Batches(samples, Collator(processor, max_length=max_length), batch_size)


def prune(model: str | Path, method: str, ratio: float, output: str | Path, criterion: str | None = None,
          calibration: str | Path | None = None, image_folder: str | Path | None = None, num_samples: int = 128,
          seed: int = 0, batch_size: int = 1, max_length: int | None = None, tokens: str | None = None,
          attention: str = "groups", mlp_multiple: int | None = None, layers: str | None = None,
          global_ranking: bool = False, split: str = "train", device: str | None = None, dtype=None,
          overwrite: bool = False, trust_remote_code: bool = False, quiet: bool = False) -> Path:
    """Calibrate, score, plan for ``ratio`` and write the pruned model with its plan and a plot.

    Every argument is checked before the model is loaded where possible, and nothing is written
    unless pruning succeeds.
    """
    criterion = check_criterion(method, criterion)
    check_ratio(ratio)
    out_path = Path(output)
    if out_path.exists() and any(out_path.iterdir()) and not overwrite:
        raise VlmpruneError(f"output directory {out_path} exists and is not empty; choose another or pass --overwrite")
    net = load(model, dtype=dtype, trust_remote_code=trust_remote_code)
    if device:
        net.to(device)
    batches = None
    if calibration is not None:
        processor = load_processor(model, trust_remote_code)
        batches = calibration_batches(processor, calibration, image_folder, num_samples, seed, batch_size,
                                      max_length, split)
    before = summarize(net)
    plan, scores = plan_from_scores(net, method, ratio, criterion, batches, tokens, attention, mlp_multiple,
                                    layers, global_ranking, seed)
    plan.extra.update({"source_model": str(model), "calibration": str(calibration) if calibration else None,
                       "num_samples": num_samples, "seed": seed})
    shapes = layer_shapes(net)
    apply_plan_(net, plan)
    after = summarize(net)
    plan.extra["parameters"] = {"before": before.parameters, "after": after.parameters}
    measured = 1 - after.parameters["total"] / before.parameters["total"]
    if abs(measured - plan.extra["achieved"]["ratio"]) > 1e-9:  # the planner's arithmetic is the truth it reports
        raise AssertionError(f"planned ratio {plan.extra['achieved']['ratio']} != measured {measured}")
    def plot(directory: Path) -> None:
        if method == "layer":
            plot_layer_scores(scores.tolist(), plan.drop_layers, directory / "importance.png", criterion)
        else:
            plot_width_scores(scores, plan, directory / "importance.png", criterion, attention)

    save_model(net, out_path, plan=plan, source=model, overwrite=overwrite, extras=plot)
    if not quiet:
        print_prune_summary(before, after, plan, shapes, out_path)
    return out_path.resolve()


def print_prune_summary(before, after, plan: PruningPlan, shapes, output: Path) -> None:
    from rich.table import Table

    from vlmprune.cli import console, print_summary

    table = Table(title=f"vlmprune prune: {plan.extra['method']} / {plan.extra['criterion']} -> {output}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for part in ("vision", "projector", "language_model", "total"):
        table.add_row(part, f"{before.parameters[part]:,}", f"{after.parameters[part]:,}")
    a = plan.extra["achieved"]
    table.add_row("removed (whole model)", f"target {plan.extra['ratio_target']:.2%}", f"{a['ratio']:.2%}")
    table.add_row("removed (language model)", "", f"{a['ratio_language_model']:.2%}")
    if plan.drop_layers:
        table.add_row("layers dropped", str(len(shapes)), f"{plan.drop_layers}")
    console.print(table)
    if plan.layers:
        print_summary(after, title="widths kept")
