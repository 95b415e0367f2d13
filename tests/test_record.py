"""run.json: the typed, versioned run record beside a model (vlmprune.record)."""

from __future__ import annotations

import json

import pytest

from vlmprune.planning.plan import PLAN_FILE, PruningPlan
from vlmprune.record import (
    RUN_FILE,
    RUN_VERSION,
    PruneRecord,
    QuantizationRecord,
    RecordError,
    RecoveryRecord,
    RunRecord,
)

PRUNE = PruneRecord(method="width", criterion="taylor", tokens="answer", ratio_target=0.2, attention="groups",
                    mlp_multiple=8, layer_range=None, global_ranking=False,
                    achieved={"params_removed": 100, "ratio": 0.19, "ratio_language_model": 0.25},
                    source_model="/models/tiny", calibration="/data/train.json", num_samples=8, seed=0,
                    source={"model_type": "llava", "fingerprint": "abc"}, loads_with="from_pretrained",
                    parameters={"before": {"total": 1000}, "after": {"total": 810}},
                    cost={"seconds": 1.5, "scope": "call"}, compensation={"mode": "ls"},
                    target={"kind": "params", "required": 0.8, "achieved": 810})
RECOVERY = RecoveryRecord(losses={"sft": 1.0}, train="all", fraction=0.5, num_samples=4, steps=6, final_loss=1.25,
                          teacher=None, hidden_layers=None, teacher_placement=None)
QUANTIZATION = QuantizationRecord(scheme="int8", description="int8 weights", backend="torchao", backend_version="0.9",
                                  quantized_modules=7, kept=["model.vision_tower"],
                                  language_model_bytes={"before": 10, "after": 5},
                                  model_bytes={"before": 20, "after": 15}, source="/models/pruned")


def test_round_trip(tmp_path):
    record = RunRecord(prune=PRUNE, recovery=[RECOVERY, RECOVERY], quantization=QUANTIZATION)
    path = record.save(tmp_path)
    assert path == tmp_path / RUN_FILE
    data = json.loads(path.read_text())
    assert data["version"] == RUN_VERSION and set(data) == {"version", "prune", "recovery", "quantization"}
    assert data["prune"]["method"] == "width" and "stock_note" not in data["prune"]  # unset fields stay out
    loaded = RunRecord.load(tmp_path)
    assert loaded == record
    assert RunRecord.load(tmp_path).to_dict() == data
    empty = RunRecord()
    empty.save(tmp_path)
    assert RunRecord.load(tmp_path) == empty


def test_an_old_style_directory_is_read_from_its_plan(tmp_path):
    """A run directory from before run.json: the record's facts were free keys of pruning_plan.json."""
    old = {"version": 1, "drop_layers": [2], "layers": {"0": {"mlp_channels": [0, 1]}},
           "method": "width", "criterion": "taylor", "tokens": "answer", "ratio_target": 0.2,
           "scores": {"heads": [[1.0, 2.0]]}, "attention": "groups", "mlp_multiple": 8, "layer_range": None,
           "global": True, "achieved": {"params_removed": 100, "ratio": 0.19, "ratio_language_model": 0.25},
           "source_model": "/models/tiny", "calibration": None, "num_samples": 8, "seed": 0,
           "source": {"fingerprint": "abc"}, "loads_with": "vlmprune.load", "loads_with_reason": "head_dim",
           "parameters": {"before": {"total": 1000}, "after": {"total": 810}}, "cost": {"seconds": 1.0},
           "recovery": [{"losses": {"sft": 1.0}, "train": "lora", "steps": 4, "retired_key": 1}],
           "quantization": {"scheme": "nf4", "backend": "bitsandbytes", "source": "/models/r"}}
    (tmp_path / PLAN_FILE).write_text(json.dumps(old))
    record = RunRecord.load(tmp_path)
    assert record.version == RUN_VERSION
    p = record.prune
    assert (p.method, p.criterion, p.tokens, p.ratio_target, p.global_ranking) == ("width", "taylor", "answer", 0.2,
                                                                                    True)
    assert p.achieved == old["achieved"] and p.parameters == old["parameters"] and p.cost == old["cost"]
    assert (p.loads_with, p.loads_with_reason, p.source) == ("vlmprune.load", "head_dim", {"fingerprint": "abc"})
    assert [r.steps for r in record.recovery] == [4] and record.recovery[0].train == "lora"
    assert record.quantization.scheme == "nf4" and record.quantization.source == "/models/r"
    # the plan itself still reads, and says what is removed
    plan = PruningPlan.load(tmp_path)
    assert plan.drop_layers == [2] and plan.layers == {0: {"mlp_channels": [0, 1]}}
    # run.json, where there is one, wins over the old keys
    RunRecord(prune=PruneRecord(method="layer")).save(tmp_path)
    assert RunRecord.load(tmp_path).prune.method == "layer"


def test_a_hand_written_plan_has_no_prune_record(tmp_path):
    PruningPlan(drop_layers=[1]).save(tmp_path / PLAN_FILE)
    record = RunRecord.load(tmp_path)
    assert record.prune is None and record.recovery == [] and record.quantization is None


def test_an_unknown_version_is_refused_with_the_version_named(tmp_path):
    (tmp_path / RUN_FILE).write_text(json.dumps({"version": 99, "prune": {"method": "width"}}))
    with pytest.raises(RecordError, match=r"run record version 99 is not supported.*reads version 1"):
        RunRecord.load(tmp_path)
    (tmp_path / RUN_FILE).unlink()
    (tmp_path / PLAN_FILE).write_text(json.dumps({"version": 7, "drop_layers": [], "method": "width"}))
    with pytest.raises(RecordError, match=r"pruning plan version 7 is not supported"):
        RunRecord.load(tmp_path)


def test_a_malformed_record_is_refused(tmp_path):
    (tmp_path / RUN_FILE).write_text(json.dumps({"version": RUN_VERSION, "prune": {"method": "width", "oops": 1}}))
    with pytest.raises(RecordError, match=r"'prune' section has unknown key\(s\) \['oops'\]"):
        RunRecord.load(tmp_path)
    (tmp_path / RUN_FILE).write_text("{not json")
    with pytest.raises(RecordError, match="not valid JSON"):
        RunRecord.load(tmp_path)


def test_a_directory_without_a_record(tmp_path):
    with pytest.raises(RecordError, match="no run record"):
        RunRecord.load(tmp_path)
    assert RunRecord.load(tmp_path, missing_ok=True) == RunRecord()
