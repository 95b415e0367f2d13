"""Why the `magnitude` width criterion loses more than a random cut on the demo language model.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/magnitude_diagnosis.py \
        [--parts stats,cuts,layers,attention] [--eval-windows 16] [--layer-windows 8]

Same corpus as benchmarks/text_ppl.py (Python 3.11 standard-library docstrings: calibration from
CALIBRATION_MODULES, evaluation from other modules, 256-token windows), same demo model. Scores are
computed once in memory (`vlmprune.prune.score`, 16 calibration samples, batches of 4, 256 tokens);
cuts are then applied by zeroing what a structure writes to the residual stream (the down-projection
columns of an MLP channel, the o_proj columns of a q head), which is what removing it does on these
bias-free Llama layers, so every cut is evaluated without reloading the model.

Parts (rows go to --out as JSON lines and are printed):
- ``stats``: per layer, how the 408 channels magnitude removes (the `--attention none` cut of
  text_ppl.py: 1128 of 1536 kept) overlap with activation's / taylor's, their share of the mean
  |activation| mass, the Spearman correlation of magnitude with mean |activation|, and where the
  channel with the largest single |activation| ranks by magnitude.
- ``cuts``: perplexity of whole-model MLP cuts (408 channels in every layer): magnitude, activation,
  random, magnitude with the top-k channels by activation protected, and data-free variants.
- ``layers``: the MLP of ONE layer cut by magnitude or by random (408 channels), for every layer.
- ``attention``: attention-only cuts (MLP intact): one kv group per layer (`groups`) or one q head per
  kv group (`heads`), by magnitude, activation and random.
- ``ranges``: the same ~20% of the decoder cut from the MLPs of a layer range only (`--layers`, planned
  by `plan_for` with `--attention none`): 1:-1 (the study's recipe skips the first and last layers)
  and 4:-2 (LLM-Pruner's LLaMA recipe, --block_mlp_layer_start 4 --block_mlp_layer_end 30 of 32),
  by magnitude, activation and random (seeds 0 and 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import text_ppl as T

KEEP = 1128  # the --attention none cut of text_ppl.py at ~20% of the decoder
CHANNELS = 1536


def _rank(x: torch.Tensor) -> torch.Tensor:
    return torch.argsort(torch.argsort(x)).double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([_rank(a), _rank(b)]))[0, 1])


def lowest(scores: list[torch.Tensor], k: int) -> dict[int, torch.Tensor]:
    return {i: torch.argsort(s, stable=True)[:k] for i, s in enumerate(scores)}


class Zeroed:
    """Zero the given input columns of one projection per layer while inside (removal, on bias-free layers)."""

    def __init__(self, modules: list, columns: dict[int, torch.Tensor]):
        self.modules, self.columns, self.saved = modules, columns, {}

    def __enter__(self):
        for i, cols in self.columns.items():
            w = self.modules[i].weight
            self.saved[i] = w.data[:, cols].clone()
            w.data[:, cols] = 0

    def __exit__(self, *exc):
        for i, cols in self.columns.items():
            self.modules[i].weight.data[:, cols] = self.saved[i]


def max_abs_down_inputs(model, layers, batches) -> list[torch.Tensor]:
    """Per layer, per channel: the largest |input of the down projection| over the calibration tokens."""
    out = [torch.zeros(CHANNELS) for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        def hook(module, args, i=i):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).float()
            out[i] = torch.maximum(out[i], x.max(0).values)
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="stats,cuts,layers,attention,ranges")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=16, help="windows for whole-model cuts")
    parser.add_argument("--layer-windows", type=int, default=8, help="windows for the one-layer cuts (30 x 2 of them)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/vlmprune-magnitude"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "magnitude_diagnosis.jsonl")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    parts = args.parts.split(",")

    import subprocess

    import transformers

    from vlmprune import calibrate
    from vlmprune.checkpoint import load, load_processor
    from vlmprune.importance.scores import Scores
    from vlmprune.planning.solve import ModelBudget, _top_heads_per_group, plan_for
    from vlmprune.prune.run import score
    from vlmprune.summary import layer_shapes

    args.workdir.mkdir(parents=True, exist_ok=True)
    built = subprocess.run([sys.executable, "-m", "vlmprune.cli", "demo", "build"], capture_output=True, text=True,
                           check=True).stdout
    demo = next(line.split(":", 1)[1].strip() for line in built.splitlines() if line.startswith("demo model:"))
    calibration = args.workdir / "calibration.json"
    T.write_calibration(calibration)
    batches = calibrate.calibration_batches(load_processor(demo), str(calibration), None, args.samples, 0, 4, 256, None)
    tokenizer = transformers.AutoTokenizer.from_pretrained(demo)
    model = load(demo).eval()
    layers = model.model.language_model.layers
    shapes = layer_shapes(model)
    scores = {c: score(model, "width", c, None if c in ("magnitude", "random") else batches).values
              for c in ("magnitude", "activation", "taylor", "random")}
    mag, act, tay, rnd = (scores[c].channels for c in ("magnitude", "activation", "taylor", "random"))
    k = CHANNELS - KEEP
    downs = [layer.mlp.down_proj for layer in layers]
    outs = [layer.self_attn.o_proj for layer in layers]

    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def ppl(windows) -> float:
        return T.perplexity(model, windows)

    if "stats" in parts:
        peak = max_abs_down_inputs(model, layers, batches)
        for i in range(len(layers)):
            rm, ra, rt = (set(torch.argsort(s[i], stable=True)[:k].tolist()) for s in (mag, act, tay))
            top = int(peak[i].argmax())
            emit({"part": "stats", "layer": i, "overlap_activation": len(rm & ra), "overlap_taylor": len(rm & rt),
                  "overlap_activation_taylor": len(ra & rt), "expected_overlap_random": k * k / CHANNELS,
                  "act_mass_removed_magnitude": float(act[i][list(rm)].sum() / act[i].sum()),
                  "act_mass_removed_activation": float(act[i][list(ra)].sum() / act[i].sum()),
                  "spearman_magnitude_activation": spearman(mag[i], act[i]),
                  "magnitude_cv": float(mag[i].std() / mag[i].mean()),
                  "peak_channel": top, "peak_over_median": float(peak[i].max() / peak[i].median()),
                  "peak_channel_magnitude_rank": int(_rank(mag[i])[top])})
        order = torch.argsort(mag[0], stable=True)
        for lo in range(0, CHANNELS, 128):  # layer 0 by magnitude rank, in bins of 128 channels
            idx = order[lo : lo + 128]
            emit({"part": "stats_layer0_bins", "magnitude_ranks": [lo, lo + 127],
                  "magnitude": float(mag[0][idx].mean()), "mean_abs_activation": float(act[0][idx].mean()),
                  "taylor": float(tay[0][idx].mean())})

    if "cuts" in parts:
        windows = T.eval_windows(tokenizer, args.eval_windows)
        peak = max_abs_down_inputs(model, layers, batches)
        emit({"part": "cuts", "cut": "dense", "ppl": ppl(windows), "windows": len(windows)})

        def protect(s: list[torch.Tensor], by: list[torch.Tensor], n: int) -> list[torch.Tensor]:
            out = []
            for x, b in zip(s, by):
                x = x.clone()
                x[torch.argsort(b, descending=True)[:n]] = float("inf")
                out.append(x)
            return out

        def weight_norms(fn) -> list[torch.Tensor]:
            return [fn(layer.mlp).detach().double() for layer in layers]

        rnd_mag = [rnd[i] if i in (0, 28, 29) else mag[i] for i in range(len(layers))]
        cuts = {"magnitude": mag, "activation": act, "taylor": tay, "random seed 0": rnd,
                "magnitude, largest removed instead": [-x for x in mag],
                "magnitude, random in layers 0/28/29": rnd_mag,
                "L2 of gate+up rows and down column": weight_norms(
                    lambda m: (m.gate_proj.weight.pow(2).sum(1) + m.up_proj.weight.pow(2).sum(1)
                               + m.down_proj.weight.pow(2).sum(0))),
                "L1 of the down column only": weight_norms(lambda m: m.down_proj.weight.abs().sum(0)),
                "L1 of the gate row only": weight_norms(lambda m: m.gate_proj.weight.abs().sum(1)),
                "L1 of the up row only": weight_norms(lambda m: m.up_proj.weight.abs().sum(1))}
        for n in (1, 4, 16, 64):
            cuts[f"magnitude, top-{n} by max |x| protected"] = protect(mag, peak, n)
            cuts[f"magnitude, top-{n} by mean |x| protected"] = protect(mag, act, n)
        for name, s in cuts.items():
            with Zeroed(downs, lowest(s, k)):
                emit({"part": "cuts", "cut": name, "kept": KEEP, "ppl": ppl(windows), "windows": len(windows)})
        spared = round(k * len(layers) / (len(layers) - 1) / 8) * 8  # about the same channels, layer 0 whole
        with Zeroed(downs, {i: torch.argsort(mag[i], stable=True)[:spared] for i in range(1, len(layers))}):
            emit({"part": "cuts", "cut": f"magnitude, layer 0 whole, {spared} cut elsewhere", "ppl": ppl(windows),
                  "windows": len(windows)})

    if "layers" in parts:
        windows = T.eval_windows(tokenizer, args.layer_windows)
        dense = ppl(windows)
        emit({"part": "layers", "layer": None, "ppl_dense": dense, "windows": len(windows)})
        for i in range(len(layers)):
            row = {"part": "layers", "layer": i}
            for name, s in (("magnitude", mag), ("random", rnd)):
                with Zeroed(downs, {i: torch.argsort(s[i], stable=True)[:k]}):
                    p = ppl(windows)
                row[f"ppl_{name}"], row[f"dnll_{name}"] = p, math.log(p / dense)
            emit(row)

    if "attention" in parts:
        windows = T.eval_windows(tokenizer, args.eval_windows)
        for mode in ("groups", "heads"):
            for name in ("magnitude", "activation", "taylor", "random"):
                s = scores[name]
                cols = {}
                for i, shape in enumerate(shapes):
                    if mode == "groups":
                        g = int(torch.argsort(s.groups[i], stable=True)[0])
                        gone = range(g * shape.group_size, (g + 1) * shape.group_size)
                    else:
                        kept = set(_top_heads_per_group(s.heads[i], shape, shape.group_size - 1))
                        gone = sorted(set(range(shape.num_heads)) - kept)
                    cols[i] = torch.cat([torch.arange(h * shape.head_dim, (h + 1) * shape.head_dim) for h in gone])
                t0 = time.perf_counter()
                with Zeroed(outs, cols):
                    emit({"part": "attention", "mode": mode, "criterion": name, "ppl": ppl(windows),
                          "windows": len(windows), "seconds": time.perf_counter() - t0})

    if "ranges" in parts:
        windows = T.eval_windows(tokenizer, args.eval_windows)
        budget = ModelBudget.of(model)
        ratio = 0.2 * sum(budget.layer_params) / budget.total  # text_ppl.py's --lm-fraction 0.2
        runs = [("magnitude", scores["magnitude"]), ("activation", scores["activation"]),
                ("random seed 0", scores["random"]), ("random seed 1", score(model, "width", "random", seed=1).values)]
        for spec in ("1:-1", "4:-2"):
            for name, values in runs:
                plan = plan_for(model, Scores("width", name, "all", values), ratio, "none", layers=spec)
                cols = {i: torch.tensor(sorted(set(range(CHANNELS)) - set(e["mlp_channels"])))
                        for i, e in plan.layers.items()}
                with Zeroed(downs, cols):
                    emit({"part": "ranges", "layers": spec, "criterion": name, "ppl": ppl(windows),
                          "kept": CHANNELS - len(next(iter(cols.values()))), "cut_layers": sorted(cols),
                          "removed_decoder": plan.extra["achieved"]["params_removed"] / sum(budget.layer_params),
                          "windows": len(windows)})


if __name__ == "__main__":
    main()
