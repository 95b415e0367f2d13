"""``recover``: train a pruned student on a seeded data subset, then write it like every other stage."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers.trainer_utils import get_last_checkpoint

from vlmprune.adapters import get_adapter
from vlmprune.data import Collator, read_samples, select
from vlmprune.errors import VlmpruneError
from vlmprune.io import load, save_model
from vlmprune.plan import PLAN_FILE, PruningPlan
from vlmprune.recover.config import RESOLVED_CONFIG, RecoverConfig
from vlmprune.recover.losses import layer_map
from vlmprune.recover.plots import plot_loss_curve
from vlmprune.recover.trainable import count_trainable, merged, set_trainable_
from vlmprune.recover.trainer import RecoveryTrainer

SAMPLE_IDS = "sample_ids.json"
TRAINER_LOG = "trainer_log.json"
LOSS_CURVE = "loss_curve.png"

# RecoverConfig fields that are TrainingArguments of the same name.
_TRAINING_FIELDS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                    "gradient_accumulation_steps", "warmup_steps", "weight_decay", "lr_scheduler_type", "seed",
                    "bf16", "logging_steps", "save_steps", "save_total_limit",
                    "report_to", "dataloader_num_workers")


# transformers 5.24 renamed gradient_checkpointing* to activation_checkpointing* (old names warn).
_CHECKPOINTING = ("activation_checkpointing" if "activation_checkpointing" in transformers.TrainingArguments.__dataclass_fields__
                  else "gradient_checkpointing")


def training_arguments(cfg: RecoverConfig) -> transformers.TrainingArguments:
    """The Trainer's arguments; creating them also sets up the process group under a launcher."""
    return transformers.TrainingArguments(
        output_dir=str(cfg.checkpoint_dir),
        **{name: getattr(cfg, name) for name in _TRAINING_FIELDS},
        **{_CHECKPOINTING: cfg.gradient_checkpointing,
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


def _check_output(cfg: RecoverConfig, is_main: bool) -> None:
    """Fail before any training when the output or the checkpoints are in the way."""
    out = Path(cfg.output)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise VlmpruneError(f"output directory {out} exists and is not empty; choose another or pass --overwrite")
    ckpt = cfg.checkpoint_dir
    if ckpt.is_dir() and get_last_checkpoint(str(ckpt)):
        if cfg.overwrite and is_main:
            shutil.rmtree(ckpt)
        elif not cfg.resume and not cfg.overwrite:
            raise VlmpruneError(f"{ckpt} holds checkpoints of an earlier run: pass --resume to continue it "
                                f"or --overwrite to start over")


def recover(cfg: RecoverConfig, callbacks: list[transformers.TrainerCallback] | None = None) -> Path:
    """Train ``cfg.student`` as configured and write it to ``cfg.output``; return the output path.

    The output holds the model (safetensors, plain ``from_pretrained``), the student's processor
    files, its ``pruning_plan.json`` with a ``recovery`` record appended, ``sample_ids.json``,
    ``resolved_config.yaml``, ``trainer_log.json`` and ``loss_curve.png``. Checkpoints go to
    ``<output>.checkpoints`` (removed at the end unless ``keep_checkpoints``). ``callbacks``
    are extra Trainer callbacks.
    """
    from vlmprune.io import load_processor

    cfg.validate()
    args = training_arguments(cfg)
    state = args.distributed_state
    _check_output(cfg, state.is_main_process)
    state.wait_for_everyone()

    # Data first: a bad fraction or an empty subset fails before any model loads.
    samples = select(read_samples(cfg.data, cfg.image_folder, split=cfg.split),
                     num_samples=cfg.num_samples, fraction=cfg.fraction, seed=cfg.seed)
    ids = [s.id for s in samples]
    from accelerate.utils import gather_object

    if len(set(gather_object([_ids_digest(ids)]))) > 1:
        raise VlmpruneError("the processes of this run chose different samples; the data differs between them")

    processor = load_processor(cfg.student, cfg.trust_remote_code)
    teacher = None
    if cfg.teacher:
        check_same_tokenizer(processor, load_processor(cfg.teacher, cfg.trust_remote_code), cfg.student, cfg.teacher)
        teacher = load(cfg.teacher, dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
                       trust_remote_code=cfg.trust_remote_code)
    student = load(cfg.student, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code)
    plan_path = Path(cfg.student) / PLAN_FILE
    plan = PruningPlan.load(plan_path) if plan_path.is_file() else None

    student_layers, teacher_layers = [], []
    if "hidden" in cfg.loss:
        student_layers, teacher_layers, pairs = hidden_pairs(student, teacher, plan, cfg.hidden_layers)
        if state.is_main_process:
            print(f"vlmprune recover: hidden-state pairs (student layer, teacher layer): {pairs}", flush=True)

    model = set_trainable_(student, cfg.train, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    trainable, total = count_trainable(model)
    if state.is_main_process:
        print(f"vlmprune recover: training {cfg.train!r}: {trainable:,} of {total:,} parameters "
              f"({trainable / total:.2%}); {len(samples)} samples; losses {cfg.loss}", flush=True)

    collator = Collator(processor, max_length=cfg.max_length, system_prompt=cfg.system_prompt)
    trainer = RecoveryTrainer(
        model=model, args=args, train_dataset=samples, data_collator=collator, callbacks=callbacks,
        teacher=teacher, weights=cfg.loss, image_token_id=collator.image_token_id, temperature=cfg.temperature,
        kd_tokens=cfg.kd_tokens, student_layers=student_layers, teacher_layers=teacher_layers,
        hidden_tokens=cfg.hidden_tokens,
    )
    resume = get_last_checkpoint(str(cfg.checkpoint_dir)) if cfg.resume and cfg.checkpoint_dir.is_dir() else None
    if cfg.resume and resume is None and state.is_main_process:
        print(f"vlmprune recover: --resume found no checkpoint in {cfg.checkpoint_dir}; starting from the beginning")
    trainer.train(resume_from_checkpoint=resume)

    out = Path(cfg.output).resolve()
    if state.is_main_process:
        history = trainer.state.log_history
        losses = [entry["loss"] for entry in history if "loss" in entry]
        record = {"losses": cfg.loss, "train": cfg.train, "fraction": cfg.fraction, "num_samples": len(samples),
                  "steps": trainer.state.global_step, "final_loss": losses[-1] if losses else None,
                  "teacher": cfg.teacher, "hidden_layers": cfg.hidden_layers if "hidden" in cfg.loss else None}
        plan = plan or PruningPlan()
        plan.extra.setdefault("recovery", []).append(record)

        def extras(directory: Path) -> None:
            (directory / SAMPLE_IDS).write_text(json.dumps(
                {"seed": cfg.seed, "fraction": cfg.fraction, "num_samples": cfg.num_samples,
                 "processes_checked": state.num_processes, "ids": ids}, indent=1))
            cfg.save(directory / RESOLVED_CONFIG)
            (directory / TRAINER_LOG).write_text(json.dumps(history, indent=1))
            plot_loss_curve(history, directory / LOSS_CURVE)

        save_model(merged(trainer.model), out, plan=plan, source=cfg.student, overwrite=cfg.overwrite,
                   extras=extras)
        if not cfg.keep_checkpoints:
            shutil.rmtree(cfg.checkpoint_dir, ignore_errors=True)
        print(f"vlmprune recover: {trainer.state.global_step} steps, final loss {record['final_loss']} -> {out}")
    state.wait_for_everyone()
    return out
