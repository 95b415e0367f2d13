"""``recover``: train a pruned student on a seeded data subset, then write it like every other stage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers.trainer import FSDP_MODEL_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from vlmprune import quiet
from vlmprune.adapters import get_adapter
from vlmprune.checkpoint import load, load_processor, save_model
from vlmprune.config import RESOLVED_CONFIG, RecoverConfig, flat_dict
from vlmprune.data import Collator, read_samples, select
from vlmprune.data.collate import warn_too_long
from vlmprune.errors import VlmpruneError
from vlmprune.paths import check_not_quantized, check_safetensors, claim_output
from vlmprune.planning.plan import PLAN_FILE, PruningPlan
from vlmprune.readers import read_json
from vlmprune.record import RecoveryRecord, RunRecord
from vlmprune.recover.distributed import (
    check_launch,
    enable_cpu_fsdp,
    end_with_launcher,
    gathered_state_dict,
    group_by_modality,
    is_sharded,
    launcher_backend,
    load_gathered,
    mixes_modalities,
    whole_weights,
)
from vlmprune.recover.losses import layer_map, reading
from vlmprune.recover.plots import plot_loss_curve
from vlmprune.recover.teacher import check_teacher_placement, host_bytes, place_teacher, resident_bytes
from vlmprune.recover.trainable import count_trainable, merged, set_trainable_
from vlmprune.recover.trainer import RecoveryTrainer
from vlmprune.summary import check_teacher

log = logging.getLogger(__name__)

SAMPLE_IDS = "sample_ids.json"
RUN_OPTIONS = "vlmprune_options.json"  # in each checkpoint: the options and samples it was trained with
# What --resume may change: where and how long it trains, how it logs and saves, where the teacher lives.
# Everything else (models, data, losses, what trains, learning rate, schedule, seed, ...) must match the
# checkpoint's, or the result would claim options it was not trained with.
RESUMABLE = ("output", "overwrite", "resume", "keep_checkpoints", "num_train_epochs", "max_steps", "logging_steps",
             "save_steps", "save_total_limit", "report_to", "dataloader_num_workers", "teacher_placement",
             "teacher_offload_folder", "gradient_checkpointing", "trust_remote_code")
_PATH_OPTIONS = ("student", "teacher", "data", "image_folder")
TRAINER_LOG = "trainer_log.json"
LOSS_CURVE = "loss_curve.png"

# transformers 5.24 renamed gradient_checkpointing* to activation_checkpointing* (old names warn).
_CHECKPOINTING = ("activation_checkpointing"
                  if "activation_checkpointing" in transformers.TrainingArguments.__dataclass_fields__
                  else "gradient_checkpointing")


def training_arguments(cfg: RecoverConfig) -> transformers.TrainingArguments:
    """The Trainer's arguments; creating them also sets up the process group under a launcher."""
    check_launch()
    check_teacher_placement(cfg.teacher_placement)  # e.g. shard outside FSDP: refused before anything loads
    enable_cpu_fsdp()  # an FSDP launch on CPU processes shards (FSDP2 over gloo) instead of falling back to DDP
    return transformers.TrainingArguments(
        output_dir=str(cfg.checkpoint_dir),
        **cfg.training.arguments(),
        **{_CHECKPOINTING: cfg.training.gradient_checkpointing,
           # Non-reentrant checkpointing keeps the layer outputs the hidden loss hooks attached to the graph.
           f"{_CHECKPOINTING}_kwargs": {"use_reentrant": False}},
        save_strategy="steps",
        logging_strategy="steps",
        logging_first_step=True,
        remove_unused_columns=False,  # the collator needs whole samples, not dataset columns
        # Without an accelerator, train on CPU processes (gloo) under `accelerate launch` too.
        use_cpu=not torch.accelerator.is_available(),
    )


def check_same_tokenizer(student_processor, teacher_processor, student: str, teacher: str) -> None:
    """Refuse a teacher whose tokenizer differs from the student's: their token positions would not line up."""
    s = getattr(student_processor, "tokenizer", student_processor)
    t = getattr(teacher_processor, "tokenizer", teacher_processor)
    if s.get_vocab() != t.get_vocab() or s.special_tokens_map != t.special_tokens_map:
        vocab_diff = len(set(s.get_vocab().items()) ^ set(t.get_vocab().items()))
        raise VlmpruneError(
            f"the teacher {teacher} and the student {student} have different tokenizers "
            f"({len(s.get_vocab())} vs {len(t.get_vocab())} tokens, {vocab_diff} entries differ; special tokens "
            f"{s.special_tokens_map} vs {t.special_tokens_map}); distillation needs the student's own unpruned model"
        )


