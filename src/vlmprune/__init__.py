"""vlmprune: structural pruning and cheap recovery of vision-language models."""

__version__ = "0.1.0"
