"""vlmprune evaluate (evaluate/run.py): the model loads in the dtype and on the device asked for."""

from __future__ import annotations

import json

import pytest
import torch

from vlmprune.cli import main
from vlmprune.config import EvalConfig, build
from vlmprune.errors import VlmpruneError
from vlmprune.evaluate import run


def _loaded(monkeypatch) -> list:
    """The models evaluate_model_dir loads, as it leaves them for the tasks."""
    seen = []
    real_load = run.load

    def load(*args, **kwargs):
        seen.append(real_load(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(run, "load", load)
    return seen


@pytest.mark.parametrize("dtype, expected",
                         [("float16", torch.float16), ("auto", torch.float32), (None, torch.float32)])
def test_cli_evaluate_loads_the_dtype_and_device_asked_for(dtype, expected, tiny_repo, tmp_path, monkeypatch):
    seen = _loaded(monkeypatch)
    out = tmp_path / "results.json"
    argv = ["evaluate", "--model", str(tiny_repo.model), "--tasks", "", "--task-file", str(tiny_repo.task_file),
            "--limit", "2", "--batch-size", "2", "--max-new-tokens", "2", "--device", "cpu", "--output", str(out)]
    assert main(argv + (["--dtype", dtype] if dtype else [])) == 0
    (model,) = seen
    assert {p.dtype for p in model.parameters()} == {expected}  # the tiny checkpoint is float32
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    result = json.loads(out.read_text())
    assert result["config"]["load"]["dtype"] == dtype and result["config"]["load"]["device"] == "cpu"
    assert result["tasks"]["test"]["count"] == 2


def test_dtype_and_device_are_checked_before_anything_loads(tiny_repo):
    with pytest.raises(VlmpruneError, match="--dtype must be one of float32, float16, bfloat16, auto"):
        build(EvalConfig, model=str(tiny_repo.model), dtype="fp16")
    with pytest.raises(VlmpruneError, match="--device 'nope' is not a device"):
        build(EvalConfig, model=str(tiny_repo.model), device="nope").check_paths()
    if not torch.cuda.is_available():
        with pytest.raises(VlmpruneError, match="has no cuda device"):
            build(EvalConfig, model=str(tiny_repo.model), device="cuda").check_paths()


def test_a_gguf_export_refuses_device_and_dtype(tiny_repo, monkeypatch):
    """llama.cpp runs a GGUF export in the types it was written with: the options are refused, not ignored."""
    import vlmprune.export.runtime as runtime

    monkeypatch.setattr(runtime, "is_gguf_dir", lambda path: True)
    for option in ({"dtype": "float16"}, {"device": "cpu"}):
        with pytest.raises(VlmpruneError, match="--device and --dtype load a Hugging Face checkpoint"):
            run.evaluate_model_dir(build(EvalConfig, model=str(tiny_repo.model), tasks="",
                                         task_file=str(tiny_repo.task_file), **option))
