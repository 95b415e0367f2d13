"""Recovery at scale on this CPU: FSDP2 over two gloo processes equals one process, resumes after a kill;
the teacher sharded or offloaded trains the same student as a full copy; DeepSpeed ZeRO-2/3 on two
CPU processes equals one process and resumes after a kill."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import transformers
import yaml
from recover_helpers import write_data, write_pair
from safetensors.torch import load_file

from vlmprune.cli import main
from vlmprune.errors import VlmpruneError

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = ROOT / "configs/accelerate"
# DeepSpeed: deepspeed picks its CPU accelerator on a machine without a GPU and talks over gloo; the first run
# builds its small shared-memory C++ op (~1 min, cached under ~/.cache/torch_extensions).

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install 'vlmprune[deepspeed]')")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "COLUMNS": "1000",  # unwrapped logs
       "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    teacher, student = write_pair(root)  # 4 layers; the student drops 1 and 3
    data, images = write_data(root / "data", 12)
    # DeepSpeed refuses data that mixes image and text-only samples: 10 of the records with an image (an even
    # number: two processes and one process with two micro-batches per step then cross epochs alike)
    image_only = root / "data" / "with_images.json"
    image_only.write_text(json.dumps([r for r in json.loads(data.read_text()) if "image" in r][:10]))
    return {"teacher": teacher, "student": student, "data": data, "images": images, "image_only": image_only}


def argv(dirs, out, *extra):
    data = dirs["image_only"] if "--images-only" in extra else dirs["data"]
    extra = tuple(e for e in extra if e != "--images-only")  # a test flag: the data without its text-only record
    return ["recover", "--student", str(dirs["student"]), "--teacher", str(dirs["teacher"]), "--data",
            str(data), "--image-folder", str(dirs["images"]), "--output", str(out), "--logging-steps", "1",
            "--learning-rate", "1e-2", "--lora-dropout", "0", "--seed", "5", *extra]


def free_port() -> int:
    """A free TCP port for the rendezvous: the default 29500 may be taken by another run on the machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config: str, args: list[str], processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE / config),
            "--num_processes", str(processes), "--mixed_precision", "no", "--main_process_port", str(free_port()),
            "-m", "vlmprune.cli", *args]


@pytest.fixture(scope="module")
def launched(dirs, tmp_path_factory):
    """``launched(config, *extra)``: the output of a two-process recovery launched with ``config`` and
    ``extra`` arguments (each combination runs once per module)."""
    done: dict[tuple, Path] = {}

    def run(config: str, *extra: str) -> Path:
        if (config, *extra) not in done:
            out = tmp_path_factory.mktemp(config.split(".")[0]) / "out"
            proc = subprocess.run(launch(config, argv(dirs, out, *extra)), env=ENV, capture_output=True,
                                  text=True, timeout=300)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            done[(config, *extra)] = out
        return done[(config, *extra)]

    return run


@pytest.fixture(scope="module")
def fsdp_run(launched):
    """``fsdp_run(*extra)``: the output of a two-process FSDP2 recovery with ``extra`` arguments."""
    return lambda *extra: launched("fsdp.yaml", *extra)


def recovery_record(out) -> dict:
    return json.loads((Path(out) / "run.json").read_text())["recovery"][-1]


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / "model.safetensors"))


def assert_same_weights(a_dir, b_dir, start_dir, atol=1e-5):
    a, b, start = weights(a_dir), weights(b_dir), weights(start_dir)
    assert a.keys() == b.keys() == start.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-3, moved  # training changed the weights far more than the tolerance
    assert diff < atol, (diff, moved)
    return diff, moved


@pytest.fixture(scope="module")
def single(dirs, tmp_path_factory):
    """``single(*extra)``: one process accumulating two micro-batches per step, what two processes with
    one sample each compute (each combination runs once per module)."""
    done: dict[tuple, Path] = {}

    def run(*extra: str) -> Path:
        if extra not in done:
            out = tmp_path_factory.mktemp("single") / "out"
            assert main(argv(dirs, out, *extra, "--gradient-accumulation-steps", "2")) == 0
            done[extra] = out
        return done[extra]

    return run


