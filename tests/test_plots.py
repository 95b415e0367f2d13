"""The plots (plots.py, recover/plots.py, report.py) draw with matplotlib's object-oriented API: PNGs
come out, and neither pyplot nor a global backend switch is touched (an application that imports
vlmprune keeps its own matplotlib backend)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import vlmprune

SRC = Path(vlmprune.__file__).resolve().parents[1]

CODE = """
import sys
from pathlib import Path
import matplotlib
matplotlib.use("svg")  # the application's choice, which vlmprune must leave alone
import torch
from vlmprune.importance.structures import WidthScores
from vlmprune.planning.plan import PruningPlan
from vlmprune.plots import plot_layer_scores, plot_search, plot_width_scores
from vlmprune.recover.plots import plot_loss_curve
from vlmprune import report

out = Path(sys.argv[1])
paths = [
    plot_layer_scores([0.3, 0.1, 0.2], [1], out / "layers.png", "block_influence"),
    plot_width_scores(WidthScores(heads=[torch.rand(4)] * 2, groups=[torch.rand(2)] * 2,
                                  channels=[torch.rand(16)] * 2),
                      PruningPlan(layers={0: {"kv_heads": [0], "mlp_channels": list(range(8))}}),
                      out / "width.png", "taylor", "groups"),
    plot_search([{"layers_dropped": 0, "proxy_kl": 0.2}, {"layers_dropped": 1, "proxy_kl": 0.1}], 1,
                out / "search.png", "20%"),
    plot_loss_curve([{"step": 1, "loss": 2.0, "loss_sft": 1.5}, {"step": 2, "loss": 1.0, "loss_sft": 0.8}],
                    out / "loss.png"),
]
original = {"parameters": {"total": 2e6}, "tasks": {"t": {"accuracy": 0.8}}}
cell = {"status": "done", "method": "layer", "recipe": "sft", "ratio": 0.2, "achieved_ratio": 0.19, "target": None}
rows = [{**cell, "params": 1e6, "t": 0.5, "id": "a", "fraction": 0.1, "mean_retention": 0.6},
        {**cell, "params": 1e6, "t": 0.7, "id": "b", "fraction": 0.5, "mean_retention": 0.8}]
plotted = report._plots(out, original, rows, ["t"])
assert sorted(plotted) == ["accuracy_vs_params", "retention_vs_fraction", "retention_vs_ratio"], plotted
paths += list(plotted.values())
one_fraction = [{**r, "fraction": 0.1} for r in rows]  # no data-fraction sweep: that plot is left out
assert sorted(report._plots(out, original, one_fraction, ["t"])) == ["accuracy_vs_params", "retention_vs_ratio"]
for p in paths:
    assert p.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n", p
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
print(len(paths))
"""


def test_plots_write_pngs_without_pyplot_or_a_backend_switch(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", CODE, str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["7"]
