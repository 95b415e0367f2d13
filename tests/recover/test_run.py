"""Recovery training end to end on tiny models: what trains, layer mapping, subsets, resume, 2 processes, bad input."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from recover_helpers import build_tiny_deep, write_data, write_pair
from safetensors.torch import load_file
from tiny_data import tiny_llava_processor

import vlmprune
from vlmprune.adapters import get_adapter
from vlmprune.cli import main
from vlmprune.config import RecoverConfig, load_stage_config, options_of
from vlmprune.data import Collator, read_samples, select
from vlmprune.planning.plan import PruningPlan
from vlmprune.recover import recover
from vlmprune.recover.run import hidden_pairs, training_arguments
from vlmprune.recover.trainer import RecoveryTrainer, layer_outputs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("recover")
    teacher, student = write_pair(root)  # 4 layers; the student drops 1 and 3
    data, images = write_data(root / "data", 12)
    return {"teacher": teacher, "student": student, "data": data, "images": images, "root": root}


def argv(dirs, out, *extra):
    return ["recover", "--student", str(dirs["student"]), "--teacher", str(dirs["teacher"]), "--data",
            str(dirs["data"]), "--image-folder", str(dirs["images"]), "--output", str(out), "--logging-steps", "1",
            *extra]


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


# --------------------------------------------------------------------------- hidden states and losses


@pytest.fixture(scope="module")
def samples(dirs):
    return read_samples(dirs["data"], dirs["images"])[:4]


def test_hooked_outputs_are_each_layers_own_output_not_the_final_norm(samples):
    model = build_tiny_deep(3)
    batch = Collator(tiny_llava_processor())(samples)
    batch.pop("labels")
    layers = get_adapter(model).layers(model)
    with torch.no_grad(), layer_outputs(list(layers)) as hooked:
        out = model(**batch, output_hidden_states=True)
    hs = out.hidden_states  # embeddings, layers 0..L-2, then the last layer AFTER the final norm
    for j in range(len(layers) - 1):
        assert torch.equal(hooked[j], hs[j + 1])
    assert not torch.allclose(hooked[-1], hs[-1])
    assert torch.allclose(model.model.language_model.norm(hooked[-1]), hs[-1])


def test_student_layer_j_is_compared_with_teacher_layer_kept_j(tmp_path):
    teacher_dir, student_dir = write_pair(tmp_path, drop_layers=(1, 3), num_layers=6)
    teacher, student = vlmprune.load(teacher_dir), vlmprune.load(student_dir)
    s_layers, t_layers, pairs = hidden_pairs(student, teacher, PruningPlan.load(student_dir), "all")
    assert pairs == [(0, 0), (1, 2), (2, 4), (3, 5)]
    for s, t in zip(s_layers, t_layers):  # the student's layers are copies of the teacher's kept ones
        for (name, a), (_, b) in zip(s.named_parameters(), t.named_parameters()):
            assert torch.equal(a, b), name
    assert t_layers[1] is get_adapter(teacher).layers(teacher)[2]


def trainer_for(student, teacher, tmp_path, weights, **kwargs):
    collator = Collator(tiny_llava_processor())
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    pairs = hidden_pairs(student, teacher, None, "all") if "hidden" in weights else ([], [], [])
    return RecoveryTrainer(model=student, args=args, data_collator=collator, teacher=teacher, weights=weights,
                           image_token_id=collator.image_token_id, student_layers=pairs[0],
                           teacher_layers=pairs[1], **kwargs), collator


@pytest.mark.parametrize("kd_tokens, hidden_tokens", [("answer", "all"), ("text", "answer")])
def test_distillation_is_exactly_zero_against_itself(tmp_path, samples, kd_tokens, hidden_tokens):
    model = vlmprune.load(write_pair(tmp_path, drop_layers=())[0])
    trainer, collator = trainer_for(model, copy.deepcopy(model), tmp_path, {"sft": 1.0, "logits": 1.0, "hidden": 1.0},
                                    kd_tokens=kd_tokens, hidden_tokens=hidden_tokens)
    model.train()
    loss = trainer.compute_loss(model, collator(samples))
    assert trainer._sums["logits"].item() == 0.0 and trainer._sums["hidden"].item() == 0.0
    assert loss.item() == pytest.approx(trainer._sums["sft"].item()) and loss.item() > 0


# --------------------------------------------------------------------------- what trains


@pytest.mark.parametrize("mode", ["projector", "lm", "lora", "all", "lm+checkpointing"])
def test_train_modes_change_only_their_parameters(dirs, tmp_path, mode, caplog):
    extra = ["--gradient-checkpointing", "--loss", "hidden=1"] if mode.endswith("checkpointing") else []
    out = tmp_path / "out"
    assert main(argv(dirs, out, "--train", mode.split("+")[0], "--max-steps", "2", "--learning-rate", "1e-2",
                     *extra)) == 0
    assert re.search(r"training '\w+': [\d,]+ of [\d,]+ parameters", caplog.text), caplog.text
    before, after = weights(dirs["student"]), weights(out)
    assert before.keys() == after.keys()  # no LoRA (or any other) extra weights
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not any(k.startswith("vision_tower.") for k in changed)
    projector = {k for k in before if k.startswith("multi_modal_projector.")}
    if mode == "projector":
        assert changed == projector
    elif mode == "lora":
        assert projector <= changed and all(k.endswith("proj.weight") for k in changed - projector)
    elif mode.startswith("lm"):
        assert not changed & projector and all(k.startswith("language_model.") for k in changed)
    else:
        assert projector <= changed and any(k.startswith("language_model.") for k in changed)
    model = transformers.AutoModelForImageTextToText.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_modules())
    plan = json.loads((out / "pruning_plan.json").read_text())
    recovery = json.loads((out / "run.json").read_text())["recovery"]
    assert plan["drop_layers"] == [1, 3] and recovery[-1]["train"] == mode.split("+")[0]
    assert recovery[-1]["steps"] == 2
    for name in ("sample_ids.json", "resolved_config.yaml", "trainer_log.json", "loss_curve.png",
                 "tokenizer_config.json"):
        assert (out / name).exists(), name
    assert not (tmp_path / "out.checkpoints").exists()


# --------------------------------------------------------------------------- data subset


def test_subset_is_seeded_stratified_and_written(dirs):
    samples = read_samples(dirs["data"], dirs["images"])
    a = [s.id for s in select(samples, fraction=0.5, seed=3)]
    assert a == [s.id for s in select(samples, fraction=0.5, seed=3)]
    assert a != [s.id for s in select(samples, fraction=0.5, seed=4)]
    chosen = [s for s in samples if s.id in a]
    by_source = {src: sum(s.source == src for s in chosen) for src in ("coco", "vg", "ocr")}
    assert all(n >= 1 for n in by_source.values()), by_source


def test_two_process_accelerate_run_picks_the_same_samples(dirs, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/ddp.yaml"), "-m", "vlmprune.cli",
           *argv(dirs, out, "--max-steps", "2", "--fraction", "0.5", "--seed", "3", "--train", "lora")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ids = json.loads((out / "sample_ids.json").read_text())
    assert ids["processes_checked"] == 2  # every process chose the same ids (checked across processes)
    samples = read_samples(dirs["data"], dirs["images"])
    assert ids["ids"] == [s.id for s in select(samples, fraction=0.5, seed=3)]
    assert json.loads((out / "run.json").read_text())["recovery"][-1]["steps"] == 2
    transformers.AutoModelForImageTextToText.from_pretrained(out)


# --------------------------------------------------------------------------- resume


class StopAt(transformers.TrainerCallback):
    """Stands in for a kill: raise once the run has finished ``step`` optimizer steps."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_resume_continues_the_loss_curve_and_ends_at_the_same_step(dirs, tmp_path):
    common = ["--max-steps", "6", "--save-steps", "2", "--train", "all", "--loss", "sft=1,logits=1,hidden=1"]
    assert main(argv(dirs, tmp_path / "full", *common)) == 0
    full = [(e["step"], e["loss"]) for e in json.loads((tmp_path / "full/trainer_log.json").read_text()) if "loss" in e]

    out = tmp_path / "killed"
    cfg = load_stage_config(RecoverConfig, values=_parse(argv(dirs, out, *common)))
    with pytest.raises(KeyboardInterrupt):
        recover(cfg, callbacks=[StopAt(3)])
    assert not out.exists()  # nothing half-written
    assert sorted(p.name for p in (tmp_path / "killed.checkpoints").iterdir()) == ["checkpoint-2"]
    assert list((tmp_path / "killed.checkpoints/checkpoint-2").glob("*.safetensors"))
    assert main(argv(dirs, out)) == 2  # earlier checkpoints are in the way without --resume

    assert main(argv(dirs, out, *common, "--resume")) == 0
    resumed = [(e["step"], e["loss"]) for e in json.loads((out / "trainer_log.json").read_text()) if "loss" in e]
    assert [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in full], rel=1e-4)
    assert json.loads((out / "run.json").read_text())["recovery"][-1]["steps"] == 6


