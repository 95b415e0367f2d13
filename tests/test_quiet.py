"""A command prints only its own progress and results (vlmprune.quiet).

The prune runs in a fresh interpreter, as a user's would, with every extra this environment has installed
(DeepSpeed, torchao, bitsandbytes, lmms-eval): their import-time messages are what the test guards against.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vlmprune
from vlmprune import quiet

SRC = Path(vlmprune.__file__).resolve().parents[1]

# The subprocess runs the CLI with its result tables sent to a file: what is left on stdout and stderr is
# vlmprune's log (stderr) and whatever any other library printed.
DRIVER = """
import io, json, sys
from rich.console import Console
import vlmprune.cli as cli
cli._console = Console(file=io.StringIO())
code = cli.main(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    json.dump({"code": code, "modules": sorted(m for m in ("deepspeed", "torchao") if m in sys.modules)}, f)
"""

# vlmprune's own log lines (cli._setup_logging: rich, level then message) and tqdm progress bars
OWN = [
    re.compile(r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) {2,}\S.*"),
    re.compile(r".*\d+%\|.*\|\s*\d+/\d+ \[[^\]]*\]"),
]


def foreign_lines(text: str) -> list[str]:
    """Lines (tqdm redraws with \\r, so those split too) that are neither a vlmprune log line nor a progress bar."""
    parts = (p.strip() for p in re.split(r"[\r\n]", text))
    return [p for p in parts if p and not any(own.fullmatch(p) for own in OWN)]


def test_foreign_lines_are_told_apart():
    own = ("INFO     read 12 samples from data.json     \n"
           "Loading weights: 100%|██████████| 82/82 [00:00<00:00, 26444.17it/s]\r"
           "taylor (grad):   0%|          | 0/2 [00:00<?, ?batch/s]\r      \n")
    assert foreign_lines(own) == []
    noise = ["[2026-12-07 11:36:57,129] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU",
             "Failed to load /venv/site-packages/torchao/_C_cutlass_90a.abi3.so: Could not load this library",
             "W1207 11:36:54.325000 27607 torch/utils/_pytree.py:630] <enum 'KernelPreference'> is an Enum subclass",
             "/x.py:3: UserWarning: something"]
    assert foreign_lines(own + "\n".join(noise)) == noise


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
            "COLUMNS": "400", "OMP_NUM_THREADS": "1"}  # wide: a log line is one line


def test_prune_prints_nothing_vlmprune_did_not_write(tiny_repo, tmp_path):
    out, record = tmp_path / "pruned", tmp_path / "record.json"
    argv = ["prune", "--model", str(tiny_repo.model), "--calibration", str(tiny_repo.data), "--image-folder",
            str(tiny_repo.images), "--num-samples", "4", "--batch-size", "2", "--output", str(out),
            "--method", "width", "--criterion", "taylor", "--ratio", "0.2"]
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(record), *argv], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(record.read_text())
    assert result["code"] == 0 and (out / "model.safetensors").exists()
    assert proc.stdout == "", f"printed on stdout by another library: {proc.stdout!r}"
    assert foreign_lines(proc.stderr) == [], f"lines vlmprune did not write: {foreign_lines(proc.stderr)}"
    # DeepSpeed is installed with vlmprune[deepspeed] but a prune does not use it: it is not even imported
    assert "deepspeed" not in result["modules"]
    if importlib.util.find_spec("torchao") is not None:  # imported by transformers on load: its messages filtered
        assert "torchao" in result["modules"]


def test_library_import_is_quiet_too():
    """A program that imports vlmprune's modules (here recover, which pulls transformers' Trainer and, through it,
    torchao) sees no third-party notes either: the package installs the filters before torch loads."""
    code = "import vlmprune.recover.run, transformers.modeling_utils, sys; print('torchao' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert foreign_lines(proc.stderr) == [], foreign_lines(proc.stderr)
    assert proc.stdout.strip() == str(importlib.util.find_spec("torchao") is not None)


def test_filters_drop_only_their_message():
    quiet.install()
    quiet.install()  # idempotent
    assert logging.getLogger("torchao").filters.count(quiet.FILTERS["torchao"]) == 1

    def kept(name: str, msg: str, *args) -> bool:
        return logging.getLogger(name).filter(logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None))

    assert not kept("torchao", "Failed to load /v/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: x")
    assert kept("torchao", "Failed to load the model config")  # any other torchao message stays
    enum_note = "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type."
    torchao_enum = type("KernelPreference", (), {"__module__": "torchao.quantization.quant_api"})
    mine = type("Mine", (), {"__module__": "vlmprune.something"})
    assert not kept("torch.utils._pytree", enum_note, torchao_enum)
    assert kept("torch.utils._pytree", enum_note, mine)  # the same note about someone else's enum stays
    assert kept("torch.utils._pytree", "another pytree warning")
    assert not kept("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: "
                    "%s. Please make sure you already `pip install kernels`", "untrusted")
    assert kept("bitsandbytes.backends.cpu.ops", "any other bitsandbytes warning")


def test_deepspeed_is_looked_up_only_where_it_is_imported(monkeypatch):
    other = pytest.importorskip("accelerate.utils.other")
    monkeypatch.setattr(other, "is_deepspeed_available", lambda: True)  # as on a machine with DeepSpeed installed
    installed = other.is_deepspeed_available
    monkeypatch.delitem(sys.modules, "deepspeed", raising=False)
    with quiet.deepspeed_only_if_in_use():
        assert other.is_deepspeed_available() is False  # not imported: nothing can be a DeepSpeedEngine
        monkeypatch.setitem(sys.modules, "deepspeed", object())  # a DeepSpeed launch imported it meanwhile
        assert other.is_deepspeed_available() is True
    assert other.is_deepspeed_available is installed  # put back
    with quiet.deepspeed_only_if_in_use():  # imported before the block: accelerate's own answer, untouched
        assert other.is_deepspeed_available is installed


def test_native_stderr_is_held_back_and_handed_over(capfd):
    """What native code writes to fd 2 inside the block (here os.write, as a C library's fprintf would) does
    not reach the terminal and is handed to the caller; Python's stderr before the block still does, and
    fd 2 is restored after it, an exception included."""
    sys.stderr.write("before\n")
    with quiet.native_stderr() as said:
        os.write(2, b"[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\n")
    assert said == ["[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\n"]
    with pytest.raises(RuntimeError), quiet.native_stderr() as said:
        os.write(2, b"E loader: bad program\n")
        raise RuntimeError("load failed")
    assert said == ["E loader: bad program\n"]
    os.write(2, b"after\n")
    with quiet.native_stderr(passthrough=True) as said:
        os.write(2, b"shown at DEBUG\n")
    assert said == []
    assert capfd.readouterr().err == "before\nafter\nshown at DEBUG\n"