def assert_equals_one_process(launched_out, single_out, dirs, label, atol=1e-5, steps=3):
    diff, moved = assert_same_weights(launched_out, single_out, dirs["student"], atol=atol)
    print(f"{label} vs one process: max |diff| {diff:.2e}, max |change| {moved:.2e}")
    model = transformers.AutoModelForImageTextToText.from_pretrained(launched_out)  # plain load, no LoRA left
    assert not any("lora" in name for name, _ in model.named_modules())
    assert json.loads((launched_out / "sample_ids.json").read_text())["processes_checked"] == 2
    assert recovery_record(launched_out)["steps"] == steps


@pytest.mark.parametrize("train", ["all", "lora"])
def test_fsdp2_two_processes_equal_one_process(dirs, fsdp_run, single, train):
    """Two FSDP2 processes with one sample each per step = one process accumulating two micro-batches."""
    common = ("--train", train, "--max-steps", "3", "--loss", "sft=1,logits=1,hidden=1")
    assert_equals_one_process(fsdp_run(*common), single(*common), dirs, f"fsdp2 ({train})")


def test_ddp_with_activation_checkpointing_trains_data_mixing_images_and_text(dirs, launched, single):
    """Step 6 gives one process the text-only sample: its projector goes unused there. With activation
    checkpointing the Trainer tells DDP that every parameter is used, and the run hung at that step;
    DDP now looks for unused parameters whenever the data mixes the two kinds."""
    common = ("--train", "all", "--max-steps", "6", "--loss", "sft=1,hidden=1", "--gradient-checkpointing")
    # six steps at lr 1e-2 (gradient norms up to ~540): 1.6e-5 apart against 3.5e-2 of change
    assert_equals_one_process(launched("ddp.yaml", *common), single(*common), dirs, "ddp + checkpointing",
                              atol=5e-5, steps=6)


