"""Inputs that lied, and inputs that broke vlmprune (issue 32, the input half): one test per class.

Every refusal asserts exit 2, a message naming the problem and the fix, the inputs unchanged (hashed
before and after) and nothing written. The seeded fuzz of issue 21 is extended here to plans, scores,
study configs and ``--config`` YAML.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from recover_helpers import write_data, write_pair
from test_reliability import prune_args, recover_args, tree_hash

from vlmprune.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run(argv) -> int:
    return main([str(a) for a in argv])


def refused(argv, capsys, message, *inputs, output=None) -> str:
    """Run ``argv``: exit 2, ``message`` in stderr, no traceback or internal error, inputs unchanged, no output."""
    before = tree_hash(*inputs) if inputs else None
    code = run(argv)
    err = capsys.readouterr().err
    flat = " ".join(err.split())
    assert code == 2, flat[-3000:]
    assert message in flat, flat[-3000:]
    assert "Traceback" not in err and "internal error" not in err
    if inputs:
        assert tree_hash(*inputs) == before
    if output is not None:
        assert not Path(output).exists() and not list(Path(output).parent.glob(f".{Path(output).name}.*"))
    return flat


@pytest.fixture
def pair(tmp_path):
    teacher, student = write_pair(tmp_path / "models", drop_layers=(2, 3))
    data, images = write_data(tmp_path / "data", 8)
    return {"teacher": teacher, "student": student, "data": data, "images": images}


@pytest.fixture(scope="module")
def scored(tiny_repo, tmp_path_factory):
    """A width prune of the tiny model (its scores.json and its folder), and the same model with other weights."""
    from tiny_data import tiny_llava_processor
    from tiny_models import build_tiny

    import vlmprune

    root = tmp_path_factory.mktemp("scored")
    assert main(prune_args(tiny_repo.model, root / "pruned")) == 0
    other = vlmprune.save_model(build_tiny("llava_llama_gqa", seed=1), root / "other", processor=tiny_llava_processor())
    return {"pruned": root / "pruned", "scores": root / "pruned" / "scores.json", "other": other}


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# ------------------------------------------------------------------------------------------ fuzz


def _mutate(rng: random.Random, value, depth: int = 0):
    """A random mutation of a JSON-like value: a key dropped, renamed or retyped; a list cut, padded or emptied."""
    kinds = [None, True, -1, 0, 1, 2.5, 10**6, float("nan"), float("inf"), "x", "", [], {}, [1, "a"], {"a": 1}, "01"]
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        out = dict(value)
        roll = rng.random()
        if roll < 0.2:
            del out[key]
        elif roll < 0.3:
            out[key + rng.choice(["", "x", "_"])] = out.pop(key)
        elif roll < 0.4:
            out[rng.choice(["method", "source", "achieved", "version", "zzz", "layers"])] = rng.choice(kinds)
        elif roll < 0.5 or depth > 3:
            out[key] = rng.choice(kinds)
        else:
            out[key] = _mutate(rng, value[key], depth + 1)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        roll = rng.random()
        out = list(value)
        if roll < 0.25:
            return out[: rng.randrange(len(out))]
        if roll < 0.45:
            return out + [rng.choice(kinds + out)]
        i = rng.randrange(len(out))
        out[i] = _mutate(rng, out[i], depth + 1) if rng.random() < 0.6 else rng.choice(kinds)
        return out
    return rng.choice(kinds)


def _text(rng: random.Random, data) -> str:
    text = json.dumps(data)
    if rng.random() < 0.1:
        text = text[: rng.randrange(1, len(text))]  # cut short
    return text


def _assert_clean(code, out, what):
    assert code in (0, 2), (what, out.err[-3000:])
    assert "Traceback" not in out.err + out.out and "internal error" not in out.err, (what, out.err[-3000:])


def test_fuzz_plans_and_scores(tiny_repo, scored, tmp_path, capsys):
    rng = random.Random(32)
    plan = json.loads((scored["pruned"] / "pruning_plan.json").read_text())
    plan["source"] = json.loads((scored["pruned"] / "run.json").read_text())["prune"]["source"]
    scores = json.loads(scored["scores"].read_text())
    for i in range(60):
        if i % 2 == 0:
            data = _write(tmp_path / f"plan{i}.json", _text(rng, _mutate(rng, plan)))
            argv = ["prune", "--model", tiny_repo.model, "--plan", data, "--output", tmp_path / f"o{i}"]
        else:
            data = _write(tmp_path / f"scores{i}.json", _text(rng, _mutate(rng, scores)))
            argv = ["prune", "--model", tiny_repo.model, "--scores", data, "--ratio", "0.2", "--output",
                    tmp_path / f"o{i}"]
        code = run(argv)
        _assert_clean(code, capsys.readouterr(), data.read_text()[:500])


def _laughs(levels: int) -> str:
    """A flow sequence whose anchors nest: 9 ** levels values once its aliases are expanded."""
    parts = ["&l0 [" + ", ".join(["lol"] * 9) + "]"]
    parts += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


def _yaml_mutations(rng: random.Random, config: dict) -> str:
    roll = rng.random()
    key = rng.choice(list(config))
    if roll < 0.3:  # YAML-level damage: anchors under a real option, tags, tabs, cut short
        return rng.choice([f"{key}: &a [*a]", f"{key}: {_laughs(7)}", "!!python/object:os.system {}", "\tfoo: 1",
                           "[1, 2", "a: b: c", "x: &x [1]\ny: [*x, *x, *x]", "- 1\n- 2", "'just text'", "", "~",
                           f"{key}: {'9' * 5000}", f"{key}: {'[' * 5000}{']' * 5000}"])
    text = yaml.safe_dump(_mutate(rng, config), sort_keys=False)
    return text[: rng.randrange(1, len(text))] if roll < 0.4 else text


def test_fuzz_config_yaml_and_study_configs(tiny_repo, tmp_path, capsys):
    rng = random.Random(21)
    prune_config = {"model": str(tmp_path / "no-model"), "method": "width", "criterion": "magnitude", "ratio": 0.2,
                    "output": str(tmp_path / "o"), "overwrite": False, "attention": "groups", "mlp_multiple": 8,
                    "global_ranking": False, "num_samples": 4, "target": None, "layers": "1:3"}
    study = yaml.safe_load((ROOT / "configs" / "study" / "smoke.yaml").read_text())
    study["output"] = str(tmp_path / "run")
    for i in range(40):
        if i % 2 == 0:
            path = _write(tmp_path / f"c{i}.yaml", _yaml_mutations(rng, prune_config))
            argv = ["prune", "--config", path, "--model", tmp_path / "no-model"]  # flags win: never a hub id
        else:
            path = _write(tmp_path / f"s{i}.yaml", _yaml_mutations(rng, study))
            # a config that survives every check still starts nothing: the teacher does not exist
            argv = ["study", "--config", path, f"teacher={tmp_path / 'no-teacher'}"]
        code = run(argv)
        out = capsys.readouterr()
        _assert_clean(code, out, path.read_text()[:500])
        assert code == 2, (path.read_text()[:500], out.err[-2000:])
    assert not (tmp_path / "o").exists() and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ bombs and depth


DEEP_JSON = "[" * 100_000 + "]" * 100_000
LONG_INT = "[" + "9" * 5000 + "]"
LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))


@pytest.mark.parametrize("text, message", [
    (DEEP_JSON, "nests lists or objects more than 100 levels deep"),
    ("[" * 150 + "]" * 150, "more than 100 levels deep"),
    (LONG_INT, "holds an integer of more than 4300 digits"),
    ('{"a": 1, "a": 2}', "names the key 'a' twice"),
])
def test_json_reader_bounds(text, message):
    from vlmprune.errors import VlmpruneError
    from vlmprune.readers import parse_json

    with pytest.raises(VlmpruneError, match=message):
        parse_json(text, "f.json", unique_keys=True)
    assert parse_json('{"a": [1, {"b": 2}]}', "f.json") == {"a": [1, {"b": 2}]}


@pytest.mark.parametrize("text, message", [
    (LAUGHS, "expands to more than 100,000 values through its anchors and aliases"),
    ("a: &a [*a]", "an alias inside the value it refers to"),
    ("[" * 100_000 + "]" * 100_000, "more than 100 levels deep"),
    ("a: " + "9" * 5000, "more than 4300 digits"),
    ("a: [", "is not valid YAML"),
    ("!!python/object/apply:os.system [echo hi]", "is not valid YAML"),
])
def test_yaml_reader_bounds(text, message):
    from vlmprune.errors import VlmpruneError
    from vlmprune.readers import parse_yaml

    with pytest.raises(VlmpruneError, match=message):
        parse_yaml(text, "c.yaml")
    assert parse_yaml("x: &x {b: 1}\ny: *x\n", "c.yaml") == {"x": {"b": 1}, "y": {"b": 1}}  # a few aliases are fine


READERS = ("data", "task", "plan", "scores", "config", "study", "override")


@pytest.mark.parametrize("kind, bomb", [(k, b) for k in READERS for b in ("deep", "long_int", "laughs")
                                        if b != "laughs" or k in ("config", "study", "override")])  # aliases: YAML
def test_bombs_in_every_reader(kind, bomb, tiny_repo, tmp_path, capsys):
    text = {"deep": DEEP_JSON, "long_int": LONG_INT, "laughs": LAUGHS}[bomb]
    file = _write(tmp_path / ("bomb.yaml" if kind in ("config", "study") else "bomb.json"), text)
    out = tmp_path / "o"
    argv = {
        "data": ["prune", "--model", tiny_repo.model, "--method", "layer", "--ratio", "0.2", "--calibration", file,
                 "--image-folder", tiny_repo.images, "--output", out],
        "task": ["evaluate", "--model", tiny_repo.model, "--tasks", "", "--task-file", file],
        "plan": ["prune", "--model", tiny_repo.model, "--plan", file, "--output", out],
        "scores": ["prune", "--model", tiny_repo.model, "--scores", file, "--ratio", "0.2", "--output", out],
        "config": ["prune", "--config", file, "--model", tiny_repo.model, "--output", out],
        "study": ["study", "--config", file],
        "override": ["prune", *prune_args(tiny_repo.model, out)[1:], f"--set=layers={text}"],
    }[kind]
    message = {"deep": "more than 100 levels deep", "long_int": "more than 4300 digits",
               "laughs": "through its anchors and aliases"}[bomb]
    refused(argv, capsys, message, tiny_repo.model, file, output=out)


def test_decompression_bomb_image_is_named(tiny_repo, tmp_path, capsys, monkeypatch):
    from PIL import Image

    task = tmp_path / "task.json"
    shutil.copytree(tiny_repo.images, tmp_path / "images")
    records = json.loads(tiny_repo.task_file.read_text())
    _write(task, [{**r, "image": f"images/{r['image']}"} for r in records if r.get("image")][:2])
    # a small image stands in for a huge one: PIL refuses any image past twice its pixel limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)
    refused(["evaluate", "--model", tiny_repo.model, "--tasks", "", "--task-file", task], capsys,
            "is refused as a decompression bomb", tmp_path / "images", task)


# ------------------------------------------------------------------------------------------ scores


def _scores(scored, edit) -> dict:
    data = json.loads(scored["scores"].read_text())
    edit(data)
    return data


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["scores"]["heads"].__setitem__(0, [float("nan")] * len(d["scores"]["heads"][0])),
     "heads[0] holds NaN or infinite values"),
    (lambda d: d["scores"]["mlp_channels"].__setitem__(1, [float("inf")] * len(d["scores"]["mlp_channels"][1])),
     "mlp_channels[1] holds NaN or infinite values"),
    (lambda d: d["scores"].update(heads=d["scores"]["heads"][:2]), "heads for 2 layers, but the model has 4"),
    (lambda d: d["scores"].update(kv_groups=d["scores"]["kv_groups"] * 2),
     "kv_groups for 8 layers, but the model has 4"),
    (lambda d: d["scores"]["mlp_channels"].__setitem__(2, d["scores"]["mlp_channels"][2][:5]),
     "mlp_channels[2] has 5 values"),
    (lambda d: d.update(method="auto"), "neither 'layer' nor 'width'"),
    (lambda d: d.update(version=7), "scores file version 7 is not one this vlmprune reads"),
])
def test_scores_must_fit_the_model_and_be_finite(tiny_repo, scored, tmp_path, capsys, edit, message):
    file = _write(tmp_path / "scores.json", _scores(scored, edit))
    refused(["prune", "--model", tiny_repo.model, "--scores", file, "--ratio", "0.2", "--output", tmp_path / "o"],
            capsys, message, tiny_repo.model, file, output=tmp_path / "o")


def test_layer_scores_of_another_depth_are_refused(tiny_repo, tmp_path, capsys):
    assert run(["prune", "--model", tiny_repo.model, "--method", "layer", "--criterion", "last", "--ratio", "0.2",
                 "--output", tmp_path / "p"]) == 0
    data = json.loads((tmp_path / "p" / "scores.json").read_text())
    data["scores"]["layers"] = data["scores"]["layers"] + [1.0, 2.0, 3.0]  # 7 scores for 4 layers
    file = _write(tmp_path / "scores.json", data)
    refused(["prune", "--model", tiny_repo.model, "--scores", file, "--ratio", "0.2", "--output", tmp_path / "o"],
            capsys, "layers has 7 values, the model 4", tiny_repo.model, file, output=tmp_path / "o")


def test_scores_of_another_model_with_the_same_shapes_are_refused(scored, tmp_path, capsys, caplog):
    refused(["prune", "--model", scored["other"], "--scores", scored["scores"], "--ratio", "0.2", "--output",
             tmp_path / "o"], capsys, "the architecture is the same but the weights differ", scored["other"],
            scored["pruned"], output=tmp_path / "o")
    # a scores file of an older vlmprune (no sample of the weights) is read, and the log says what was not checked
    old = _write(tmp_path / "old.json", _scores(scored, lambda d: (d["model"].pop("weights"), d.update(version=1))))
    assert run(["prune", "--model", scored["other"], "--scores", old, "--ratio", "0.2", "--output",
                 tmp_path / "o"]) == 0
    assert "records no sample of the weights" in caplog.text


def test_weights_sample_survives_a_change_of_dtype(tiny_repo):
    import torch

    import vlmprune
    from vlmprune.summary import same_weights, source_record

    model = vlmprune.load(tiny_repo.model)
    here = source_record(model)["weights"]
    assert same_weights(here, source_record(model.to(torch.bfloat16))["weights"]) is True
    assert same_weights(here, source_record(model.to(torch.float16))["weights"]) is True
    assert same_weights(here, [v * 1.5 + 0.01 for v in here]) is False
    assert same_weights(here, None) is None


# ------------------------------------------------------------------------------------------ plans


def test_a_plan_made_for_another_model_is_refused_with_the_difference(scored, tmp_path, capsys):
    from recover_helpers import build_tiny_deep
    from tiny_data import tiny_llava_processor

    import vlmprune

    deep = vlmprune.save_model(build_tiny_deep(6), tmp_path / "deep", processor=tiny_llava_processor())
    # a plan in a vlmprune output folder: the run.json beside it says which model it was made for
    refused(["prune", "--model", deep, "--plan", scored["pruned"] / "pruning_plan.json", "--output", tmp_path / "o"],
            capsys, "was made for another model than", deep, scored["pruned"], output=tmp_path / "o")
    # an old plan that carries its record as free keys (source, achieved)
    record = json.loads((scored["pruned"] / "run.json").read_text())["prune"]
    plan = json.loads((scored["pruned"] / "pruning_plan.json").read_text())
    old = _write(tmp_path / "old.json", {**plan, "source": record["source"], "achieved": record["achieved"]})
    err = refused(["prune", "--model", deep, "--plan", old, "--output", tmp_path / "o"], capsys,
                  "num_layers 6 (the plan's 'source' field says 4)", deep, old, output=tmp_path / "o")
    assert "remove the plan's 'source' field" in err


def test_a_hand_edited_plan_records_what_it_removes(tiny_repo, scored, tmp_path, capsys, caplog):
    record = json.loads((scored["pruned"] / "run.json").read_text())["prune"]
    plan = json.loads((scored["pruned"] / "pruning_plan.json").read_text())
    plan["layers"]["0"]["mlp_channels"] = plan["layers"]["0"]["mlp_channels"][:8]  # narrower than it says
    edited = _write(tmp_path / "edited.json", {**plan, "source": record["source"], "achieved": record["achieved"],
                                               "method": "width", "criterion": 7})
    assert run(["prune", "--model", tiny_repo.model, "--plan", edited, "--output", tmp_path / "o"]) == 0
    assert "the plan's notes say it removes" in caplog.text
    written = json.loads((tmp_path / "o" / "run.json").read_text())["prune"]
    params = written["parameters"]
    assert written["achieved"]["ratio"] == pytest.approx(1 - params["after"]["total"] / params["before"]["total"])
    assert written["achieved"]["ratio"] > record["achieved"]["ratio"] and "criterion" not in written


def test_a_hand_made_plan_with_a_method_key_prints_its_result(tiny_repo, tmp_path, capsys):
    plan = _write(tmp_path / "p.json", {"drop_layers": [2], "method": "width"})
    assert run(["prune", "--model", tiny_repo.model, "--plan", plan, "--output", tmp_path / "o"]) == 0
    out = capsys.readouterr()
    assert "removed" in out.out and "internal error" not in out.err


@pytest.mark.parametrize("text, message", [
    ('{"layers": {"1": {"mlp_channels": [0, 1]}, "01": {"mlp_channels": [2]}}}', "keys '1' and '01' both name layer 1"),
    ('{"layers": {"1": {"mlp_channels": [0]}, "1": {"mlp_channels": [2]}}}', "names the key '1' twice"),
    ('{"drop_layers": [1], "drop_layers": [2]}', "names the key 'drop_layers' twice"),
])
def test_a_plan_naming_a_layer_twice_is_refused(tiny_repo, tmp_path, capsys, text, message):
    plan = _write(tmp_path / "p.json", text)
    refused(["prune", "--model", tiny_repo.model, "--plan", plan, "--output", tmp_path / "o"], capsys, message,
            tiny_repo.model, plan, output=tmp_path / "o")


def test_printing_after_the_output_is_written_never_fails_the_command(tiny_repo, tmp_path, capsys, monkeypatch):
    import vlmprune.cli

    def broken(result):
        raise KeyError("criterion")

    monkeypatch.setattr(vlmprune.cli, "print_prune_result", broken)
    assert main(prune_args(tiny_repo.model, tmp_path / "o")) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "was written completely, but printing its summary failed (KeyError" in err
    assert (tmp_path / "o" / "run.json").is_file()


# ------------------------------------------------------------------------------------------ targets


def test_a_params_target_is_a_budget(tiny_repo):
    """The closest-width plan of the exact ratio keeps more than the target; the target's plan never does."""
    import vlmprune
    from vlmprune.config import parse_target
    from vlmprune.errors import VlmpruneError
    from vlmprune.planning.solve import ModelBudget, achieved, plan_for
    from vlmprune.planning.targets import ratio_for
    from vlmprune.prune.run import score
    from vlmprune.summary import layer_shapes

    model = vlmprune.load(tiny_repo.model)
    budget, shapes = ModelBudget.of(model), layer_shapes(model)
    scores = score(model, "width", "magnitude")

    def kept(plan):
        return 1 - achieved(plan, budget, shapes)["ratio"]

    overshooting = 0
    for fraction in (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6):
        def plan_at(r):
            return plan_for(model, scores, r, "groups", 8)

        overshooting += kept(plan_at(1 - fraction)) > fraction  # the ratio solver's closest width
        assert kept(plan_at(ratio_for(model, parse_target(f"params={fraction}"), plan_at))) <= fraction
    assert overshooting, "no target where the closest width overshoots: the test would prove nothing"
    with pytest.raises(VlmpruneError, match="no plan of this method fits it"):
        ratio_for(model, parse_target("params=0.01"), lambda r: plan_for(model, scores, r, "groups", 8))


