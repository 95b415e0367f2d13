"""Recovery under a launcher: FSDP2 on CPU processes, DeepSpeed, and the final model gathered from shards.

``accelerate launch --config_file configs/accelerate/fsdp.yaml`` on a machine without an
accelerator would silently train plain DDP: accelerate 1.x turns FSDP on only for GPU-like
distributed types, and CPU processes are ``MULTI_CPU``. Torch's FSDP2 (``fully_shard``) runs on
CPU over gloo, so :func:`enable_cpu_fsdp` makes the launcher's FSDP plugin take effect there too
(this is how the FSDP path is tested on a CPU machine, and what a CPU cluster gets).

Under FSDP the student's parameters are DTensor shards; the final model is gathered to the main
process as a full state dict (a collective: every process calls :func:`gathered_state_dict`) and
loaded into a fresh copy of the student built the same way (LoRA wrappers included), so the output
is the same plain ``save_pretrained`` directory as a single-process run writes.

DeepSpeed (ZeRO-1/2/3) runs on CPU processes as it is: deepspeed picks its CPU accelerator and
gloo. Models load whole under it (:func:`whole_weights`); on data that mixes image and text-only
samples every step trains on one kind (:func:`group_by_modality`, :class:`ModalityGroupedSampler`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import sys

import torch
from torch import nn

from vlmprune.errors import VlmpruneError

log = logging.getLogger(__name__)

_PATCHED = "_vlmprune_cpu_fsdp"


def end_with_launcher() -> None:
    """Under a launcher, end this worker when the launcher dies (Linux: the parent-death signal).

    A launcher killed outright (SIGKILL, an out-of-memory kill) cannot stop its workers: they went on
    training and writing checkpoints into the run's checkpoint folder, where a ``--resume`` of the same
    run then writes too. With this each worker gets SIGTERM when its parent, the launcher, is gone.
    """
    if os.environ.get("LOCAL_RANK") is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the launcher died before the call: nobody is left to signal us
        os.kill(os.getpid(), signal.SIGTERM)


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
    if launcher_backend() == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise VlmpruneError("the launch config asks for DeepSpeed, which is not installed: pip install "
                            "'vlmprune[deepspeed]' (it builds a small C++ op on first use, so a compiler is needed), "
                            "or launch with configs/accelerate/fsdp.yaml (FSDP2, no extra package)")


def zero_stage() -> int | None:
    """The DeepSpeed ZeRO stage the launcher asked for (None outside DeepSpeed)."""
    if launcher_backend() != "deepspeed":
        return None
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))


def mixes_modalities(samples) -> bool:
    """Whether ``samples`` hold both samples with images and text-only ones."""
    return len({bool(s.images) for s in samples}) == 2


def group_by_modality(samples, num_processes: int, choice: str = "auto") -> bool:
    """Whether every optimizer step must train on samples of one kind (all with images, or all
    text-only); refuses, before any model loads, what cannot train.

    A process whose micro-batch has no image skips the vision tower and projector while another
    runs them. ZeRO-3 gathers a module's weight shards with a collective when the module runs, so
    the processes' collectives stop matching (training hangs; deepspeedai/DeepSpeed#7170). ZeRO-1/2
    reduce gradients in buckets filled in the order gradients arrive: the projector's gradients are
    missing on one process (gloo aborts), and if they are made up (zeros) they arrive at another
    point of the backward and are summed with other weights' gradients (measured: a step with the
    text-only sample moved the weights 1e-3 away from one process's, silently). With every step of
    one kind (:class:`ModalityGroupedSampler`) all processes run the same modules. FSDP2 and DDP
    train on mixed steps (FSDP2 reduces zeros for unused weights; DDP looks for unused parameters).

    ``choice``: ``on`` / ``off``, or ``auto``: on for DeepSpeed with 2+ processes on mixed data.
    """
    needed = mixes_modalities(samples) and zero_stage() is not None and num_processes >= 2
    if choice == "off" and needed:
        with_images = sum(bool(s.images) for s in samples)
        raise VlmpruneError(
            f"DeepSpeed ZeRO-{zero_stage()} cannot train steps that mix samples with images ({with_images}) and "
            f"text-only samples ({len(samples) - with_images}): a process with a text-only micro-batch skips the "
            f"vision tower and projector the other processes run, and DeepSpeed's collectives stop matching. Drop "
            f"--group-by-modality off (every step then trains on one kind of sample), or use "
            f"configs/accelerate/fsdp.yaml (FSDP2 reduces zeros for unused weights) or ddp.yaml")
    return choice == "on" or (choice == "auto" and needed)


class ModalityGroupedSampler(torch.utils.data.Sampler):
    """Sample indices so that each run of ``unit`` consecutive indices is of one kind: all samples
    with images or all text-only. With ``unit`` = micro-batch x accumulation steps x processes,
    every optimizer step trains on one kind on every process (accelerate hands process ``i`` the
    batches ``i, i + P, ...`` of this order).

    Per epoch (seeded by ``seed + epoch``, the same on every process): each kind is shuffled and its
    last unit filled up by repeating the kind's first samples of the epoch (as a distributed sampler
    pads), then the units are shuffled. One process with accumulation A sees the same order as A
    processes, so the two train alike.
    """

    def __init__(self, has_image, unit: int, seed: int):
        self.has_image = [bool(h) for h in has_image]
        self.unit = int(unit)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _kinds(self) -> list[list[int]]:
        return [idx for idx in ([i for i, h in enumerate(self.has_image) if h == kind] for kind in (True, False))
                if idx]

    def __len__(self) -> int:
        return sum(-(-len(idx) // self.unit) * self.unit for idx in self._kinds())

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        units = []
        for idx in self._kinds():
            order = [idx[j] for j in torch.randperm(len(idx), generator=generator).tolist()]
            order += [order[k % len(order)] for k in range(-len(order) % self.unit)]
            units += [order[k:k + self.unit] for k in range(0, len(order), self.unit)]
        for u in torch.randperm(len(units), generator=generator).tolist():
            yield from units[u]


@contextlib.contextmanager
def whole_weights():
    """Load models whole inside this block, even under a DeepSpeed ZeRO-3 launch.

    Creating the TrainingArguments of a ZeRO-3 launch registers transformers' DeepSpeed config
    globally, and from then on every ``from_pretrained`` builds its model under ``deepspeed.zero.Init``:
    each process keeps a 0-element placeholder per weight. vlmprune counts, wraps (LoRA) and pairs
    the student's layers before training, and runs the teacher outside any DeepSpeed engine, so
    both load whole (as ``zero3_init_flag: false`` in the launch config says); DeepSpeed partitions
    the student when the Trainer prepares it. Elsewhere this does nothing.
    """
    if launcher_backend() != "deepspeed":
        yield
        return
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


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
