"""Instruction data: reading LLaVA / HF-datasets conversations, seeded subsets, and collation."""

from vlmprune.data.collate import IGNORE_INDEX, Collator, image_token_id_of, token_masks
from vlmprune.data.records import Sample, open_image, read_samples, select

__all__ = [
    "IGNORE_INDEX",
    "Collator",
    "Sample",
    "image_token_id_of",
    "open_image",
    "read_samples",
    "select",
    "token_masks",
]
