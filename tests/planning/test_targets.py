"""Deployment targets (params, memory with the KV cache) and --method auto."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import FAMILIES, build_tiny

import vlmprune
from vlmprune.adapters import get_adapter
from vlmprune.cli import main
from vlmprune.config import parse_target
from vlmprune.errors import PlanError, VlmpruneError
from vlmprune.planning.plan import PruningPlan
from vlmprune.planning.targets import footprint
from vlmprune.summary import layer_shapes


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
    plan = json.loads((out / "run.json").read_text())["prune"]
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
    plan = json.loads((out / "run.json").read_text())["prune"]
    assert plan["target"]["achieved"] <= goal and plan["target"]["achieved"] > 0.6 * now
    reloaded = vlmprune.load(out)
    assert footprint(reloaded, parse_target("memory=1GB,seq=512,dtype=fp32")).memory_bytes == plan["target"]["achieved"]


def test_auto_meets_the_target_and_beats_pure_layer_and_pure_width(tiny_repo, tmp_path, monkeypatch):
    import matplotlib.image

    import vlmprune.prune.run

    plotted = []  # what the search plot is handed: every candidate, the chosen one, the target

    def spy(rows, chosen, path, quantity):
        plotted.append((copy.deepcopy(rows), chosen, path, quantity))
        return real_plot(rows, chosen, path, quantity)

    real_plot = vlmprune.prune.run.plot_search
    monkeypatch.setattr(vlmprune.prune.run, "plot_search", spy)
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
    record = json.loads((out / "run.json").read_text())["prune"]
    assert record["method"] == "auto" and plan["drop_layers"] == chosen["drop_layers"]
    assert record["search"] == "search.json" and set(plan) == {"version", "drop_layers", "layers"}
    assert abs(record["target"]["achieved"] / record["parameters"]["before"]["total"] - 0.75) < 0.05
    # (saved under a temporary name, then moved into place)
    handed = [(json.loads(json.dumps(r)), c, p.name, q) for r, c, p, q in plotted]
    assert handed and all(h == (rows, search["chosen"], "search.png", search["target"]) for h in handed), handed
    image = matplotlib.image.imread(out / "search.png")
    assert image.shape[:2] == (420, 720)  # figsize 6 x 3.5 inches at 120 dpi
    assert image[..., :3].std() > 0.05  # not blank
    red = (abs(image[..., 0] - 0xD6 / 255) < 0.02) & (abs(image[..., 1] - 0x27 / 255) < 0.02)
    assert red.sum() > 20  # the chosen candidate's star (tab:red) is drawn
    second = json.loads((tmp_path / "auto-rank2" / "run.json").read_text())["prune"]  # --top-k 2
    assert second["rank"] == 2 and second["proxy_kl"] == sorted(r["proxy_kl"] for r in rows)[1]
    rank2 = vlmprune.count_parameters(vlmprune.load(tmp_path / "auto-rank2"))["total"]
    assert second["parameters"]["after"]["total"] == rank2


@pytest.mark.parametrize("spec", ["params=2", "memory=2", "latency=200", "params=0.7,seq=3", "speed=3"])
def test_bad_targets_are_refused(tiny_repo, tmp_path, capsys, spec):
    assert main(["prune", "--model", str(tiny_repo.model), "--method", "width", "--target", spec,
                 "--output", str(tmp_path / "o")]) == 2
    assert "--target" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_ratio_and_target_are_exclusive():
    from vlmprune.config import PruneConfig, build

    with pytest.raises(VlmpruneError, match="one of --ratio"):
        build(PruneConfig, model="m", output="o", method="width", ratio=0.2, target="params=0.8")
    with pytest.raises(VlmpruneError, match="a plan already says what goes"):
        build(PruneConfig, model="m", output="o", plan="p.json", target="params=0.8")


def test_auto_is_a_study_grid_value(tiny_repo, tmp_path):
    from pathlib import Path

    smoke = Path(__file__).resolve().parents[2] / "configs" / "study" / "smoke.yaml"
    run = tmp_path / "run"
    grid = "[{method: [auto, layer, width], ratio: 0.25, recipe: none}]"
    assert main(["study", "--config", str(smoke), f"output={run}", f"teacher={tiny_repo.model}",
                 f"train_data={tiny_repo.data}", f"image_folder={tiny_repo.images}",
                 f"evaluation.task_file={tiny_repo.task_file}", f"grid={grid}"]) == 0
    plan = json.loads((run / "pruned" / "auto-magnitude-r0.25" / "run.json").read_text())["prune"]
    assert plan["method"] == "auto" and plan["layer_criterion"] == "block_influence"
    rows = {c["id"]: c for c in json.loads((run / "results.json").read_text())["cells"]}
    assert {"auto-magnitude-r0.25-none", "layer-block_influence-r0.25-none", "width-magnitude-r0.25-none"} <= set(rows)
    assert all(r["status"] == "done" for r in rows.values())


def test_latency_prediction_by_hand():
    from vlmprune.planning.targets import predict_latency

    shapes = layer_shapes(build_tiny("llava_llama_gqa"))  # 4 layers, 8 q heads in 2 kv groups, MLP 128
    assert [(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in shapes] == [(8, 2, 128)] * 4
    profile = {"base_s": 0.010, "kinds": [
        {"layers": [0, 1], "fixed_s": 0.001,
         "attention": [[8, 0.008], [4, 0.005]], "mlp": [[128, 0.006], [64, 0.004]]},
        {"layers": [2, 3], "fixed_s": 0.002,
         "attention": [[8, 0.010], [4, 0.004]], "mlp": [[128, 0.012], [32, 0.001]]}]}
    assert predict_latency(profile, shapes) == pytest.approx(0.010 + 2 * (0.001 + 0.008 + 0.006)
                                                             + 2 * (0.002 + 0.010 + 0.012))
    plan = PruningPlan(drop_layers=[3], layers={0: {"kv_heads": [1], "mlp_channels": list(range(96))},
                                                2: {"q_heads": [0, 4], "mlp_channels": list(range(48))}})
    layer0 = 0.001 + 0.005 + 0.005           # 4 q heads: the table's point; 96 channels: halfway from 64 to 128
    layer1 = 0.001 + 0.008 + 0.006           # untouched
    layer2 = 0.002 + 0.001 + (0.001 + 16 * 0.011 / 96)  # 2 heads: below the table, along its last segment
    assert predict_latency(profile, shapes, plan) == pytest.approx(0.010 + layer0 + layer1 + layer2)
    narrow = PruningPlan(layers={2: {"kv_heads": [0], "mlp_channels": [0]}})  # extrapolation never goes below 0
    assert predict_latency(profile, shapes, narrow) == pytest.approx(
        0.010 + 2 * (0.001 + 0.008 + 0.006) + (0.002 + 0.004 + 0.0) + (0.002 + 0.010 + 0.012))


def test_latency_target_plans_on_the_profile_and_measures_the_result(tiny_repo, tmp_path, monkeypatch):
    from vlmprune.planning.targets import PROFILE_VERSION, predict_latency
    from vlmprune.summary import source_record

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    model = vlmprune.load(tiny_repo.model)
    shapes = layer_shapes(model)
    # a known profile stands in for the timings, so the plan does not depend on this machine's noise
    profile = {"version": PROFILE_VERSION, "base_s": 0.001, "kinds": [
        {"layers": list(range(len(shapes))), "fixed_s": 0.0004,
         "attention": [[shapes[0].num_heads, 0.002], [shapes[0].num_heads // 2, 0.001]],
         "mlp": [[shapes[0].intermediate_size, 0.003], [shapes[0].intermediate_size // 2, 0.0015]]}]}
    key = f"{source_record(model)['fingerprint']}-cpu-s32-b1-v{PROFILE_VERSION}"
    cache = tmp_path / "cache" / "vlmprune" / "latency" / f"{key}.json"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps(profile))
    now = predict_latency(profile, shapes)
    goal_ms = 1000 * 0.8 * now
    out = tmp_path / "o"
    assert main(["prune", "--model", str(tiny_repo.model), "--method", "width", "--criterion", "magnitude",
                 "--mlp-multiple", "8", "--target", f"latency={goal_ms:.4f}ms,seq=32", "--output", str(out)]) == 0
    t = json.loads((out / "run.json").read_text())["prune"]["target"]
    assert t["kind"] == "latency" and t["predicted_s"] <= t["required"] and t["predicted_s"] > 0.6 * now
    assert t["measured_s"] > 0 and t["prediction_error"] == pytest.approx(t["predicted_s"] / t["measured_s"] - 1)


def test_latency_profile_times_every_layer_at_four_widths_once(tmp_path, monkeypatch):
    from vlmprune.planning.targets import latency_profile, predict_latency

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = build_tiny("llava_llama_gqa")
    shapes = layer_shapes(model)
    target = parse_target("latency=1s,seq=16")
    profile = latency_profile(model, target, repeats=1)
    assert sorted(i for kind in profile["kinds"] for i in kind["layers"]) == list(range(len(shapes)))
    for kind in profile["kinds"]:  # full width and 3/4, 1/2, 1/4 (2 kv groups: 2 or 1 kept)
        assert [c for c, _ in kind["mlp"]] == [32, 64, 96, 128]
        assert [h for h, _ in kind["attention"]] == [4, 8]
        assert all(t > 0 for _, t in kind["mlp"] + kind["attention"]) and kind["fixed_s"] >= 0
    # the parts add up: the unpruned model's prediction is its measured prefill
    assert predict_latency(profile, shapes) == pytest.approx(profile["measured_s"], rel=1e-6)
    assert latency_profile(model, target) == profile  # cached: measured once


@pytest.mark.parametrize("family", ["gemma3", "qwen3_5", "gemma4"])
def test_latency_profile_of_families_with_several_layer_kinds(family, tmp_path, monkeypatch):
    """Sliding-window and full-attention layers (gemma3), linear-attention layers whose token mixer is
    kept whole (qwen3_5), and a family whose heads are never cut (gemma4): each kind is its own table."""
    from vlmprune.planning.targets import latency_profile, predict_latency

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = build_tiny(family)
    shapes = layer_shapes(model)
    profile = latency_profile(model, parse_target("latency=1s,seq=16"), repeats=1)
    assert sorted(i for kind in profile["kinds"] for i in kind["layers"]) == list(range(len(shapes)))
    assert len(profile["kinds"]) >= 2 and all(len(kind["mlp"]) == 4 for kind in profile["kinds"])
    adapter = get_adapter(model)
    for kind in profile["kinds"]:  # attention narrowed only where the family can cut heads
        cut = all(adapter.has_heads(adapter.layers(model)[i]) for i in kind["layers"])
        assert (len(kind["attention"]) > 1) == cut
    assert predict_latency(profile, shapes) == pytest.approx(profile["measured_s"], rel=1e-6)


def test_a_study_grid_cuts_to_a_target_and_the_report_compares_methods_at_it(tiny_repo, tmp_path):
    from pathlib import Path

    from vlmprune.study import expand_grid

    model = vlmprune.load(tiny_repo.model)
    goal = footprint(model, parse_target("memory=1GB,seq=64")).memory_bytes * 0.85  # a 15% smaller footprint
    spec = f"memory={goal:.0f}B,seq=64"
    smoke = Path(__file__).resolve().parents[2] / "configs" / "study" / "smoke.yaml"
    run = tmp_path / "run"
    grid = f"[{{method: [layer, width], target: '{spec}', recipe: none}}]"
    assert main(["study", "--config", str(smoke), f"output={run}", f"teacher={tiny_repo.model}",
                 f"train_data={tiny_repo.data}", f"image_folder={tiny_repo.images}",
                 f"evaluation.task_file={tiny_repo.task_file}", f"grid={grid}"]) == 0
    slug = spec.replace("=", "").replace(",", "-")
    for method, criterion in (("layer", "block_influence"), ("width", "magnitude")):
        plan = json.loads((run / "pruned" / f"{method}-{criterion}-t-{slug}" / "run.json").read_text())["prune"]
        assert plan["target"]["kind"] == "memory" and plan["target"]["achieved"] <= goal
    rows = {c["id"]: c for c in json.loads((run / "results.json").read_text())["cells"]}
    assert set(rows) == {f"layer-block_influence-t-{slug}-none", f"width-magnitude-t-{slug}-none"}
    assert all(r["status"] == "done" and r["target"] == spec and r["ratio"] is None and r["target_achieved"] <= goal
               for r in rows.values())
    md = (run / "results.md").read_text()
    assert "## Methods at the same size" in md and f"| {spec} | none |" in md
    # a block takes a ratio or a target; a latency target depends on the machine that runs the cell
    config = {"recipes": {"none": None}, "criterion": {"layer": "block_influence", "width": "taylor"}}
    with pytest.raises(VlmpruneError, match="ratio or target, not both"):
        expand_grid({**config, "grid": [{"method": "layer", "ratio": 0.2, "target": "params=0.8"}]})
    with pytest.raises(VlmpruneError, match="latency"):
        expand_grid({**config, "grid": [{"method": "layer", "target": "latency=20ms"}]})
    with pytest.raises(VlmpruneError, match="--target"):
        expand_grid({**config, "grid": [{"method": "layer", "target": "memory=2"}]})
