"""Recovery training of a pruned model: SFT and distillation from the unpruned teacher."""

from vlmprune.recover.run import recover

__all__ = ["recover"]
