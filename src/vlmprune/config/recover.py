"""``vlmprune recover``'s config: its option groups (data, losses, what trains, the trainer) and
:class:`RecoverConfig`."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from vlmprune.config.checks import TEACHER_PLACEMENTS, need, one_of, positive
from vlmprune.config.fields import checked, group, opt
from vlmprune.config.groups import LoadOptions
from vlmprune.config.resolve import to_yaml
from vlmprune.errors import VlmpruneError

TRAIN_MODES = ("projector", "lm", "lora", "all")
MODALITY_GROUPING = ("auto", "on", "off")
# where the trainer reports (transformers' report_to integrations)
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
