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

from vlmprune.adapters import Adapter
from vlmprune.plan import LayerShape


@dataclass
class LayerSums:
    """Per-structure sums of one layer: q heads' rows, kv heads' rows, q heads' o columns, MLP channels."""

    q_rows: torch.Tensor   # [H]
    kv_rows: torch.Tensor  # [KV]
    o_cols: torch.Tensor   # [H]
    mlp_rows: torch.Tensor  # [I]
    mlp_cols: torch.Tensor  # [I]

    @classmethod
    def zeros(cls, shape: LayerShape) -> "LayerSums":
        z = lambda n: torch.zeros(n, dtype=torch.float64)  # noqa: E731
        return cls(z(shape.num_heads), z(shape.num_kv_heads), z(shape.num_heads), z(shape.intermediate_size),
                   z(shape.intermediate_size))

    def add_(self, field_name: str, values: torch.Tensor) -> None:
        getattr(self, field_name).add_(values.detach().to("cpu", torch.float64))


@dataclass(frozen=True)
class ParamRole:
    """One parameter of a layer and the units its rows or columns belong to."""

    layer: int
    role: str  # "q", "k", "v", "qkv", "o", "mlp_rows", "gate_up", "down"
    is_bias: bool = False


def layer_params(layer: nn.Module, adapter: Adapter, index: int) -> dict[nn.Parameter, ParamRole]:
    """The prunable parameters of one decoder layer with their roles."""
    lay = adapter.layout
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    named: list[tuple[nn.Module, str]] = []
    if lay.qkv:
        named.append((getattr(attn, lay.qkv), "qkv"))
    else:
        named += [(getattr(attn, lay.q), "q"), (getattr(attn, lay.k), "k"), (getattr(attn, lay.v), "v")]
    named.append((getattr(attn, lay.o), "o"))
    if lay.gate_up:
        named.append((getattr(mlp, lay.gate_up), "gate_up"))
    else:
        named += [(getattr(mlp, name), "mlp_rows") for name in lay.channel_projections()]
    named.append((getattr(mlp, lay.down), "down"))
    out: dict[nn.Parameter, ParamRole] = {}
    for module, role in named:
        out[module.weight] = ParamRole(index, role)
        # o and down biases belong to no head/channel (they are kept whatever is cut)
        if module.bias is not None and role not in ("o", "down"):
            out[module.bias] = ParamRole(index, role, is_bias=True)
    return out


def _units(values: torch.Tensor, n: int) -> torch.Tensor:
    """Sum a per-row (or per-column) vector into n equal consecutive units."""
    return values.reshape(n, -1).sum(-1)


def reduce_(sums: LayerSums, role: ParamRole, values: torch.Tensor, shape: LayerShape) -> None:
    """Add an elementwise statistic of one parameter (same shape as it) to its structures' sums."""
    values = values.float()
    per_row = values if role.is_bias else values.sum(dim=1)  # [out]
    h, kv, d, i = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.intermediate_size
    if role.role == "q":
        sums.add_("q_rows", _units(per_row, h))
    elif role.role in ("k", "v"):
        sums.add_("kv_rows", _units(per_row, kv))
    elif role.role == "qkv":
        sums.add_("q_rows", _units(per_row[: h * d], h))
        sums.add_("kv_rows", _units(per_row[h * d : (h + kv) * d], kv))
        sums.add_("kv_rows", _units(per_row[(h + kv) * d :], kv))
    elif role.role == "o":
        sums.add_("o_cols", _units(values.sum(dim=0), h))
    elif role.role == "mlp_rows":
        sums.add_("mlp_rows", per_row)
    elif role.role == "gate_up":
        sums.add_("mlp_rows", per_row[:i] + per_row[i:])
    elif role.role == "down":
        sums.add_("mlp_cols", values.sum(dim=0))
    else:  # pragma: no cover - roles come from layer_params
        raise ValueError(role.role)


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
