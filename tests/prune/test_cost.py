"""The cost record of `vlmprune prune` (vlmprune.phases) and the memory fixes behind it."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny

import vlmprune
from vlmprune import phases
from vlmprune.checkpoint import check_finite
from vlmprune.cli import main
from vlmprune.errors import VlmpruneError
from vlmprune.surgery.rows import keep_cols_, keep_rows_

SRC = Path(vlmprune.__file__).resolve().parents[1]


def prune_argv(tiny_repo, out, *extra):
    return ["prune", "--model", str(tiny_repo.model), "--calibration", str(tiny_repo.data), "--image-folder",
            str(tiny_repo.images), "--num-samples", "4", "--batch-size", "2", "--output", str(out),
            "--method", "width", "--criterion", "taylor", "--ratio", "0.2", *extra]


def check_record(cost: dict) -> None:
    assert list(cost["phases"]) == list(phases.PHASES)
    for name, entry in cost["phases"].items():
        assert set(entry) == {"seconds", "cpu_seconds", "peak_rss_mib", "rss_start_mib", "rss_end_mib"}, name
        assert entry["seconds"] >= 0 and entry["cpu_seconds"] >= 0, name
    ran = ("load", "data", "calibration", "scoring", "planning", "surgery", "save", "records")
    for name in ran:  # a calibrated width prune goes through every one of them
        assert cost["phases"][name]["seconds"] > 0, name
        assert cost["phases"][name]["peak_rss_mib"] > 0, name
    total = sum(entry["seconds"] for entry in cost["phases"].values())
    assert total == pytest.approx(cost["seconds"], abs=0.02)  # every second in exactly one phase
    assert cost["peak_rss_mib"] == max(e["peak_rss_mib"] for e in cost["phases"].values() if e["peak_rss_mib"])
    assert cost["weights_mib"] > 0 and cost["peak_over_weights"] > 0


def test_cli_writes_the_cost_of_every_phase(tiny_repo, tmp_path):
    out = tmp_path / "pruned"
    assert main(prune_argv(tiny_repo, out)) == 0
    cost = json.loads((out / "run.json").read_text())["prune"]["cost"]
    check_record(cost)
    assert cost["scope"] == "process"  # the CLI counts the interpreter and the imports too
    assert cost["phases"]["import"]["seconds"] > 0


def test_library_prune_returns_the_same_record(tiny_repo, tmp_path):
    result = vlmprune.prune(model=str(tiny_repo.model), output=str(tmp_path / "o"), method="width",
                            criterion="taylor", ratio=0.2, calibration=str(tiny_repo.data),
                            image_folder=str(tiny_repo.images), num_samples=4, batch_size=2)
    check_record(result.cost)
    assert result.cost["scope"] == "call"  # prune() called in a running process: no import phase
    assert result.cost["phases"]["import"]["seconds"] == 0
    saved = json.loads((tmp_path / "o" / "run.json").read_text())["prune"]
    assert saved["cost"] == result.cost
    assert phases.current() is None  # the recording ended with the call


def test_phase_times_add_up_to_the_command(tiny_repo, tmp_path):
    """In its own process: the record's phases add up to about the wall time seen from outside (the
    rest is the process's exit, after the run record is written)."""
    out = tmp_path / "pruned"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "vlmprune.cli", *prune_argv(tiny_repo, out)], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    cost = json.loads((out / "run.json").read_text())["prune"]["cost"]
    check_record(cost)
    assert cost["seconds"] <= wall + 0.05
    assert cost["seconds"] >= 0.75 * wall - 0.5, (cost["seconds"], wall)


def test_recorder_nests_phases_and_resets_the_peak():
    with phases.recording() as rec:
        with phases.phase("load"):
            # 64 MiB of fresh anonymous pages, touched: never memory the allocator already holds resident
            # (in a long test process, earlier tests' freed heap would absorb a torch allocation unseen)
            big = mmap.mmap(-1, 64 * 2**20)
            for offset in range(0, len(big), mmap.PAGESIZE):
                big[offset] = 1
            with phases.phase("data"):  # nested: pauses load
                time.sleep(0.05)
            big.close()
        with phases.phase("save"):
            time.sleep(0.01)
        cost = rec.record()
    assert phases.current() is None
    assert cost["scope"] == "call"
    assert cost["phases"]["data"]["seconds"] >= 0.05
    assert cost["phases"]["load"]["seconds"] < cost["seconds"]
    assert sum(e["seconds"] for e in cost["phases"].values()) == pytest.approx(cost["seconds"], abs=0.01)
    if cost["peak_per_phase"]:  # the kernel let us reset VmHWM: save never held the 64 MiB
        assert cost["phases"]["load"]["peak_rss_mib"] - cost["phases"]["save"]["peak_rss_mib"] > 48
    with pytest.raises(ValueError, match="unknown phase"):
        with phases.recording() as rec:
            rec.enter("lunch")


def test_no_recording_no_cost():
    with phases.phase("load"):  # outside a recording: nothing happens
        pass
    assert phases.current() is None


def test_allocator_helpers_are_harmless():
    assert isinstance(phases.trim_malloc(), bool)
    assert phases.peak_rss_kib() is None or phases.peak_rss_kib() > 0
    assert phases.process_age() is None or phases.process_age() > 0


# ------------------------------------------------------------------------------------- the fixes


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_check_finite_finds_every_non_finite_value(bad, dtype):
    model = build_tiny("llava_llama_mha").to(dtype)
    check_finite(model)  # finite: accepted
    with torch.no_grad():
        model.model.language_model.layers[1].mlp.up_proj.weight[3, 5] = bad
    with pytest.raises(VlmpruneError, match="NaN or inf"):
        check_finite(model)


def test_surgery_writes_weights_of_their_own():
    linear = torch.nn.Linear(6, 5, bias=True)
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    original = linear.weight
    keep_rows_(linear, torch.tensor([0, 3, 4]))
    keep_cols_(linear, torch.tensor([1, 2]))
    assert torch.equal(linear.weight, weight[[0, 3, 4]][:, [1, 2]]) and torch.equal(linear.bias, bias[[0, 3, 4]])
    assert linear.weight.untyped_storage().data_ptr() != original.untyped_storage().data_ptr()
    assert linear.weight.is_contiguous() and linear.weight.untyped_storage().nbytes() == 3 * 2 * 4
    assert (linear.out_features, linear.in_features) == (3, 2)