def hidden_pairs(student: nn.Module, teacher: nn.Module, plan: PruningPlan | None, which: str = "all"):
    """Decoder-layer modules whose outputs the hidden loss compares: (student layers, teacher layers, index pairs)."""
    s_layers = get_adapter(student).layers(student)
    t_layers = get_adapter(teacher).layers(teacher)
    pairs = layer_map(len(s_layers), len(t_layers), plan, which)
    return [s_layers[j] for j, _ in pairs], [t_layers[i] for _, i in pairs], pairs


def _ids_digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def complete_checkpoints(directory: Path) -> list[Path]:
    """The Trainer checkpoints in ``directory`` that were written to the end, newest first.

    A kill while a checkpoint is written leaves a folder without its trainer state or with weights
    cut short; resuming from it would fail (or load garbage), so such folders are skipped.
    """
    found = []
    for path in directory.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        step = path.name.rsplit("-", 1)[-1]
        if not (path.is_dir() and step.isdigit()):
            continue
        problem = None
        try:
            read_json(path / "trainer_state.json")
            weights = list(path.glob("*.safetensors"))
            if not weights:
                problem = "no weights"
            for file in weights:
                check_safetensors(file)
            if launcher_backend() != "deepspeed" and not any((path / f).is_file()
                                                             for f in ("optimizer.pt", "optimizer.bin")):
                problem = "no optimizer state"
            fsdp_weights = path / f"{FSDP_MODEL_NAME}.bin"
            if launcher_backend() == "fsdp" and not (fsdp_weights.is_file() and zipfile.is_zipfile(fsdp_weights)):
                problem = f"no complete {fsdp_weights.name} (the FSDP shards resume from it)"
        except (OSError, ValueError, VlmpruneError) as exc:
            problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not problem and launcher_backend() == "deepspeed":
            problem = _deepspeed_checkpoint_problem(path)  # raises for a launch of another size
        if problem:
            log.warning("vlmprune recover: skipping incomplete checkpoint %s (%s)", path, problem)
            continue
        found.append((int(step), path))
    return [path for _, path in sorted(found, reverse=True)]


def _deepspeed_checkpoint_problem(path: Path) -> str | None:
    """What is missing from a DeepSpeed checkpoint (None: complete), or an error if it cannot resume here.

    DeepSpeed writes ``global_step<N>/`` with the model states and one optimizer-state file per
    process, then the file ``latest`` naming that folder. Its ZeRO shards resume only on the number of
    processes that wrote them.
    """
    latest = path / "latest"
    if not latest.is_file():
        return "no 'latest' file (DeepSpeed writes it last)"
    tag = path / latest.read_text().strip()
    models = list(tag.glob("*model_states.pt")) if tag.is_dir() else []
    optims = list(tag.glob("*optim_states.pt")) if tag.is_dir() else []
    if not models or not optims:
        return f"no DeepSpeed model and optimizer states in {tag.name}"
    for file in models + optims:
        if not zipfile.is_zipfile(file):
            return f"{file.name} is cut short"
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if len(optims) != processes:
        raise VlmpruneError(f"{path} was written by {len(optims)} DeepSpeed processes and this launch has {processes}: "
                            f"ZeRO optimizer shards resume only on as many processes as wrote them; launch with "
                            f"--num_processes {len(optims)}, or pass --overwrite to start over")
    return None


