"""Never lose a user's files, never save a broken model, never end in a traceback (issue 21, one test per case)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from recover_helpers import write_data, write_pair

from vlmprune.cli import main

ROOT = Path(__file__).resolve().parents[1]


def tree_hash(*folders) -> str:
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            digest.update(str(path).encode())
            if path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def prune_args(model, output, *extra):
    return ["prune", "--model", str(model), "--method", "width", "--criterion", "magnitude", "--ratio", "0.1",
            "--output", str(output), *extra]


@pytest.fixture
def pair(tmp_path):
    teacher, student = write_pair(tmp_path / "models", drop_layers=(2, 3))
    data, images = write_data(tmp_path / "data", 8)
    return {"teacher": teacher, "student": student, "data": data, "images": images}


def recover_args(pair, output, *extra):
    return ["recover", "--student", str(pair["student"]), "--data", str(pair["data"]), "--image-folder",
            str(pair["images"]), "--output", str(output), "--loss", "sft=1", "--train", "projector", "--max-steps", "2",
            *extra]


# ------------------------------------------------------------------------------------------ data loss


def test_1_output_dot_with_overwrite_deletes_nothing(tiny_repo, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.txt").write_text("years of work")
    before = tree_hash(work, tiny_repo.model)
    monkeypatch.chdir(work)
    assert main(prune_args(tiny_repo.model, ".", "--overwrite")) == 2
    assert "is the current directory" in capsys.readouterr().err
    assert tree_hash(work, tiny_repo.model) == before


def test_2_output_containing_the_input_model_is_refused(tiny_repo, tmp_path, capsys):
    model = tmp_path / "models" / "m"
    shutil.copytree(tiny_repo.model, model)
    (tmp_path / "models" / "notes.txt").write_text("keep me")
    before = tree_hash(tmp_path / "models")
    assert main(prune_args(model, tmp_path / "models", "--overwrite")) == 2
    assert "contains the input model" in capsys.readouterr().err
    assert tree_hash(tmp_path / "models") == before


def test_3_concurrent_runs_on_one_output_cannot_both_win(tiny_repo, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "vlmprune.cli", *prune_args(tiny_repo.model, out)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "another vlmprune run is writing" in loser or "exists and is not empty" in loser
    assert json.loads((out / "run.json").read_text())["prune"]["criterion"] == "magnitude"


def test_4_output_inside_the_model_and_user_folders_are_not_copied(tiny_repo, tmp_path, capsys):
    model = tmp_path / "m"
    shutil.copytree(tiny_repo.model, model)
    (model / "notes").mkdir()
    (model / "notes" / "n.txt").write_text("mine")
    before = tree_hash(model)
    assert main(prune_args(model, model / "sub" / "pruned")) == 2
    assert "lies inside the input model" in capsys.readouterr().err
    assert tree_hash(model) == before and not (model / "sub").exists()
    assert main(prune_args(model, tmp_path / "out")) == 0
    assert not (tmp_path / "out" / "notes").exists() and (tmp_path / "out" / "tokenizer_config.json").exists()


# ------------------------------------------------------------------------------------------ wrong results


def test_5_non_finite_losses_stop_training_and_nothing_is_saved(pair, tmp_path, capsys):
    assert main(recover_args(pair, tmp_path / "o", "--loss", "sft=inf")) == 2
    assert "finite numbers" in capsys.readouterr().err
    assert main(recover_args(pair, tmp_path / "o", "--learning-rate", "1e38", "--max-steps", "4",
                             "--train", "all")) == 2
    err = capsys.readouterr().err
    assert "not finite" in err or "NaN or inf" in err, err
    assert not (tmp_path / "o").exists()


def test_6_resuming_from_the_final_checkpoint_adds_no_step(pair, tmp_path):
    out = tmp_path / "o"
    assert main(recover_args(pair, out, "--max-steps", "4", "--save-steps", "2", "--keep-checkpoints")) == 0
    shutil.rmtree(out)  # what a kill during the final write leaves: every checkpoint, no output
    assert main(recover_args(pair, out, "--max-steps", "4", "--save-steps", "2", "--resume")) == 0
    assert json.loads((out / "run.json").read_text())["recovery"][-1]["steps"] == 4


def test_7_resume_skips_a_half_written_checkpoint(pair, tmp_path, caplog):
    out = tmp_path / "o"
    assert main(recover_args(pair, out, "--max-steps", "2", "--save-steps", "2", "--keep-checkpoints")) == 0
    shutil.rmtree(out)
    ckpts = tmp_path / "o.checkpoints"
    half = ckpts / "checkpoint-3"
    shutil.copytree(ckpts / "checkpoint-2", half)
    weights = next(half.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(recover_args(pair, out, "--max-steps", "4", "--save-steps", "2", "--resume")) == 0
    assert "skipping incomplete checkpoint" in caplog.text and "checkpoint-3" in caplog.text
    assert json.loads((out / "run.json").read_text())["recovery"][-1]["steps"] == 4


def test_8_a_teacher_that_is_not_the_pruned_model_is_refused(pair, tmp_path, capsys):
    shallow, _ = write_pair(tmp_path / "shallow", drop_layers=(0,), num_layers=3)
    argv = recover_args(pair, tmp_path / "o", "--teacher", str(shallow), "--loss", "sft=1,hidden=1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not the model this student was pruned from" in err or "drops layer(s) [3]" in err, err
    other, _ = write_pair(tmp_path / "other", drop_layers=(0,), seed=1)  # same shapes, other weights: same arch
    assert main(recover_args(pair, tmp_path / "o2", "--teacher", str(other), "--loss", "sft=1,hidden=1")) in (0, 2)


def test_9_stale_temporaries_of_killed_runs_are_removed(tiny_repo, tmp_path):
    stale = tmp_path / ".out.tmp-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert main(prune_args(tiny_repo.model, tmp_path / "out")) == 0
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------------------ messages


def _records(images_rel="images/0.png"):
    return [{"id": "a", "image": images_rel, "conversations": [{"from": "human", "value": "<image>\nq?"},
                                                                {"from": "gpt", "value": "yes"}]}]


@pytest.mark.parametrize("content, extra, message", [
    (json.dumps([{"id": "a"}]), [], "has no conversations"),
    (json.dumps([{"conversations": [{"from": "human", "value": "q"}]}]), [], "has no answer"),
    (json.dumps({"a": 1}), [], "must hold a JSON list"),
    (b"\xff\xfe\x00bad", [], "not UTF-8"),
    (json.dumps(_records("nope.png")), [], "image file not found"),
    (json.dumps(_records("corrupt.png")), [], "cannot open image"),
    (None, [], "file not found"),
    (json.dumps(_records("corrupt.png")), ["--limit", "-1"], "--limit must be"),
    (json.dumps(_records()), ["--batch-size", "0"], "--batch-size must be"),
    (json.dumps(_records()), ["--output", "DIR"], "is a directory"),
])
def test_10_evaluate_task_file_errors(tiny_repo, tmp_path, capsys, content, extra, message):
    task = tmp_path / "task.json"
    shutil.copytree(tiny_repo.images, tmp_path / "images")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    if content is not None:
        task.write_bytes(content if isinstance(content, bytes) else content.encode())
    extra = [str(tmp_path) if e == "DIR" else e for e in extra]
    code = main(["evaluate", "--model", str(tiny_repo.model), "--tasks", "", "--task-file", str(task), *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def _broken(kind, tiny_repo, tmp_path) -> Path:
    model = tmp_path / kind
    shutil.copytree(tiny_repo.model, model)
    weights = model / "model.safetensors"
    if kind == "no_config":
        (model / "config.json").unlink()
    elif kind == "unknown_type":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "model_type": "not_a_model"}))
    elif kind == "half_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "header_only":
        data = weights.read_bytes()
        weights.write_bytes(data[: 8 + int.from_bytes(data[:8], "little")])
    elif kind == "no_weights":
        weights.unlink()
    elif kind == "missing":
        shutil.rmtree(model)
        return tmp_path / "does" / "not" / "exist"
    return model


@pytest.mark.parametrize("kind, message", [
    ("no_config", "has no config.json"), ("unknown_type", "not_a_model"), ("half_weights", "truncated"),
    ("header_only", "truncated"), ("no_weights", "no *.safetensors weights"), ("missing", "directory not found"),
])
@pytest.mark.parametrize("command", ["prune", "inspect"])
def test_11_broken_model_folders(tiny_repo, tmp_path, capsys, kind, message, command):
    model = _broken(kind, tiny_repo, tmp_path)
    argv = prune_args(model, tmp_path / "out") if command == "prune" else ["inspect", str(model)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    (["--learning-rate", "-1"], "--learning-rate must be"), (["--per-device-train-batch-size", "0"], "must be"),
    (["--lora-r", "0"], "--lora-r must be"), (["--lr-scheduler-type", "foo"], "--lr-scheduler-type must be"),
    (["--report-to", "foo"], "--report-to must be"), (["--gradient-accumulation-steps", "0"], "must be"),
])
def test_12_recover_values_are_checked_before_work(pair, tmp_path, capsys, extra, message):
    assert main(recover_args(pair, tmp_path / "o", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.checkpoints").exists()


@pytest.mark.parametrize("extra, message", [
    (["--device", "foo"], "is not a device"), (["--device", "cuda"], "has no cuda device"),
    (["--dtype", "foo"], "invalid choice"),
])
def test_12_prune_values_are_checked(tiny_repo, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) if message == "invalid choice" else _nothing():
        assert main(prune_args(tiny_repo.model, tmp_path / "o", *extra)) == 2
    assert message in capsys.readouterr().err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_12_output_that_is_a_file_and_teacher_vocabulary(pair, tiny_repo, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(prune_args(tiny_repo.model, tmp_path / "file")) == 2
    assert "is an existing file" in capsys.readouterr().err
    import vlmprune

    wide = vlmprune.load(pair["teacher"])
    wide.resize_token_embeddings(wide.get_output_embeddings().weight.shape[0] + 8)
    bigger = vlmprune.save_model(wide, tmp_path / "bigger", source=pair["teacher"])
    assert main(recover_args(pair, tmp_path / "o", "--teacher", str(bigger), "--loss", "sft=1,logits=1")) == 2
    assert "vocab" in capsys.readouterr().err


def test_13_study_unknown_keys_bad_task_file_and_failed_cells(tiny_repo, tmp_path, capsys):
    smoke = ROOT / "configs" / "study" / "smoke.yaml"
    base = ["study", "--config", str(smoke), f"output={tmp_path / 'run'}", f"teacher={tiny_repo.model}",
            f"train_data={tiny_repo.data}", f"image_folder={tiny_repo.images}"]
    for bad, message in (("evaluation.limt=3", "evaluation.limt"),
                         ("calibration.num_sample=3", "calibration.num_sample"),
                         ("recipes.sft.learning_rat=1", "recipes.sft.learning_rat"),
                         ("recovery.learning_rate=-1", "--learning-rate must be")):
        assert main([*base, bad]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "t.json").write_text("{not json")
    assert main([*base, f"evaluation.task_file={tmp_path / 't.json'}"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_14_unclear_cases_have_clear_answers(tiny_repo, pair, tmp_path, capsys):
    from vlmprune.cli import _join_dash_values, build_parser

    args, _ = build_parser().parse_known_args(_join_dash_values(prune_args(tiny_repo.model, "o", "--layers", "-2:")))
    assert args.layers == "-2:"
    assert main(recover_args({**pair, "student": tmp_path / "missing"}, tmp_path / "o")) == 2
    assert "student directory not found" in capsys.readouterr().err
    assert main(prune_args(tiny_repo.model, tmp_path / "o", "--mlp-multiple", "0")) == 2
    assert "--mlp-multiple must be an integer >= 1" in capsys.readouterr().err
    layer = ["prune", "--model", str(tiny_repo.model), "--method", "layer", "--ratio", "0.2", "--output",
             str(tmp_path / "o")]
    for extra in (["--layers", "1:3"], ["--global"], ["--attention", "heads"], ["--mlp-multiple", "8"]):
        assert main(layer + extra) == 2
        assert "applies to --method width only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(recover_args(pair, tmp_path / "o", "--loss", "sft=1,sft=2")) == 2
    assert "names 'sft' twice" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ fuzz


def _malformed(rng: random.Random):
    good = {"id": "x", "image": "0.png", "conversations": [{"from": "human", "value": "<image>\nq"},
                                                          {"from": "gpt", "value": "a"}]}
    mutations = [
        lambda r: [], lambda r: {"not": "a list"}, lambda r: [1, 2], lambda r: [None], lambda r: "text",
        lambda r: [{**good, "conversations": []}], lambda r: [{**good, "conversations": "hello"}],
        lambda r: [{**good, "conversations": [{"from": "alien", "value": "x"}]}],
        lambda r: [{**good, "conversations": [{"from": "human"}]}],
        lambda r: [{**good, "image": 42}], lambda r: [{**good, "image": ["a.png", 3]}],
        lambda r: [{**good, "image": "missing.png"}],
        lambda r: [{**good, "conversations": [{"from": "gpt", "value": "a"}]}],
        lambda r: [{**good, "conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "a"}]}],
        lambda r: [{**good, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}],
    ]
    return rng.choice(mutations)(rng)


def test_fuzz_malformed_records_never_reach_the_user_as_tracebacks(tiny_repo, pair, tmp_path, capsys):
    rng = random.Random(0)
    shutil.copy(tiny_repo.images / "0.png", tmp_path / "0.png") if (tiny_repo.images / "0.png").exists() else None
    for i in range(50):
        data = tmp_path / f"bad{i}.json"
        text = json.dumps(_malformed(rng))
        if rng.random() < 0.15:
            text = text[: rng.randrange(len(text))]  # cut short: not JSON at all
        data.write_text(text)
        command = ("evaluate", "prune", "recover")[i % 3]
        if command == "evaluate":
            argv = ["evaluate", "--model", str(tiny_repo.model), "--tasks", "", "--task-file", str(data)]
        elif command == "prune":
            argv = ["prune", "--model", str(tiny_repo.model), "--method", "layer", "--ratio", "0.2", "--calibration",
                    str(data), "--image-folder", str(tmp_path), "--output", str(tmp_path / f"o{i}")]
        else:
            argv = recover_args({**pair, "data": data, "images": tmp_path}, tmp_path / f"o{i}")
        code = main(argv)
        out = capsys.readouterr()
        assert code == 2, (command, text, out.err[-2000:])
        assert "Traceback" not in out.err + out.out and "internal error" not in out.err
        assert not (tmp_path / f"o{i}").exists()
