"""One config system for every command: a frozen dataclass per stage, YAML + flags + dotted overrides.

Each stage's options are one dataclass whose fields carry their help text (``opt(...)``). A command
line is resolved the same way for every command: the ``--config`` YAML first, then ``key=value``
overrides (dotted keys reach nested sections), then explicit flags; unknown keys are refused at any
depth. The dataclass checks its values once, in ``__post_init__``, before any model or data loads;
checks that need the file system (inputs exist, the output may be written) are ``check_paths()``,
called by the stage when it starts. Nothing here imports torch or transformers, so ``vlmprune
--help`` stays fast (a look at ``transformers.HfArgumentParser``: it does the dataclass-to-argparse
part, but importing it loads transformers; the glue below is the forty lines we need of it).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlmprune.errors import VlmpruneError
from vlmprune.readers import parse_json, parse_yaml, read_yaml_file
from vlmprune.vocab import (
    ATTENTION_MODES,
    COMPENSATE_LAYERS,
    COMPENSATE_MODES,
    CONVERT_FAMILIES,
    DATASETS,
    DTYPES,
    PRUNE_METHODS,
    TOKENS,
)

RESOLVED_CONFIG = "resolved_config.yaml"


def opt(default: Any = None, help: str = "", *, flag: str | None = None, choices=None, type=None,
        positional: bool = False, cli: bool = True, default_factory=None, key: str | None = None):
    """A config field with what its command-line flag needs. ``key`` is the option's name in a flat YAML,
    ``--set`` and its flag where it differs from the field's (a group's ``path`` is ``calibration``)."""
    meta = {"help": help, "flag": flag, "choices": choices, "type": type, "positional": positional, "cli": cli,
            "key": key}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def group(cls, *, only: tuple[str, ...] | None = None):
    """A field holding an option group (:class:`LoadOptions`, ...). Its options are flags and flat YAML keys
    of the command as if they were its own, or a YAML section of the group's name; ``only`` names the ones this
    command acts on (the others are unknown options here)."""
    return field(default_factory=cls, metadata={"group": cls, "only": only})


@dataclass(frozen=True)
class Option:
    """One option of a stage as users write it: its flat key, where it lives, and its field."""

    key: str
    group: str | None  # the stage's field holding the group, or None for the stage's own fields
    field: dataclasses.Field

    @property
    def path(self) -> str:
        return f"{self.group}.{self.field.name}" if self.group else self.field.name


def options_of(cls) -> list[Option]:
    """Every option of a stage config, its groups' included (in field order)."""
    out = []
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("group")
        if sub is None:
            out.append(Option(f.metadata.get("key") or f.name, None, f))
            continue
        only = f.metadata.get("only")
        out += [Option(g.metadata.get("key") or g.name, f.name, g) for g in dataclasses.fields(sub)
                if only is None or g.name in only]
    return out


_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
               "dict": "a mapping", "list": "a list", "None": "null"}


def _is(value: Any, name: str) -> bool:
    if name == "None":
        return value is None
    if name == "bool":
        return isinstance(value, bool)
    if name in ("int", "float") and isinstance(value, bool):
        return False
    if name == "float":
        return isinstance(value, (int, float))
    return isinstance(value, {"str": str, "int": int, "dict": dict, "list": (list, tuple)}.get(name, object))


def check_types(config) -> None:
    """Every value of ``config`` of its field's declared type, so that ``overwrite: "false"`` (a string) is
    refused instead of counting as true (YAML, ``--set`` and Python callers all pass here)."""
    for f in dataclasses.fields(config):
        if f.metadata.get("group") is not None:
            continue
        value = getattr(config, f.name)
        names = [t.strip() for t in str(f.type).split("|")]
        if any(_is(value, n) for n in names):
            continue
        key = f.metadata.get("key") or f.name
        wanted = " or ".join(_TYPE_WORDS.get(n, n) for n in names)
        hint = ""
        if "bool" in names and isinstance(value, str):
            hint = f" (in YAML write {key}: {value.strip().lower()} without quotes; a quoted word is a string)"
        raise VlmpruneError(f"option {key} must be {wanted}, got {value!r} ({type(value).__name__}){hint}")


def checked(cls):
    """``@dataclass(frozen=True)`` for a config or group whose values are type-checked (:func:`check_types`)
    before its own ``__post_init__`` checks run."""
    own = cls.__dict__.get("__post_init__")

    def __post_init__(self):
        check_types(self)
        if own is not None:
            own(self)

    cls.__post_init__ = __post_init__
    return dataclass(frozen=True)(cls)


# ---------------------------------------------------------------------------------------------
# value checks shared by the stage configs (each message names the flag and what it accepts)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def need(name: str, value: Any) -> None:
    if value in (None, ""):
        raise VlmpruneError(f"{_flag(name)} is required")


def positive(name: str, value: Any, *, allow_none: bool = True, zero: bool = False, kind=int) -> None:
    if value is None and allow_none:
        return
    ok_type = (isinstance(value, (int, float)) and not isinstance(value, bool)
               and (kind is float or float(value).is_integer()))
    if not ok_type or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        bound = ">= 0" if zero else "> 0" if kind is float else ">= 1"
        what = "an integer" if kind is int else "a number"
        raise VlmpruneError(f"{_flag(name)} must be {what} {bound}, got {value!r}")


