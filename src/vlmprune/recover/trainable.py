"""What recovery trains: the projector, the language model, LoRA on it, or all but the vision tower.

The vision tower is frozen in every mode. LoRA goes through peft, with target modules restricted
by a regex to the language model's decoder layers: vision towers have q/k/v projections too
(DESIGN.md, Pitfalls), and a bare name list would put adapters there.
"""

from __future__ import annotations

import re

from torch import nn

from vlmprune.adapters import get_adapter
from vlmprune.config import TRAIN_MODES
from vlmprune.errors import VlmpruneError


def lora_target_regex(model: nn.Module) -> str:
    """A regex that peft full-matches against module names: every Linear in the language model's layers."""
    adapter = get_adapter(model)
    leaves = sorted({name.rsplit(".", 1)[-1] for name, module in adapter.layers(model).named_modules()
                     if isinstance(module, nn.Linear)})
    return rf"{re.escape(adapter.parts.language_model)}\.layers\.\d+\.(?:.+\.)?(?:{'|'.join(map(re.escape, leaves))})"


def set_trainable_(model: nn.Module, mode: str, lora_r: int = 16, lora_alpha: int = 32,
                   lora_dropout: float = 0.05) -> nn.Module:
    """Set ``requires_grad`` for ``mode``; return the model to train (a peft model for ``lora``).

    ``projector``: the projector only. ``lm``: the language model and its output head.
    ``lora``: LoRA adapters on the language model's linear layers, with the projector fully
    trained alongside (as a peft ``modules_to_save``, so checkpoints carry it). ``all``:
    everything except the vision tower.
    """
    if mode not in TRAIN_MODES:
        raise VlmpruneError(f"--train must be one of {', '.join(TRAIN_MODES)}, got {mode!r}")
    adapter = get_adapter(model)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                            target_modules=lora_target_regex(model),
                            modules_to_save=[adapter.parts.projector])
        return get_peft_model(model, config)  # freezes everything but the adapters and modules_to_save
    model.requires_grad_(mode == "all")
    if mode == "lm":
        adapter.language_model(model).requires_grad_(True)
        model.get_output_embeddings().requires_grad_(True)
    adapter.vision(model).requires_grad_(False)
    if mode in ("projector", "all"):  # after the vision tower: Qwen's projector lives inside it
        adapter.projector(model).requires_grad_(True)
    return model


def count_trainable(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    unique = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique)


def merged(model: nn.Module) -> nn.Module:
    """The plain model to save: LoRA merged into the base weights, peft wrappers removed."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model
