"""Teacher memory per process under each ``--teacher-placement``: between forwards and at a forward's peak.

    OMP_NUM_THREADS=1 python benchmarks/teacher_placement.py [--shape smollm2-135m] [--dtype float32] [--json out.json]

The teacher is a LLaVA whose language model is shaped like ``--shape`` (default SmolLM2-135M: 30
layers, hidden 576, tied 49152-token embeddings) behind a ViT-S/14 vision tower at 112 px, random
weights, built by ``benchmarks/common.py``. Each placement is made by ``vlmprune.recover.teacher.
place_teacher`` exactly as ``vlmprune recover`` makes it, then the teacher runs two forwards under
``no_grad`` on one fake sample (64 image tokens, 48 text tokens):

- replicate: one process;
- shard: two gloo CPU processes (``torch.multiprocessing``), FSDP2 as under ``configs/accelerate/fsdp.yaml``;
- offload cpu / offload disk: one process, CPU as the execution device.

Columns (bytes of the teacher's parameters and buffers, counted on the modules, tied weights once):

- "between forwards": what the process holds after a forward, until the next (the
  ``teacher_bytes_per_process`` of the recovery record). Sharded: the local shards.
  Offloaded: what stays on the execution device (the buffers).
- "forward peak": the most held at once during a forward, sampled at every torch call that takes a
  parameter. Sharded: the local shards (FSDP2 keeps them while a unit is gathered) plus every unit
  gathered at that moment (the root stays gathered for the whole forward, the decoder layers one at
  a time). Offloaded: the buffers plus the weights the hooks put on the execution device at once
  (one module's; on a GPU those are copies, on this CPU machine the host tensors themselves).
- "host copy": offload's CPU copy the hooks read from (0 for disk: memory-mapped files).

Every placement's logits are compared with the replicated teacher's (max |difference|).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from vlmprune.recover.teacher import host_bytes, place_teacher, resident_bytes

sys.path.insert(0, str(Path(__file__).parent))
from common import LM_SHAPES, build_llava, fake_batch  # noqa: E402


def gathered_bytes(model: nn.Module) -> int:
    """Bytes of the FSDP-managed parameters gathered right now (plain tensors where shards were; 0 unsharded)."""
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen and not isinstance(p, DTensor) and p.device.type != "meta":
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


class PeakSampler(TorchFunctionMode):
    """Sample ``measure()`` at every torch call that takes a parameter (the weights it needs are in place)."""

    def __init__(self, measure):
        super().__init__()
        self.measure, self.peak = measure, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(a, nn.Parameter) for a in (*args, *kwargs.values())):
            self.peak = max(self.peak, self.measure())
        return func(*args, **kwargs)


def build(shape: str, dtype: torch.dtype):
    model = build_llava(shape, dtype=dtype)
    model.config.text_config.use_cache = False
    return model, {k: v for k, v in fake_batch(model, 1, text=40, answer=8).items() if k != "labels"}


def forward(model: nn.Module, batch: dict, measure) -> tuple[torch.Tensor, int]:
    """Two forwards (the second after the first's resharding / offloading); the logits and the peak."""
    sampler = PeakSampler(measure)
    with torch.no_grad():
        model(**batch)
        with sampler:
            logits = model(**batch).logits
    return logits, sampler.peak


def measure_single(placement: str, shape: str, dtype: torch.dtype) -> dict:
    model, batch = build(shape, dtype)
    with contextlib.ExitStack() as cleanup:
        folder = cleanup.enter_context(tempfile.TemporaryDirectory()) if placement == "offload-disk" else None
        model = place_teacher(model, placement.split("-")[0], torch.device("cpu"), offload_folder=folder,
                              cleanup=cleanup)
        logits, peak = forward(model, batch, lambda: resident_bytes(model))
        row = {"placement": placement, "processes": 1, "between": resident_bytes(model), "peak": peak,
               "host": host_bytes(model), "logits": logits}
    return row


def _shard_worker(rank: int, world: int, port: int, shape: str, dtype: torch.dtype, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(ACCELERATE_USE_FSDP="true", WORLD_SIZE=str(world), RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, batch = build(shape, dtype)
        model = place_teacher(model, "shard", torch.device("cpu"))
        shards = resident_bytes(model)  # local shards + buffers, before any forward
        logits, peak = forward(model, batch, lambda: shards + gathered_bytes(model))
        row = {"rank": rank, "before": shards, "between": resident_bytes(model), "peak": peak,
               "gathered_after": gathered_bytes(model)}
        torch.save({"row": row, "logits": logits}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def measure_shard(shape: str, dtype: torch.dtype, world: int = 2) -> dict:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "rank")
        mp.spawn(_shard_worker, args=(world, port, shape, dtype, out), nprocs=world, join=True)
        results = [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]
    rows = [r["row"] for r in results]
    assert all(r["gathered_after"] == 0 and r["between"] == r["before"] for r in rows), rows  # the root resharded too
    return {"placement": "shard", "processes": world, "between": max(r["between"] for r in rows),
            "peak": max(r["peak"] for r in rows), "host": 0, "logits": results[0]["logits"],
            "per_rank": [{k: r[k] for k in ("rank", "between", "peak")} for r in rows]}


def mb(n: int) -> str:
    return f"{n / 1e6:9.1f} MB" if n >= 1e5 else f"{n:9d} B "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(LM_SHAPES))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1)

    rows = [measure_single("replicate", args.shape, dtype)]
    reference = rows[0]["logits"]
    rows.append(measure_shard(args.shape, dtype))
    rows.append(measure_single("offload-cpu", args.shape, dtype))
    rows.append(measure_single("offload-disk", args.shape, dtype))
    for row in rows:
        row["max_logit_diff"] = float((row.pop("logits") - reference).abs().max())

    print(f"teacher: {args.shape}-shaped LLaVA in {args.dtype}, {rows[0]['between'] / 1e6:.1f} MB of weights")
    print(f"{'placement':14} {'procs':>5} {'between forwards':>16} {'forward peak':>14} {'host copy':>13} "
          f"{'max |logit diff|':>17}")
    for row in rows:
        print(f"{row['placement']:14} {row['processes']:5d} {mb(row['between']):>16} {mb(row['peak']):>14} "
              f"{mb(row['host']):>13} {row['max_logit_diff']:17.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "dtype": args.dtype, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
