"""Where the distillation teacher lives on each process (``--teacher-placement``).

The teacher only runs forward, under ``no_grad``, once per micro-batch; it is never trained or saved.

- ``replicate`` (default): a full copy on every process's training device.
- ``shard``: under FSDP2 (``configs/accelerate/fsdp.yaml``) the teacher is sharded like the student,
  with torch's ``fully_shard`` per language-model decoder layer plus the root (embeddings, vision
  tower, projector, final norm, head), over all processes (the 1-D mesh the student gets from
  accelerate without a ``parallelism_config``). Every unit, the root included, reshards after its
  forward: torch keeps the root gathered after a forward by default because training's backward
  follows at once, but the teacher has no backward. Between forwards each process holds 1/N of the
  weights; during a forward, its shards plus the root's whole weights plus one decoder layer at a
  time. Forward hooks on the teacher's layers (the hidden-state loss) still see each layer's whole
  output: FSDP shards weights, not activations. Every process must run the teacher forward the same
  number of times (it does: once per micro-batch), since each forward all-gathers.
- ``offload``: accelerate's ``cpu_offload`` (the weights stay in CPU memory) or, with
  ``--teacher-offload-folder``, ``disk_offload`` (written once to a temporary ``vlmprune-teacher-*``
  folder per process, memory-mapped from there); hooks bring each module's weights to the training
  device for its forward and drop them after. Between forwards the device holds only the buffers.

Each process still reads the whole teacher into CPU memory once while loading it (``vlmprune.load``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from vlmprune.adapters import get_adapter
from vlmprune.config import TEACHER_PLACEMENTS
from vlmprune.errors import VlmpruneError
from vlmprune.recover.distributed import launcher_backend

log = logging.getLogger(__name__)

OFFLOAD_PREFIX = "vlmprune-teacher-"
_PARALLELISM_DIMS = ("DP_REPLICATE", "TP", "CP", "SP")  # accelerate's parallelism_config, as its launcher exports it


def check_teacher_placement(placement: str) -> None:
    """Refuse a placement the launcher cannot give, before any model loads."""
    if placement not in TEACHER_PLACEMENTS:
        raise VlmpruneError(f"--teacher-placement must be one of {', '.join(TEACHER_PLACEMENTS)}, got {placement!r}")
    if placement != "shard":
        return
    backend = launcher_backend()
    alternatives = ("launch with `accelerate launch --config_file configs/accelerate/fsdp.yaml`, or keep the "
                    "teacher off the device with --teacher-placement offload")
    if backend == "deepspeed":
        raise VlmpruneError("--teacher-placement shard shards the teacher with FSDP2; under DeepSpeed only the "
                            f"trained model is partitioned: {alternatives}")
    if backend != "fsdp":
        where = ("under DDP (a plain multi-process launch)" if int(os.environ.get("WORLD_SIZE", "1")) > 1
                 else "in a single process, where there is nothing to shard over")
        raise VlmpruneError(f"--teacher-placement shard needs an FSDP launch; this run is {where}: {alternatives}")
    extra = [d.lower() for d in _PARALLELISM_DIMS if int(os.environ.get(f"PARALLELISM_CONFIG_{d}_SIZE", "1")) > 1]
    if extra:
        raise VlmpruneError(f"--teacher-placement shard shards the teacher over all processes; the launch config's "
                            f"parallelism_config also has {', '.join(extra)} dimensions, which vlmprune does not "
                            f"mirror for the teacher: use --teacher-placement offload, or a config without them")


def is_placed(teacher: nn.Module) -> bool:
    """Whether the teacher's weights were already put where they live (sharded or offloaded): not to be moved."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(teacher, FSDPModule) or getattr(teacher, "_hf_hook", None) is not None


def place_teacher(teacher: nn.Module, placement: str, device: torch.device | str, *, offload_folder: str | None = None,
                  cleanup: contextlib.ExitStack | None = None) -> nn.Module:
    """Freeze ``teacher`` in eval mode and put its weights where ``placement`` says; return it.

    ``device`` is this process's training device (where the teacher computes). ``offload_folder``
    (offload only) selects disk offload: a temporary ``vlmprune-teacher-*`` folder is made in it and
    removed when ``cleanup`` closes (required then).
    """
    check_teacher_placement(placement)
    teacher.eval().requires_grad_(False)
    if placement == "replicate":
        return teacher.to(device)
    if placement == "shard":
        return _shard(teacher)
    return _offload(teacher, torch.device(device), offload_folder, cleanup)


def _shard(teacher: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    # reshard_after_forward=True on the root too (torch's default for a root is to stay gathered).
    for layer in get_adapter(teacher).layers(teacher):
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(teacher, reshard_after_forward=True)
    return teacher


def _offload(teacher: nn.Module, device: torch.device, folder: str | None,
             cleanup: contextlib.ExitStack | None) -> nn.Module:
    from accelerate import cpu_offload, disk_offload

    # An indexed CPU device ("cpu:0", which compares unequal to "cpu") breaks accelerate 1.16's hooks: its
    # set_module_tensor_to_device raises a TypeError when it puts a weight back after the forward. Give
    # them the plain device.
    device = _plain_device(device)
    if folder is None:
        return cpu_offload(teacher, execution_device=device)
    if cleanup is None:
        raise ValueError("disk offload needs a cleanup stack to remove its temporary folder")
    parent = Path(folder).expanduser()
    parent.mkdir(parents=True, exist_ok=True)
    # One folder per process: processes sharing --teacher-offload-folder never write the same files,
    # and a folder holding an earlier run's index.json is never mistaken for this teacher's weights.
    path = Path(tempfile.mkdtemp(prefix=OFFLOAD_PREFIX, dir=parent))
    cleanup.callback(shutil.rmtree, path, ignore_errors=True)
    log.info("vlmprune recover: offloading the teacher to %s", path)
    return disk_offload(teacher, str(path), execution_device=device)


def _plain_device(device: torch.device) -> torch.device:
    return torch.device("cpu") if device.type == "cpu" else device


def _unique_tensors(tensors):
    seen = set()
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def resident_bytes(teacher: nn.Module) -> int:
    """Bytes of the teacher's parameters and buffers this process holds in its modules right now.

    Sharded parameters count their local shard; offloaded ones (on the meta device between
    forwards) count nothing. Tied weights count once.
    """
    from torch.distributed.tensor import DTensor

    total = 0
    for tensor in _unique_tensors(list(teacher.parameters()) + list(teacher.buffers())):
        if isinstance(tensor, DTensor):
            tensor = tensor.to_local()
        if tensor.device.type != "meta":
            total += tensor.numel() * tensor.element_size()
    return total


def host_bytes(teacher: nn.Module) -> int:
    """Bytes of the CPU copy an offloaded teacher's hooks bring weights in from (0 for disk offload, memory-mapped)."""
    total, seen = 0, set()
    for module in teacher.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", [hook]) if hook is not None else []:
            weights = getattr(h, "weights_map", None)
            if not getattr(h, "offload", False) or weights is None:
                continue
            dataset = getattr(weights, "dataset", weights)  # a PrefixedDataset over the whole state dict
            if not isinstance(dataset, dict):
                continue  # disk offload: an OffloadedWeightsLoader reading memory-mapped files
            for value in dataset.values():
                if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                    key = (value.untyped_storage().data_ptr(), value.storage_offset(), value.numel())
                    if key not in seen:
                        seen.add(key)
                        total += value.numel() * value.element_size()
    return total
