"""Deployment targets (params, memory with the KV cache) and --method auto."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import vlmprune
from tiny_models import FAMILIES, build_tiny
from vlmprune.cli import main
from vlmprune.config import parse_target
from vlmprune.adapters import get_adapter
from vlmprune.errors import PlanError, VlmpruneError
from vlmprune.plan import PruningPlan
from vlmprune.prune import layer_shapes
from vlmprune.targets import footprint


def stored_kv_bytes(model, seq: int, batch: int) -> int:
    """The bytes of keys and values the model's own cache holds after a prefill of ``seq`` tokens
    (measured, independent of vlmprune: sliding windows, KV sharing and linear attention as stored)."""
    ids = torch.randint(3, 50, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).past_key_values
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
               if torch.is_tensor(t))


def legal_plan(model) -> PruningPlan:
    """A plan that drops one layer and narrows another, legal for the family (protected layers and
    heads kept whole where the family needs them)."""
    adapter = get_adapter(model)
    shapes = layer_shapes(model)
    for drop in range(len(shapes)):
        other = next(i for i in range(len(shapes)) if i != drop)
        layer = adapter.layers(model)[other]
        entry = {"mlp_channels": list(range(8))}
        if adapter.has_heads(layer) and shapes[other].num_kv_heads > 1:
            entry["kv_heads"] = [0]
        plan = PruningPlan(drop_layers=[drop], layers={other: entry})
        try:
            vlmprune.apply_plan_(copy.deepcopy(model), plan)
        except PlanError:
            continue
        return plan
    raise AssertionError("no legal plan")


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_footprint_counts_weights_and_the_kv_cache_as_stored(family):
    model = build_tiny(family)
    target = parse_target("memory=1GB,seq=40,batch=2,dtype=fp32")
    fp = footprint(model, target)
    params = sum(p.numel() for p in model.parameters())
    assert fp.parameters == params and fp.weight_bytes == 4 * params
    assert fp.kv_bytes == stored_kv_bytes(model, 40, 2)
    plan = legal_plan(model)
    after = footprint(model, target, plan)
    pruned = vlmprune.apply_plan_(copy.deepcopy(model), plan)
    assert after.parameters == sum(p.numel() for p in pruned.parameters())  # computed == applied
    assert after.kv_bytes == stored_kv_bytes(pruned, 40, 2)


def test_params_target_through_the_cli(tiny_repo, tmp_path):
    out = tmp_path / "o"
    assert main(["prune", "--model", str(tiny_repo.model), "--method", "width", "--criterion", "magnitude",
                 "--target", "params=0.85", "--mlp-multiple", "8", "--output", str(out)]) == 0
    plan = json.loads((out / "pruning_plan.json").read_text())
    total = plan["parameters"]["before"]["total"]
    assert plan["target"]["kind"] == "params" and plan["target"]["achieved"] == plan["parameters"]["after"]["total"]
    assert abs(plan["target"]["achieved"] / total - 0.85) < 0.03


def test_memory_target_is_met(tiny_repo, tmp_path):
    model = vlmprune.load(tiny_repo.model)
    now = footprint(model, parse_target("memory=1GB,seq=512,dtype=fp32")).memory_bytes
    goal = int(now * 0.8)
    out = tmp_path / "o"
    assert main(["prune", "--model", str(tiny_repo.model), "--method", "width", "--criterion", "magnitude",
                 "--target", f"memory={goal}B,seq=512,dtype=fp32", "--mlp-multiple", "8", "--output", str(out)]) == 0
    plan = json.loads((out / "pruning_plan.json").read_text())
    assert plan["target"]["achieved"] <= goal and plan["target"]["achieved"] > 0.6 * now
    reloaded = vlmprune.load(out)
    assert footprint(reloaded, parse_target("memory=1GB,seq=512,dtype=fp32")).memory_bytes == plan["target"]["achieved"]


def test_auto_meets_the_target_and_beats_pure_layer_and_pure_width(tiny_repo, tmp_path):
    out = tmp_path / "auto"
    assert main(["prune", "--model", str(tiny_repo.model), "--method", "auto", "--criterion", "magnitude",
                 "--target", "params=0.75", "--mlp-multiple", "8", "--calibration", str(tiny_repo.data),
                 "--image-folder", str(tiny_repo.images), "--num-samples", "8", "--batch-size", "2",
                 "--top-k", "2", "--output", str(out)]) == 0
    search = json.loads((out / "search.json").read_text())
    rows = search["candidates"]
    ks = [r["layers_dropped"] for r in rows]
    assert 0 in ks and max(ks) >= 1  # pure width and (at least partly) pure layer were both tried
    chosen = rows[search["chosen"]]
    assert chosen["proxy_kl"] == min(r["proxy_kl"] for r in rows)
    pure = [r for r in rows if r["layers_dropped"] in (0, max(ks))]
    assert all(chosen["proxy_kl"] <= r["proxy_kl"] for r in pure)
    plan = json.loads((out / "pruning_plan.json").read_text())
    assert plan["method"] == "auto" and plan["drop_layers"] == chosen["drop_layers"]
    assert abs(plan["target"]["achieved"] / plan["parameters"]["before"]["total"] - 0.75) < 0.05
    assert (out / "search.png").stat().st_size > 5000
    second = json.loads((tmp_path / "auto-rank2" / "pruning_plan.json").read_text())  # --top-k 2
    assert second["rank"] == 2 and second["proxy_kl"] == sorted(r["proxy_kl"] for r in rows)[1]
    assert second["parameters"]["after"]["total"] == vlmprune.count_parameters(vlmprune.load(tmp_path / "auto-rank2"))["total"]


@pytest.mark.parametrize("spec", ["params=2", "memory=2", "latency=200", "params=0.7,seq=3", "speed=3"])
def test_bad_targets_are_refused(tiny_repo, tmp_path, capsys, spec):
    assert main(["prune", "--model", str(tiny_repo.model), "--method", "width", "--target", spec,
                 "--output", str(tmp_path / "o")]) == 2
    assert "--target" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_ratio_and_target_are_exclusive():
    from vlmprune.config import PruneConfig

    with pytest.raises(VlmpruneError, match="one of --ratio"):
        PruneConfig(model="m", output="o", method="width", ratio=0.2, target="params=0.8")
    with pytest.raises(VlmpruneError, match="a plan already says what goes"):
        PruneConfig(model="m", output="o", plan="p.json", target="params=0.8")


def test_auto_is_a_study_grid_value(tiny_repo, tmp_path):
    from pathlib import Path

    smoke = Path(__file__).resolve().parents[2] / "configs" / "study" / "smoke.yaml"
    run = tmp_path / "run"
    grid = "[{method: [auto, layer, width], ratio: 0.25, recipe: none}]"
    assert main(["study", "--config", str(smoke), f"output={run}", f"teacher={tiny_repo.model}",
                 f"train_data={tiny_repo.data}", f"image_folder={tiny_repo.images}",
                 f"evaluation.task_file={tiny_repo.task_file}", f"grid={grid}"]) == 0
    plan = json.loads((run / "pruned" / "auto-magnitude-r0.25" / "pruning_plan.json").read_text())
    assert plan["method"] == "auto" and plan["layer_criterion"] == "block_influence"
    rows = {c["id"]: c for c in json.loads((run / "results.json").read_text())["cells"]}
    assert {"auto-magnitude-r0.25-none", "layer-block_influence-r0.25-none", "width-magnitude-r0.25-none"} <= set(rows)
    assert all(r["status"] == "done" for r in rows.values())


def test_latency_fit_recovers_known_coefficients():
    from vlmprune.targets import fit_latency, latency_features, predict_latency

    coef = [0.004, 0.002, 0.0005, 0.00001]
    shapes = layer_shapes(build_tiny("llava_llama_gqa"))
    plans = [PruningPlan(), PruningPlan(drop_layers=[3]), PruningPlan(drop_layers=[2, 3]),
             PruningPlan(layers={i: {"mlp_channels": list(range(32))} for i in range(4)}),
             PruningPlan(layers={i: {"kv_heads": [0]} for i in range(4)})]
    points = [(latency_features(shapes, p), predict_latency(coef, latency_features(shapes, p))) for p in plans]
    assert fit_latency(points) == pytest.approx(coef, rel=1e-6, abs=1e-12)


def test_latency_target_plans_on_the_profile_and_measures_the_result(tiny_repo, tmp_path, monkeypatch):
    from vlmprune.inspect import source_record
    from vlmprune.targets import latency_features, predict_latency

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = vlmprune.load(tiny_repo.model)
    # a known profile stands in for the timings, so the plan does not depend on this machine's noise
    coef = [0.001, 0.0004, 0.0001, 0.00002]
    cache = tmp_path / "cache" / "vlmprune" / "latency" / f"{source_record(model)['fingerprint']}-cpu-s32-b1.json"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"coef": coef, "points": []}))
    now = predict_latency(coef, latency_features(layer_shapes(model)))
    goal_ms = 1000 * 0.8 * now
    out = tmp_path / "o"
    assert main(["prune", "--model", str(tiny_repo.model), "--method", "width", "--criterion", "magnitude",
                 "--mlp-multiple", "8", "--target", f"latency={goal_ms:.4f}ms,seq=32", "--output", str(out)]) == 0
    t = json.loads((out / "pruning_plan.json").read_text())["target"]
    assert t["kind"] == "latency" and t["predicted_s"] <= t["required"] and t["predicted_s"] > 0.6 * now
    assert t["measured_s"] > 0 and t["prediction_error"] == pytest.approx(t["predicted_s"] / t["measured_s"] - 1)


def test_latency_profile_times_the_model_and_pruned_copies_once(tmp_path, monkeypatch):
    import math

    from vlmprune.targets import latency_profile

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = build_tiny("llava_llama_gqa")
    target = parse_target("latency=1s,seq=16")
    profile = latency_profile(model, target)
    assert len(profile["points"]) == 5 and all(p["seconds"] > 0 for p in profile["points"])
    assert all(math.isfinite(c) for c in profile["coef"])
    assert latency_profile(model, target) == profile  # cached: measured once
