"""The plan format: JSON in and out, and every malformed or ill-fitting plan refused by name."""

import json

import pytest

from vlmprune.errors import PlanError
from vlmprune.planning.plan import LayerShape, PruningPlan

# 4 layers; 8 q heads in 2 kv groups of 4; 16 MLP channels
SHAPES = [LayerShape(8, 2, 4, 16)] * 4


def resolve(data):
    return PruningPlan.from_dict(data).resolve(SHAPES)


def test_json_round_trip_keeps_extra_fields(tmp_path):
    data = {"version": 1, "drop_layers": [3], "layers": {"0": {"kv_heads": [1], "mlp_channels": [0, 5]}},
            "criterion": "taylor", "scores": {"0": [0.1, 0.2]}}
    plan = PruningPlan.from_dict(data)
    path = plan.save(tmp_path / "pruning_plan.json")
    again = PruningPlan.load(tmp_path)
    expected = {**data, "layers": {"0": {"kv_heads": [1], "mlp_channels": [0, 5]}}}
    assert again.to_dict() == json.loads(path.read_text()) == expected
    assert again.kept_layers(4) == [0, 1, 2]


def test_missing_keys_keep_the_part_whole():
    keep = resolve({"layers": {"1": {"kv_heads": [1]}}})[1]
    assert keep.kv_heads == (1,) and keep.q_heads == (4, 5, 6, 7)
    assert keep.mlp_channels == tuple(range(16))
    keep = resolve({"layers": {"2": {"q_heads": [0, 3, 4, 7]}}})[2]
    assert keep.kv_heads == (0, 1)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"drop_layers": [4]}, r"drop_layers names layer 4, but the model has 4 layers"),
        ({"drop_layers": [0, 1, 2, 3]}, r"drops all 4 layers"),
        ({"layers": {"9": {"mlp_channels": [0]}}}, r"layers\[9\] does not exist"),
        ({"layers": {"0": {"mlp_channels": [16]}}}, r"layers\[0\].mlp_channels has index 16 out of range"),
        ({"layers": {"0": {"q_heads": []}}}, r"layers\[0\].q_heads keeps nothing"),
        ({"layers": {"0": {"mlp_channels": []}}}, r"layers\[0\].mlp_channels keeps nothing"),
        ({"layers": {"0": {"kv_heads": [0], "q_heads": [0, 5]}}}, r"keeps head 5, which belongs to kv head 1"),
        ({"layers": {"1": {"q_heads": [0, 1, 4]}}}, r"layers\[1\]: every kept kv head must keep the same number"),
        ({"layers": {"1": {"q_heads": [0, 1]}}}, r"same number \(>0\)"),
        ({"drop_layers": [2], "layers": {"2": {"mlp_channels": [0]}}}, r"layer 2 is both dropped and width-pruned"),
    ],
)
def test_plans_that_do_not_fit_are_refused_by_entry(data, message):
    with pytest.raises(PlanError, match=message):
        resolve(data)


@pytest.mark.parametrize(
    "data, message",
    [
        ([1, 2], "must be a JSON object"),
        ({"version": 2}, "version 2 is not supported"),
        ({"drop_layers": "3"}, "'drop_layers' must be a list"),
        ({"drop_layers": [1, 1]}, "lists a layer twice"),
        ({"layers": {"x": {}}}, "'x' is not a layer index"),
        ({"layers": {"0": {"heads": [1]}}}, r"unknown key\(s\) \['heads'\]"),
        ({"layers": {"0": {"q_heads": [1, -1]}}}, "must be a list of non-negative integers"),
        ({"layers": {"0": {"q_heads": [1, 1]}}}, "lists an index twice"),
    ],
)
def test_malformed_plans_are_refused(data, message):
    with pytest.raises(PlanError, match=message):
        PruningPlan.from_dict(data)


def test_unreadable_plan_file(tmp_path):
    (tmp_path / "p.json").write_text("{nope")
    with pytest.raises(PlanError, match="not valid JSON"):
        PruningPlan.load(tmp_path / "p.json")
    with pytest.raises(PlanError, match="no pruning plan"):
        PruningPlan.load(tmp_path / "absent.json")
