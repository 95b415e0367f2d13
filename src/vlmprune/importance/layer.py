"""Layer criteria: pure functions from collected statistics to per-layer scores or a block.

Scores: higher = more important. Statistics come from vlmprune.calibrate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HiddenStateStats:
    """Sums over selected tokens, for every pair (l, m) of residual-stream states h_0..h_L, where
    h_i enters layer i and h_{i+1} leaves it (the layer's own output, before any final norm)."""

    cos: torch.Tensor      # [L+1, L+1] sum of cos(h_l, h_m)
    angular: torch.Tensor  # [L+1, L+1] sum of arccos(cos(h_l, h_m)) / pi
    tokens: int = 0

    @property
    def num_layers(self) -> int:
        return self.cos.shape[0] - 1


@dataclass
class SkipLossStats:
    """Answer loss of the intact model and with each layer skipped, summed over batches."""

    base: float
    skipped: torch.Tensor  # [L]
    batches: int = 0


def block_influence(stats: HiddenStateStats) -> torch.Tensor:
    """ShortGPT Block Influence: BI_i = sum over tokens of 1 - cos(h_i, h_{i+1})."""
    adjacent = torch.diagonal(stats.cos, offset=1)
    return stats.tokens - adjacent


def angular_block(stats: HiddenStateStats, n: int) -> tuple[int, torch.Tensor]:
    """Best contiguous block of ``n`` layers to drop (Gromov et al.): the start l minimising the
    mean angular distance between h_l and h_{l+n}. Returns (start, distance of every start)."""
    L = stats.num_layers
    if not 1 <= n < L:
        raise ValueError(f"a block must have 1..{L - 1} layers, got {n}")
    starts = torch.arange(L - n + 1)
    distance = stats.angular[starts, starts + n] / max(stats.tokens, 1)
    return int(distance.argmin()), distance


def angular(stats: HiddenStateStats) -> torch.Tensor:
    """Mean angular distance between each layer's input and output (a per-layer view of the
    angular criterion; dropping uses angular_block)."""
    return torch.diagonal(stats.angular, offset=1) / max(stats.tokens, 1)


def skip_loss(stats: SkipLossStats) -> torch.Tensor:
    """Increase of the answer loss when a layer is skipped (mean over batches)."""
    n = max(stats.batches, 1)
    return (stats.skipped - stats.base) / n


def last(num_layers: int) -> torch.Tensor:
    """'Drop the last n': later layers score lower, so the lowest n are the last n."""
    return torch.arange(num_layers, 0, -1, dtype=torch.float64)


@dataclass
class LayerScores:
    """Per-layer scores, and for block criteria the distance of every block start for every block
    length n (``blocks[n - 1][l]``: dropping layers l..l+n-1), so a plan for any ratio can be made later."""

    layers: torch.Tensor  # [L]
    blocks: list[torch.Tensor] | None = None  # [L - 1] x [L - n + 1]

    def block_start(self, n: int) -> int | None:
        if self.blocks is None or n < 1 or n > len(self.blocks):
            return None
        return int(self.blocks[n - 1].argmin())

    def without(self, protected: set[int]) -> LayerScores:
        """Scores in which protected layers (and blocks that contain one) can never be chosen."""
        if not protected:
            return self
        layers = self.layers.clone()
        layers[sorted(protected)] = float("inf")
        blocks = None
        if self.blocks is not None:
            blocks = [b.clone() for b in self.blocks]
            for n, b in enumerate(blocks, 1):
                for start in range(b.shape[0]):
                    if protected & set(range(start, start + n)):
                        b[start] = float("inf")
        return LayerScores(layers, blocks)