def _parse(args):
    from vlmprune.cli import build_parser

    ns, _ = build_parser().parse_known_args(args)
    return {o.key: getattr(ns, o.key) for o in options_of(RecoverConfig) if hasattr(ns, o.key)}


def test_yaml_config_with_flags_on_top(dirs, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"student: {dirs['student']}\ndata: {dirs['data']}\noutput: {tmp_path}/o\nloss: sft=1\n"
                    "learning_rate: 0.1\ntemperature: 3\n")
    cfg = load_stage_config(RecoverConfig, path, {"learning_rate": 0.5, "train": "lora"})
    assert (cfg.training.learning_rate, cfg.objective.temperature, cfg.trainable.train,
            cfg.objective.loss) == (0.5, 3, "lora", {"sft": 1.0})
    assert training_arguments(cfg).learning_rate == 0.5


# --------------------------------------------------------------------------- bad input


def test_teacher_with_another_tokenizer_is_refused(dirs, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(dirs["teacher"], other)
    processor = tiny_llava_processor()
    processor.tokenizer.add_tokens(["<extra>"])
    processor.save_pretrained(other)
    assert main(argv(dirs, tmp_path / "o", "--teacher", str(other))) == 2
    err = capsys.readouterr().err
    assert "different tokenizers" in err and str(other) in err and str(dirs["student"]) in err


@pytest.mark.parametrize("extra, match", [
    (["--fraction", "0"], "fraction must be in \\(0, 1\\]"),
    (["--fraction", "1.5"], "fraction must be in \\(0, 1\\]"),
    (["--fraction", "0.01"], "selects no samples"),
    (["--fraction", "0.5", "--num-samples", "3"], "either --fraction or --num-samples"),
    (["--loss", "sft=1,kd=1"], "unknown loss"),
    (["--train", "vision"], None),
])
def test_bad_options_are_refused(dirs, tmp_path, capsys, extra, match):
    args = argv(dirs, tmp_path / "o")
    if match is None:
        with pytest.raises(SystemExit):  # argparse's own choices error
            main(args + extra)
        return
    assert main(args + extra) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_depth_pruned_student_without_plan_refuses_hidden_loss(dirs, tmp_path, capsys):
    student = tmp_path / "student"
    shutil.copytree(dirs["student"], student)
    (student / "pruning_plan.json").unlink()
    args = argv(dirs, tmp_path / "o", "--hidden-layers", "all", "--max-steps", "1")
    args[args.index("--student") + 1] = str(student)
    assert main(args) == 2
    assert "no pruning_plan.json" in capsys.readouterr().err
    assert main(args[:-4] + ["--loss", "sft=1,logits=1", "--max-steps", "1"]) == 0  # logits need no mapping


def test_distillation_needs_a_teacher(dirs, tmp_path, capsys):
    args = argv(dirs, tmp_path / "o")
    i = args.index("--teacher")
    del args[i:i + 2]
    assert main(args) == 2
    assert "pass --teacher" in capsys.readouterr().err
