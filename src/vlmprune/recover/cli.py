"""``vlmprune recover``: flags over an optional YAML config, then a call into :func:`vlmprune.recover.recover`.

Until the main CLI registers this subcommand, ``python -m vlmprune.recover.cli recover ...``
runs it with the same flags (under ``accelerate launch -m`` too).
"""

from __future__ import annotations

import argparse
import sys

from vlmprune.errors import VlmpruneError
from vlmprune.recover.config import RecoverConfig
from vlmprune.recover.losses import LOSSES
from vlmprune.recover.trainable import TRAIN_MODES

_DEFAULTS = RecoverConfig()


def _flag(parser, name: str, help: str, **kwargs) -> None:
    """A flag for config field ``name``; unset flags stay out of the namespace so the YAML value wins."""
    default = getattr(_DEFAULTS, name)
    if kwargs.get("action") != "store_true":
        help = f"{help} (default: {default})"
    parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=argparse.SUPPRESS, help=help, **kwargs)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``recover`` on an ``add_subparsers()`` object; return its parser."""
    p = subparsers.add_parser("recover", help="recover a pruned model's quality: SFT and distillation",
                              description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML file of options (the names below, with _); flags override it")
    _flag(p, "student", "the pruned model directory")
    _flag(p, "teacher", "the unpruned model (needed by the logits and hidden losses; same tokenizer)")
    _flag(p, "data", "LLaVA-format JSON/JSONL, a save_to_disk directory or a hub dataset id")
    _flag(p, "image_folder", "root of the relative image paths in --data")
    _flag(p, "split", "dataset split (HF datasets)")
    _flag(p, "output", "output directory (written at the end; checkpoints go to OUTPUT.checkpoints)")
    _flag(p, "overwrite", "replace an existing output and discard earlier checkpoints", action="store_true")
    _flag(p, "resume", "continue from the last checkpoint in OUTPUT.checkpoints", action="store_true")
    _flag(p, "keep_checkpoints", "keep OUTPUT.checkpoints after success", action="store_true")
    _flag(p, "trust_remote_code", "run the model repo's own code", action="store_true")
    _flag(p, "loss", f"weighted losses NAME=W,... with NAME in {', '.join(LOSSES)}, e.g. sft=1,hidden=1")
    _flag(p, "temperature", "logit KD temperature", type=float)
    _flag(p, "kd_tokens", "positions of the logit KD", choices=["answer", "text"])
    _flag(p, "hidden_layers", "student layers of the hidden loss: all, last or i,j,...")
    _flag(p, "hidden_tokens", "real tokens the hidden loss counts", choices=["all", "text", "answer"])
    _flag(p, "train", "what trains (the vision tower never does)", choices=list(TRAIN_MODES))
    _flag(p, "lora_r", "LoRA rank", type=int)
    _flag(p, "lora_alpha", "LoRA alpha", type=int)
    _flag(p, "lora_dropout", "LoRA dropout", type=float)
    _flag(p, "fraction", "train on this fraction of the data, in (0, 1] (seeded, stratified by source)", type=float)
    _flag(p, "num_samples", "train on this many samples (seeded, stratified by source)", type=int)
    _flag(p, "max_length", "truncate longer samples (never their image tokens)", type=int)
    _flag(p, "system_prompt", "system message for samples without one")
    _flag(p, "learning_rate", "peak learning rate", type=float)
    _flag(p, "num_train_epochs", "epochs", type=float)
    _flag(p, "max_steps", "optimizer steps; overrides epochs when > 0", type=int)
    _flag(p, "per_device_train_batch_size", "samples per process per micro-batch", type=int)
    _flag(p, "gradient_accumulation_steps", "micro-batches per optimizer step", type=int)
    _flag(p, "warmup_steps", "warmup steps, or a fraction of the run when < 1", type=float)
    _flag(p, "weight_decay", "AdamW weight decay", type=float)
    _flag(p, "lr_scheduler_type", "transformers scheduler name")
    _flag(p, "seed", "seed of the data subset, the data order and initialisation", type=int)
    _flag(p, "bf16", "bfloat16 mixed precision (where the device supports it)", action="store_true")
    _flag(p, "gradient_checkpointing", "recompute activations in backward to save memory", action="store_true")
    _flag(p, "logging_steps", "log every N optimizer steps", type=int)
    _flag(p, "save_steps", "checkpoint every N optimizer steps", type=int)
    _flag(p, "save_total_limit", "checkpoints kept", type=int)
    _flag(p, "report_to", "none, tensorboard, wandb, mlflow, all (installed ones)")
    _flag(p, "dataloader_num_workers", "data loading worker processes", type=int)
    p.set_defaults(func=cmd_recover)
    return p


def cmd_recover(args: argparse.Namespace) -> None:
    """Resolve the config (YAML, then flags) and run recovery."""
    from vlmprune.recover import load_config, recover

    overrides = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    recover(load_config(args.config, overrides))


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point with the same flags as ``vlmprune recover``."""
    parser = argparse.ArgumentParser(prog="vlmprune")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except VlmpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
