"""The loss curve of a recovery run."""

from __future__ import annotations

from pathlib import Path

# matplotlib's object-oriented API: a Figure draws and saves itself (Agg for PNG), with no global backend
# switch and no pyplot figure list to close
from matplotlib.figure import Figure


def plot_loss_curve(history: list[dict], path: Path) -> Path:
    """Total loss and each logged term (``loss_<name>``) against the optimizer step."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    keys = [k for k in dict.fromkeys(k for entry in history for k in entry) if k == "loss" or k.startswith("loss_")]
    for key in keys:
        points = [(entry["step"], entry[key]) for entry in history if key in entry]
        ax.plot(*zip(*points), marker="." if len(points) < 50 else None,
                label="total (weighted)" if key == "loss" else key[5:], linewidth=2 if key == "loss" else 1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Recovery training")
    if keys:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
