"""Value checks and parsers shared by the stage configs (each message names the flag and what it accepts):
ratios, layer ranges, task lists, ``--target``, ``--device-map``, ``--max-memory``, ``--device``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmprune.errors import VlmpruneError
from vlmprune.readers import parse_json
from vlmprune.vocab import (
    DATASETS,
)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def need(name: str, value: Any) -> None:
    if value in (None, ""):
        raise VlmpruneError(f"{flag_name(name)} is required")


def positive(name: str, value: Any, *, allow_none: bool = True, zero: bool = False, kind=int) -> None:
    if value is None and allow_none:
        return
    ok_type = (isinstance(value, (int, float)) and not isinstance(value, bool)
               and (kind is float or float(value).is_integer()))
    if not ok_type or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        bound = ">= 0" if zero else "> 0" if kind is float else ">= 1"
        what = "an integer" if kind is int else "a number"
        raise VlmpruneError(f"{flag_name(name)} must be {what} {bound}, got {value!r}")


def one_of(name: str, value: Any, choices, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value not in choices:
        raise VlmpruneError(f"{flag_name(name)} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_ratio(ratio: Any) -> None:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio < 1:
        raise VlmpruneError(f"--ratio must be a fraction of the model's parameters in (0, 1), got {ratio!r}")


def parse_layer_range(spec: str | None, num_layers: int | None = None) -> list[int] | None:
    """'START:END' (python slice, END exclusive, either may be empty or negative) -> layer indices
    (None without ``num_layers``: only the syntax is checked)."""
    if not spec:
        return None if num_layers is None else list(range(num_layers))
    try:
        start, end = (int(x) if x.strip() else None for x in str(spec).split(":"))
    except ValueError:
        raise VlmpruneError(f"--layers must look like START:END (e.g. 2:-2), got {spec!r}") from None
    if num_layers is None:
        return None
    chosen = list(range(num_layers))[slice(start, end)]
    if not chosen:
        raise VlmpruneError(f"--layers {spec} selects no layer of the model's {num_layers}")
    return chosen


BUILTIN_TASKS = DATASETS  # test.json files under --data-dir (written by `vlmprune data`)
# lmms-eval tasks vlmprune ships (vlmprune/evaluate/lmms_tasks): the built-in tasks' data as lmms-eval
# task YAMLs over a save_to_disk directory, so lmms-eval runs offline end to end
LMMS_PACKAGED_TASKS = tuple(f"{t}_lmms" for t in BUILTIN_TASKS)


def task_list(name: str, value: Any) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (None and '' -> [])."""
    if value is None:
        return []
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) and t.strip() for t in value):
        raise VlmpruneError(f"{flag_name(name)} must be comma-separated task names or a list of them, got {value!r}")
    return [t.strip() for t in value]
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}
_BYTES = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "int8": 1}


@dataclass(frozen=True)
class Target:
    """A deployment target: ``params`` (a fraction kept <= 1, or a count), ``memory`` (bytes) or ``latency``
    (seconds of prefill on this device) at a context."""

    spec: str
    kind: str  # "params" | "memory"
    value: float
    seq: int = 4096
    batch: int = 1
    dtype_bytes: int = 2


