"""Third-party messages a vlmprune command cannot avoid, dropped on the logger that emits them.

A command prints only its own progress and results. Most third-party noise is avoided at its cause
(an optional backend is not imported where the command does not use it: see
``checkpoint._deepspeed_only_if_in_use``). What is left comes from imports that transformers makes
whenever a package is installed: those messages are listed below, each with the reason it says
nothing to a vlmprune user, and each is matched exactly on its own logger. Nothing else is silenced:
no logging level is raised and no warnings filter is set. Torch-free, so the CLI may call it early.
"""

from __future__ import annotations

import logging
from collections.abc import Callable


def _torchao_kernel_library(record: logging.LogRecord) -> bool:
    # torchao (vlmprune[quantize]) loads its compiled kernel libraries at import and logs one warning per
    # library this machine cannot load (_C_mxfp8*.so and _C_cutlass_90a*.so are built for CUDA sm90a).
    # transformers imports torchao on every model load when it is installed, so every command printed them;
    # no vlmprune scheme uses those kernels (vlmprune.quantize.SCHEMES), and a scheme that lacks its kernel
    # fails with its own error.
    message = record.getMessage()
    return message.startswith("Failed to load ") and "/torchao/_C" in message and ".so" in message


def _torchao_enum_constant(record: logging.LogRecord) -> bool:
    # torch deprecates pytree register_constant() on Enum subclasses, and torchao 0.18 still calls it at import for
    # its KernelPreference and ScaleCalculationMode enums: a note to torchao's authors, printed on every model load.
    return (isinstance(record.msg, str) and record.msg.startswith("%s is an Enum subclass and is now natively")
            and isinstance(record.args, tuple) and len(record.args) == 1
            and getattr(record.args[0], "__module__", "").startswith("torchao."))


class _Drop(logging.Filter):
    def __init__(self, matches: Callable[[logging.LogRecord], bool]):
        super().__init__()
        self.matches = matches

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.matches(record)


# the logger each message is emitted on (a logger's own filters see only its own records: nothing else is touched)
FILTERS = {
    "torchao": _Drop(_torchao_kernel_library),
    "torch.utils._pytree": _Drop(_torchao_enum_constant),
}


def install() -> None:
    """Add the filters (idempotent); call before the libraries are imported, since they log at import."""
    for name, drop in FILTERS.items():
        logger = logging.getLogger(name)
        if drop not in logger.filters:
            logger.addFilter(drop)
