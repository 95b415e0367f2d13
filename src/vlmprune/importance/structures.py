"""Which weights a prunable structure owns, and per-structure sums of any elementwise statistic.

A q head owns its q rows (weight and bias) and its o_proj columns; a kv head its k and v rows;
an MLP channel its gate/up (or fc1) rows with biases and its down (or fc2) column. Statistics
(|W|, |W * dL/dW|, ...) are reduced to these units as soon as they exist, so nothing of full
weight size has to be kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vlmprune.adapters import Adapter, Slice
from vlmprune.planning.plan import LayerShape


@dataclass
class LayerSums:
    """Per-structure sums of one layer: q heads' rows, kv heads' rows, q heads' o columns, MLP channels."""

    q_rows: torch.Tensor   # [H]
    kv_rows: torch.Tensor  # [KV]
    o_cols: torch.Tensor   # [H]
    mlp_rows: torch.Tensor  # [I]
    mlp_cols: torch.Tensor  # [I]

    @classmethod
    def zeros(cls, shape: LayerShape) -> LayerSums:
        z = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
        return cls(z(shape.num_heads), z(shape.num_kv_heads), z(shape.num_heads), z(shape.intermediate_size),
                   z(shape.intermediate_size))

    def add_(self, field_name: str, values: torch.Tensor) -> None:
        getattr(self, field_name).add_(values.detach().to("cpu", torch.float64))


# (unit, dim) of a slice -> the LayerSums field its statistic adds to
_FIELDS = {("q", 0): "q_rows", ("kv", 0): "kv_rows", ("q", 1): "o_cols", ("mlp", 0): "mlp_rows", ("mlp", 1): "mlp_cols"}


@dataclass(frozen=True)
class Owned:
    """One prunable parameter of a layer: the slices (of its projection) that say which structure
    owns each row or column, and whether it is the projection's bias."""

    layer: int
    slices: tuple[Slice, ...]
    is_bias: bool = False

    @property
    def dim(self) -> int:
        return self.slices[0].dim


def layer_params(layer: nn.Module, adapter: Adapter, index: int, shape: LayerShape) -> dict[nn.Parameter, Owned]:
    """The prunable parameters of one decoder layer, each with the slices that own it (from the adapter)."""
    by_module: dict[int, list[Slice]] = {}
    for slc in adapter.slices(layer, shape):
        by_module.setdefault(id(slc.module), []).append(slc)
    out: dict[nn.Parameter, Owned] = {}
    for slices in by_module.values():
        module = slices[0].module
        out[module.weight] = Owned(index, tuple(slices))
        # biases of column-owned projections (o, down) belong to no structure: kept whatever is cut
        if module.bias is not None and slices[0].dim == 0:
            out[module.bias] = Owned(index, tuple(slices), is_bias=True)
    return out


def reduce_(sums: LayerSums, owned: Owned, values: torch.Tensor) -> None:
    """Add an elementwise statistic of one parameter (same shape as it) to its structures' sums."""
    values = values.float()
    if owned.is_bias:
        per_index = values
    else:
        per_index = values.sum(dim=1 - owned.dim)  # [rows] or [columns]
    for slc in owned.slices:
        target = getattr(sums, _FIELDS[(slc.unit, slc.dim)])
        mine = slc.owner >= 0
        owner = slc.owner[mine].to(per_index.device)
        unit_sums = torch.zeros(target.shape[0], dtype=per_index.dtype, device=per_index.device)
        target.add_(unit_sums.index_add_(0, owner, per_index[mine.to(per_index.device)]).to("cpu", torch.float64))


@dataclass
class WidthScores:
    """Importance of every prunable structure, per layer (higher = more important)."""

    heads: list[torch.Tensor]     # [H] per layer
    groups: list[torch.Tensor]    # [KV] per layer
    channels: list[torch.Tensor]  # [I] per layer
    meta: dict = field(default_factory=dict)

    def to_dict(self, digits: int = 6) -> dict:
        r = lambda t: [float(f"{v:.{digits}g}") for v in t.tolist()]  # noqa: E731
        return {"heads": [r(t) for t in self.heads], "kv_groups": [r(t) for t in self.groups],
                "mlp_channels": [r(t) for t in self.channels]}


def combine(sums: list[LayerSums], shapes: list[LayerShape]) -> WidthScores:
    """Structure scores from per-structure sums: head = q rows + o columns; kv group = its k/v
    rows + its q heads; channel = its rows + its down column."""
    heads, groups, channels = [], [], []
    for s, shape in zip(sums, shapes):
        head = s.q_rows + s.o_cols
        heads.append(head)
        groups.append(s.kv_rows + head.reshape(shape.num_kv_heads, -1).sum(-1))
        channels.append(s.mlp_rows + s.mlp_cols)
    return WidthScores(heads, groups, channels)