def _prepare_checkpoints(cfg: RecoverConfig, is_main: bool) -> Path | None:
    """The checkpoint to resume from (None: start fresh), after refusing what is in the way."""
    ckpt = cfg.checkpoint_dir
    if not ckpt.is_dir():
        if cfg.resume and is_main:
            log.warning("vlmprune recover: --resume found no checkpoint in %s; starting from the beginning", ckpt)
        return None
    if cfg.overwrite:
        if is_main:
            shutil.rmtree(ckpt)
        return None
    complete = complete_checkpoints(ckpt)
    if not cfg.resume:
        if complete or any(ckpt.glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
            raise VlmpruneError(f"{ckpt} holds checkpoints of an earlier run: pass --resume to continue it "
                                f"or --overwrite to start over")
        return None
    if not complete:
        if is_main:
            log.warning("vlmprune recover: --resume found no complete checkpoint in %s; starting from the beginning",
                        ckpt)
        return None
    check_pickled_state(complete[0])
    return complete[0]


def check_pickled_state(checkpoint: Path) -> None:
    """Refuse a checkpoint whose optimizer, scheduler or RNG state holds more than tensors and plain values.

    The Trainer reads these ``torch.save`` files with ``weights_only=True``, which refuses any other object
    (code to run, in a tampered file) with an unpickling error; they are read here the same way first
    (memory-mapped, so the optimizer state costs no copy) so that the refusal names the file.
    """
    from transformers.trainer_pt_utils import safe_globals

    for file in sorted(p for p in checkpoint.iterdir() if p.suffix in (".pt", ".pth") and p.is_file()):
        try:
            with safe_globals():
                torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - unpickling errors of every kind: the file is refused by name
            named = re.search(r"unsupported (global|operand)[^\n]*", str(exc), re.IGNORECASE)  # what torch refused
            reason = named.group(0).rstrip(". ") if named else type(exc).__name__
            raise VlmpruneError(f"{file} holds something other than training state ({reason}); vlmprune never "
                                f"unpickles objects from a checkpoint. It was not written by vlmprune recover: remove "
                                f"{checkpoint} (or the whole {checkpoint.parent}) and run again") from None


def run_options(cfg: RecoverConfig, ids: list[str]) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: the options outside :data:`RESUMABLE` (local paths
    resolved) and the digest of the samples chosen."""
    options = {k: v for k, v in flat_dict(cfg).items() if k not in RESUMABLE}
    for key in _PATH_OPTIONS:
        if options.get(key) and Path(options[key]).expanduser().exists():
            options[key] = str(Path(options[key]).expanduser().resolve())
    return {**json.loads(json.dumps(options)), "samples": _ids_digest(ids)}


def check_resumable(checkpoint: Path, cfg: RecoverConfig, ids: list[str]) -> None:
    """Refuse to resume ``checkpoint`` with options other than those it was trained with, naming the difference."""
    saved = checkpoint / RUN_OPTIONS
    if not saved.is_file():
        log.warning("vlmprune recover: %s records no options (an older vlmprune wrote it); resuming without "
                    "checking that they match", checkpoint)
        return
    try:
        earlier = read_json(saved)
    except VlmpruneError as exc:
        raise VlmpruneError(f"{exc}: pass --overwrite to start over") from None
    if not isinstance(earlier, dict):
        raise VlmpruneError(f"{saved} does not hold a run's options: pass --overwrite to start over")
    now = run_options(cfg, ids)
    changed = [f"{key}: {earlier.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(earlier) | set(now))
               if earlier.get(key) != now.get(key)]
    if changed:
        names = "; ".join(c if not c.startswith("samples:") else "the training samples (data or selection differ)"
                          for c in changed)
        raise VlmpruneError(f"--resume would continue {checkpoint} with other options than it was trained with: "
                            f"{names}. Only {', '.join(RESUMABLE[3:])} may change on resume; give the earlier "
                            f"values, or pass --overwrite to start over")


class _RecordOptions(transformers.TrainerCallback):
    """Write the run's options into every checkpoint, so that a resume can be checked against them."""

    def __init__(self, options: dict[str, Any]):
        self.options = options

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            (folder / RUN_OPTIONS).write_text(json.dumps(self.options, indent=1))
        return control


def _finished_at(checkpoint: Path | None, cfg: RecoverConfig) -> bool:
    """Whether ``checkpoint`` already holds this run's last step (a kill during the final write)."""
    if checkpoint is None:
        return False
    state = read_json(checkpoint / "trainer_state.json")
    target = cfg.training.max_steps if cfg.training.max_steps > 0 else state.get("max_steps", 0)
    return 0 < target <= state.get("global_step", -1)


def _build_student(cfg: RecoverConfig) -> nn.Module:
    """The student as training sees it before the first step (LoRA-wrapped for ``--train lora``)."""
    with whole_weights():
        student = load(cfg.student, dtype=torch.float32, trust_remote_code=cfg.load.trust_remote_code)
    t = cfg.trainable
    return set_trainable_(student, t.train, t.lora_r, t.lora_alpha, t.lora_dropout)


def _final_model(trainer: RecoveryTrainer, cfg: RecoverConfig, is_main: bool) -> nn.Module | None:
    """The trained plain model (LoRA merged) on the main process, None elsewhere.

    Sharded training (FSDP, ZeRO-3) holds no whole weight anywhere: every process takes part in
    gathering the full state dict, which the main process loads into a fresh copy of the student.
    """
    if not is_sharded(trainer) or not _is_wrapped(trainer):
        return merged(trainer.accelerator.unwrap_model(trainer.model)) if is_main else None
    state = gathered_state_dict(trainer)
    if not is_main:
        return None
    return merged(load_gathered(_build_student(cfg), state))


def _is_wrapped(trainer: RecoveryTrainer) -> bool:
    """Whether the Trainer sharded the model (it does so in ``train``; not when the last checkpoint is the result)."""
    from torch.distributed.fsdp import FSDPModule

    model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
    return isinstance(model, FSDPModule) or type(model).__name__ == "DeepSpeedEngine"


def recover(cfg: RecoverConfig, callbacks: list[transformers.TrainerCallback] | None = None) -> Path:
    """Train ``cfg.student`` as configured and write it to ``cfg.output``; return the output path.

    The output holds the model (safetensors, plain ``from_pretrained``), the student's processor
    files, its ``pruning_plan.json``, its ``run.json`` with a ``recovery`` record appended, ``sample_ids.json``,
    ``resolved_config.yaml``, ``trainer_log.json`` and ``loss_curve.png``. Checkpoints go to
    ``<output>.checkpoints`` (removed at the end unless ``keep_checkpoints``). ``callbacks``
    are extra Trainer callbacks.
    """
    cfg.check_paths()  # every input, the output and the scheduler name, before anything starts
    check_not_quantized(cfg.student, "recover", "student")
    end_with_launcher()
    args = training_arguments(cfg)
    state = args.distributed_state
    with contextlib.ExitStack() as stack:
        stack.enter_context(quiet.deepspeed_only_if_in_use())  # DeepSpeed is imported only by a DeepSpeed launch
        if state.is_main_process:  # one writer per output for the whole run
            inputs = [("student", cfg.student), ("teacher", cfg.teacher), ("training data", cfg.data.path),
                      ("image folder", cfg.data.image_folder)]
            stack.enter_context(claim_output(cfg.output, inputs, cfg.overwrite))
        return _recover(cfg, args, state, callbacks, stack)


@dataclass
class _Run:
    """What the steps of one recovery pass along."""

    cfg: RecoverConfig
    args: transformers.TrainingArguments
    state: Any
    resume: Path | None = None
    samples: list = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    grouped: bool = False
    processor: Any = None
    plan: PruningPlan | None = None
    record: RunRecord = field(default_factory=RunRecord)
    teacher: nn.Module | None = None
    student: nn.Module | None = None
    student_layers: list = field(default_factory=list)
    teacher_layers: list = field(default_factory=list)
    teacher_bytes: list[int] | None = None
    teacher_host: int | None = None
    trainer: RecoveryTrainer | None = None

    def info(self, message: str, *args) -> None:
        if self.state.is_main_process:
            log.info(message, *args)


def _recover(cfg: RecoverConfig, args, state, callbacks, cleanup: contextlib.ExitStack) -> Path:
    """The recovery, step by step: checkpoints and data; the models (checked); the hidden-state layer pairs; the
    teacher's placement; the trainer; training (or a finished checkpoint taken as is); the output."""
    run = _Run(cfg, args, state)
    _prepare(run)
    _load_models(run)
    _pair_layers(run)
    _place_teacher(run, cleanup)
    _build_trainer(run, callbacks)
    _train_or_finish(run)
    return _write(run)


def _prepare(run: _Run) -> None:
    """Checkpoints to resume from, then the data: a bad fraction or an empty subset fails before any model loads."""
    cfg, state, args = run.cfg, run.state, run.args
    run.resume = _prepare_checkpoints(cfg, state.is_main_process)
    if run.resume is not None:
        run.info("vlmprune recover: resuming from %s", run.resume)
    state.wait_for_everyone()
    run.samples = select(read_samples(cfg.data.path, cfg.data.image_folder, split=cfg.data.split),
                         num_samples=cfg.data.num_samples, fraction=cfg.data.fraction, seed=cfg.training.seed)
    run.ids = [s.id for s in run.samples]
    if run.resume is not None:
        check_resumable(run.resume, cfg, run.ids)
    from accelerate.utils import gather_object

    if len(set(gather_object([_ids_digest(run.ids)]))) > 1:
        raise VlmpruneError("the processes of this run chose different samples; the data differs between them")
    run.grouped = group_by_modality(run.samples, state.num_processes, cfg.data.group_by_modality)
    if run.grouped:
        run.info("vlmprune recover: every optimizer step trains on samples of one kind (with images or text-only)")
    if mixes_modalities(run.samples) and args.ddp_find_unused_parameters is None:
        # A text-only micro-batch leaves the projector unused. Under DDP with activation checkpointing the
        # Trainer would tell DDP that every parameter is used, and the processes would wait for each other
        # forever; non-reentrant checkpointing works with unused-parameter detection.
        args.ddp_find_unused_parameters = True


def _load_models(run: _Run) -> None:
    """The processor, the student's plan and record, the teacher (checked against the record's source) and
    the student (checked against the teacher's vocabulary when the logits are distilled)."""
    cfg = run.cfg
    run.processor = load_processor(cfg.student, cfg.load.trust_remote_code)
    plan_path = Path(cfg.student) / PLAN_FILE
    run.plan = PruningPlan.load(plan_path) if plan_path.is_file() else None
    run.record = RunRecord.load(cfg.student, missing_ok=True)
    if cfg.teacher:
        check_same_tokenizer(run.processor, load_processor(cfg.teacher, cfg.load.trust_remote_code), cfg.student,
                             cfg.teacher)
        with whole_weights():  # a ZeRO-3 launch would load it as empty shards no engine gathers
            run.teacher = load(cfg.teacher, dtype=torch.bfloat16 if cfg.training.bf16 else torch.float32,
                               trust_remote_code=cfg.load.trust_remote_code)
        if run.record.prune is not None and run.record.prune.source is not None:
            check_teacher(run.teacher, run.record.prune.source, cfg.teacher)
    with whole_weights():  # counted, wrapped and paired below; DeepSpeed partitions it when the Trainer prepares it
        run.student = load(cfg.student, dtype=torch.float32, trust_remote_code=cfg.load.trust_remote_code)
    compared = reading(cfg.objective.loss, "logits", teacher=True)
    if run.teacher is not None and compared:
        s_vocab = run.student.get_output_embeddings().weight.shape[0]
        t_vocab = run.teacher.get_output_embeddings().weight.shape[0]
        if s_vocab != t_vocab:
            raise VlmpruneError(f"the {compared[0]} loss compares vocabularies, but the student has {s_vocab:,} output "
                                f"tokens and the teacher {t_vocab:,}: distil from the student's own unpruned model, "
                                f"or drop the {compared[0]} loss")


def _pair_layers(run: _Run) -> None:
    """Hidden-state distillation: which student layer learns which teacher layer (from the plan)."""
    if reading(run.cfg.objective.loss, "hidden_states"):
        run.student_layers, run.teacher_layers, pairs = hidden_pairs(run.student, run.teacher, run.plan,
                                                                     run.cfg.objective.hidden_layers)
        run.info("vlmprune recover: hidden-state pairs (student layer, teacher layer): %s", pairs)


def _place_teacher(run: _Run, cleanup: contextlib.ExitStack) -> None:
    """After the checks and the layer pairs (the same modules, whatever the placement)."""
    if run.teacher is None:
        return
    from accelerate.utils import gather_object

    cfg = run.cfg
    run.teacher = place_teacher(run.teacher, cfg.teacher_placement, run.args.device,
                                offload_folder=cfg.teacher_offload_folder, cleanup=cleanup)
    run.teacher_bytes = gather_object([resident_bytes(run.teacher)])  # one entry per process, in rank order
    run.teacher_host = host_bytes(run.teacher)
    run.info("vlmprune recover: teacher placement %s: %s bytes held per process (%s in a host copy)",
             cfg.teacher_placement, ", ".join(f"{b:,}" for b in run.teacher_bytes), f"{run.teacher_host:,}")


def _build_trainer(run: _Run, callbacks) -> None:
    """The trainable student (LoRA or not), the collator and the RecoveryTrainer."""
    cfg, student = run.cfg, run.student
    # LoRA's initial weights are random: seed them so that every process (FSDP shards each process's
    # own copy) and a single-process run of the same seed start from the same adapters.
    transformers.set_seed(cfg.training.seed)
    t = cfg.trainable
    model = set_trainable_(student, t.train, t.lora_r, t.lora_alpha, t.lora_dropout)
    trainable, total = count_trainable(model)
    run.info("vlmprune recover: training %r: %s of %s parameters (%.2f%%); %d samples; losses %s", cfg.trainable.train,
             f"{trainable:,}", f"{total:,}", 100 * trainable / total, len(run.samples), cfg.objective.loss)
    collator = Collator(run.processor, max_length=cfg.data.max_length, system_prompt=cfg.data.system_prompt)
    if run.state.is_main_process:
        warn_too_long(collator, run.samples, student.config, "training")
    if launcher_backend() == "fsdp":
        # Shard by the language model's decoder layers only: the vision tower's layers (in the model's
        # _no_split_modules too) are skipped by text-only batches, and a unit one process skips while
        # the other gathers it breaks FSDP's collectives. The frozen tower stays in the root unit.
        os.environ.setdefault("FSDP_TRANSFORMER_CLS_TO_WRAP", type(get_adapter(student).layers(student)[0]).__name__)
    run.trainer = RecoveryTrainer(
        model=model, args=run.args, train_dataset=run.samples, data_collator=collator,
        callbacks=[*(callbacks or []), _RecordOptions(run_options(cfg, run.ids))],
        teacher=run.teacher, weights=cfg.objective.loss, image_token_id=collator.image_token_id, options=cfg.objective,
        student_layers=run.student_layers, teacher_layers=run.teacher_layers, group_by_modality=run.grouped,
    )


def _train_or_finish(run: _Run) -> None:
    """Train (resuming where a checkpoint says), or take a checkpoint of the run's last step as the result."""
    trainer, resume = run.trainer, run.resume
    if _finished_at(resume, run.cfg):
        # The Trainer would run one step past the end from here; the checkpoint already is the result.
        run.info("vlmprune recover: %s is the run's last step; writing it without training further", resume)
        if trainer.is_fsdp_enabled:  # the model is not sharded yet: its full weights are the checkpoint's safetensors
            from safetensors.torch import load_file

            load_gathered(trainer.model, load_file(str(resume / "model.safetensors")))
        else:
            trainer._load_from_checkpoint(str(resume))
        trainer.state = transformers.TrainerState.load_from_json(str(resume / "trainer_state.json"))
        return
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except ValueError as e:
        if "DeepSpeed config values that mismatch" not in str(e):
            raise
        # a launch config that fixes a value vlmprune recover's options also set (accumulation, clipping)
        raise VlmpruneError(f"{e}\nThe DeepSpeed config of this launch fixes values that vlmprune recover's "
                            f"options set: remove those keys or set them to auto (as "
                            f"configs/accelerate/deepspeed_zero*.yaml do)") from None


def _write(run: _Run) -> Path:
    """The model, its plan, the student's record with this recovery appended, the sample ids, the config,
    the trainer's log and the loss curve (one writer: the main process)."""
    cfg, state, trainer = run.cfg, run.state, run.trainer
    out = Path(cfg.output).resolve()
    final = _final_model(trainer, cfg, state.is_main_process)  # a collective under FSDP / ZeRO-3
    if state.is_main_process:
        history = trainer.state.log_history
        losses = [entry["loss"] for entry in history if "loss" in entry]
        teacher = run.teacher is not None
        hidden_layers = cfg.objective.hidden_layers if reading(cfg.objective.loss, "hidden_states") else None
        entry = RecoveryRecord(losses=cfg.objective.loss, train=cfg.trainable.train, fraction=cfg.data.fraction,
                               num_samples=len(run.samples),
                               steps=trainer.state.global_step, final_loss=losses[-1] if losses else None,
                               teacher=cfg.teacher, hidden_layers=hidden_layers,
                               teacher_placement=cfg.teacher_placement if teacher else None,
                               teacher_bytes_per_process=run.teacher_bytes, teacher_host_bytes=run.teacher_host)
        run.record.recovery.append(entry)
        plan = run.plan or PruningPlan()

        def extras(directory: Path) -> None:
            (directory / SAMPLE_IDS).write_text(json.dumps(
                {"seed": cfg.training.seed, "fraction": cfg.data.fraction, "num_samples": cfg.data.num_samples,
                 "processes_checked": state.num_processes, "ids": run.ids}, indent=1))
            cfg.save(directory / RESOLVED_CONFIG)
            (directory / TRAINER_LOG).write_text(json.dumps(history, indent=1))
            plot_loss_curve(history, directory / LOSS_CURVE)
            run.record.save(directory)

        save_model(final, out, plan=PruningPlan(plan.drop_layers, plan.layers), source=cfg.student,
                   overwrite=cfg.overwrite, extras=extras)
        if not cfg.keep_checkpoints:
            shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)
        log.info("vlmprune recover: %d steps, final loss %s -> %s", trainer.state.global_step, entry.final_loss, out)
    state.wait_for_everyone()
    return out
