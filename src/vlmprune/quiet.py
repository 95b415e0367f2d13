"""Third-party messages a vlmprune command cannot avoid, dropped on the logger that emits them.

A command prints only its own progress and results. Third-party noise is avoided at its cause where
vlmprune can: an optional backend is not imported where the command does not use it (see
:func:`deepspeed_only_if_in_use`). What is left comes from imports that transformers and peft
make whenever a package is installed: those messages are listed below, each with the reason it says
nothing to a vlmprune user, and each is matched exactly on its own logger. Nothing else is silenced:
no logging level is raised and no warnings filter is set. Imports nothing heavy (accelerate only
inside :func:`deepspeed_only_if_in_use`): the package's ``__init__`` installs the filters before any
module of it imports torch or transformers.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator


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


def _bitsandbytes_hub_kernel(record: logging.LogRecord) -> bool:
    # bitsandbytes (vlmprune[quantize]) asks the `kernels` package at import, on CPUs with AVX512-BF16, for a 4-bit
    # matmul kernel from the hub, and logs a warning when it cannot have it; it then runs its own CPU kernel, the
    # one vlmprune's nf4 checks are made with (tests/test_quantize.py). peft imports bitsandbytes whenever it is
    # installed, so every recovery printed it, whether or not anything is quantized.
    return isinstance(record.msg, str) and record.msg.startswith(
        "Failed to load CPU gemm_4bit_forward from kernels-community")


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
    "bitsandbytes.backends.cpu.ops": _Drop(_bitsandbytes_hub_kernel),
}


def install() -> None:
    """Add the filters (idempotent); call before the libraries are imported, since they log at import."""
    for name, drop in FILTERS.items():
        logger = logging.getLogger(name)
        if drop not in logger.filters:
            logger.addFilter(drop)


@contextlib.contextmanager
def deepspeed_only_if_in_use() -> Iterator[None]:
    """Keep accelerate from importing DeepSpeed where nothing in this process uses it.

    ``save_pretrained`` and the Trainer unwrap a model through accelerate's ``extract_model_from_parallel``,
    which imports DeepSpeed whenever it is installed, only to test whether the model is a ``DeepSpeedEngine``.
    That import took 0.2-0.8 s on this project's shared VM (after torch and transformers) and printed
    DeepSpeed's "Setting accelerator to CPU" on stdout in every prune, quantize and recovery. A model can
    be a ``DeepSpeedEngine`` only where DeepSpeed is imported already (a recovery launched with a DeepSpeed
    config imports it when accelerate sets up), so inside this block accelerate looks DeepSpeed up exactly
    there, at each call. Where this accelerate does not look it up that way, everything goes on as
    accelerate does it.
    """
    try:
        import accelerate.utils.other as other
    except ImportError:
        yield
        return
    original = getattr(other, "is_deepspeed_available", None)
    if original is None or "deepspeed" in sys.modules:
        yield
        return
    other.is_deepspeed_available = lambda: "deepspeed" in sys.modules and original()
    try:
        yield
    finally:
        other.is_deepspeed_available = original


@contextlib.contextmanager
def native_stderr(passthrough: bool = False) -> Iterator[list[str]]:
    """What C/C++ code writes to file descriptor 2 inside the block, held back (Python's own ``sys.stderr``
    writes are flushed first and are not held): yields a list that holds the text after the block, so a
    caller can put it into the error it raises when the native call fails. ExecuTorch's XNNPACK backend
    prints cpuinfo's probing of ARM-only files ("[cpuinfo_utils.cpp:71] Reading file
    /sys/devices/soc0/image_version", five lines) whenever it loads a program on x86, which says nothing to a
    user. ``passthrough``: hold nothing (vlmprune logging at DEBUG)."""
    import os
    import tempfile

    held: list[str] = []
    if passthrough:
        yield held
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield held
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            held.append(sink.read().decode(errors="replace"))
