"""The config system (vlmprune.config): option groups shared by the stages, flat keys and group sections
read alike, every value checked against its field's type, and the study's sections typed as the same groups."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import yaml

from vlmprune import config
from vlmprune.cli import STAGES, build_parser, main
from vlmprune.config import (
    CalibrationOptions,
    CompensationOptions,
    EvalConfig,
    LoadOptions,
    PruneConfig,
    RecoverConfig,
    build,
    options_of,
    resolve,
    to_yaml,
)
from vlmprune.errors import VlmpruneError

CONFIGS = [cls for cls, *_ in STAGES.values()]
PRUNE = {"model": "m", "output": "o", "method": "width", "ratio": 0.2}
RECOVER = {"student": "s", "data": "d", "output": "o", "loss": "sft=1"}


def test_flat_keys_and_group_sections_make_the_same_config():
    flat = build(PruneConfig, {**PRUNE, "calibration": "data.json", "num_samples": 8, "compensate": "ls",
                               "compensate_ridge": 0.01, "dtype": "bfloat16", "attention": "heads"})
    nested = build(PruneConfig, {**PRUNE, "calibration": {"path": "data.json", "num_samples": 8},
                                 "compensation": {"mode": "ls", "ridge": 0.01}, "load": {"dtype": "bfloat16"},
                                 "width": {"attention": "heads"}})
    assert flat == nested
    assert isinstance(flat.calibration, CalibrationOptions) and isinstance(flat.compensation, CompensationOptions)
    assert (flat.calibration.num_samples, flat.compensation.ridge, flat.load.dtype) == (8, 0.01, "bfloat16")


def test_the_resolved_config_reads_back_as_the_same_config(tmp_path):
    cfg = build(PruneConfig, {**PRUNE, "calibration": "d.json", "num_samples": 8, "compensate": "ls",
                              "global_ranking": True})
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert config.load_stage_config(PruneConfig, path) == cfg
    rec = build(RecoverConfig, {**RECOVER, "learning_rate": 0.5, "train": "lora", "fraction": 0.1})
    path.write_text(to_yaml(rec))
    assert config.load_stage_config(RecoverConfig, path) == rec
    assert set(yaml.safe_load(path.read_text())) >= {"data", "objective", "trainable", "training", "load"}


def test_one_option_given_twice_or_unknown_in_a_section_is_refused():
    with pytest.raises(VlmpruneError, match="num_samples is given twice"):
        build(PruneConfig, {**PRUNE, "num_samples": 4, "calibration": {"num_samples": 8}})
    with pytest.raises(VlmpruneError, match=r"unknown option\(s\) calibration.num_sample; known under calibration"):
        build(PruneConfig, {**PRUNE, "calibration": {"num_sample": 8}})
    with pytest.raises(VlmpruneError, match=r"unknown option\(s\) device_map"):
        build(EvalConfig, {"model": "m", "device_map": "auto"})  # evaluate takes the load options it acts on


def _wrong_value(f: dataclasses.Field):
    """A value of none of the field's declared types (a string where a bool is asked: the "false" trap)."""
    names = {t.strip() for t in str(f.type).split("|")}
    if "str" not in names:
        return "false" if "bool" in names else "12"
    return 3.5 if not names & {"float", "int"} else ["a", "list"] if "list" not in names else {"a": 1}


CASES = [(cls, option) for cls in CONFIGS for option in options_of(cls)]


@pytest.mark.parametrize("cls, option", CASES, ids=[f"{c.__name__}.{o.key}" for c, o in CASES])
def test_every_option_of_every_stage_is_type_checked(cls, option):
    bad = _wrong_value(option.field)
    with pytest.raises(VlmpruneError, match=f"option {option.key} must be"):
        build(cls, {option.key: bad})


def test_every_stage_that_loads_a_model_takes_the_shared_load_options():
    loading = {"InspectConfig", "PruneConfig", "EvalConfig", "QuantizeConfig", "ExportConfig", "RecoverConfig"}
    for cls in CONFIGS:
        groups = {f.metadata.get("group") for f in dataclasses.fields(cls)}
        assert (LoadOptions in groups) == (cls.__name__ in loading), cls.__name__
    keys = {o.key for o in options_of(EvalConfig)}
    assert {"device", "dtype"} <= keys and "device_map" not in keys


@pytest.mark.parametrize("text, key", [('overwrite: "false"\n', "overwrite"),
                                       ('trust_remote_code: "false"\n', "trust_remote_code"),
                                       ('global_ranking: "no"\n', "global_ranking"),
                                       ('num_samples: "8"\n', "num_samples")])
def test_a_quoted_word_in_a_config_file_is_refused_and_nothing_changes(tiny_repo, tmp_path, capsys, text, key):
    out = tmp_path / "out"
    assert main(["prune", "--model", str(tiny_repo.model), "--method", "width", "--criterion", "magnitude",
                 "--ratio", "0.1", "--output", str(out)]) == 0
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    yml = tmp_path / "c.yaml"
    yml.write_text(text)
    assert main(["prune", "--config", str(yml), "--model", str(tiny_repo.model), "--method", "width",
                 "--criterion", "magnitude", "--ratio", "0.2", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"option {key} must be" in err and "internal error" not in err
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "out"]  # no leftovers


def test_set_and_flags_still_beat_a_yaml_section(tmp_path):
    yml = tmp_path / "p.yaml"
    yml.write_text(yaml.safe_dump({**PRUNE, "calibration": {"path": "d.json", "num_samples": 16}}))
    args, rest = build_parser().parse_known_args(["prune", "--config", str(yml), "num_samples=8"])
    assert resolve(PruneConfig, args, rest).calibration.num_samples == 8
    args, rest = build_parser().parse_known_args(["prune", "--config", str(yml), "calibration.num_samples=4",
                                                  "--num-samples", "2"])
    assert resolve(PruneConfig, args, rest).calibration.num_samples == 2


def test_the_study_sections_are_the_stage_groups(tmp_path):
    from vlmprune.study import DEFAULTS, study_sections

    sections = study_sections({**DEFAULTS, "calibration": {"num_samples": 8, "batch_size": 2},
                               "compensation": {"sequential": True}})
    assert isinstance(sections["calibration"], CalibrationOptions) and sections["calibration"].num_samples == 8
    assert sections["compensation"].sequential is True
    assert sections["evaluation"].tasks == ["easyvqa", "digits"]
    with pytest.raises(VlmpruneError, match="option num_samples must be an integer"):
        study_sections({**DEFAULTS, "calibration": {"num_samples": "8"}})
    with pytest.raises(VlmpruneError, match=r"unknown option\(s\) calibration.path"):
        study_sections({**DEFAULTS, "calibration": {"path": "x"}})  # the study fills the data in itself


def test_the_configs_in_the_repository_load(tiny_repo, tmp_path):
    from vlmprune.study import check_study_config, load_study_config

    root = Path(__file__).resolve().parents[1] / "configs"
    studies = sorted((root / "study").glob("*.yaml"))
    assert studies
    for path in studies:
        overrides = [f"output={tmp_path / path.stem}", "teacher=-", "train_data=-"]
        if path.stem == "smoke":  # its tests give it a task file
            overrides.append(f"evaluation.task_file={tiny_repo.task_file}")
        cfg = load_study_config(path, overrides)
        check_study_config(cfg, str(path))