# ------------------------------------------------------------------------------------------ evaluate, convert


@pytest.mark.parametrize("tasks", [None, "easyvqa"])
def test_a_task_file_named_like_a_requested_task_is_refused(tiny_repo, tmp_path, capsys, tasks):
    task = tmp_path / "easyvqa.json"
    shutil.copy(tiny_repo.task_file, task)
    argv = ["evaluate", "--model", tiny_repo.model, "--task-file", task] + (["--tasks", tasks] if tasks else [])
    refused(argv, capsys, "is reported under its file name, 'easyvqa', which is also a task you asked for", task)


FIXTURES = Path(os.environ.get("VLMPRUNE_SEED_FIXTURES", ROOT.parent / "shared" / "fixtures" / "seed-families"))
needs_fixtures = pytest.mark.skipif(not (FIXTURES / "bunny" / "model.safetensors").is_file(),
                                    reason=f"seed-family reference fixtures not found at {FIXTURES}")


def _source(tmp_path, edit=None) -> Path:
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "bunny", src)
    for path in [src, *src.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)
    if edit:
        edit(src)
    return src


def _config(**changes):
    def edit(src):
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, **changes}))
    return edit


@needs_fixtures
@pytest.mark.parametrize("edit, message", [
    (lambda s: (s / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    (lambda s: (s / "config.json").write_text("[1, 2]"), "must hold a JSON object of model options, not a list"),
    (_config(torch_dtype="int8"), "torch_dtype = 'int8' is not a floating-point dtype"),
    (_config(vocab_size="100"), "vocab_size = '100' is text where a number belongs"),
    (lambda s: (s / "model.safetensors").write_bytes((s / "model.safetensors").read_bytes()[:100_000]),
     "is truncated or corrupt"),
])
def test_convert_of_a_broken_source_names_the_problem(tmp_path, capsys, edit, message):
    src = _source(tmp_path, edit)
    refused(["convert", "--from", "bunny", src, "--output", tmp_path / "out"], capsys, message, src,
            output=tmp_path / "out")


@needs_fixtures
def test_convert_without_tokenizer_warns_and_commands_name_the_missing_processor(tiny_repo, tmp_path, capsys):
    src = _source(tmp_path)
    assert run(["convert", "--from", "bunny", src, "--output", tmp_path / "out"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "has no tokenizer files, so the converted model will have no processor" in err
    assert "copy the original checkpoint's tokenizer files (tokenizer.json, tokenizer.model or vocab.json" in err
    for argv in (["evaluate", "--model", tmp_path / "out", "--tasks", "", "--task-file", tiny_repo.task_file],
                 ["prune", "--model", tmp_path / "out", "--method", "layer", "--ratio", "0.1", "--calibration",
                  tiny_repo.data, "--image-folder", tiny_repo.images, "--output", tmp_path / "p"]):
        err = refused(argv, capsys, "has no processor", tmp_path / "out", output=tmp_path / "p")
        assert "was converted by `vlmprune convert` from" in err and "tokenizer files" in err


# ------------------------------------------------------------------------------------------ internal errors


def test_quantize_device_and_quantized_inputs(tiny_repo, pair, tmp_path, capsys):
    pytest.importorskip("torchao")
    refused(["quantize", "--model", tiny_repo.model, "--scheme", "int8", "--device", "foo", "--output",
             tmp_path / "q"], capsys, "--device 'foo' is not a device", tiny_repo.model, output=tmp_path / "q")
    assert run(["quantize", "--model", pair["student"], "--scheme", "int8", "--output", tmp_path / "q"]) == 0
    quantized = tmp_path / "q"
    refused(prune_args(quantized, tmp_path / "o"), capsys, "is quantized (torchao", quantized, output=tmp_path / "o")
    err = refused(recover_args({**pair, "student": quantized}, tmp_path / "r"), capsys,
                  "`vlmprune recover` works on full-precision weights only", quantized, output=tmp_path / "r")
    assert "run it on the model before `vlmprune quantize`" in err


class _Payload:
    def __reduce__(self):
        import os

        return os.system, ("echo pwned",)


@pytest.mark.parametrize("name", ["scheduler.pt", "rng_state.pth"])
def test_a_pickled_object_in_a_trainer_checkpoint_is_named(pair, tmp_path, capsys, name):
    import torch

    out = tmp_path / "o"
    assert main(recover_args(pair, out, "--max-steps", "2", "--save-steps", "2", "--keep-checkpoints")) == 0
    shutil.rmtree(out)
    ckpt = tmp_path / "o.checkpoints" / "checkpoint-2"
    torch.save({"x": _Payload()}, ckpt / name)
    err = refused(recover_args(pair, out, "--max-steps", "4", "--save-steps", "2", "--resume"), capsys,
                  f"{ckpt / name} holds something other than training state", ckpt, output=out)
    assert "posix.system" in err and "pwned" not in err


def test_a_torchvision_that_does_not_import_is_named_at_start_up(tiny_repo, tmp_path, capsys, monkeypatch):
    fake = tmp_path / "site" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    for argv in (["inspect", tiny_repo.model], prune_args(tiny_repo.model, tmp_path / "o")):
        err = refused(argv, capsys, "torchvision is installed but does not import beside this torch",
                      tiny_repo.model, output=tmp_path / "o")
        assert "operator torchvision::nms does not exist" in err and "pip uninstall torchvision" in err
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    assert run(["report", tmp_path / "no-run"]) == 2  # commands without transformers are not checked
    assert "does not import beside" not in capsys.readouterr().err
