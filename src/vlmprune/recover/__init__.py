"""Recovery training of a pruned model: SFT and distillation from the unpruned teacher."""

from vlmprune.recover.config import RecoverConfig, load_config
from vlmprune.recover.run import recover

__all__ = ["RecoverConfig", "load_config", "recover"]