def one_of(name: str, value: Any, choices, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value not in choices:
        raise VlmpruneError(f"{_flag(name)} must be one of {', '.join(map(str, choices))}, got {value!r}")


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


def _task_list(name: str, value: Any) -> list[str]:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]`` (None and '' -> [])."""
    if value is None:
        return []
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, str) and t.strip() for t in value):
        raise VlmpruneError(f"{_flag(name)} must be comma-separated task names or a list of them, got {value!r}")
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


# ---------------------------------------------------------------------------------------------
# option groups: the parts several commands (and the study's sections) share


@checked
class LoadOptions:
    """How a command loads a model: the same options for every command that loads one. A command takes the
    ones it can act on (``group(LoadOptions, only=...)``); the others are unknown options there."""

    dtype: str | None = opt(None, "float32, float16, bfloat16, or auto (default: the checkpoint's)", choices=DTYPES)
    device: str | None = opt(None, "cpu, cuda, cuda:1, ... (default: where the model loads)")
    device_map: str | dict | None = opt(None, "load the model dispatched across GPUs / CPU / disk (accelerate "
                                              "big-model loading): auto, balanced, balanced_low_0, sequential, or a "
                                              "JSON {module: device} (inline or a file)")
    max_memory: str | dict | None = opt(None, "with --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    offload_folder: str | None = opt(None, "with --device-map: where disk-offloaded weights go (default: a "
                                           "temporary folder beside the output)")
    trust_remote_code: bool = opt(False, "run the model repo's own code (off by default)")

    def __post_init__(self):
        one_of("dtype", self.dtype, DTYPES)
        parse_device_map(self.device_map)
        parse_max_memory(self.max_memory)
        if self.device_map is not None and self.device is not None:
            raise VlmpruneError("give either --device (the whole model on one device) or --device-map (dispatched), "
                                "not both")
        if self.device_map is None and (self.max_memory is not None or self.offload_folder is not None):
            raise VlmpruneError("--max-memory and --offload-folder apply to a dispatched model: add --device-map auto")

    def kwargs(self) -> dict[str, Any]:
        """What :func:`vlmprune.checkpoint.load` takes of these (the dtype name as given: "auto" is the
        checkpoint's; a dispatched load's placement is the caller's, which owns the offload folder)."""
        return {"dtype": self.dtype, "trust_remote_code": self.trust_remote_code}


@checked
class CalibrationOptions:
    """The data the statistics of a prune are computed on (the study's ``calibration:`` section)."""

    path: str | None = opt(None, "LLaVA-format JSON/JSONL, a save_to_disk directory or a hub dataset id",
                           key="calibration")
    image_folder: str | None = opt(None, "root of the relative image paths in --calibration")
    split: str = opt("train", "dataset split (HF datasets)")
    num_samples: int = opt(128, "calibration samples (seeded draw)", type=int)
    seed: int = opt(0, "seed of the calibration draw and of the random criterion", type=int)
    batch_size: int = opt(1, "calibration batch size", type=int)
    max_length: int | None = opt(None, "truncate longer samples (never their image tokens)", type=int)
    tokens: str | None = opt(None, "positions the statistics use (default: the criterion's)", choices=TOKENS)

    def __post_init__(self):
        one_of("tokens", self.tokens, TOKENS)
        for name in ("num_samples", "batch_size", "max_length"):
            positive(name, getattr(self, name))
        positive("seed", self.seed, zero=True, allow_none=False)
        if self.image_folder and not self.path:
            raise VlmpruneError("--image-folder needs --calibration (the data whose images it holds)")


@checked
class PlanOptions:
    """What a prune removes, and how much (``vlmprune prune`` without ``--plan``)."""

    method: str | None = opt(None, "drop decoder layers, heads and MLP channels, or search the mix (auto)",
                             choices=PRUNE_METHODS)
    ratio: float | None = opt(None, "fraction of the WHOLE model's parameters to remove, in (0, 1)", type=float)
    target: str | None = opt(None, "instead of --ratio: params=0.7 (kept), params=1.5B, "
                                   "memory=2GB[,seq=4096,batch=1,dtype=bf16] (weights + KV cache), or "
                                   "latency=200ms[,seq=1024,batch=1] (prefill on this device)")
    criterion: str | None = opt(None, "a registered criterion (`vlmprune criteria` lists them); default: "
                                      "block_influence for layer, taylor for width (and for auto's width part)")
    layer_criterion: str | None = opt(None, "auto: the layer criterion of the depth part (default block_influence)")
    top_k: int = opt(1, "auto: also write the 2nd..k-th best candidates as OUTPUT-rank2 ... (recover each, pick after)",
                     type=int)
    stock: bool = opt(False, "only shapes the family's stock class can hold (the output loads with plain "
                             "from_pretrained, vLLM, ...): attention is left whole where its cut could not load, "
                             "else the prune is refused with the reason")

    def __post_init__(self):
        one_of("method", self.method, PRUNE_METHODS)
        if self.ratio is not None:
            check_ratio(self.ratio)
        if self.target is not None:
            parse_target(self.target)
        positive("top_k", self.top_k, allow_none=False)
        if self.top_k > 1 and self.method != "auto":
            raise VlmpruneError("--top-k applies to --method auto (its ranked candidates)")
        if self.layer_criterion is not None and self.method != "auto":
            raise VlmpruneError("--layer-criterion is the depth part of --method auto; with --method layer use "
                                "--criterion")

    @property
    def given(self) -> bool:
        """Whether anything of a fresh plan was asked for (a ``--plan`` file says all of it)."""
        return any(v is not None for v in (self.method, self.ratio, self.target))


@checked
class WidthOptions:
    """How a width cut shapes what stays (the study's ``width:`` section)."""

    attention: str = opt("groups", "width: drop whole kv groups, q heads inside every group, or leave attention alone",
                         choices=ATTENTION_MODES)
    mlp_multiple: int | None = opt(None, "kept MLP widths are multiples of this (default 64 for MLPs >= 4096, else 8)",
                                   type=int)
    layers: str | None = opt(None, "width: prune only layers START:END (python slice; gives non-uniform widths)")
    global_ranking: bool = opt(False, "width: rank structures across layers instead of the same widths in each",
                               flag="--global")

    def __post_init__(self):
        one_of("attention", self.attention, ATTENTION_MODES, allow_none=False)
        positive("mlp_multiple", self.mlp_multiple)
        parse_layer_range(self.layers)

    def changed(self) -> list[str]:
        """The flags set away from their defaults (refused by a layer cut)."""
        return [f.metadata.get("flag") or _flag(f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != f.default]


@checked
class CompensationOptions:
    """Update the kept weights to stand in for what a cut removes (the study's ``compensation:`` section)."""

    mode: str = opt("auto", "update the kept weights to stand in for what goes, from the calibration data: "
                            "ls (least squares into o_proj / down_proj, and a linear map for dropped layers; "
                            "no new parameter), bias (FLAP's mean into the consumer's bias), none (a plain cut), "
                            "auto (ls when --calibration is given, else none)",
                    choices=COMPENSATE_MODES, key="compensate")
    sequential: bool = opt(True, "compensate layer by layer on the states of the already cut and compensated "
                                 "layers, so errors do not compound (--no-compensate-sequential: every fit on the "
                                 "unpruned model's states)",
                           key="compensate_sequential")
    ridge: float = opt(1e-3, "ridge of the compensation fits, times the mean diagonal of the Gram matrix",
                       type=float, key="compensate_ridge")
    select: bool = opt(False, "with --compensate ls: within each layer, remove the heads / kv groups / MLP channels "
                              "whose loss the fit makes up best (greedy OBS on the consumer's Gram matrix); the "
                              "criterion still sets how many go in each layer", key="compensate_select")
    layers: str = opt("map", "with --compensate ls, what stands in for a run of dropped layers: map (a least-squares "
                             "linear map folded into the preceding MLP output), scale (the later layers' residual "
                             "writes divided by the run's median norm growth), map+scale", choices=COMPENSATE_LAYERS,
                      key="compensate_layers")

    def __post_init__(self):
        one_of("compensate", self.mode, COMPENSATE_MODES, allow_none=False)
        positive("compensate_ridge", self.ridge, allow_none=False, kind=float)
        one_of("compensate_layers", self.layers, COMPENSATE_LAYERS, allow_none=False)
        if self.select and self.mode not in ("ls", "auto"):
            raise VlmpruneError("--compensate-select chooses what the least-squares fit makes up best: add "
                                "--compensate ls")


@checked
class EvalOptions:
    """What an evaluation asks (the study's ``evaluation:`` section)."""

    tasks: str | list | None = opt(None, "comma-separated built-in tasks ('' for none; default: easyvqa,digits, "
                                         "or none when --lmms-tasks is given)")
    task_file: str | None = opt(None, "your own LLaVA-format test file (exact match; choice letters recognised)")
    lmms_tasks: str | list | None = opt(None, "comma-separated lmms-eval tasks (needs vlmprune[lmms]), e.g. "
                                              "mme,pope,gqa; packaged offline ones: " + ", ".join(LMMS_PACKAGED_TASKS))
    lmms_include: str | None = opt(None, "a folder of your own lmms-eval task YAMLs (e.g. over a save_to_disk data "
                                         "set); their !function entries run the folder's Python: trust it as you "
                                         "would --trust-remote-code")
    limit: int | None = opt(None, "a seeded subset of this many questions per task (lmms-eval tasks: the first N, "
                                  "packaged ones: the same seeded subset as the built-in task)", type=int)
    data_dir: str | None = opt(None, "where the built-in tasks' data lives (default: the user cache)")
    batch_size: int = opt(32, "questions per generation batch", type=int)
    max_new_tokens: int = opt(10, "answer length limit in tokens", type=int)

    def __post_init__(self):
        lmms = _task_list("lmms_tasks", self.lmms_tasks)
        object.__setattr__(self, "lmms_tasks", lmms)
        tasks = list(BUILTIN_TASKS) if self.tasks is None and not lmms else _task_list("tasks", self.tasks)
        object.__setattr__(self, "tasks", tasks)
        unknown = [t for t in self.tasks if t not in BUILTIN_TASKS]
        if unknown:
            raise VlmpruneError(f"unknown task(s) {unknown}; built-in tasks: {', '.join(BUILTIN_TASKS)} "
                                f"(or pass your own LLaVA-format test file with --task-file, or lmms-eval "
                                f"tasks with --lmms-tasks)")
        if len(set(lmms)) != len(lmms):
            raise VlmpruneError(f"--lmms-tasks names a task twice: {lmms}")
        if not self.tasks and not self.task_file and not self.lmms_tasks:
            raise VlmpruneError("nothing to evaluate: give --tasks, --task-file and/or --lmms-tasks")
        if self.lmms_include is not None and not self.lmms_tasks:
            raise VlmpruneError("--lmms-include adds task YAMLs for --lmms-tasks: name the tasks to run with "
                                "--lmms-tasks")
        for name in ("limit", "batch_size", "max_new_tokens"):
            positive(name, getattr(self, name), allow_none=name == "limit")


# ---------------------------------------------------------------------------------------------
# the stage configs


@checked
class InspectConfig:
    """``vlmprune inspect``: what a model is made of."""

    model: str | None = opt(None, "local directory or hub id", positional=True)
    json: bool = opt(False, "print JSON instead of tables")
    load: LoadOptions = group(LoadOptions, only=("trust_remote_code",))

    def __post_init__(self):
        need("model", self.model)


@checked
class PruneConfig:
    """``vlmprune prune``: calibrate, score, plan and cut (or apply a plan, or re-plan from saved scores)."""

    model: str | None = opt(None, "local directory or hub id")
    output: str | None = opt(None, "output directory (written whole at the end)")
    plan: str | None = opt(None, "pruning_plan.json to apply (indices of the input model)")
    scores: str | None = opt(None, "scores.json of an earlier prune of the same model: re-plan for --ratio "
                                   "without calibrating again")
    overwrite: bool = opt(False, "replace an existing output directory (only one vlmprune wrote)")
    planning: PlanOptions = group(PlanOptions)
    width: WidthOptions = group(WidthOptions)
    calibration: CalibrationOptions = group(CalibrationOptions)
    compensation: CompensationOptions = group(CompensationOptions)
    load: LoadOptions = group(LoadOptions)

    def __post_init__(self):
        need("model", self.model)
        need("output", self.output)
        p = self.planning
        if self.plan is not None:
            if p.given or self.scores is not None:
                raise VlmpruneError("give either --plan, or --method with --ratio/--target (optionally with --scores), "
                                    "not both: a plan already says what goes")
        else:
            if p.method is None and self.scores is None:
                raise VlmpruneError("vlmprune prune needs --plan PLAN.json, or --method layer|width with --ratio R")
            if (p.ratio is None) == (p.target is None):
                raise VlmpruneError("give one of --ratio (the fraction of the whole model's parameters to remove, "
                                    "e.g. 0.2) or --target (e.g. params=0.8 or memory=2GB)")
        dispatched = self.load.device_map is not None
        if dispatched and p.target is not None and parse_target(p.target).kind == "latency":
            raise VlmpruneError("a latency target times pruned copies of the model on one device; it cannot run on a "
                                "--device-map dispatched model: use a params or memory target there")
        if p.method == "auto" and dispatched:
            raise VlmpruneError("--method auto ranks candidates on pruned copies held in memory; it cannot run on a "
                                "--device-map dispatched model: choose --method layer or width there")
        if p.method == "auto" and (self.scores is not None or self.width.layers or self.width.global_ranking):
            raise VlmpruneError("--method auto searches depth x width over all layers: it takes no --scores, "
                                "--layers or --global")
        if p.method == "layer" and self.width.changed():
            raise VlmpruneError(f"{self.width.changed()[0]} applies to --method width only; --method layer drops "
                                f"whole layers")
        if self.compensation.mode == "auto":  # resolved here, so the run record and resolved config name it
            mode = "ls" if self.calibration.path else "none"
            if self.compensation.select and mode == "none":
                raise VlmpruneError("--compensate-select chooses what the least-squares fit makes up best, on "
                                    "calibration data: add --calibration DATA")
            object.__setattr__(self, "compensation", dataclasses.replace(self.compensation, mode=mode))
        if self.compensation.mode != "none" and not self.calibration.path:
            raise VlmpruneError(f"--compensate {self.compensation.mode} fits the kept weights on calibration data: "
                                f"add --calibration DATA (the plan or scores alone do not carry the activations)")

    def check_paths(self) -> None:
        """Inputs exist and the output may be written (before anything loads)."""
        from vlmprune.paths import check_model_source, check_output

        check_model_source(self.model)
        for name, file in (("plan", "pruning_plan.json"), ("scores", "scores.json")):
            value = getattr(self, name)
            if value is None or Path(value).is_file() or (name == "plan" and (Path(value) / file).is_file()):
                continue  # a plan's folder is read for its pruning_plan.json
            if Path(value).is_dir():
                raise VlmpruneError(f"{_flag(name)} {value} is a folder" + (
                    f"; give its {file}: {_flag(name)} {Path(value) / file}" if (Path(value) / file).is_file()
                    else f" without {file}: give the {file} file"))
            raise VlmpruneError(f"{_flag(name)} {value}: file not found")
        folder = self.calibration.image_folder
        if folder is not None and not Path(folder).is_dir():
            raise VlmpruneError(f"--image-folder {folder}: directory not found")
        check_device(self.load.device)
        check_output(self.output, self.inputs(), self.overwrite)

    def inputs(self) -> list[tuple[str, str | None]]:
        return [("input model", self.model), ("calibration data", self.calibration.path),
                ("image folder", self.calibration.image_folder), ("plan", self.plan), ("scores", self.scores)]


@checked
class EvalConfig:
    """``vlmprune evaluate``: exact-match tasks and efficiency measures."""

    model: str | None = opt(None, "model directory (pruned or not) or hub id")
    output: str | None = opt(None, "write the results JSON to this file")
    overwrite: bool = opt(False, "replace an existing --output file (only results vlmprune evaluate wrote)")
    efficiency: bool = opt(False, "add parameters, FLOPs per sample, prefill latency, decode speed, peak memory")
    evaluation: EvalOptions = group(EvalOptions)
    load: LoadOptions = group(LoadOptions, only=("dtype", "device"))

    def __post_init__(self):
        e = self.evaluation
        if self.efficiency and not e.tasks and not e.task_file:
            raise VlmpruneError("--efficiency measures a prompt of a built-in task or --task-file: give one of them")

    def check_paths(self, model: bool = True) -> None:
        from vlmprune.paths import check_model_source

        if model:
            need("model", self.model)
            check_model_source(self.model)
        check_device(self.load.device)
        e = self.evaluation
        if e.lmms_include is not None and not Path(e.lmms_include).is_dir():
            raise VlmpruneError(f"--lmms-include {e.lmms_include}: directory not found")
        if e.task_file is not None and not Path(e.task_file).is_file():
            raise VlmpruneError(f"--task-file {e.task_file}: file not found" if not Path(e.task_file).exists()
                                else f"--task-file {e.task_file} is a directory; give the JSON file of test records")
        stem = Path(e.task_file).stem if e.task_file is not None else None
        if stem is not None and stem in list(e.tasks) + list(e.lmms_tasks):
            raise VlmpruneError(f"--task-file {e.task_file} is reported under its file name, {stem!r}, which is "
                                f"also a task you asked for (--tasks {','.join(e.tasks)}"
                                f"{' --lmms-tasks ' + ','.join(e.lmms_tasks) if e.lmms_tasks else ''}): one "
                                f"would replace the other in the results. Rename the file (e.g. my-{stem}.json), or "
                                f"leave {stem} out of the tasks (--tasks '' for no built-in task)")


@checked
class QuantizeConfig:
    """``vlmprune quantize``: post-training quantization of the language model's decoder layers."""

    model: str | None = opt(None, "model directory (pruned or not) or hub id")
    # The names are vlmprune.quantize.SCHEMES (its registry); the runner checks them before anything loads.
    scheme: str | None = opt(None, "a quantization scheme: int8, int8-dynamic, nf4 (CPU) and int4 (CUDA + bfloat16) "
                                   "are built in (docs/quantize.md), more with vlmprune.register_scheme")
    output: str | None = opt(None, "output directory (written whole at the end)")
    overwrite: bool = opt(False, "replace an existing output directory (only one vlmprune wrote)")
    # where: the device defaults to cuda for int4, else cpu
    load: LoadOptions = group(LoadOptions, only=("dtype", "device", "trust_remote_code"))

    def __post_init__(self):
        need("model", self.model)
        need("output", self.output)
        need("scheme", self.scheme)


@checked
class ConvertConfig:
    """``vlmprune convert``: an original Bunny / Mini-InternVL-Chat checkpoint -> a native one."""

    family: str | None = opt(None, "bunny: BunnyPhiForCausalLM (Bunny-v1.0); internvl-chat: InternVLChatModel "
                                   "with Phi-3", flag="--from", choices=CONVERT_FAMILIES)
    source: str | None = opt(None, "local directory of the original checkpoint (its code is never run)",
                             positional=True)
    output: str | None = opt(None, "output directory")
    vision_tower: str | None = opt(None, "bunny: directory of the SigLIP tower config that mm_vision_tower names "
                                         "(default: that name, as a path or from the hub cache)")
    image_token_id: int | None = opt(None, "internvl-chat without tokenizer files: the <IMG_CONTEXT> id", type=int)
    overwrite: bool = opt(False, "replace an existing output directory (only one vlmprune wrote)")

    def __post_init__(self):
        one_of("from", self.family, CONVERT_FAMILIES, allow_none=False)
        need("source", self.source)
        need("output", self.output)


# vlmprune export --format gguf: numpy quantizers of the gguf package, and llama.cpp's K-quant mixes (its own
# kernels, from the xllamacpp runtime); the mixes llama.cpp quantizes only with an importance matrix are refused
GGUF_NUMPY_QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
GGUF_K_QUANTS = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
GGUF_IMATRIX_QUANTS = ("q2_k_s", "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs")


def refuse_imatrix_quant(quant: str | None) -> None:
    if quant in GGUF_IMATRIX_QUANTS:
        raise VlmpruneError(
            f"--quant {quant} needs an importance matrix (activation statistics from calibration text, llama.cpp's "
            f"`llama-imatrix`), which this export does not compute; pick one of {', '.join(GGUF_K_QUANTS)}, or export "
            f"--quant f16 and run `llama-quantize --imatrix imatrix.gguf model.gguf out.gguf {quant.upper()}`")
# vlmprune export --format executorch: the decoder's Linear weights as XNNPACK runs them (int8: 8-bit weights per
# channel, int4: 4-bit weights in groups of 32, both with int8 activations quantized per token at run time)
PTE_QUANTS = ("none", "int8", "int4")
PTE_DTYPES = ("float32", "bfloat16")
EXPORT_FORMATS = ("gguf", "executorch")


@checked
class ExportConfig:
    """``vlmprune export``: a (pruned) model as files an edge runtime runs: GGUF for llama.cpp (text model
    model.gguf + vision tower and projector mmproj.gguf), or one ExecuTorch program (model.pte: vision
    encoder, token embedding and text decoder, XNNPACK on CPU), checked against what the runtime can hold
    first and, for ExecuTorch, against the PyTorch model's logits before it is published."""

    model: str | None = opt(None, "model directory (pruned or not)", positional=True)
    format: str | None = opt("gguf", "gguf: llama.cpp / Ollama / LM Studio; executorch: one .pte for PyTorch's "
                                     "on-device runtime (XNNPACK)", choices=EXPORT_FORMATS)
    output: str | None = opt(None, "output directory (written whole at the end)")
    quant: str | None = opt(None, "gguf: weight type of the text model's matrices: f32, f16 (default), bf16, q8_0, "
                                  "q4_0 (numpy; rows that do not fill whole blocks fall back to f16 and are "
                                  "reported), or a llama.cpp K-quant mix: q4_k_m, q4_k_s, q5_k_m, q5_k_s, q6_k, "
                                  "q3_k_m, q3_k_s, q3_k_l, q2_k (llama.cpp's kernels from xllamacpp; rows that do "
                                  "not fill 256-blocks fall back per tensor, reported). executorch: none (default), "
                                  "int8 (8-bit weights per channel) or int4 (4-bit weights in groups of 32), both with "
                                  "dynamic int8 activations, on the language model's Linear layers",
                            choices=GGUF_NUMPY_QUANTS + GGUF_K_QUANTS + PTE_QUANTS)
    vision_quant: str | None = opt(None, "gguf: weight type of the mmproj (default: f16, or f32/bf16 with that "
                                         "--quant)", choices=GGUF_NUMPY_QUANTS)
    no_vision: bool = opt(False, "gguf: write the text model only (no mmproj)")
    dtype: str | None = opt(None, "executorch: float32 (default) or bfloat16 for the whole program",
                            choices=PTE_DTYPES)
    max_seq_len: int | None = opt(None, "executorch: the KV cache's length, prompt and answer together "
                                        "(default 1024, at most the model's max_position_embeddings)", type=int)
    image_size: int | None = opt(None, "executorch: the (square) image size the vision encoder is exported for "
                                       "(default: the processor's; Qwen2.5-VL: 448, a multiple of 28)", type=int)
    overwrite: bool = opt(False, "replace an existing output directory (only one vlmprune wrote)")
    load: LoadOptions = group(LoadOptions, only=("trust_remote_code",))

    def __post_init__(self):
        need("model", self.model)
        need("output", self.output)
        one_of("format", self.format, EXPORT_FORMATS, allow_none=False)
        if self.format == "gguf":
            refuse_imatrix_quant(self.quant)
            one_of("quant", self.quant, GGUF_NUMPY_QUANTS + GGUF_K_QUANTS)
            one_of("vision_quant", self.vision_quant, GGUF_NUMPY_QUANTS)
            for name in ("dtype", "max_seq_len", "image_size"):
                if getattr(self, name) is not None:
                    raise VlmpruneError(f"{_flag(name)} is an ExecuTorch option; with --format gguf the types are "
                                        f"set by --quant and --vision-quant")
        else:
            if self.quant is not None and self.quant not in PTE_QUANTS:
                raise VlmpruneError(f"--quant {self.quant} is a GGUF type; --format executorch takes "
                                    f"{', '.join(PTE_QUANTS)}")
            one_of("dtype", self.dtype, PTE_DTYPES)
            if self.vision_quant is not None or self.no_vision:
                raise VlmpruneError("--vision-quant and --no-vision are GGUF options; the ExecuTorch program always "
                                    "holds the vision encoder, in --dtype")
            positive("max_seq_len", self.max_seq_len)
            positive("image_size", self.image_size)


@checked
class DataConfig:
    """``vlmprune data``: write a demo data set in the LLaVA conversation format."""

    dataset: str | None = opt(None, " or ".join(DATASETS), positional=True, choices=DATASETS)
    output: str | None = opt(None, "output directory")
    limit: int | None = opt(None, "only the first N images per split", type=int)
    overwrite: bool = opt(False, "replace an existing output directory (only a data set vlmprune wrote)")

    def __post_init__(self):
        one_of("dataset", self.dataset, DATASETS, allow_none=False)
        need("output", self.output)
        positive("limit", self.limit)


@checked
class ReportConfig:
    """``vlmprune report``: aggregate a study run directory into tables and plots."""

    run: str | None = opt(None, "the study's run directory", positional=True)

    def __post_init__(self):
        need("run", self.run)
        if not Path(self.run).is_dir():
            raise VlmpruneError(f"run directory not found: {self.run}")


TRAIN_MODES = ("projector", "lm", "lora", "all")
MODALITY_GROUPING = ("auto", "on", "off")
# transformers.SchedulerType values (checked against transformers when a run starts)
REPORT_TO = ("none", "all", "tensorboard", "wandb", "mlflow", "comet_ml", "clearml", "dvclive", "trackio", "swanlab")


def parse_losses(spec: str | dict) -> dict[str, float]:
    """``"sft=1,hidden=0.5"`` (or a dict) -> ``{"sft": 1.0, "hidden": 0.5}``; unknown names, repeated names
    and weights that are negative or not finite are refused. Names are those of the loss registry
    (:func:`vlmprune.recover.losses.register_loss`), imported here, not when the CLI starts."""
    from vlmprune.recover.losses import get_loss

    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for part in str(spec).split(","):
            name, sep, weight = part.partition("=")
            if not sep:
                raise VlmpruneError(f"--loss entries are NAME=WEIGHT (e.g. sft=1,hidden=1), got {part!r}")
            items.append((name.strip(), weight.strip()))
    weights: dict[str, float] = {}
    seen = set()
    for name, weight in items:
        get_loss(name)  # unknown names are refused with the registered ones
        if name in seen:
            raise VlmpruneError(f"--loss names {name!r} twice; give each loss once (e.g. sft=1,hidden=1)")
        seen.add(name)
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise VlmpruneError(f"loss {name!r} has weight {weight!r}, not a number") from None
        if not math.isfinite(value) or value < 0:
            raise VlmpruneError(f"loss {name!r} has weight {value}; weights are finite numbers >= 0")
        if value > 0:
            weights[name] = value
    if not weights:
        raise VlmpruneError(f"--loss {spec!r} gives no loss a positive weight")
    return weights


@checked
class DataOptions:
    """The training data of a recovery, and how much of it."""

    path: str | None = opt(None, "LLaVA-format JSON/JSONL, a save_to_disk directory or a hub dataset id", key="data")
    image_folder: str | None = opt(None, "root of the relative image paths in --data")
    split: str = opt("train", "dataset split (HF datasets)")
    fraction: float | None = opt(None, "train on this fraction of the data, in (0, 1] (seeded, stratified by source)",
                                 type=float)
    num_samples: int | None = opt(None, "train on this many samples (seeded, stratified by source)", type=int)
    max_length: int | None = opt(None, "truncate longer samples (never their image tokens)", type=int)
    group_by_modality: str = opt("auto", "train every optimizer step on samples of one kind (all with images or "
                                         "all text-only): on, off, or auto (on where a DeepSpeed launch of 2+ "
                                         "processes needs it, on data that mixes the two)", choices=MODALITY_GROUPING)
    system_prompt: str | None = opt(None, "system message for samples without one")

    def __post_init__(self):
        one_of("group_by_modality", self.group_by_modality, MODALITY_GROUPING, allow_none=False)
        for name in ("num_samples", "max_length"):
            positive(name, getattr(self, name))
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise VlmpruneError(f"--fraction must be in (0, 1], got {self.fraction!r}")
        if self.fraction is not None and self.num_samples is not None:
            raise VlmpruneError("give either --fraction or --num-samples, not both")


@checked
class LossOptions:
    """What a recovery minimises: the weighted losses and their options."""

    loss: dict | str = opt(None, "weighted losses NAME=W,..., e.g. sft=1,hidden=1 (built in: sft, logits, hidden; "
                                 "more with vlmprune.recover.losses.register_loss)",
                           default_factory=lambda: {"sft": 1.0, "hidden": 1.0})
    temperature: float = opt(2.0, "logit KD temperature", type=float)
    kd_tokens: str = opt("answer", "positions of the logit KD", choices=("answer", "text"))
    hidden_layers: str | int = opt("all", "student layers of the hidden loss: all, last or i,j,...")
    hidden_tokens: str = opt("all", "real tokens the hidden loss counts", choices=("all", "text", "answer"))

    def __post_init__(self):
        object.__setattr__(self, "loss", parse_losses(self.loss))
        positive("temperature", self.temperature, allow_none=False, kind=float)
        one_of("kd_tokens", self.kd_tokens, ("answer", "text"), allow_none=False)
        one_of("hidden_tokens", self.hidden_tokens, ("all", "text", "answer"), allow_none=False)
        hidden = str(self.hidden_layers)
        if hidden not in ("all", "last") and not all(x.strip().lstrip("-").isdigit() for x in hidden.split(",")):
            raise VlmpruneError(f"--hidden-layers must be all, last or student layer indices i,j,..., got {hidden!r}")

    @property
    def teacher_losses(self) -> list[str]:
        """The losses that distil from a teacher."""
        from vlmprune.recover.losses import get_loss

        return sorted(name for name in self.loss if get_loss(name).needs_teacher)


@checked
class TrainableOptions:
    """What trains (the vision tower never does)."""

    train: str = opt("all", "what trains (the vision tower never does)", choices=TRAIN_MODES)
    lora_r: int = opt(16, "LoRA rank", type=int)
    lora_alpha: float = opt(32, "LoRA alpha", type=float)
    lora_dropout: float = opt(0.05, "LoRA dropout", type=float)

    def __post_init__(self):
        one_of("train", self.train, TRAIN_MODES, allow_none=False)
        positive("lora_r", self.lora_r, allow_none=False)
        positive("lora_alpha", self.lora_alpha, allow_none=False, kind=float)
        if not 0 <= self.lora_dropout < 1:
            raise VlmpruneError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout!r}")


@checked
class TrainingOptions:
    """The optimisation, passed to ``transformers.TrainingArguments`` under the same names (except
    ``gradient_checkpointing``, whose name there depends on the transformers version)."""

    learning_rate: float = opt(2e-5, "peak learning rate", type=float)
    num_train_epochs: float = opt(1.0, "epochs", type=float)
    max_steps: int = opt(-1, "optimizer steps; overrides epochs when > 0", type=int)
    per_device_train_batch_size: int = opt(1, "samples per process per micro-batch", type=int)
    gradient_accumulation_steps: int = opt(1, "micro-batches per optimizer step", type=int)
    warmup_steps: float = opt(0.0, "warmup steps, or a fraction of the run when < 1", type=float)
    weight_decay: float = opt(0.0, "AdamW weight decay", type=float)
    lr_scheduler_type: str = opt("cosine", "transformers scheduler name (linear, cosine, constant, ...)")
    seed: int = opt(0, "seed of the data subset, the data order and initialisation", type=int)
    bf16: bool = opt(False, "bfloat16 mixed precision (where the device supports it)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    logging_steps: int = opt(10, "log every N optimizer steps", type=int)
    save_steps: int = opt(200, "checkpoint every N optimizer steps", type=int)
    save_total_limit: int = opt(2, "checkpoints kept", type=int)
    report_to: str = opt("none", "none, tensorboard, wandb, mlflow, all (installed ones)")
    dataloader_num_workers: int = opt(0, "data loading worker processes", type=int)

    def __post_init__(self):
        for name in ("learning_rate", "num_train_epochs"):
            positive(name, getattr(self, name), allow_none=False, kind=float)
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps",
                     "save_total_limit"):
            positive(name, getattr(self, name), allow_none=False)
        for name in ("warmup_steps", "weight_decay"):
            positive(name, getattr(self, name), allow_none=False, zero=True, kind=float)
        positive("seed", self.seed, allow_none=False, zero=True)
        positive("dataloader_num_workers", self.dataloader_num_workers, allow_none=False, zero=True)
        if self.max_steps == 0 or self.max_steps < -1:
            raise VlmpruneError(f"--max-steps must be >= 1 (or -1: train --num-train-epochs), got {self.max_steps!r}")
        for r in str(self.report_to).split(","):
            one_of("report_to", r.strip(), REPORT_TO, allow_none=False)

    def arguments(self) -> dict[str, Any]:
        """The ``TrainingArguments`` of the same name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "gradient_checkpointing"}


@checked
class RecoverConfig:
    """``vlmprune recover``: train a pruned student on a seeded data subset (SFT and distillation)."""

    # what: models, output
    student: str | None = opt(None, "the pruned model directory")
    teacher: str | None = opt(None, "the unpruned model (needed by the logits and hidden losses; same tokenizer)")
    teacher_placement: str = opt("replicate", "where the teacher's weights live on each process: replicate (a "
                                              "full copy), shard (FSDP2 like the student; under "
                                              "configs/accelerate/fsdp.yaml only) or offload (kept on the CPU, or "
                                              "on disk with --teacher-offload-folder; each module's weights come "
                                              "to the device for its forward)", choices=TEACHER_PLACEMENTS)
    teacher_offload_folder: str | None = opt(None, "with --teacher-placement offload: offload the teacher to disk "
                                                   "in this folder (each process writes a temporary "
                                                   "vlmprune-teacher-* folder there, removed at the end) instead "
                                                   "of CPU memory")
    output: str | None = opt(None, "output directory (written at the end; checkpoints go to OUTPUT.checkpoints)")
    overwrite: bool = opt(False, "replace an existing output and discard earlier checkpoints")
    resume: bool = opt(False, "continue from the last complete checkpoint in OUTPUT.checkpoints")
    keep_checkpoints: bool = opt(False, "keep OUTPUT.checkpoints after success")
    data: DataOptions = group(DataOptions)
    objective: LossOptions = group(LossOptions)
    trainable: TrainableOptions = group(TrainableOptions)
    training: TrainingOptions = group(TrainingOptions)
    load: LoadOptions = group(LoadOptions, only=("trust_remote_code",))

    def __post_init__(self):
        for name, value in (("student", self.student), ("data", self.data.path), ("output", self.output)):
            need(name, value)
        distilled = self.objective.teacher_losses
        if distilled and not self.teacher:
            raise VlmpruneError(f"the losses {distilled} distil from a teacher: pass --teacher")
        one_of("teacher_placement", self.teacher_placement, TEACHER_PLACEMENTS, allow_none=False)
        if self.teacher_placement != "replicate" and not self.teacher:
            raise VlmpruneError(f"--teacher-placement {self.teacher_placement} places the distillation teacher: "
                                f"pass --teacher, or drop the option")
        if self.teacher_offload_folder is not None and self.teacher_placement != "offload":
            raise VlmpruneError("--teacher-offload-folder is where an offloaded teacher goes: add "
                                "--teacher-placement offload")
        if self.resume and self.overwrite:
            raise VlmpruneError("--resume continues a run and --overwrite starts over: give one")

    @property
    def checkpoint_dir(self) -> Path:
        """Where the Trainer keeps its periodic checkpoints (beside the output, which is written at the end)."""
        out = Path(self.output).resolve()
        return out.with_name(out.name + ".checkpoints")

    def check_paths(self) -> None:
        """Inputs exist, the output may be written, the scheduler is one transformers knows."""
        from transformers.trainer_utils import SchedulerType

        from vlmprune.paths import check_model_source, check_output

        check_model_source(self.student, "student")
        if self.teacher:
            check_model_source(self.teacher, "teacher")
        folder = self.data.image_folder
        if folder is not None and not Path(folder).is_dir():
            raise VlmpruneError(f"--image-folder {folder}: directory not found")
        one_of("lr_scheduler_type", self.training.lr_scheduler_type, [s.value for s in SchedulerType],
               allow_none=False)
        inputs = [("student", self.student), ("teacher", self.teacher), ("training data", self.data.path),
                  ("image folder", folder)]
        out = check_output(self.output, inputs, self.overwrite)
        if self.teacher_offload_folder is not None:
            folder = Path(self.teacher_offload_folder).expanduser().resolve()
            if folder.exists() and not folder.is_dir():
                raise VlmpruneError(f"--teacher-offload-folder {self.teacher_offload_folder} is a file: give a "
                                    f"directory (it is created if missing)")
            if folder.is_relative_to(out):
                raise VlmpruneError(f"--teacher-offload-folder {self.teacher_offload_folder} lies inside --output "
                                    f"{self.output}, which is written whole at the end: put the teacher's offload "
                                    f"folder elsewhere")

    def save(self, path: Path) -> None:
        path.write_text(to_yaml(self))


# ---------------------------------------------------------------------------------------------
# YAML + overrides + flags -> a config


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["evaluation.limit=100", "teacher=/m"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise VlmpruneError(f"overrides are key=value (dotted keys for nested options), got {item!r}")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise VlmpruneError(f"override {item!r} conflicts with another override of {part!r}")
        try:
            node[parts[-1]] = parse_yaml(raw, f"override {item!r}")
        except VlmpruneError as exc:
            if "is not valid YAML" not in str(exc):
                raise  # an alias bomb or a nesting past the limit: refused, not taken as text
            node[parts[-1]] = raw
    return out


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    if not Path(path).exists():
        raise VlmpruneError(f"config file not found: {path}")
    loaded = read_yaml_file(path)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise VlmpruneError(f"{path} must hold a mapping of option: value")
    return loaded


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = deep_merge(base[key], value)
        else:
            merged[key] = value
    return merged


def check_keys(values: dict, known, where: str) -> None:
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise VlmpruneError(f"unknown option(s) {', '.join(where + k for k in unknown)}; "
                            f"known{' under ' + where.rstrip('.') if where else ''}: {', '.join(sorted(known))}")


def grouped(cls, values: dict[str, Any]) -> dict[str, Any]:
    """Flat keys (``num_samples: 8``, as flags and ``--set`` give them) and group sections
    (``calibration: {num_samples: 8}``) -> the nested form of ``cls``'s fields. A key that names both a group and
    an option of it (``calibration``: the data, or the section) is the section when its value is a mapping.
    Unknown keys, and one option given both ways, are refused with the known ones."""
    known = options_of(cls)
    by_key = {o.key: o for o in known}
    sections = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("group") is not None}
    out: dict[str, Any] = {}
    where: dict[str, str] = {}

    def put(option: Option, value: Any, given_as: str) -> None:
        if option.path in where:
            raise VlmpruneError(f"option {option.key} is given twice (as {where[option.path]} and as {given_as}): "
                                f"give it once")
        where[option.path] = given_as
        if option.group is None:
            out[option.field.name] = value
        else:
            out.setdefault(option.group, {})[option.field.name] = value

    for key, value in values.items():
        if key in sections and (isinstance(value, dict) or dataclasses.is_dataclass(value)):
            if dataclasses.is_dataclass(value):
                value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            members = {o.field.name: o for o in known if o.group == key}
            check_keys(value, members, f"{key}.")
            for name, item in value.items():
                put(members[name], item, f"{key}.{name}")
        elif key in by_key:
            put(by_key[key], value, key)
        else:
            check_keys({key: value}, [*by_key, *sections], "")
    return out


def build(cls, values: dict[str, Any] | None = None, /, **options):
    """The config ``cls`` of flat keys and/or group sections (``values`` and keyword ``options``), with unknown
    keys named and every value type-checked; the one way a config is made from user input (CLI, YAML, the
    Python verbs' keyword options, the study's cells)."""
    nested = grouped(cls, {**(values or {}), **options})
    try:
        for name, section in list(nested.items()):
            sub = next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("group")
            if sub is not None:
                nested[name] = sub(**section)
        return cls(**nested)
    except TypeError as exc:
        raise VlmpruneError(f"bad option value: {exc}") from None


def add_arguments(parser: argparse.ArgumentParser, cls, overrides: bool = True) -> None:
    """Flags for every option of ``cls`` (its groups' included), plus ``--config`` and ``key=value`` overrides."""
    parser.set_defaults(config_class=cls)
    for option in options_of(cls):
        f, meta = option.field, option.field.metadata
        if not meta.get("cli", True):
            continue
        kwargs: dict[str, Any] = {"help": meta.get("help", ""), "default": argparse.SUPPRESS}
        if f.type in ("bool", bool):  # an option on by default is turned off by --no-FLAG
            kwargs["action"] = argparse.BooleanOptionalAction if f.default is True else "store_true"
        else:
            if meta.get("type"):
                kwargs["type"] = meta["type"]
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if f.default not in (None, dataclasses.MISSING) and not meta.get("positional"):
                kwargs["help"] += f" (default: {f.default})"
        if meta.get("positional"):
            kwargs.pop("default")
            kwargs["nargs"] = "?"
            parser.add_argument(option.key, **kwargs)
        else:
            parser.add_argument(meta.get("flag") or _flag(option.key), dest=option.key, **kwargs)
    parser.add_argument("--config", dest="config_file", metavar="YAML",
                        help="options from a YAML file (flat keys with _, or sections of the option groups); "
                             "overrides and flags win")
    if overrides:
        parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                            help="override an option, dotted for nested ones (repeatable; also as trailing KEY=VALUE)")


def resolve(cls, args: argparse.Namespace, extra: list[str] | None = None):
    """The config of one command line: YAML, then ``key=value`` overrides, then flags (each layer brought to
    the nested form first, so that a flag beats the same option in a YAML section)."""
    yaml_values = grouped(cls, read_yaml(getattr(args, "config_file", None)))
    overrides = parse_overrides(list(getattr(args, "overrides", None) or []) + list(extra or []))
    keys = {o.key for o in options_of(cls)}
    flags = {k: v for k, v in vars(args).items() if k in keys and v is not None}
    merged = deep_merge(deep_merge(yaml_values, grouped(cls, overrides)), grouped(cls, flags))
    return build(cls, merged)


def as_dict(config) -> dict[str, Any]:
    """A stage config as nested plain values: its own options, then one section per group holding the options
    the stage takes of it (what ``--config`` reads back to the same config)."""
    out: dict[str, Any] = {}
    for option in options_of(type(config)):
        if option.group is None:
            out[option.field.name] = getattr(config, option.field.name)
        else:
            out.setdefault(option.group, {})[option.field.name] = getattr(getattr(config, option.group),
                                                                            option.field.name)
    return out


def flat_dict(config) -> dict[str, Any]:
    """A stage config as ``{flat key: value}``, the keys users write as flags and flat YAML."""
    return {o.key: getattr(getattr(config, o.group) if o.group else config, o.field.name)
            for o in options_of(type(config))}


def to_yaml(config) -> str:
    return yaml.safe_dump(as_dict(config), sort_keys=False)


def load_stage_config(cls, path: str | Path | None = None, values: dict[str, Any] | None = None):
    """A stage config from a YAML file (optional) with ``values`` on top (None = not given)."""
    given = grouped(cls, {k: v for k, v in (values or {}).items() if v is not None})
    return build(cls, deep_merge(grouped(cls, read_yaml(path)), given))
