"""Outputs that could destroy inputs, data loss, leftovers and output-path failures (issue 32, one test per class).

Every refusal is checked for exit code 2, its message, the inputs unchanged (hashed before and after) and
no leftovers (``.NAME.tmp-*``, ``.NAME.lock``, ``.NAME.old-*``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from recover_helpers import write_data, write_pair
from test_reliability import prune_args, recover_args, tree_hash

from vlmprune import paths
from vlmprune.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "study" / "smoke.yaml"


def leftovers(folder: Path) -> list[str]:
    """Hidden temporaries, locks and moved-aside outputs vlmprune could have left in ``folder``."""
    return sorted(p.name for p in Path(folder).iterdir()
                  if p.name.startswith(".") and any(t in p.name for t in (".tmp-", ".lock", ".old-", ".offload-")))


@pytest.fixture
def pair(tmp_path):
    teacher, student = write_pair(tmp_path / "models", drop_layers=(2, 3))
    data, images = write_data(tmp_path / "data", 8)
    return {"teacher": teacher, "student": student, "data": data, "images": images}


@pytest.fixture
def pruned(tiny_repo, tmp_path):
    """A model vlmprune wrote (what a careless output must never replace with something else)."""
    out = tmp_path / "pruned"
    assert main(prune_args(tiny_repo.model, out)) == 0
    return out


def evaluate_args(tiny_repo, *extra):
    return ["evaluate", "--model", str(tiny_repo.model), "--tasks", "", "--task-file", str(tiny_repo.task_file),
            "--limit", "2", "--batch-size", "2", "--max-new-tokens", "2", *extra]


# ------------------------------------------------------------------------------------------ 1. evaluate --output


def test_evaluate_output_never_replaces_an_input_or_a_file_it_did_not_write(tiny_repo, tmp_path, capsys):
    inputs = (tiny_repo.model, tiny_repo.images)
    before = tree_hash(*inputs)
    calibration = tmp_path / "calib.json"
    calibration.write_text(json.dumps([{"id": "keep me"}]))
    for output, message in ((tiny_repo.task_file, "is the task file"),
                            (tiny_repo.model / "results.json", "lies inside the model directory"),
                            (calibration, "exists; choose another file or pass --overwrite")):
        assert main(evaluate_args(tiny_repo, "--output", str(output))) == 2
        assert message in capsys.readouterr().err
    assert main(evaluate_args(tiny_repo, "--output", str(calibration), "--overwrite")) == 2
    assert "is not results vlmprune wrote" in capsys.readouterr().err
    assert main(evaluate_args(tiny_repo, "--output", str(tiny_repo.task_file), "--overwrite")) == 2
    assert "is the task file" in capsys.readouterr().err
    assert tree_hash(*inputs) == before and json.loads(calibration.read_text()) == [{"id": "keep me"}]
    results = tmp_path / "results.json"
    assert main(evaluate_args(tiny_repo, "--output", str(results))) == 0
    assert main(evaluate_args(tiny_repo, "--output", str(results))) == 2  # its own results: --overwrite
    assert main(evaluate_args(tiny_repo, "--output", str(results), "--overwrite")) == 0
    assert json.loads(results.read_text())["tasks"] and leftovers(tmp_path) == []
    assert leftovers(tiny_repo.images) == []


def test_evaluate_output_failing_to_write_leaves_no_temporary(tiny_repo, tmp_path, capsys, monkeypatch):
    real = Path.write_text

    def full(self, text, *args, **kwargs):
        if ".tmp-" in self.name:
            real(self, text[:10], *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    assert main(evaluate_args(tiny_repo, "--output", str(tmp_path / "r.json"))) == 2
    assert "the disk is full" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ 2. kinds of output


def test_an_output_is_replaced_only_by_one_of_its_kind(pruned, tmp_path, capsys):
    """`vlmprune data` over a pruned model (the digits data set once replaced one), with and without --overwrite."""
    from vlmprune.demo.datasets import write_digits

    pytest.importorskip("sklearn")
    before = tree_hash(pruned)
    assert main(["data", "digits", "--output", str(pruned), "--limit", "2"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["data", "digits", "--output", str(pruned), "--limit", "2", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"holds a {paths.MODEL} that vlmprune wrote, and this command writes a {paths.DATA_SET}" in err, err
    assert tree_hash(pruned) == before and leftovers(tmp_path) == []
    data = tmp_path / "digits"
    write_digits(data, limit=2)
    assert paths.written_kind(data) == paths.DATA_SET and paths.written_kind(pruned) == paths.MODEL
    with pytest.raises(paths.VlmpruneError, match="exists and is not empty"):
        write_digits(data, limit=2)  # the writer no longer replaces anything by default
    write_digits(data, limit=3, overwrite=True)  # a data set by a data set, when asked
    assert len(json.loads((data / "test.json").read_text())) == 3
    data_before = tree_hash(data)
    assert main(prune_args(pruned, data, "--overwrite")) == 2  # and a model never replaces a data set
    assert f"holds a {paths.DATA_SET}" in capsys.readouterr().err
    assert tree_hash(data) == data_before and leftovers(tmp_path) == []


def test_demo_build_into_a_folder_of_another_kind_is_refused(tmp_path, monkeypatch):
    from vlmprune.demo import assemble

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.json").write_text("[]")
    paths.write_marker(folder, paths.DATA_SET)
    before = tree_hash(folder)
    monkeypatch.setattr(assemble, "assemble", lambda **kw: pytest.fail("assembled over a data set"))
    with pytest.raises(paths.VlmpruneError, match="exists and is not empty"):
        assemble.build_demo_model(folder)
    assert tree_hash(folder) == before and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------ 3. study outputs


def study_args(tiny_repo, output, *extra):
    return ["study", "--config", str(SMOKE), f"output={output}", f"teacher={tiny_repo.model}",
            f"train_data={tiny_repo.data}", f"image_folder={tiny_repo.images}",
            f"evaluation.task_file={tiny_repo.task_file}", "--no-report", *extra]


def test_study_output_guard(tiny_repo, pruned, tmp_path, capsys, monkeypatch):
    before = tree_hash(tiny_repo.model, tiny_repo.images, pruned)
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(home / "work")
    for output, message in ((tiny_repo.model, "is the teacher"), (tiny_repo.model / "run", "lies inside the teacher"),
                            (tiny_repo.images, "is the image folder"), (home / "work", "is the current directory"),
                            (home, "contains the current directory"),
                            (pruned, f"exists and is not a {paths.STUDY} (it holds a {paths.MODEL} vlmprune wrote")):
        assert main(study_args(tiny_repo, output)) == 2
        err = capsys.readouterr().err
        assert message in err, (output, err)
    held = tmp_path / "run"
    held.mkdir()
    import fcntl

    fd = os.open(paths.sibling(held, "lock"), os.O_RDWR | os.O_CREAT)  # another study holds it
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert main(study_args(tiny_repo, held)) == 2
        assert "another vlmprune run is writing" in capsys.readouterr().err
    finally:
        os.close(fd)
    assert tree_hash(tiny_repo.model, tiny_repo.images, pruned) == before
    assert list(held.iterdir()) == [] and not (home / "work" / "cells").exists()
    (held / "cells").mkdir()  # a study's run directory is reused by a study only
    paths.write_marker(held, paths.STUDY)
    assert main(prune_args(tiny_repo.model, held, "--overwrite")) == 2
    assert f"holds a {paths.STUDY} that vlmprune wrote" in capsys.readouterr().err
    assert sorted(p.name for p in held.iterdir()) == [paths.MARKER, "cells"]


# ------------------------------------------------------------------------------------------ 4. grid values


@pytest.mark.parametrize("override, message", [
    ("grid=[{method: widht, ratio: 0.2}]", "grid names method 'widht'; methods: layer, width, auto"),
    ("grid=[{method: width, criterion: taylr}]", "grid names criterion 'taylr' for method width"),
    ("criterion.layer=nope", "grid names criterion 'nope' for method layer"),
    ("grid=[{method: layer, ratio: abc}]", "grid ratio 'abc'"),
    ("grid=[{method: layer, ratio: 1.5}]", "grid ratio 1.5"),
    ("grid=[{method: width, recipe: sft, fraction: 2}]", "grid fraction 2"),
    ("grid=[{method: layer, recipe: [nope]}]", "grid names recipe 'nope'"),
    ("recipes={'x/../../../victim': null}", "becomes part of folder names"),
    ("recipes={'..': null}", "becomes part of folder names"),
    ("grid=not-a-list", "'grid' must be a list"),
])
def test_grid_values_are_checked_when_the_config_loads(tiny_repo, tmp_path, capsys, override, message):
    argv = study_args(tiny_repo, tmp_path / "run", override)
    if override.startswith("recipes="):
        name = override.split("'")[1]
        argv.append(f"grid=[{{method: layer, ratio: 0.2, recipe: '{name}'}}]")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "internal error" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_study_never_deletes_outside_its_run_directory(tiny_repo, tmp_path, capsys, monkeypatch):
    from vlmprune import study

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.txt").write_text("years of work")
    run = tmp_path / "run"
    config = study.load_study_config(SMOKE, [f"output={run}", f"teacher={tiny_repo.model}",
                                             f"train_data={tiny_repo.data}", f"image_folder={tiny_repo.images}",
                                             f"evaluation.task_file={tiny_repo.task_file}"])
    cell = study.expand_grid(config)[0]
    (run / "cells").mkdir(parents=True)
    (run / "cells" / cell.id).symlink_to(victim)  # a failed cell's folder that points outside
    (run / "original").mkdir()
    (run / "original" / "eval.json").write_text("{}")
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    paths.write_marker(run, paths.STUDY)
    monkeypatch.setattr(study, "_prune_cell", lambda *a: pytest.fail("ran a cell"))
    with pytest.raises(paths.VlmpruneError, match="outside the run directory"):
        study.run_study(config)
    assert (victim / "thesis.txt").read_text() == "years of work"
    with pytest.raises(paths.VlmpruneError, match="outside the run directory"):
        study._remove(run, run / "cells" / ".." / ".." / "victim")
    assert victim.is_dir() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------ 5. kill between renames


def test_an_output_a_killed_replacement_moved_aside_is_restored(tiny_repo, pruned, tmp_path, capsys, caplog):
    before = tree_hash(pruned)
    aside = paths.sibling(pruned, "old-1234abcd")
    pruned.rename(aside)  # what a kill between the two renames of --overwrite leaves
    assert main(prune_args(tiny_repo.model, pruned, "--criterion", "nope")) == 2  # even a run that then fails
    assert "restored" in caplog.text and aside.name in caplog.text
    assert pruned.is_dir() and not aside.exists()
    assert tree_hash(pruned) == before
    pruned.rename(aside)
    assert main(prune_args(tiny_repo.model, pruned)) == 2  # restored, then refused: it exists
    assert "exists and is not empty" in capsys.readouterr().err
    assert tree_hash(pruned) == before and leftovers(tmp_path) == []
    pruned.rename(aside)
    shutil.copytree(aside, paths.sibling(pruned, "old-99999999"))
    assert main(prune_args(tiny_repo.model, pruned, "--overwrite")) == 2  # which one is the user's? ask
    assert "2 earlier versions a killed run moved aside" in capsys.readouterr().err
    assert aside.is_dir() and paths.sibling(pruned, "old-99999999").is_dir() and not pruned.exists()


def test_a_replacement_keeps_the_earlier_output_until_the_new_one_is_in_place(pruned, monkeypatch):
    before = tree_hash(pruned)
    real = Path.rename

    def fail_second(self, target):
        if ".tmp-" in self.name:
            raise OSError(errno.EIO, "I/O error", str(self))
        return real(self, target)

    monkeypatch.setattr(Path, "rename", fail_second)
    with pytest.raises(OSError):
        with paths.atomic_output_dir(pruned, overwrite=True) as tmp:
            (tmp / "config.json").write_text("{}")
    assert tree_hash(pruned) == before and leftovers(pruned.parent) == []


# ------------------------------------------------------------------------------------------ 6. output-path failures


def test_output_path_failures_are_messages(tiny_repo, tmp_path, capsys, monkeypatch):
    before = tree_hash(tiny_repo.model)
    (tmp_path / "file").write_text("x")
    long = "n" * 250
    cases = [(tmp_path / "file" / "x", "is a file, not a folder"),
             (tmp_path / ("d" * 300), "more than the 255 a file name may have"),
             (tmp_path / "/".join(["p" * 200] * 22), "more than the 4,096 a path may have")]
    for output, message in cases:
        assert main(prune_args(tiny_repo.model, output)) == 2
        err = capsys.readouterr().err
        assert message in err and "internal error" not in err, err
    assert (tmp_path / "file").read_text() == "x"
    assert main(prune_args(tiny_repo.model, tmp_path / long)) == 0  # legal: its lock and temporaries are shortened
    assert (tmp_path / long / "config.json").is_file() and leftovers(tmp_path) == []
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path else real_access(p, mode))
    assert main(prune_args(tiny_repo.model, tmp_path / "o")) == 2
    assert "cannot be written (permission denied, or it is immutable" in capsys.readouterr().err
    monkeypatch.setattr(os, "statvfs", lambda p: type("S", (), {"f_flag": os.ST_RDONLY})())
    assert main(prune_args(tiny_repo.model, tmp_path / "o")) == 2
    assert "is on a read-only file system" in capsys.readouterr().err
    monkeypatch.setattr(os, "access", real_access)
    real_open = os.open

    def read_only(path, *args, **kwargs):  # the file system turns read-only after the checks
        if str(path).startswith(str(tmp_path)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert main(prune_args(tiny_repo.model, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "read-only file system; choose an --output on a writable disk" in err and "internal error" not in err
    monkeypatch.setattr(os, "open", real_open)
    assert tree_hash(tiny_repo.model) == before and not (tmp_path / "o").exists() and leftovers(tmp_path) == []


def _disk_full(monkeypatch):
    """safetensors writes part of the weights, then the disk is full (as its Rust writer reports it)."""
    import transformers.modeling_utils as modeling_utils
    from safetensors import SafetensorError

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(modeling_utils, "safe_save_file", save_file)


@pytest.mark.parametrize("command", ["prune", "quantize", "recover"])
def test_disk_full_while_saving_cleans_up_and_says_so(tiny_repo, pair, tmp_path, capsys, monkeypatch, command):
    if command == "quantize":
        pytest.importorskip("torchao")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    argv = {"prune": prune_args(tiny_repo.model, out),
            "quantize": ["quantize", "--model", str(tiny_repo.model), "--scheme", "int8", "--output", str(out)],
            "recover": recover_args(pair, out)}[command]
    inputs = (tiny_repo.model, pair["student"], pair["data"].parent)
    before = tree_hash(*inputs)
    _disk_full(monkeypatch)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "internal error" not in err, err
    assert tree_hash(*inputs) == before and not out.exists() and leftovers(work) == []


# ------------------------------------------------------------------------------------------ 7. SIGTERM


_SLOW_SAVE = """
import sys, time
from pathlib import Path
import transformers.modeling_utils as m
real = m.safe_save_file
def slow(tensors, filename, metadata=None):
    real(tensors, filename, metadata=metadata)
    Path(sys.argv[1]).write_text("saving")
    time.sleep(60)
