"""Pictures of importance: what was scored, what was cut."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# matplotlib's object-oriented API: a Figure draws and saves itself (Agg for PNG), with no global backend
# switch and no pyplot figure list to close
from matplotlib.figure import Figure

from vlmprune.importance.structures import WidthScores
from vlmprune.planning.plan import PruningPlan


def plot_layer_scores(scores, dropped: list[int], path: Path, criterion: str) -> Path:
    """Bar chart of per-layer importance; dropped layers in red."""
    values = np.asarray([float(v) for v in scores])
    fig = Figure(figsize=(max(6, 0.3 * len(values)), 3.5))
    ax = fig.subplots()
    colors = ["tab:red" if i in set(dropped) else "tab:blue" for i in range(len(values))]
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(f"{criterion} score")
    ax.set_title(f"Layer importance ({criterion}); red = dropped ({len(dropped)})")
    ax.set_xticks(range(len(values)))
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_width_scores(scores: WidthScores, plan: PruningPlan, path: Path, criterion: str, attention: str) -> Path:
    """Heatmaps: heads (or kv groups) and MLP channels per layer, each row sorted by score, with
    the cut line where the kept structures end."""
    use_groups = attention == "groups"
    attn = scores.groups if use_groups else scores.heads
    layers = len(scores.channels)
    fig = Figure(figsize=(11, max(3, 0.22 * layers + 1.5)))
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 3]})
    for ax, rows, label, key in ((axes[0], attn, "kv groups" if use_groups else "q heads",
                                  "kv_heads" if use_groups else "q_heads"),
                                 (axes[1], scores.channels, "MLP channels", "mlp_channels")):
        width = max(len(r) for r in rows)
        grid = np.full((layers, width), np.nan)
        kept_counts = []
        for i, r in enumerate(rows):
            vals = np.sort(np.asarray(r.tolist(), dtype=float))[::-1]
            top = vals.max() if vals.size and vals.max() > 0 else 1.0
            grid[i, : len(vals)] = vals / top  # each layer normalised to its own maximum
            kept = plan.layers.get(i, {}).get(key)
            kept_counts.append(len(kept) if kept is not None else len(vals))
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        for i, k in enumerate(kept_counts):  # the cut: a vertical segment through each layer's row
            ax.plot([k - 0.5, k - 0.5], [i - 0.5, i + 0.5], color="red", linewidth=2)
        ax.set_title(f"{label} (sorted per layer; red = cut)")
        ax.set_xlabel("rank within layer")
        ax.set_ylabel("decoder layer")
        fig.colorbar(im, ax=ax, fraction=0.03, label="score / layer max")
    fig.suptitle(f"Width importance ({criterion})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot_search(rows: list[dict], chosen: int, path: Path, quantity: str) -> Path:
    """The auto search: proxy (KL to the original) against layers dropped, the chosen mix marked."""
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ks = [r["layers_dropped"] for r in rows]
    kl = [r["proxy_kl"] for r in rows]
    ax.plot(ks, kl, "o-", color="tab:blue", label="candidates")
    pick = rows[chosen]
    ax.plot([pick["layers_dropped"]], [pick["proxy_kl"]], "*", color="tab:red", markersize=16, label="chosen")
    ax.set_xlabel("layers dropped (the rest of the cut is width)")
    ax.set_ylabel("KL to the original (held-out text tokens)")
    ax.set_title(f"--method auto at {quantity}: 0 = pure width, right end = pure layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
