"""Compensation: the kept weights take over what a cut removes (vlmprune/surgery/compensate.py)."""

from __future__ import annotations

import collections
import copy
import json
import logging

import numpy as np
import pytest
import torch
from checks import assert_close, logits, reload_plain
from tiny_models import FAMILIES, build_tiny, make_inputs

import vlmprune
from vlmprune.adapters import get_adapter
from vlmprune.cli import main
from vlmprune.errors import VlmpruneError
from vlmprune.planning.plan import PruningPlan
from vlmprune.prune import apply_plan_, layer_shapes
from vlmprune.record import RunRecord
from vlmprune.surgery.apply import loads_stock
from vlmprune.surgery.compensate import compensate_, ridge_fold


def batches(family, model, n=8):
    return [make_inputs(family, model, batch=2, seed=100 + s) for s in range(n)]


def width_plan(model, mode="groups") -> PruningPlan:
    """Alternate kv groups (or one q head per group) and every third MLP channel of every layer."""
    adapter = get_adapter(model)
    layers = {}
    for i, (shape, layer) in enumerate(zip(layer_shapes(model), adapter.layers(model))):
        g = shape.group_size
        entry = {"mlp_channels": [c for c in range(shape.intermediate_size) if c % 3 != 1]}
        if adapter.has_heads(layer) and mode == "groups" and shape.num_kv_heads > 1:
            kv = list(range(1, shape.num_kv_heads, 2))
            entry.update(kv_heads=kv, q_heads=[h for k in kv for h in range(k * g, (k + 1) * g)])
        elif adapter.has_heads(layer) and mode == "heads" and g > 1:
            entry["q_heads"] = [k * g + j for k in range(shape.num_kv_heads) for j in range(1, g)]
        layers[i] = entry
    return PruningPlan(layers=layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_removed_changes_no_weight(family):
    model = build_tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    record = compensate_(model, PruningPlan(), batches(family, model, 2), "ls", sequential=True)
    assert record["layers"] == {} and record["dropped_runs"] == []
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def _copy_structure_(adapter, layer, shape, unit: str, src: int, dst: int) -> None:
    """Make structure ``dst`` compute exactly what ``src`` computes (its owned rows, bias included)."""
    for slc in adapter.slices(layer, shape):
        if slc.unit != unit or slc.dim != 0:
            continue
        rows_src, rows_dst = (slc.owner == src).nonzero().squeeze(1), (slc.owner == dst).nonzero().squeeze(1)
        with torch.no_grad():
            slc.module.weight[rows_dst] = slc.module.weight[rows_src]
            if slc.module.bias is not None:
                slc.module.bias[rows_dst] = slc.module.bias[rows_src]


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_copies_of_kept_structures_give_the_unpruned_logits(family):
    """Removed MLP channels (and q heads, where a group holds several) that duplicate kept ones:
    ``ls`` folds them into their twins and the pruned model computes what the unpruned one did."""
    model = build_tiny(family)
    adapter = get_adapter(model)
    shapes = layer_shapes(model)
    plan = PruningPlan()
    for i, (layer, shape) in enumerate(zip(adapter.layers(model), shapes)):
        gone = [c for c in range(shape.intermediate_size) if c % 4 == 3]
        for c in gone:
            _copy_structure_(adapter, layer, shape, "mlp", c - 1, c)
        entry = {"mlp_channels": [c for c in range(shape.intermediate_size) if c not in gone]}
        if adapter.has_heads(layer) and shape.group_size > 1:  # the last q head of each group copies the first
            g = shape.group_size
            for k in range(shape.num_kv_heads):
                _copy_structure_(adapter, layer, shape, "q", k * g, k * g + g - 1)
            entry["q_heads"] = [h for h in range(shape.num_heads) if h % g != g - 1]
        plan.layers[i] = entry
    inputs = make_inputs(family, model, seed=7)
    expected = logits(model, inputs)
    plain = logits(apply_plan_(copy.deepcopy(model), plan), inputs)
    assert (plain - expected).abs().max() > 1e-3  # the cut alone loses something
    record = compensate_(model, plan, batches(family, model, 12), "ls", sequential=True, ridge=1e-12)
    apply_plan_(model, plan)
    assert_close(logits(model, inputs), expected)
    errors = [e["error_after"] for layer in record["layers"].values() for e in layer.values()]
    assert errors and max(errors) < 1e-6


def test_ridge_fold_equals_numpy_by_hand():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    G = z.T @ z
    W = rng.normal(size=(3, 6))
    removed = np.array([False, True, False, False, True, False])
    K, R = ~removed, removed
    lam = 1e-2 * np.mean(np.diag(G[np.ix_(K, K)]))
    B = G[np.ix_(R, K)] @ np.linalg.inv(G[np.ix_(K, K)] + lam * np.eye(K.sum()))
    expected = W.copy()
    expected[:, K] = W[:, K] + W[:, R] @ B
    expected[:, R] = 0
    new, got_B, used = ridge_fold(torch.tensor(W), torch.tensor(G), torch.tensor(removed), 1e-2)
    assert used == 1e-2
    np.testing.assert_allclose(got_B.numpy(), B, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(new.numpy(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", ["llava_llama_gqa", "llava_phi", "llava_phi3"])
def test_a_dropped_layer_whose_update_is_linear_is_reproduced_exactly(family):
    """Layer 2's update is y1 M (y1: layer 1's MLP output): the map folded into layer 1's down
    projection reproduces it, so the model without layer 2 gives the unpruned logits."""
    model = build_tiny(family)
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    hidden = adapter.text_config(model).hidden_size
    M = torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(3)) * 0.3
    y1 = collections.deque()  # layer 1's outputs, taken by layer 2 in order (compensation runs layer by layer)
    layer1_mlp = adapter.mlp(layers[1]).register_forward_hook(lambda m, a, o: y1.append(o))

    def linear_update(module, args, kwargs, out):
        if not y1:  # compensation's capture of the layers' arguments: the layers pass their input through
            return out
        h = args[0] if args else kwargs["hidden_states"]
        new = h + y1.popleft() @ M
        return (new, *out[1:]) if isinstance(out, tuple) else new

    layer2 = layers[2].register_forward_hook(linear_update, with_kwargs=True)
    inputs = make_inputs(family, model, seed=7)
    expected = logits(model, inputs)
    plan = PruningPlan(drop_layers=[2])
    record = compensate_(model, plan, batches(family, model, 12), "ls", ridge=1e-12)
    layer1_mlp.remove()
    layer2.remove()
    apply_plan_(model, plan)
    assert_close(logits(model, inputs), expected)
    (run,) = record["dropped_runs"]
    assert run["layers"] == [2] and run["into"] == 1 and run["error_after"] < 1e-8 < run["error_before"]


@pytest.mark.parametrize("family", ["llava_llama_gqa", "llava_phi", "internvl_qwen2", "gemma3"])
@pytest.mark.parametrize("sequential", [False, True])
def test_compensation_lowers_the_error_and_saves_reloads_stock(family, sequential, tmp_path):
    model = build_tiny(family)
    plan = width_plan(model)
    plan.drop_layers = [] if family == "gemma3" else [2]  # (Gemma normalises the MLP output: no layer fold)
    plan.layers.pop(2, None)
    inputs = make_inputs(family, model, seed=7)
    expected = logits(model, inputs)
    stock = loads_stock(model, plan) is None
    plain = apply_plan_(copy.deepcopy(model), plan)
    compensate_(model, plan, batches(family, model), "ls", sequential=sequential)
    apply_plan_(model, plan)
    compensated = logits(model, inputs)
    assert (compensated - expected).pow(2).mean() < (logits(plain, inputs) - expected).pow(2).mean()
    assert vlmprune.count_parameters(model) == vlmprune.count_parameters(plain)  # ls adds no parameter
    # stock where the plan says stock, else through vlmprune.load
    reloaded = reload_plain(model, tmp_path) if stock else vlmprune.load(vlmprune.save_model(model, tmp_path / "o"))
    assert torch.equal(logits(reloaded, inputs), compensated)


def test_bias_mode_moves_the_mean_into_the_consumer_bias_where_it_has_one():
    model = build_tiny("llava_phi")  # Phi's dense / fc2 carry a bias
    plan = width_plan(model)
    inputs = make_inputs("llava_phi", model, seed=7)
    expected = logits(model, inputs)
    plain = logits(apply_plan_(copy.deepcopy(model), plan), inputs)
    biases = [adapter_bias.clone() for adapter_bias in _fc2_biases(model)]
    record = compensate_(model, plan, batches("llava_phi", model), "bias")
    assert all(not torch.equal(b, a) for b, a in zip(biases, _fc2_biases(model)))
    apply_plan_(model, plan)
    assert (logits(model, inputs) - expected).pow(2).mean() < (plain - expected).pow(2).mean()
    assert all(e["error_after"] < e["error_before"] for layer in record["layers"].values() for e in layer.values())


def _fc2_biases(model):
    adapter = get_adapter(model)
    return [adapter.mlp(layer).fc2.bias for layer in adapter.layers(model)]


def test_bias_mode_is_refused_where_the_consumer_has_no_bias():
    model = build_tiny("llava_llama_gqa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(VlmpruneError, match="--compensate ls"):
        compensate_(model, width_plan(model), batches("llava_llama_gqa", model, 2), "bias")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_too_few_tokens_raise_the_ridge_and_warn_with_the_counts(caplog):
    model = build_tiny("llava_llama_gqa")
    plan = width_plan(model)
    with caplog.at_level(logging.WARNING, logger="vlmprune.surgery.compensate"):
        record = compensate_(model, plan, [make_inputs("llava_llama_gqa", model, batch=1, seed=1)], "ls")
    assert "calibration tokens for" in caplog.text and "underdetermined" in caplog.text
    assert all(torch.isfinite(p).all() for p in model.parameters())
    entries = [e for layer in record["layers"].values() for e in layer.values()]
    assert any(e["tokens"] < e["kept"] for e in entries)
    assert all(e["ridge"] == (0.1 if e["tokens"] < e["kept"] else 1e-3) for e in entries)


def test_non_finite_statistics_stop_before_anything_changes():
    model = build_tiny("llava_llama_gqa")
    adapter = get_adapter(model)
    with torch.no_grad():
        adapter.mlp(adapter.layers(model)[0]).up_proj.weight[0, 0] = float("inf")
    with pytest.raises(VlmpruneError, match="not finite"):
        compensate_(model, width_plan(model), batches("llava_llama_gqa", model, 2), "ls")


def test_cli_prune_compensated_records_and_reloads(tiny_repo, tmp_path):
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(tiny_repo.model), "--calibration", str(tiny_repo.data), "--image-folder",
            str(tiny_repo.images), "--num-samples", "8", "--batch-size", "2", "--output", str(out),
            "--method", "width", "--ratio", "0.2", "--compensate", "ls", "--compensate-sequential"]
    assert main(argv) == 0
    plan = json.loads((out / "pruning_plan.json").read_text())
    comp = json.loads((out / "run.json").read_text())["prune"]["compensation"]
    assert comp["mode"] == "ls" and comp["sequential"] is True and comp["calibration_tokens"] > 0
    errors = [e for layer in comp["layers"].values() for e in layer.values()]
    assert errors and all(e["error_after"] <= e["error_before"] for e in errors)
    # the same plan, uncompensated, differs only in the consumers' weights
    plain = apply_plan_(vlmprune.load(tiny_repo.model), vlmprune.PruningPlan.from_dict(plan))
    loaded = vlmprune.load(out)
    changed = {k for k, v in loaded.state_dict().items() if not torch.equal(v, plain.state_dict()[k])}
    assert changed and all(k.endswith(("o_proj.weight", "down_proj.weight")) for k in changed)


def test_cli_compensate_with_a_plan_and_no_calibration_is_refused_before_loading(tiny_repo, tmp_path, capsys,
                                                                                  monkeypatch):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"drop_layers": [1]}))
    monkeypatch.setattr("vlmprune.prune.run.load", lambda *a, **k: pytest.fail("loaded the model"))
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_repo.model), "--plan", str(plan), "--output", str(out),
                 "--compensate", "ls"]) == 2
    assert "--calibration" in capsys.readouterr().err
    assert not out.exists()