m.safe_save_file = slow
from vlmprune.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_during_a_save_is_an_interrupt(tiny_repo, tmp_path):
    out, flag = tmp_path / "out", tmp_path / "saving.flag"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                                                 os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_SAVE, str(flag), *prune_args(tiny_repo.model, out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not flag.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert flag.exists(), proc.communicate()
    assert leftovers(tmp_path)  # mid-save: the temporary and the lock are there
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "terminated: nothing was written to the output" in err
    assert not out.exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------ 8. 9. modes, --plan DIR


def test_outputs_have_the_usual_mode_and_a_plan_folder_is_read(tiny_repo, pruned, tmp_path, capsys):
    umask = os.umask(0)
    os.umask(umask)
    assert (pruned.stat().st_mode & 0o777) == 0o777 & ~umask
    out = tmp_path / "again"
    assert main(["prune", "--model", str(tiny_repo.model), "--plan", str(pruned), "--output", str(out)]) == 0
    assert json.loads((out / "pruning_plan.json").read_text())["layers"] == \
        json.loads((pruned / "pruning_plan.json").read_text())["layers"]
    assert main([*prune_args(tiny_repo.model, tmp_path / "o2"), "--scores", str(pruned)]) == 2
    assert f"is a folder; give its scores.json: --scores {pruned / 'scores.json'}" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["prune", "--model", str(tiny_repo.model), "--plan", str(empty), "--output", str(tmp_path / "o3")]) == 2
    assert "is a folder without pruning_plan.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ 10. reruns and resumes