@pytest.mark.parametrize("config", ["fsdp.yaml", pytest.param("deepspeed_zero3.yaml", marks=needs_deepspeed)])
def test_resumes_after_a_kill_and_ends_at_the_same_step(dirs, tmp_path, config):
    """FSDP2 resumes from its full-state files, DeepSpeed from its own global_step* shards."""
    common = ["--train", "all", "--max-steps", "12", "--save-steps", "2", "--lr-scheduler-type", "linear",
              "--loss", "sft=1,hidden=1", *(["--images-only"] if "deepspeed" in config else [])]
    out = tmp_path / "killed"
    ckpts = tmp_path / "killed.checkpoints"
    proc = subprocess.Popen(launch(config, argv(dirs, out, *common)), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 200
        while not (ckpts / "checkpoint-2" / "trainer_state.json").is_file():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
    finally:  # the launcher and both workers, mid-run (torchrun may put workers in their own groups)
        tree = [proc.pid] + [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=30)
        time.sleep(1)
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                       for pid in tree[1:])
    assert not out.exists()
    steps_done = sorted(int(p.name.rsplit("-", 1)[1]) for p in ckpts.iterdir() if p.name.startswith("checkpoint-"))
    assert steps_done and steps_done[-1] < 12, steps_done

    run = subprocess.run(launch(config, argv(dirs, out, *common, "--resume")), env=ENV, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"resuming from {ckpts / f'checkpoint-{steps_done[-1]}'}" in run.stderr  # not started over
    log = json.loads((out / "trainer_log.json").read_text())
    assert [e["step"] for e in log if "loss" in e][-1] == 12
    assert json.loads((out / "run.json").read_text())["recovery"][-1]["steps"] == 12
    # The resumed two-process run lands where an uninterrupted one-process run of the same seed lands.
    assert main(argv(dirs, tmp_path / "single", *common, "--gradient-accumulation-steps", "2")) == 0
    # 12 steps of gloo all-reduces, split by a restart, sum in another order than one process does:
    # up to ~2e-5 apart here, against ~6e-2 of training change (a wrong resume is off by ~1e-2)
    assert_same_weights(out, tmp_path / "single", dirs["student"], atol=1e-4)
    transformers.AutoModelForImageTextToText.from_pretrained(out)


def test_workers_end_when_the_launcher_is_killed(dirs, tmp_path):
    """A launcher killed outright used to leave its workers training (and writing checkpoints into the
    folder a --resume of the run writes to); now each worker gets SIGTERM when its launcher is gone."""
    # 5,000 steps: ~4 min here. Orphaned workers (before) trained on and wrote the output.
    common = ["--train", "all", "--max-steps", "5000", "--save-steps", "2", "--save-total-limit", "1",
              "--loss", "sft=1"]
    with (tmp_path / "launch.log").open("w") as log:
        proc = subprocess.Popen(launch("ddp.yaml", argv(dirs, tmp_path / "out", *common)), env=ENV,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    workers = []
    try:
        deadline = time.monotonic() + 200
        while not (tmp_path / "out.checkpoints" / "checkpoint-2" / "trainer_state.json").is_file():
            assert proc.poll() is None, (tmp_path / "launch.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        workers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(workers) >= 2
        os.kill(proc.pid, signal.SIGKILL)  # the launcher only
        proc.wait(timeout=30)

        def alive():
            return [pid for pid in workers
                    if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]

        deadline = time.monotonic() + 30
        while alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive()
        assert not (tmp_path / "out").exists()  # they stopped; they did not train on to the end and write it
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- the teacher's placement

TEACHER_RUN = ("--train", "all", "--max-steps", "3", "--loss", "sft=1,logits=1,hidden=1")


def test_fsdp2_sharded_teacher_trains_the_same_student_with_half_the_teacher_per_process(dirs, fsdp_run):
    replicated = fsdp_run(*TEACHER_RUN)
    sharded = fsdp_run(*TEACHER_RUN, "--teacher-placement", "shard")
    diff, moved = assert_same_weights(sharded, replicated, dirs["student"], atol=1e-6)
    print(f"sharded vs replicated teacher under fsdp2: max |diff| {diff:.2e}, max |change| {moved:.2e}")
    full, = {b for b in recovery_record(replicated)["teacher_bytes_per_process"]}  # the same whole copy on both
    record = recovery_record(sharded)
    assert record["teacher_placement"] == "shard" and len(record["teacher_bytes_per_process"]) == 2
    for held in record["teacher_bytes_per_process"]:  # each rank's shards (plus the few unsharded buffers)
        assert abs(held - full / 2) < 0.01 * full, (held, full)


@pytest.fixture(scope="module")
def replicated_single(dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("replicated") / "out"
    assert main(argv(dirs, out, *TEACHER_RUN)) == 0
    return out


@pytest.mark.parametrize("where", ["cpu", "disk"])
def test_offloaded_teacher_trains_the_same_student_bit_for_bit(dirs, replicated_single, tmp_path, where):
    folder = ["--teacher-offload-folder", str(tmp_path / "offload")] if where == "disk" else []
    out = tmp_path / "offloaded"
    assert main(argv(dirs, out, *TEACHER_RUN, "--teacher-placement", "offload", *folder)) == 0
    a, b = weights(out), weights(replicated_single)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record, full = recovery_record(out), recovery_record(replicated_single)["teacher_bytes_per_process"][0]
    assert record["teacher_placement"] == "offload"
    assert record["teacher_bytes_per_process"][0] < 0.01 * full  # only buffers stay on the device
    assert (record["teacher_host_bytes"] > 0.9 * full) if where == "cpu" else record["teacher_host_bytes"] == 0
    if where == "disk":
        assert list((tmp_path / "offload").iterdir()) == []  # its vlmprune-teacher-* folder is gone


@pytest.mark.parametrize("device", [torch.device("cpu", 0), "cpu:0", "cpu"])
def test_offload_runs_whatever_the_cpu_device_is_called(device):
    """accelerate's offload hooks fail on "cpu:0" (torch.device("cpu", 0) != torch.device("cpu")); place_teacher
    gives them the plain device."""
    from recover_helpers import build_tiny_deep

    from vlmprune.recover.teacher import place_teacher, resident_bytes

    ids = torch.randint(5, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = build_tiny_deep(2)(input_ids=ids).logits
    teacher = place_teacher(build_tiny_deep(2), "offload", device)
    for _ in range(2):  # the second forward after the first put every weight back
        with torch.no_grad():
            assert torch.equal(teacher(input_ids=ids).logits, want)
    assert resident_bytes(teacher) == sum(b.numel() * b.element_size() for b in teacher.buffers())


def test_a_sharded_teacher_outside_fsdp_is_refused_before_anything_loads(dirs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    assert main(argv(dirs, out, "--max-steps", "1", "--teacher-placement", "shard")) == 2
    err = capsys.readouterr().err
    assert "--teacher-placement shard" in err and "single process" in err
    assert "fsdp.yaml" in err and "--teacher-placement offload" in err
    assert not out.exists()
    monkeypatch.setenv("WORLD_SIZE", "2")  # a DDP launch (refused before its process group starts)
    assert main(argv(dirs, out, "--max-steps", "1", "--teacher-placement", "shard")) == 2
    assert "under DDP" in capsys.readouterr().err and not out.exists()


def test_teacher_placement_options_are_checked(dirs, tmp_path, monkeypatch, capsys):
    from vlmprune.recover.teacher import check_teacher_placement

    out = tmp_path / "o"
    assert main(argv(dirs, out, "--teacher-offload-folder", str(tmp_path / "f"))) == 2
    assert "add --teacher-placement offload" in capsys.readouterr().err
    assert main(["recover", "--student", str(dirs["student"]), "--data", str(dirs["data"]), "--output", str(out),
                 "--loss", "sft=1", "--teacher-placement", "offload"]) == 2
    assert "pass --teacher" in capsys.readouterr().err
    assert main(argv(dirs, out, "--teacher-placement", "offload", "--teacher-offload-folder", str(out / "t"))) == 2
    assert "lies inside --output" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(VlmpruneError, match="under DeepSpeed.*fsdp.yaml.*--teacher-placement offload"):
        check_teacher_placement("shard")
    check_teacher_placement("offload")


# --------------------------------------------------------------------------- configs for GPUs


def test_launch_configs_parse_and_name_their_backend():
    configs = {p.name: yaml.safe_load(p.read_text()) for p in ACCELERATE.glob("*.yaml")}
    assert {"ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"} <= configs.keys()
    assert configs["fsdp.yaml"]["fsdp_config"]["fsdp_version"] == 2
    assert configs["fsdp.yaml"]["fsdp_config"]["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert configs["deepspeed_zero2.yaml"]["deepspeed_config"]["zero_stage"] == 2
    z3 = configs["deepspeed_zero3.yaml"]["deepspeed_config"]
    assert z3["zero_stage"] == 3 and z3["zero3_save_16bit_model"] is True  # the final save needs gathered weights
    for name, cfg in configs.items():
        assert cfg["num_processes"] >= 1 and cfg["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED"), name


@pytest.mark.parametrize("name", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_configs_build_the_trainer_arguments(name, tmp_path):
    """The accelerate DeepSpeed plugin built from each config, as `accelerate launch` builds it (needs deepspeed)."""
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin

    ds = yaml.safe_load((ACCELERATE / name).read_text())["deepspeed_config"]
    # no gradient_accumulation_steps in the config: "auto", the Trainer's --gradient-accumulation-steps
    assert "gradient_accumulation_steps" not in ds
    plugin = DeepSpeedPlugin(zero_stage=ds["zero_stage"], gradient_clipping=ds["gradient_clipping"],
                             zero3_save_16bit_model=ds.get("zero3_save_16bit_model"))
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == ds["zero_stage"]


def test_deepspeed_not_installed_is_refused_with_the_alternative(dirs, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert main(argv(dirs, tmp_path / "o", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert "DeepSpeed, which is not installed" in err and "vlmprune[deepspeed]" in err and "fsdp.yaml" in err
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- DeepSpeed on CPU processes


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("train", ["all", "lora"])
def test_deepspeed_two_processes_equal_one_process(dirs, launched, single, stage, train):
    """ZeRO-2 (optimizer state and gradients sharded) and ZeRO-3 (weights too) with hidden+logit
    distillation from a whole teacher per process: the final weights, gathered from the shards under
    ZeRO-3, equal one process's."""
    # a tenth of the other tests' learning rate: at 1e-2 the gradient norm reaches ~450 by step 3 on these
    # samples and amplifies rounding (LoRA ended ~1e-4 apart)
    common = ("--train", train, "--max-steps", "3", "--loss", "sft=1,logits=1,hidden=1", "--images-only",
              "--learning-rate", "1e-3")
    out = launched(f"deepspeed_zero{stage}.yaml", *common)
    # DeepSpeed reduces its gradients in buckets of another order: up to ~4e-6 apart against ~2e-3 of change
    assert_equals_one_process(out, single(*common), dirs, f"deepspeed zero-{stage} ({train})", atol=2e-5)
    record = recovery_record(out)
    assert len(set(record["teacher_bytes_per_process"])) == 1 and record["teacher_bytes_per_process"][0] > 0


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_trains_data_mixing_images_and_text_a_kind_per_step(dirs, tmp_path, stage):
    """On data with a text-only sample every step trains on one kind (grouped by default under
    DeepSpeed): without it ZeRO-3 hung and ZeRO-2 aborted at the step where one process had the
    text-only sample. Seven steps cover the epoch (six image steps and the text-only one). The reference
    is one DeepSpeed process accumulating two micro-batches: DeepSpeed's flat optimizer state moves the
    projector on a text-only step too (a zero gradient), where torch's AdamW skips a weight with none."""
    common = ["--train", "all", "--max-steps", "7", "--loss", "sft=1,hidden=1", "--learning-rate", "1e-3"]
    config = f"deepspeed_zero{stage}.yaml"
    two = subprocess.run(launch(config, argv(dirs, tmp_path / "two", *common, "--save-steps", "7",
                                             "--keep-checkpoints")), env=ENV,
                         capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "every optimizer step trains on samples of one kind" in two.stderr
    one = subprocess.run(launch(config, argv(dirs, tmp_path / "one", *common, "--gradient-accumulation-steps", "2",
                                             "--group-by-modality", "on"), processes=1),
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    diff, moved = assert_same_weights(tmp_path / "two", tmp_path / "one", dirs["student"], atol=2e-5)
    print(f"deepspeed zero-{stage} on mixed data vs one process: max |diff| {diff:.2e}, max |change| {moved:.2e}")
    assert recovery_record(tmp_path / "two")["steps"] == 7
    if stage == 3:  # killed while writing the output: --resume finds the last step's checkpoint and writes it
        (tmp_path / "two").rename(tmp_path / "first")
        again = subprocess.run(launch(config, argv(dirs, tmp_path / "two", *common, "--save-steps", "7", "--resume")),
                               env=ENV,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert again.stderr.count("is the run's last step; writing it without training further") == 1
        assert_same_weights(tmp_path / "two", tmp_path / "first", dirs["student"], atol=1e-12)  # the same bits


@needs_deepspeed
def test_a_deepspeed_config_that_disagrees_with_the_options_is_a_clear_error(dirs, tmp_path):
    config = yaml.safe_load((ACCELERATE / "deepspeed_zero2.yaml").read_text())
    config["deepspeed_config"]["gradient_accumulation_steps"] = 1
    (tmp_path / "fixed.yaml").write_text(yaml.safe_dump(config))
    cmd = launch("deepspeed_zero2.yaml", argv(dirs, tmp_path / "out", "--max-steps", "1", "--images-only",
                                               "--gradient-accumulation-steps", "2"), processes=1)
    cmd[cmd.index("--config_file") + 1] = str(tmp_path / "fixed.yaml")
    run = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "internal error" not in run.stderr
    assert "fixes values that vlmprune recover's options set: remove those keys or set them to auto" in run.stderr
    assert not (tmp_path / "out").exists()


def test_modality_grouping_is_decided_before_anything_loads(dirs, monkeypatch):
    from vlmprune.data import read_samples
    from vlmprune.recover.distributed import group_by_modality

    mixed = read_samples(dirs["data"], dirs["images"])
    images = read_samples(dirs["image_only"], dirs["images"])
    assert not group_by_modality(mixed, num_processes=2)  # DDP and FSDP train mixed steps (tests above)
    assert group_by_modality(mixed, num_processes=1, choice="on")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for stage in ("1", "2", "3"):
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", stage)
        assert group_by_modality(mixed, num_processes=2)
        with pytest.raises(VlmpruneError, match=rf"ZeRO-{stage} .* mix samples with images \(11\) and text-only "
                                                r"samples \(1\).*--group-by-modality off.*fsdp.yaml.*ddp.yaml"):
            group_by_modality(mixed, num_processes=2, choice="off")
    assert not group_by_modality(mixed, num_processes=1)  # one process reduces nothing
    assert not group_by_modality(images, num_processes=2)  # one kind only
    group_by_modality(images, num_processes=2, choice="off")


@pytest.mark.parametrize("unit", [1, 2, 3, 4])
def test_modality_grouped_sampler_gives_every_step_one_kind(unit):
    from vlmprune.recover.distributed import ModalityGroupedSampler

    has_image = [True] * 11 + [False] * 3
    sampler = ModalityGroupedSampler(has_image, unit, seed=5)
    order = list(sampler)
    assert len(order) == len(sampler) and len(order) % unit == 0
    assert set(order) == set(range(len(has_image)))  # every sample, some repeated to fill a kind's last unit
    assert len(order) - len(has_image) < 2 * unit
    assert all(len({has_image[i] for i in order[k:k + unit]}) == 1 for k in range(0, len(order), unit))
    assert list(ModalityGroupedSampler(has_image, unit, seed=5)) == order  # the same on every process
    sampler.set_epoch(1)
    assert list(sampler) != order and sorted(set(sampler)) == sorted(set(order))


def test_deepspeed_checkpoints_count_as_complete_only_when_whole(tmp_path, monkeypatch):
    """A DeepSpeed checkpoint resumes from ``latest`` -> ``global_step*/`` (model states + one optimizer file
    per process, each a whole zip); cut short it is skipped; written by another process count it is refused."""
    import zipfile

    from vlmprune.recover.run import complete_checkpoints

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    torch_file = tmp_path / "state.pt"
    torch.save({"x": torch.zeros(2)}, torch_file)  # a zip, as DeepSpeed writes them
    assert zipfile.is_zipfile(torch_file)

    def checkpoint(step, ranks=2, latest=True, cut=False):
        path = tmp_path / "ckpts" / f"checkpoint-{step}"
        tag = path / f"global_step{step}"
        tag.mkdir(parents=True)
        (path / "trainer_state.json").write_text("{}")
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(path / "model.safetensors"))
        (tag / "mp_rank_00_model_states.pt").write_bytes(torch_file.read_bytes())
        for rank in range(ranks):
            data = torch_file.read_bytes()
            (tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(data[:20] if cut and rank else data)
        if latest:
            (path / "latest").write_text(tag.name)
        return path

    good = checkpoint(2)
    checkpoint(4, latest=False)  # killed before DeepSpeed named it
    checkpoint(6, cut=True)      # rank 1's optimizer file cut short
    assert complete_checkpoints(tmp_path / "ckpts") == [good]
    checkpoint(8, ranks=4)
    with pytest.raises(VlmpruneError,
                       match="written by 4 DeepSpeed processes and this launch has 2.*--num_processes 4"):
        complete_checkpoints(tmp_path / "ckpts")
