"""End-to-end verbs that read and write run directories (the CLI calls these)."""

from __future__ import annotations

from pathlib import Path

from vlmprune.inspect import summarize
from vlmprune.io import load, save_model
from vlmprune.plan import PruningPlan
from vlmprune.prune import apply_plan_


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
