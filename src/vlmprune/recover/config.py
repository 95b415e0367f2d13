"""The recovery config: one dataclass, read from YAML, overridden by command-line flags, saved resolved."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlmprune.errors import VlmpruneError
from vlmprune.recover.losses import parse_losses
from vlmprune.recover.trainable import TRAIN_MODES

RESOLVED_CONFIG = "resolved_config.yaml"


@dataclass
class RecoverConfig:
    """Everything ``vlmprune recover`` needs. Field names are the flags' (``--kd-tokens`` -> kd_tokens)."""

    # what: models, data, output
    student: str | None = None
    teacher: str | None = None
    data: str | None = None
    image_folder: str | None = None
    split: str = "train"
    output: str | None = None
    overwrite: bool = False
    resume: bool = False
    keep_checkpoints: bool = False  # keep <output>.checkpoints after success (deleted by default)
    trust_remote_code: bool = False
    # losses
    loss: dict[str, float] = field(default_factory=lambda: {"sft": 1.0, "hidden": 1.0})
    temperature: float = 2.0
    kd_tokens: str = "answer"  # answer | text
    hidden_layers: str = "all"  # all | last | i,j,... (student layer indices)
    hidden_tokens: str = "all"  # all | text | answer: which real tokens the hidden loss counts
    # what trains
    train: str = "all"  # projector | lm | lora | all
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # data fraction and collation
    fraction: float | None = None
    num_samples: int | None = None
    max_length: int | None = None
    system_prompt: str | None = None
    # training (passed to transformers.TrainingArguments under the same names)
    learning_rate: float = 2e-5
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    warmup_steps: float = 0.0  # a step count, or a fraction of the run when < 1
    weight_decay: float = 0.0
    lr_scheduler_type: str = "cosine"
    seed: int = 0
    bf16: bool = False
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    save_steps: int = 200
    save_total_limit: int = 2
    report_to: str = "none"  # none | tensorboard | wandb | mlflow | all (installed ones)
    dataloader_num_workers: int = 0

    def __post_init__(self):
        self.loss = parse_losses(self.loss)

    def validate(self) -> "RecoverConfig":
        """Check values that need no model or data; return self."""
        for name in ("student", "data", "output"):
            if not getattr(self, name):
                raise VlmpruneError(f"vlmprune recover needs --{name.replace('_', '-')}")
        if set(self.loss) & {"logits", "hidden"} and not self.teacher:
            raise VlmpruneError(f"the losses {sorted(set(self.loss) - {'sft'})} distil from a teacher: pass --teacher")
        choices = {"kd_tokens": ("answer", "text"), "hidden_tokens": ("all", "text", "answer"), "train": TRAIN_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise VlmpruneError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.temperature <= 0:
            raise VlmpruneError(f"--temperature must be > 0, got {self.temperature}")
        if self.fraction is not None and self.num_samples is not None:
            raise VlmpruneError("give either --fraction or --num-samples, not both")
        if self.resume and self.overwrite:
            raise VlmpruneError("--resume continues a run and --overwrite starts over: give one")
        return self

    @property
    def checkpoint_dir(self) -> Path:
        """Where the Trainer keeps its periodic checkpoints (beside the output, which is written at the end)."""
        out = Path(self.output).resolve()
        return out.with_name(out.name + ".checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RecoverConfig:
    """The YAML at ``path`` (if any) with ``overrides`` (flag values, None = not given) on top, validated."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError:
            raise VlmpruneError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise VlmpruneError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise VlmpruneError(f"{path} must hold a mapping of option: value")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in dataclasses.fields(RecoverConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise VlmpruneError(f"unknown recover option(s) {unknown}; known: {', '.join(sorted(known))}")
    return RecoverConfig(**values).validate()
