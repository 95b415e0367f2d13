"""Recovery under a launcher: FSDP2 on CPU processes, and the final model gathered from shards.

``accelerate launch --config_file configs/accelerate/fsdp.yaml`` on a machine without an
accelerator would silently train plain DDP: accelerate 1.x turns FSDP on only for GPU-like
distributed types, and CPU processes are ``MULTI_CPU``. Torch's FSDP2 (``fully_shard``) runs on
CPU over gloo, so :func:`enable_cpu_fsdp` makes the launcher's FSDP plugin take effect there too
(this is how the FSDP path is tested on a CPU machine, and what a CPU cluster gets).

Under FSDP the student's parameters are DTensor shards; the final model is gathered to the main
process as a full state dict (a collective: every process calls :func:`gathered_state_dict`) and
loaded into a fresh copy of the student built the same way (LoRA wrappers included), so the output
is the same plain ``save_pretrained`` directory as a single-process run writes.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from vlmprune.errors import VlmpruneError

log = logging.getLogger(__name__)

_PATCHED = "_vlmprune_cpu_fsdp"


def launcher_backend() -> str:
    """What the launcher asked for: ``fsdp``, ``deepspeed`` or ``plain`` (DDP or one process)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return "plain"


def enable_cpu_fsdp() -> None:
    """Let an FSDP launch config shard on CPU processes (gloo) instead of falling back to DDP.

    Only acts when the launcher asked for FSDP and this machine has no accelerator; idempotent.
    """
    if launcher_backend() != "fsdp" or torch.accelerator.is_available():
        return
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, _PATCHED, False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)

    setattr(__init__, _PATCHED, True)
    AcceleratorState.__init__ = __init__


def check_launch() -> None:
    """Refuse combinations that cannot work under the launcher's backend, before any model loads."""
    backend = launcher_backend()
    if backend == "deepspeed" and not torch.accelerator.is_available():
        raise VlmpruneError("DeepSpeed needs a GPU here (vlmprune's DeepSpeed configs are for GPUs; its CPU path "
                            "is untested); on a CPU machine use configs/accelerate/fsdp.yaml (FSDP2 over gloo) or "
                            "configs/accelerate/ddp.yaml")


def is_sharded(trainer) -> bool:
    """Whether the trained model's parameters are shards (FSDP, DeepSpeed ZeRO-3) that must be gathered."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    if getattr(trainer, "is_deepspeed_enabled", False):
        stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
        return stage == 3
    return False


def gathered_state_dict(trainer) -> dict[str, torch.Tensor] | None:
    """The full state dict of the trained model on the main process (None elsewhere); a collective.

    Under FSDP2 each sharded parameter is gathered in turn (``DTensor.full_tensor``) and only the
    main process keeps a CPU copy, so no process ever holds more than one extra whole tensor.
    (``get_model_state_dict`` of torch 2.13 returned some frozen parameters as shards after training.)
    """
    from torch.distributed.tensor import DTensor

    main = trainer.accelerator.is_main_process
    if not getattr(trainer, "is_fsdp_enabled", False):
        wrapped = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
        state = trainer.accelerator.get_state_dict(wrapped)
        return state if main else None
    out = {}
    for key, value in trainer.model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()
        if main:
            out[key] = value.detach().to("cpu", copy=True)
    return out if main else None


def load_gathered(fresh: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load a gathered state dict into a freshly built copy of the student; every weight must find its place."""
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    check_gathered_keys(fresh, missing, unexpected)
    return fresh


def check_gathered_keys(model: nn.Module, missing, unexpected) -> None:
    """Refuse a state dict that leaves weights unset or brings unknown ones (a tied output head may be absent)."""
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise VlmpruneError(f"the gathered weights do not match the student: missing {list(missing)[:5]}, "
                            f"unexpected {list(unexpected)[:5]}")


def _is_tied(model: nn.Module, key: str) -> bool:
    base = getattr(model, "get_base_model", lambda: model)()
    out = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    inp = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    return out is not None and inp is not None and out.weight is inp.weight and key.endswith("lm_head.weight")
