"""Tiny teacher/student directories and data for the recovery tests."""

from __future__ import annotations

import copy
from pathlib import Path

import transformers
from tiny_data import tiny_llava_processor, write_llava_dataset
from tiny_models import _config_llava_llama_gqa, build_tiny

import vlmprune

FAMILY = "llava_llama_gqa"


def build_tiny_deep(num_layers: int = 6, seed: int = 0):
    """The tiny LLaVA (Llama, GQA) with ``num_layers`` decoder layers."""
    import torch

    config = _config_llava_llama_gqa()
    config.text_config.num_hidden_layers = num_layers
    torch.manual_seed(seed)
    return transformers.LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def write_pair(root: Path, drop_layers=(1, 3), num_layers: int = 4, seed: int = 0) -> tuple[Path, Path]:
    """Save a teacher (tiny LLaVA + processor) and a student pruned from it by ``drop_layers``."""
    root = Path(root)
    teacher = build_tiny(FAMILY, seed=seed) if num_layers == 4 else build_tiny_deep(num_layers, seed)
    processor = tiny_llava_processor()
    teacher_dir = vlmprune.save_model(teacher, root / "teacher", processor=processor)
    plan = vlmprune.PruningPlan(drop_layers=list(drop_layers))
    student = vlmprune.apply_plan_(copy.deepcopy(teacher), plan)
    student_dir = vlmprune.save_model(student, root / "student", plan=plan, source=teacher_dir)
    return teacher_dir, student_dir


def write_data(root: Path, n: int = 12) -> tuple[Path, Path]:
    """A LLaVA JSON of ``n`` records (three image sources, one text-only record) and its image folder."""
    return write_llava_dataset(Path(root), n), Path(root) / "images"