def test_a_study_rerun_with_another_setup_is_refused(tiny_repo, pair, tmp_path, capsys):
    from vlmprune import study

    run = tmp_path / "run"
    config = study.load_study_config(SMOKE, [f"output={run}", f"teacher={tiny_repo.model}",
                                             f"train_data={tiny_repo.data}", f"image_folder={tiny_repo.images}",
                                             f"evaluation.task_file={tiny_repo.task_file}"])
    run.mkdir()
    (run / "cells").mkdir()
    (run / "resolved_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    paths.write_marker(run, paths.STUDY)
    before = tree_hash(run)
    for change, message in ((f"teacher={pair['teacher']}", f"teacher: '{tiny_repo.model}' -> '{pair['teacher']}'"),
                            ("seed=3", "seed: 0 -> 3"), ("evaluation.limit=2", "evaluation.limit: 8 -> 2"),
                            ("recipes.sft.train=all", "recipes.sft:"),
                            ("criterion.width=taylor", "criterion.width: 'magnitude' -> 'taylor'")):
        assert main(study_args(tiny_repo, run, change)) == 2
        err = capsys.readouterr().err
        assert "holds a study run with another setup" in err and message in err, (change, err)
    assert tree_hash(run) == before and leftovers(tmp_path) == []
    # what may change: the name, keep_models, more cells, new recipes (checked without running anything)
    study.check_rerun(run, {**config, "name": "other", "keep_models": True,
                            "recipes": {**config["recipes"], "new": None},
                            "grid": [*config["grid"], {"method": "layer", "ratio": 0.3}]})
    study.check_rerun(run, {**config, "teacher": str(Path(os.path.relpath(tiny_repo.model)))})  # same path


def test_resume_with_other_options_is_refused(pair, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(recover_args(pair, out, "--max-steps", "2", "--save-steps", "2", "--keep-checkpoints")) == 0
    shutil.rmtree(out)
    ckpts = tmp_path / "o.checkpoints"
    before = tree_hash(ckpts, pair["data"].parent)
    other_data, _ = write_data(tmp_path / "other", 6)
    for extra, message in ((["--learning-rate", "0.5"], "learning_rate: 2e-05 -> 0.5"),
                           (["--seed", "3"], "seed: 0 -> 3"), (["--loss", "sft=2"], "loss:")):
        assert main(recover_args(pair, out, "--max-steps", "4", "--resume", *extra)) == 2
        err = capsys.readouterr().err
        assert "--resume would continue" in err and message in err, (extra, err)
    assert main(recover_args({**pair, "data": other_data}, out, "--max-steps", "4", "--resume")) == 2
    assert "data:" in capsys.readouterr().err
    assert tree_hash(ckpts, pair["data"].parent) == before and not out.exists()
    assert main(recover_args(pair, out, "--max-steps", "4", "--save-steps", "2", "--logging-steps", "3",
                             "--resume")) == 0  # longer, logged otherwise: what may change
    assert json.loads((out / "run.json").read_text())["recovery"][-1]["steps"] == 4


# ------------------------------------------------------------------------------------------ 11. limits


def test_samples_longer_than_the_model_are_announced_with_the_estimate(tiny_repo, tmp_path, caplog):
    records = json.loads(tiny_repo.data.read_text())
    long = {**records[0], "id": "long-one"}
    long["conversations"] = [{"from": "human", "value": "<image>\n" + "word " * 3000},
                             {"from": "gpt", "value": "yes"}]
    data = tmp_path / "calib.json"
    data.write_text(json.dumps([long, *records[1:4]]))
    argv = ["prune", "--model", str(tiny_repo.model), "--method", "layer", "--ratio", "0.2", "--calibration",
            str(data), "--image-folder", str(tiny_repo.images), "--num-samples", "4", "--output"]
    assert main([*argv, str(tmp_path / "o")]) == 0
    assert "1 of the 4 calibration samples are longer than the model's 512 positions" in caplog.text
    assert "'long-one', has about" in caplog.text and "Pass --max-length 512" in caplog.text, caplog.text
    caplog.clear()
    assert main([*argv, str(tmp_path / "o2"), "--max-length", "512"]) == 0
    assert "longer than the model's" not in caplog.text


def test_a_grid_larger_than_the_limit_is_refused_with_the_estimate(tiny_repo, tmp_path, capsys):
    grid = "grid=[{method: [layer, width], ratio: [0.1, 0.2, 0.3], recipe: [none, sft]}]"
    assert main(study_args(tiny_repo, tmp_path / "run", grid, "max_cells=5")) == 2
    err = capsys.readouterr().err
    assert "the grid has 12 cells, more than max_cells=5: 6 pruned models" in err and "GB of pruned weights" in err
    assert "set max_cells=12" in err and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ 12. docs


def test_readme_says_lmms_include_runs_the_folders_code():
    readme = (ROOT / "README.md").read_text()
    assert "`evaluate --lmms-include DIR` runs DIR's Python" in readme
    assert "runs code from DIR" in (ROOT / "docs" / "evaluate.md").read_text()


# ------------------------------------------------------------------------------------------ fuzz


def test_fuzz_study_grids_end_in_messages_when_the_config_loads(tiny_repo, tmp_path):
    """Seeded random grid blocks and recipe names: refused with a message when the config loads (never another
    exception), and every grid that loads has cell ids that are safe folder names."""
    import random

    from vlmprune import study

    rng = random.Random(0)
    values = {"method": ["layer", "width", "auto", "widht", "", None, 3, ["layer", "x/.."]],
              "criterion": ["taylor", "magnitude", "taylr", None, 1.5, "../x"],
              "ratio": [0.2, 0, 1, -0.1, "abc", None, True, [0.1, "0.2"], 1e309],
              "fraction": [0.5, 0, 2, "half", None, False], "recipe": ["none", "sft", "nope", "../up", 7, None],
              "quantization": ["int8", "int9", None, 0], "compensate": ["none", "ls", "bogus", 1],
              "target": ["params=0.7", "params=", "latency=5ms", 3, "memory=1/0"], "bogus_axis": [1]}
    base = [f"output={tmp_path / 'run'}", f"teacher={tiny_repo.model}", f"train_data={tiny_repo.data}",
            f"image_folder={tiny_repo.images}", f"evaluation.task_file={tiny_repo.task_file}"]
    loaded = refused = 0
    for _ in range(60):
        block = {axis: rng.choice(choices) for axis, choices in values.items() if rng.random() < 0.45}
        recipes = rng.choice([[], ["recipes={'a/b': null}"], ["recipes={'..': null}"], ["recipes={'ok-1': null}"]])
        try:
            config = study.load_study_config(SMOKE, [*base, f"grid={json.dumps([block])}", *recipes])
        except paths.VlmpruneError as exc:
            assert str(exc), block
            refused += 1
            continue
        loaded += 1
        assert all(study.SAFE_ID.match(c.id) and ".." not in c.id for c in study.expand_grid(config)), block
    assert refused > 30 and loaded > 0 and not (tmp_path / "run").exists()
