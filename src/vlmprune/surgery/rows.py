"""Slicing primitives that know no model: keep some output rows or input columns of a Linear."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def keep_rows_(linear: nn.Linear, rows: torch.Tensor) -> None:
    """Keep only the given output rows (and bias entries) of ``linear``, in place."""
    rows = rows.to(linear.weight.device)
    # index_select writes a new tensor: no clone (a second copy) is needed for it to own its memory
    linear.weight = nn.Parameter(linear.weight.index_select(0, rows), linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.index_select(0, rows), linear.bias.requires_grad)
    linear.out_features = int(rows.numel())


@torch.no_grad()
def keep_cols_(linear: nn.Linear, cols: torch.Tensor) -> None:
    """Keep only the given input columns of ``linear``, in place (the bias is untouched)."""
    cols = cols.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.index_select(1, cols), linear.weight.requires_grad)
    linear.in_features = int(cols.numel())