def parse_target(spec: str) -> Target:
    """``params=0.7`` | ``params=1.5B`` | ``memory=2GB[,seq=4096,batch=1,dtype=bf16]`` |
    ``latency=200ms[,seq=1024,batch=1]`` -> Target (latency in seconds)."""
    import re

    head, *rest = [part.strip() for part in str(spec).split(",")]
    kind, sep, raw = head.partition("=")
    bad = VlmpruneError(f"--target must look like params=0.7, params=1.5B, memory=2GB[,seq=4096,batch=1,dtype=bf16] "
                        f"or latency=200ms[,seq=1024,batch=1]; got {spec!r}")
    if not sep or kind not in ("params", "memory", "latency"):
        raise bad
    found = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)", raw.strip())
    if not found:
        raise bad
    number, unit = float(found.group(1)), found.group(2).lower()
    if kind == "params":
        if unit not in _UNITS or (not unit and not 0 < number < 1 and number < 1000):
            raise VlmpruneError(f"--target {spec}: params is a fraction kept in (0, 1) or a count such as 1.5B")
        value = number * _UNITS[unit]
    elif kind == "memory":
        if unit not in _BYTES:
            raise VlmpruneError(f"--target {spec}: memory needs a unit: B, KB, MB, GB, KiB, MiB or GiB")
        value = number * _BYTES[unit]
    else:
        if unit not in ("ms", "s"):
            raise VlmpruneError(f"--target {spec}: latency needs a unit: ms or s")
        value = number / 1000 if unit == "ms" else number
    allowed = {"params": {}, "memory": {"seq": 4096, "batch": 1, "dtype": "bf16"},
               "latency": {"seq": 1024, "batch": 1}}[kind]
    options = dict(allowed) | {"dtype": allowed.get("dtype", "bf16")}
    for part in rest:
        key, sep, val = part.partition("=")
        if not sep or key not in allowed:
            raise VlmpruneError(f"--target {spec}: unknown option {part!r}; {kind} targets take "
                                f"{', '.join(k + '=' for k in allowed) or 'no options'}")
        options[key] = val
    if str(options["dtype"]) not in _DTYPE_BYTES:
        raise VlmpruneError(f"--target {spec}: dtype must be one of {', '.join(_DTYPE_BYTES)}")
    try:
        seq, batch = int(options.get("seq", 4096)), int(options.get("batch", 1))
    except ValueError:
        raise bad from None
    if value <= 0 or seq < 1 or batch < 1:
        raise bad
    return Target(str(spec), kind, value, seq, batch, _DTYPE_BYTES[str(options["dtype"])])


# Where recovery keeps the distillation teacher (vlmprune.recover.teacher).
TEACHER_PLACEMENTS = ("replicate", "shard", "offload")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def parse_device_map(spec: str | dict | None) -> str | dict | None:
    """``--device-map``: one of accelerate's strategies, a JSON object ``{"module": device}``, or a JSON file of one."""
    if spec is None or isinstance(spec, dict) or spec in DEVICE_MAPS:
        return spec
    text = str(spec)
    if not text.lstrip().startswith("{"):
        try:
            text = Path(text).read_text()
        except OSError:
            raise VlmpruneError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, a JSON object or a JSON file "
                                f"of one; {spec!r} is none of these") from None
    mapping = parse_json(text, f"--device-map {spec!r}")
    if not isinstance(mapping, dict) or not mapping:
        raise VlmpruneError(f"--device-map {spec!r} must map module names to devices (cpu, disk, 0, cuda:1, ...)")
    return mapping


def parse_max_memory(spec: str | dict | None) -> dict | None:
    """``--max-memory "0=20GiB,1=20GiB,cpu=64GiB"`` -> ``{0: "20GiB", 1: "20GiB", "cpu": "64GiB"}``
    (accelerate's form)."""
    if spec is None or isinstance(spec, dict):
        return spec
    out: dict = {}
    for part in str(spec).split(","):
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise VlmpruneError(f"--max-memory entries are DEVICE=SIZE (e.g. 0=20GiB,cpu=64GiB), got {part!r}")
        out[int(key) if key.isdigit() else key] = value
    return out


def check_device(device: str | None) -> None:
    """A device torch knows and this machine has (imports torch: call when the command starts)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise VlmpruneError(f"--device {device!r} is not a device; use cpu, cuda, cuda:1, mps, ...") from None
    if dev.type != "cpu":
        module = getattr(torch, dev.type, None)
        available = getattr(module, "is_available", lambda: False)()
        if not available:
            raise VlmpruneError(f"--device {device}: this machine (torch {torch.__version__}) has no {dev.type} "
                                f"device; use --device cpu or install a torch build for it")
        count = getattr(module, "device_count", lambda: 1)()
        if dev.index is not None and dev.index >= count:
            raise VlmpruneError(f"--device {device}: there are only {count} {dev.type} device(s)")
