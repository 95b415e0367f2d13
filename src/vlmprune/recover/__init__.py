"""Recovery training of a pruned model: SFT and distillation from the unpruned teacher.

``recover`` loads on first use, so that the loss registry (``vlmprune.recover.losses``, which the
config reads to check ``--loss`` names) imports without the trainer and transformers.
"""

from __future__ import annotations

import importlib

__all__ = ["recover"]


def __getattr__(name: str):
    if name != "recover":
        raise AttributeError(f"module 'vlmprune.recover' has no attribute {name!r}")
    value = importlib.import_module("vlmprune.recover.run").recover
    globals()[name] = value
    return value