def test_study_compensate_axis_shares_scores_and_compensates(tiny_repo, tmp_path):
    from vlmprune.study import expand_grid, load_study_config, run_study

    config_file = tmp_path / "study.yaml"
    config_file.write_text(
        "name: comp\ncalibration: {num_samples: 6, batch_size: 2}\nevaluation: {tasks: [], limit: 4}\n"
        "grid:\n  - {method: width, criterion: magnitude, ratio: 0.2, compensate: [none, ls]}\n")
    overrides = [f"output={tmp_path / 'run'}", f"teacher={tiny_repo.model}", f"train_data={tiny_repo.data}",
                 f"image_folder={tiny_repo.images}", f"evaluation.task_file={tiny_repo.task_file}"]
    config = load_study_config(config_file, overrides)
    cells = expand_grid(config)
    assert [c.id for c in cells] == ["width-magnitude-r0.2-none", "width-magnitude-r0.2+ls-none"]
    with pytest.raises(VlmpruneError, match="grid names compensate"):
        load_study_config(config_file, [*overrides, "grid=[{method: width, compensate: lsq}]"])
    result = run_study(config)
    assert result.done == 2 and not result.failed
    plain, comp = (json.loads((tmp_path / "run" / "pruned" / c.prune_id / "pruning_plan.json").read_text())
                   for c in cells)
    plain_record, comp_record = (RunRecord.load(tmp_path / "run" / "pruned" / c.prune_id).prune.to_dict()
                                 for c in cells)
    assert "compensation" not in plain_record and comp_record["compensation"]["mode"] == "ls"
    assert plain["layers"] == comp["layers"]  # the same cut, compensated


