"""How big things are: the stored bytes of a (quantized) tensor, and this process's resident memory
(current and peak RSS from ``/proc/self/status``, with ``getrusage`` where there is no ``/proc``).

One reader of memory for the whole package: :mod:`vlmprune.phases` (the prune command's cost record),
:mod:`vlmprune.evaluate.efficiency`, :mod:`vlmprune.quantize` and the benchmarks use it. Importing
this module imports no torch (the tensor helpers import it when called).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def status_kib(*keys: str) -> dict[str, int]:
    """The given fields of /proc/self/status, in KiB (missing ones left out)."""
    out = {}
    try:
        with open(_STATUS, "rb") as f:
            for line in f:
                name, _, value = line.partition(b":")
                key = name.decode()
                if key in keys:
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def peak_rss_kib() -> int | None:
    """The process's peak RSS since the last reset (VmHWM), or its lifetime peak from getrusage."""
    hwm = status_kib("VmHWM").get("VmHWM")
    if hwm is not None:
        return hwm
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):
        return None


def rss_kib() -> int | None:
    return status_kib("VmRSS").get("VmRSS")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def tensor_bytes(t: torch.Tensor) -> int:
    """Stored size of one tensor: a torchao tensor subclass is the sum of its inner tensors
    (int8/int4 data, scales, zero points); a bitsandbytes 4-bit parameter is its packed bytes plus
    the block scales kept in its ``quant_state``. ``numel * element_size`` would report the
    dequantized size for the first and miss the scales of the second."""
    import torch

    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if isinstance(getattr(t, n), torch.Tensor))
    total = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)
    while state is not None:  # nested: double quantization keeps the scales' own scales in state2
        total += sum(x.numel() * x.element_size() for x in (state.absmax, state.code) if x is not None)
        state = getattr(state, "state2", None)
    return total


def is_quantized_weight(t: torch.Tensor) -> bool:
    """True for a torchao tensor subclass or a bitsandbytes quantized parameter."""
    import torch

    return type(t) not in (torch.Tensor, torch.nn.Parameter)
