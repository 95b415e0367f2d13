"""Cost of scoring: wall time and peak memory of each criterion, as a multiple of the weight bytes.

    .venv/bin/python benchmarks/prune_cost.py [--samples 64] [--batch-size 8] [--json out.json]
    .venv/bin/python benchmarks/prune_cost.py --shape qwen2.5-vl-3b --batch-sizes 1,8 [--device cuda]
    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python benchmarks/prune_cost.py --command [--repeats 3] \
        [--samples 16] [--max-length 256] [--criteria taylor,block_influence] [--jsonl rows.jsonl]

``--command``: the whole `vlmprune prune` command, load to save, per criterion, in its own process
(see ``command_main``): its wall time and peak RSS, and per phase (vlmprune.phases: import, load,
data, calibration, scoring, planning, surgery, save, records, other) the time and peak RSS the
command recorded in its run.json, as medians over ``--repeats`` runs.

Default shape: LLaVA-style with a SmolLM2-135M-shaped language model (30 layers, hidden 576, 9 heads,
3 kv heads, MLP 1536), float32. ``--shape qwen2.5-vl-3b|llava-1.5-7b`` builds that whole VLM at its
real shape (vision tower included) with random weights in bfloat16 (``--dtype``), on the meta device
first so building costs no initialisation time, with one 112-px image per sample.

Each (criterion, batch size) runs in a fresh process; the peak counter (CPU: the kernel's peak RSS;
CUDA: the allocator's peak) is reset after the model and batches exist, so the peak is the scoring's own.
"peak / weights" = (peak during scoring - memory before the model existed) / weight bytes. Two
references measure the activations of one batch: ``forward`` (no-grad forward of the base model, what
the forward criteria run) and ``backward`` (forward + backward of the answer loss with every weight
frozen, what Taylor runs besides its gradients). The budgets checked at the end are the issue's:
Taylor and activation <= 1.3 x weights + activations of one batch, layer criteria <= 1.1 x weights + activations.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CRITERIA = {"layer": ["block_influence", "angular", "skip_loss", "last"],
            "width": ["taylor", "magnitude", "activation", "wanda", "random"]}


def activations_only(model, batches) -> None:
    """Forward + backward of the answer loss with every weight frozen: the memory of the
    activations autograd keeps, and nothing else (the reference for Taylor's budget)."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_())
    for batch in batches:
        model(**batch).loss.backward()


def forward_only(model, batches) -> None:
    """No-grad forward of the base model (no LM head): the activations the forward criteria see."""
    import torch

    with torch.no_grad():
        for batch in batches:
            model.model(**{k: v for k, v in batch.items() if k != "labels"})


def worker(method: str, criterion: str, samples: int, batch_size: int, shape: str, dtype: str, device: str,
           text_layers: int | None = None) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from common import REAL_SHAPES, build_llava, build_real, fake_batch, fake_real_batch

    from vlmprune.evaluate.efficiency import peak_mb, reset_peak
    from vlmprune.prune.run import score_and_plan

    torch_dtype = getattr(torch, dtype)
    base = reset_peak(device)
    if shape in REAL_SHAPES:
        model = build_real(shape, torch_dtype, device, text_layers=text_layers)
        make = lambda i: fake_real_batch(model, batch_size, seed=i, image_px=112)  # noqa: E731
    else:
        model = build_llava(shape, torch_dtype).to(device)
        make = lambda i: fake_batch(model, batch_size, seed=i)  # noqa: E731
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()) / 2**20
    batches = [{k: v.to(device) for k, v in make(i).items()} for i in range(max(samples // batch_size, 1))]
    reset_peak(device)
    t0 = time.perf_counter()
    stats_mb = None
    if method == "reference":
        (forward_only if criterion == "forward" else activations_only)(model, batches)
    elif method == "compensate":  # a 20% width cut (magnitude: no data), fitted; the peak is the fit's own
        from vlmprune.surgery.compensate import compensate_

        plan, _ = score_and_plan(model, "width", 0.2, "magnitude")
        reset_peak(device)
        t0 = time.perf_counter()
        compensate_(model, plan, batches, criterion, sequential=True)
        widest = max(max(m.in_features for m in (layer.self_attn.o_proj, layer.mlp.down_proj))
                     for layer in model.model.language_model.layers)
        stats_mb = widest * widest * 8 / 2**20  # one consumer's float64 Gram matrix
    else:
        score_and_plan(model, method, 0.2, criterion, batches)
    seconds = time.perf_counter() - t0
    peak = peak_mb(device)
    return {"shape": shape, "text_layers": text_layers, "dtype": dtype, "device": device, "batch_size": batch_size,
            "batches": len(batches),
            "tokens_per_batch": int(batches[0]["input_ids"].numel()),
            "method": method, "criterion": criterion, "seconds": seconds, "weights_mb": weights,
            "rss_before_model_mb": base, "peak_rss_mb": peak, "layer_statistics_mb": stats_mb,
            "peak_over_weights": (peak - base) / weights}


def budgets(rows: list[dict]) -> list[str]:
    """The issue's targets, per batch size: criterion peak vs factor x weights + the matching reference."""
    lines = []
    for bs in sorted({r["batch_size"] for r in rows}):
        at = {r["criterion"]: r for r in rows if r["batch_size"] == bs}
        for name, factor, ref in (("taylor", 1.3, "backward"), ("activation", 1.3, "forward"),
                                  ("wanda", 1.3, "forward"), ("block_influence", 1.1, "forward"),
                                  ("angular", 1.1, "forward"),
                                  ("skip_loss", 1.1, "forward"), ("ls", 1.5, "forward")):
            if name not in at or ref not in at:
                continue
            r, a = at[name], at[ref]
            weights = r["weights_mb"]
            activations = max(a["peak_rss_mb"] - a["rss_before_model_mb"] - weights, 0.0)
            used = r["peak_rss_mb"] - r["rss_before_model_mb"]
            # compensation (issue 28): the prune budget plus one layer's statistics (its Gram matrices, float64)
            budget = factor * weights + activations + 2 * (r.get("layer_statistics_mb") or 0.0)
            lines.append(f"batch {bs} {name}: {used:.0f} MB above the bare process; budget {factor} x {weights:.0f} MB "
                         f"weights + {activations:.0f} MB activations ({ref} reference) = {budget:.0f} MB -> "
                         f"{'OK' if used <= budget else 'OVER'} ({used / budget:.2f} of budget)")
    return lines


COMMAND_CRITERIA = {"magnitude": "width", "random": "width", "activation": "width", "wanda": "width",
                    "taylor": "width", "block_influence": "layer", "angular": "layer"}
DATA_FREE = ("magnitude", "random", "last")


def median(values):
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def command_main(args) -> None:
    """Run `vlmprune prune` per criterion on a saved model and print its cost per phase (medians)."""
    import os

    from common import run_vlmprune, save_llava, weight_bytes, write_calibration

    from vlmprune.checkpoint import load
    from vlmprune.phases import PHASES
    from vlmprune.planning.solve import ModelBudget
    from vlmprune.record import RunRecord

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else save_llava(args.shape, workdir / f"model-{args.shape}")
    calibration = workdir / "calibration.json"
    write_calibration(calibration)
    model = load(model_dir)
    budget = ModelBudget.of(model)
    ratio = args.lm_fraction * sum(budget.layer_params) / budget.total  # ~20% of the decoder layers
    weights_mib = weight_bytes(model) / 2**20
    del model
    env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    if args.src:
        env["PYTHONPATH"] = str(Path(args.src).resolve())
    criteria = args.criteria.split(",") if args.criteria else list(COMMAND_CRITERIA)
    rows = []
    for repeat in range(args.repeats):  # repeats outermost: a disturbance spreads over criteria
        modes = args.compensate.split(",") if args.compensate else []
        for name in [c + m for c in criteria for m in ("", *(f"+{mode}" for mode in modes))]:
            criterion, _, compensate = name.partition("+")
            method = COMMAND_CRITERIA.get(criterion, "width")
            out = workdir / f"out-{name}"
            argv = ["prune", "--model", str(model_dir), "--method", method, "--criterion", criterion,
                    "--ratio", f"{ratio:.6f}", "--output", str(out), "--overwrite", "--seed", "0"]
            if criterion not in DATA_FREE or compensate:
                argv += ["--calibration", str(calibration), "--num-samples", str(args.samples),
                         "--max-length", str(args.max_length), "--batch-size", str(args.batch_size)]
            mode, _, fit = compensate.partition("-")  # ls-oneshot: every fit on the unpruned model's states
            argv += ["--compensate", mode or "none"]  # the plain rows are plain (auto would fit with data)
            argv += ["--no-compensate-sequential"] if fit == "oneshot" else []
            load_before = os.getloadavg()[0]
            seconds, peak, code = run_vlmprune(argv, workdir / f"{name}.log", env)
            if code != 0:
                print(f"{name}: vlmprune prune failed (exit {code}); see {workdir / (name + '.log')}")
                continue
            record = RunRecord.load(out).prune
            row = {"label": args.label, "criterion": name, "method": method, "repeat": repeat,
                   "threads": args.threads, "samples": args.samples, "max_length": args.max_length,
                   "batch_size": args.batch_size, "wall_s": seconds, "peak_rss_mib": peak, "weights_mib": weights_mib,
                   "loadavg": [load_before, os.getloadavg()[0]], "cost": record.cost}
            rows.append(row)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")
            peak = process_peak(row)
            print(f"{name:16s} run {repeat}: {seconds:6.1f} s  peak {peak:6.0f} MiB ({peak / weights_mib:.2f}x "
                  f"weights)  load {load_before:.1f}", flush=True)
    if not rows:
        return
    print(f"\nweights {weights_mib:.0f} MiB; {args.threads} thread(s); medians of {args.repeats}; "
          f"{args.samples} samples <= {args.max_length} tokens, batch {args.batch_size}; label {args.label}")
    print_command_tables(rows, PHASES)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def process_peak(row: dict) -> float:
    """The prune process's peak RSS: its own record when it wrote one. (Resetting VmHWM, as the
    recorder does, also resets what the kernel reports to the parent through wait4.)"""
    cost = row.get("cost")
    return cost["peak_rss_mib"] if cost and cost.get("peak_rss_mib") else row["peak_rss_mib"]


def _whole_command(row: dict, key: str, weights: float):
    """The whole command's value in the column of ``key``: wall seconds, CPU seconds, or peak RSS / weights."""
    if key == "seconds":
        return row["wall_s"]
    if key == "cpu_seconds":
        return (row.get("cost") or {}).get("cpu_seconds")
    return process_peak(row) / weights


def print_command_tables(rows: list[dict], phases) -> None:
    """Two tables (seconds; peak RSS / weight bytes) with a row per criterion and a column per phase."""
    criteria = list(dict.fromkeys(r["criterion"] for r in rows))
    for title, key in (("wall seconds", "seconds"), ("CPU seconds (the process, all threads)", "cpu_seconds"),
                       ("peak RSS / weights", "peak_rss_mib")):
        print(f"\n{title}:")
        print("| criterion | whole command | " + " | ".join(phases) + " |")
        print("|---|---:|" + "---:|" * len(phases))
        for c in criteria:
            got = [r for r in rows if r["criterion"] == c]
            weights = got[0]["weights_mib"]
            whole = median([_whole_command(r, key, weights) for r in got])
            cells = []
            for name in phases:
                values = [r["cost"]["phases"][name][key] for r in got if r.get("cost")]
                value = median(values)
                if value is None:
                    cells.append("")
                elif key != "peak_rss_mib":
                    cells.append(f"{value:.2f}")
                else:
                    cells.append(f"{value / weights:.2f}")
            print(f"| {c} | {'' if whole is None else f'{whole:.2f}'} | " + " | ".join(cells) + " |")
    print("\nagainst the target (peak <= 1.5 x weights + one batch's activations, above the imported process):")
    print("| criterion | peak MiB | imports MiB | one batch's activations MiB "
          "| (peak - imports - activations) / weights |")
    print("|---|---:|---:|---:|---:|")
    for c in criteria:
        got = [r for r in rows if r["criterion"] == c and r.get("cost")]
        if not got:
            continue
        parts = [target_parts(r) for r in got]
        peak, imports, act = (median([p[i] for p in parts]) for i in range(3))
        net = median([(p[0] - p[1] - p[2]) / r["weights_mib"] for p, r in zip(parts, got)])
        print(f"| {c} | {peak:.0f} | {imports:.0f} | {act:.0f} | {net:.2f} |")


def target_parts(row: dict) -> tuple[float, float, float]:
    """(process peak, RSS once everything is imported, one batch's activations) in MiB. The activations:
    how far the calibration phase rose above the RSS it started from (0 for criteria without data)."""
    phases = row["cost"]["phases"]
    cal = phases["calibration"]
    act = cal["peak_rss_mib"] - cal["rss_start_mib"] if cal["peak_rss_mib"] is not None else 0.0
    return process_peak(row), phases["import"]["rss_end_mib"], max(act, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m",
                        help="smollm2-135m (LLaVA-style, default), qwen2.5-vl-3b or llava-1.5-7b "
                             "(whole real VLM shapes)")
    parser.add_argument("--samples", type=int, help="calibration samples (default 64; real shapes: one batch)")
    parser.add_argument("--batch-size", type=int, help="calibration batch size (default 8; --command: 1, prune's own)")
    parser.add_argument("--batch-sizes", help="comma-separated batch sizes (overrides --batch-size)")
    parser.add_argument("--dtype", help="float32 / bfloat16 (default: bfloat16 for real shapes, else float32)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--text-layers", type=int, help="real shapes: build only this many decoder layers (same "
                                                        "widths; a layer's cost on a machine too small for all)")
    parser.add_argument("--criteria", help="comma-separated subset (references: forward, backward)")
    parser.add_argument("--json", help="write the rows here (appended as they come with --jsonl)")
    parser.add_argument("--jsonl", help="append each row to this file as soon as it is measured")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    command = parser.add_argument_group("--command: the whole `vlmprune prune` command, per phase")
    command.add_argument("--command", action="store_true", help="run `vlmprune prune` per criterion (see above)")
    command.add_argument("--model", help="checkpoint to prune (default: build_llava(--shape) saved in --workdir)")
    command.add_argument("--repeats", type=int, default=3)
    command.add_argument("--max-length", type=int, default=256)
    command.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the prune processes")
    command.add_argument("--lm-fraction", type=float, default=0.2,
                         help="share of the decoder layers' parameters to cut")
    command.add_argument("--src", help="PYTHONPATH of the prune processes (another checkout's src, to compare)")
    command.add_argument("--label", default="", help="a name for these rows (e.g. before / after)")
    command.add_argument("--compensate", help="also run each criterion with --compensate MODE (comma-separated; "
                         "ls-oneshot: with --no-compensate-sequential), interleaved (rows read CRITERION+MODE)")
    command.add_argument("--workdir", default="/tmp/vlmprune-prune-cost")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    if args.command:
        args.samples = args.samples or 16
        args.batch_size = args.batch_size or 1
        command_main(args)
        return
    from common import REAL_SHAPES

    real = args.shape in REAL_SHAPES
    dtype = args.dtype or ("bfloat16" if real else "float32")
    sizes = [int(x) for x in args.batch_sizes.split(",")] if args.batch_sizes else [args.batch_size or 8]
    if args.worker:
        method, criterion, bs = args.worker.split(":")
        samples = args.samples or (int(bs) if real else 64)
        print(json.dumps(worker(method, criterion, samples, int(bs), args.shape, dtype, args.device, args.text_layers)))
        return
    wanted = set(args.criteria.split(",")) if args.criteria else None
    groups = {**CRITERIA, "reference": ["forward", "backward"], "compensate": ["ls"]}
    if real and wanted is None:  # skip_loss runs L+1 forwards per batch: hours at these sizes on a CPU
        groups["layer"] = [c for c in groups["layer"] if c != "skip_loss"]
    rows = []
    for bs in sizes:
        for method, names in groups.items():
            for criterion in names:
                if wanted and criterion not in wanted:
                    continue
                cmd = [sys.executable, __file__, "--worker", f"{method}:{criterion}:{bs}", "--shape", args.shape,
                       "--dtype", dtype, "--device", args.device]
                cmd += ["--text-layers", str(args.text_layers)] if args.text_layers else []
                if args.samples:
                    cmd += ["--samples", str(args.samples)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{method} {criterion} batch {bs}: FAILED\n{out.stderr[-2000:]}", flush=True)
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rows.append(r)
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(r) + "\n")
                print(f"batch {bs} {method:9s} {criterion:16s} {r['seconds']:8.1f} s  peak {r['peak_rss_mb']:7.0f} MB  "
                      f"({r['peak_over_weights']:.2f}x weights of {r['weights_mb']:.0f} MB)", flush=True)
    if not rows:
        return
    print("\n| batch | method | criterion | wall time (s) | peak (MB) | peak / weight bytes |")
    print("|---:|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch_size']} | {r['method']} | {r['criterion']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} "
              f"| {r['peak_over_weights']:.2f} |")
    r0 = rows[0]
    print(f"\nshape {args.shape}, {dtype}, {args.device}; {r0['weights_mb']:.0f} MB of weights; memory before the "
          f"model: {r0['rss_before_model_mb']:.0f} MB")
    for line in budgets(rows):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
