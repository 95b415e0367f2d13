"""Option groups: the parts several commands (and the study's sections) share."""

from __future__ import annotations

import dataclasses
from typing import Any

from vlmprune.config.checks import (
    BUILTIN_TASKS,
    LMMS_PACKAGED_TASKS,
    check_ratio,
    flag_name,
    one_of,
    parse_device_map,
    parse_layer_range,
    parse_max_memory,
    parse_target,
    positive,
    task_list,
)
from vlmprune.config.fields import checked, opt
from vlmprune.errors import VlmpruneError
from vlmprune.vocab import (
    ATTENTION_MODES,
    COMPENSATE_LAYERS,
    COMPENSATE_MODES,
    DTYPES,
    PRUNE_METHODS,
    TOKENS,
)


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
        return [f.metadata.get("flag") or flag_name(f.name) for f in dataclasses.fields(self)
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
        lmms = task_list("lmms_tasks", self.lmms_tasks)
        object.__setattr__(self, "lmms_tasks", lmms)
        tasks = list(BUILTIN_TASKS) if self.tasks is None and not lmms else task_list("tasks", self.tasks)
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