def test_auto_search_ranks_candidates_as_compensated_models():
    from vlmprune.planning.search import kl_proxy, search, text_logprobs
    from vlmprune.prune.run import score

    family = "llava_llama_gqa"
    model = build_tiny(family)
    calib, held_out = batches(family, model, 6), batches(family, model, 2)
    layer_scores, width_scores = score(model, "layer", "last").values, score(model, "width", "magnitude").values
    seen = []

    def fit(copy_, plan):
        seen.append(plan)
        compensate_(copy_, plan, calib, "ls")

    best, tried = search(model, layer_scores, width_scores, lambda plan_at: 0.2, held_out, "groups", 8, fit)
    assert [c.plan for c in tried] == seen and len(tried) >= 2
    reference = text_logprobs(model, held_out)
    for cand in tried:  # each proxy is that of the compensated, cut copy
        again = copy.deepcopy(model)
        compensate_(again, cand.plan, calib, "ls")
        assert kl_proxy(reference, text_logprobs(apply_plan_(again, cand.plan), held_out)) == pytest.approx(cand.proxy)
    assert best.proxy == min(c.proxy for c in tried)


def test_cli_auto_with_compensation_writes_compensated_ranked_candidates(tiny_repo, tmp_path):
    out = tmp_path / "auto"
    assert main(["prune", "--model", str(tiny_repo.model), "--method", "auto", "--criterion", "magnitude",
                 "--ratio", "0.25", "--mlp-multiple", "8", "--calibration", str(tiny_repo.data),
                 "--image-folder", str(tiny_repo.images), "--num-samples", "8", "--batch-size", "2",
                 "--top-k", "2", "--compensate", "ls", "--output", str(out)]) == 0
    for directory in (out, tmp_path / "auto-rank2"):
        plan = json.loads((directory / "pruning_plan.json").read_text())
        assert RunRecord.load(directory).prune.compensation["mode"] == "ls"
        plain = apply_plan_(vlmprune.load(tiny_repo.model), vlmprune.PruningPlan.from_dict(plan))
        loaded = vlmprune.load(directory)
        assert any(not torch.equal(v, plain.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_compensation_runs_without_autograd():
    """Layer-by-layer runs with autograd on keep every activation alive (7 GB on the demo model)."""
    model = build_tiny("llava_llama_gqa")
    modes = []
    layers = get_adapter(model).layers(model)
    handles = [layer.register_forward_hook(lambda m, a, o: modes.append(torch.is_grad_enabled())) for layer in layers]
    compensate_(model, width_plan(model), batches("llava_llama_gqa", model, 2), "ls", sequential=True)
    for h in handles:
        h.remove()
    assert modes and not any(modes)


@pytest.mark.parametrize("family", FAMILIES)
def test_select_removes_the_structures_the_fit_makes_up_exactly(family):
    """Every fourth MLP channel (and the last q head of each group of three or more) copies its neighbour;
    the plan removes as many others. ``select`` removes one of each pair of twins instead, so the
    compensated cut gives the unpruned logits, with the plan's widths."""
    model = build_tiny(family)
    adapter = get_adapter(model)
    shapes = layer_shapes(model)
    plan = PruningPlan()
    twins = {}
    for i, (layer, shape) in enumerate(zip(adapter.layers(model), shapes)):
        pairs = [(c - 1, c) for c in range(shape.intermediate_size) if c % 4 == 3]
        for src, dst in pairs:
            _copy_structure_(adapter, layer, shape, "mlp", src, dst)
        twins[i] = pairs
        entry = {"mlp_channels": [c for c in range(shape.intermediate_size) if c % 4 != 1]}
        g = shape.group_size
        if adapter.has_heads(layer) and g >= 3:
            for k in range(shape.num_kv_heads):
                _copy_structure_(adapter, layer, shape, "q", k * g, k * g + g - 1)
            entry["q_heads"] = [h for h in range(shape.num_heads) if h % g != 1]
        plan.layers[i] = entry
    given = copy.deepcopy(plan)
    inputs = make_inputs(family, model, seed=7)
    expected = logits(model, inputs)
    record = compensate_(model, plan, batches(family, model, 12), "ls", sequential=True, ridge=1e-12, select=True)
    assert record["selected"] == sorted(plan.layers)
    for i, entry in plan.layers.items():
        assert {k: len(v) for k, v in entry.items()} == {k: len(v) for k, v in given.layers[i].items()}
        gone = set(range(shapes[i].intermediate_size)) - set(entry["mlp_channels"])
        assert all(len(gone & set(pair)) == 1 for pair in twins[i])
        if "q_heads" in entry:
            g = shapes[i].group_size
            gone_q = set(range(shapes[i].num_heads)) - set(entry["q_heads"])
            assert all(len(gone_q & {k * g, k * g + g - 1}) == 1 for k in range(shapes[i].num_kv_heads))
    apply_plan_(model, plan)
    assert_close(logits(model, inputs), expected)


def test_obs_select_picks_the_unit_with_the_least_loss_after_the_fold():
    """One unit: the greedy choice is the brute-force best (ridge_fold's residual output energy, ridge ~ 0);
    units of one column and of two; the per-group limit is kept."""
    from vlmprune.surgery.compensate import _obs_select

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(200, 8, generator=gen, dtype=torch.float64) @ torch.randn(8, 8, generator=gen,
                                                                              dtype=torch.float64)
    G = z.T @ z
    W = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    for units in ([torch.tensor([c]) for c in range(8)], [torch.tensor([2 * u, 2 * u + 1]) for u in range(4)]):
        losses = []
        for cols in units:
            removed = torch.zeros(8, dtype=torch.bool)
            removed[cols] = True
            new, _, _ = ridge_fold(W, G, removed, 1e-9)
            losses.append(float(torch.einsum("of,fg,og->", W - new, G, W - new)))
        assert _obs_select(W, G, units, 1, 1e-9) == [int(np.argmin(losses))]
    units = [torch.tensor([c]) for c in range(8)]
    gone = _obs_select(W, G, units, 4, 1e-9, groups=[c // 4 for c in range(8)], per_group=2)
    assert len(set(gone)) == 4 and sum(c < 4 for c in gone) == 2


def test_cli_compensate_select_needs_ls(tiny_repo, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_repo.model), "--calibration", str(tiny_repo.data), "--output", str(out),
                 "--method", "width", "--ratio", "0.2", "--compensate-select"]) == 2
    assert "--compensate ls" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("family", ["llava_llama_gqa", "llava_phi", "internvl_qwen2"])
def test_a_dropped_layer_that_scales_the_residual_is_reproduced_by_the_scale(family):
    """Layer 2 multiplies the residual by 1.7: with ``layers_fit="scale"`` the later layers' writes are
    divided by 1.7, and since every later reader normalises, the model without layer 2 gives the unpruned
    logits; the record carries the scale."""
    model = build_tiny(family)
    layers = get_adapter(model).layers(model)
    for m in model.modules():  # scale-free norms: the tiny model's residual is small next to eps
        for name in ("variance_epsilon", "eps"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 1e-12)

    def scale(module, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        return (1.7 * h, *out[1:]) if isinstance(out, tuple) else 1.7 * h

    handle = layers[2].register_forward_hook(scale, with_kwargs=True)
    inputs = make_inputs(family, model, seed=7)
    expected = logits(model, inputs)
    plan = PruningPlan(drop_layers=[2])
    plain = logits(apply_plan_(copy.deepcopy(model), plan), inputs)
    assert (plain - expected).abs().max() > 1e-3  # the drop alone loses something
    record = compensate_(model, plan, batches(family, model, 4), "ls", layers_fit="scale")
    handle.remove()
    assert record["dropped_runs"][0]["scale"] == pytest.approx(1.7, rel=1e-5)
    apply_plan_(model, plan)
    assert_close(logits(model, inputs), expected)


def test_scale_is_skipped_where_a_norm_follows_the_writes(caplog):
    model = build_tiny("gemma3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.WARNING):
        record = compensate_(model, PruningPlan(drop_layers=[1]), batches("gemma3", model, 2), "ls",
                             layers_fit="scale")
    assert "normalises" in record["dropped_runs"][0]["scale_skipped"] and "not rescaled" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
