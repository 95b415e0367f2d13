"""The stage configs: one frozen dataclass per command (recovery's in :mod:`vlmprune.config.recover`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vlmprune.config.checks import check_device, flag_name, need, one_of, parse_target, positive
from vlmprune.config.fields import checked, group, opt
from vlmprune.config.groups import (
    CalibrationOptions,
    CompensationOptions,
    EvalOptions,
    LoadOptions,
    PlanOptions,
    WidthOptions,
)
from vlmprune.errors import VlmpruneError
from vlmprune.vocab import (
    CONVERT_FAMILIES,
    DATASETS,
)


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
                raise VlmpruneError(f"{flag_name(name)} {value} is a folder" + (
                    f"; give its {file}: {flag_name(name)} {Path(value) / file}" if (Path(value) / file).is_file()
                    else f" without {file}: give the {file} file"))
            raise VlmpruneError(f"{flag_name(name)} {value}: file not found")
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
    dtype: str | None = opt(None, "executorch: float32 (default) or bfloat16 for the language model (the vision "
                                  "side stays float32)", choices=PTE_DTYPES)
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
                    raise VlmpruneError(f"{flag_name(name)} is an ExecuTorch option; with --format gguf the types are "
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
