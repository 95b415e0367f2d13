"""`vlmprune report RUN_DIR`: every cell of a study in one table (md, csv, json) and three plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

# matplotlib's object-oriented API: a Figure draws and saves itself (Agg for PNG), with no global backend
# switch and no pyplot figure list to close
from matplotlib.figure import Figure

from vlmprune.errors import VlmpruneError
from vlmprune.readers import read_json, read_yaml_file
from vlmprune.study import expand_grid


def _read(path: Path) -> dict | None:
    try:
        return read_json(path)
    except VlmpruneError:
        return None


def collect(run: Path) -> tuple[dict, list[dict]]:
    """The original model's scores and one row per cell: done, failed, unfinished, or (for the
    cells of the run's grid, read from its resolved_config.yaml, not yet started) pending."""
    original = _read(run / "original" / "eval.json")
    if original is None:
        raise VlmpruneError(f"{run} has no original/eval.json: is it a `vlmprune study` run directory?")
    tasks = sorted(original["tasks"])
    rows = []
    for cell_dir in sorted((run / "cells").iterdir()) if (run / "cells").exists() else []:
        cell, status = _read(cell_dir / "cell.json"), _read(cell_dir / "status.json")
        if cell is None:
            continue
        row = {k: cell[k] for k in ("id", "method", "criterion", "ratio", "recipe", "fraction")}
        row["target"] = cell.get("target")
        row["quantization"] = cell.get("quantization")
        row["compensate"] = cell.get("compensate") or "none"
        row["status"] = (status or {}).get("status", "unfinished")
        row["error"] = (status or {}).get("error")
        result = _read(cell_dir / "eval.json") if row["status"] == "done" else None
        if result:
            row["params"] = result["parameters"]["total"]
            row["disk_bytes"] = result.get("disk_bytes")
            row["achieved_ratio"] = (result.get("achieved") or {}).get("ratio")
            if result.get("target"):  # what the cut achieved of the quantity the target is in
                row["target_achieved"] = result["target"].get("achieved")
            for t in tasks:
                score = result["tasks"].get(t, {}).get("accuracy")
                base = original["tasks"][t]["accuracy"]
                row[f"{t}"] = score
                row[f"{t}_retention"] = score / base if score is not None and base else None
            kept = [row[f"{t}_retention"] for t in tasks if row.get(f"{t}_retention") is not None]
            row["mean_retention"] = sum(kept) / len(kept) if kept else None
            row["seconds"] = (status or {}).get("seconds")
        rows.append(row)
    config = run / "resolved_config.yaml"
    if config.exists():
        seen = {r["id"] for r in rows}
        rows += [{**cell.to_dict(), "status": "pending", "error": None}
                 for cell in expand_grid(read_yaml_file(config)) if cell.id not in seen]
    return original, rows


def _fmt(value, pct=False) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{100 * value:.1f}%" if pct else f"{value:.3f}"
    return str(value)


def _is_fraction(original: dict, task: str) -> bool:
    """Is the task scored as a fraction (shown in %)? lmms-eval scores such as MME's sums are not."""
    return original["tasks"][task].get("scale", "fraction") == "fraction"


def method_label(r: dict) -> str:
    """How a cell's cut reads in tables and plots: ``layer (block_influence)``, ``width (taylor) +ls``."""
    comp = r.get("compensate") or "none"
    base = f"{r['method']} ({r['criterion']})" if r.get("criterion") else r["method"]
    return base + ("" if comp == "none" else f" +{comp}")


def cell_words(r: dict) -> str:
    """A cell in words: ``layer (block_influence) 15%, sft+hidden on 5% of the data, int8``."""
    size = r["target"] if r.get("target") else f"{r['ratio']:.0%}"
    recovery = "no recovery" if r["recipe"] == "none" else r["recipe"]
    if r.get("fraction") is not None and r["recipe"] != "none":
        recovery += f" on {r['fraction']:.0%} of the data"
    return f"{method_label(r)} {size}, {recovery}" + (f", {r['quantization']}" if r.get("quantization") else "")


def retention_series(done: list[dict]) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(cut, recipe) -> [(% of the parameters removed, mean retention %)], at each recipe's most common data
    fraction, sorted by size: what the retention plot draws."""
    series = {}
    for key in sorted({(method_label(r), r["recipe"]) for r in done}):
        pts = [r for r in done if (method_label(r), r["recipe"]) == key]
        fractions = [r["fraction"] for r in pts]
        main = max(set(fractions), key=fractions.count)
        series[key] = sorted((round(100 * (r["achieved_ratio"] or r["ratio"] or 0), 4),
                              round(100 * r["mean_retention"], 4)) for r in pts if r["fraction"] == main)
    return series


def _fmt_int(value) -> str:
    return f"{value:,}" if isinstance(value, int) else ""


def _fmt_mb(value) -> str:
    return f"{value / 2**20:,.1f}" if isinstance(value, int) else ""


def write_report(run: str | Path) -> dict[str, Path]:
    """Write results.{md,csv,json} and plots into the run directory; return their paths."""
    run = Path(run)
    original, rows = collect(run)
    tasks = sorted(original["tasks"])
    out = {"json": run / "results.json", "csv": run / "results.csv", "md": run / "results.md"}
    out["json"].write_text(json.dumps({"original": {"tasks": {t: original["tasks"][t]["accuracy"] for t in tasks},
                                                    "parameters": original["parameters"]}, "cells": rows}, indent=1))
    columns = ["id", "method", "criterion", "ratio", "target", "achieved_ratio", "target_achieved", "recipe",
               "fraction", "quantization", "params", "disk_bytes", "compensate",
               *[c for t in tasks for c in (t, f"{t}_retention")], "mean_retention", "status", "error"]
    with out["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Study results: {run.name}", "",
             f"Original model: {original['parameters']['total']:,} parameters; "
             + ", ".join(f"{t} {_fmt(original['tasks'][t]['accuracy'], _is_fraction(original, t))}"
                         for t in tasks), "",
             "| method | ratio (target / achieved) | recovery | data fraction | quantization | params | disk MB | "
             + " | ".join(f"{t} (retention)" for t in tasks) + " | mean retention | status |",
             "|---|---|---|---:|---|---:|---:|" + "---:|" * len(tasks) + "---:|---|"]
    for r in sorted(rows, key=lambda r: (method_label(r), r.get("target") or "", r["ratio"] or 0, r["recipe"],
                                         r["fraction"] or 0, r.get("quantization") or "")):
        scores = " | ".join(f"{_fmt(r.get(t), _is_fraction(original, t))} ({_fmt(r.get(f'{t}_retention'), True)})"
                            if r.get(t) is not None
                            else "" for t in tasks)
        status = r["status"] if r["status"] != "failed" else f"failed: {r['error']}"
        size = r["target"] if r.get("target") else f"{r['ratio']:.0%}"
        lines.append(f"| {method_label(r)} | {size} / {_fmt(r.get('achieved_ratio'), True)} | "
                     f"{r['recipe']} | {_fmt(r['fraction'], True)} | {r.get('quantization') or ''} | "
                     f"{_fmt_int(r.get('params'))} | {_fmt_mb(r.get('disk_bytes'))} | {scores} | "
                     f"{_fmt(r.get('mean_retention'), True)} | {status} |")
    lines += _by_size(rows, tasks)
    out.update(_plots(run, original, rows, tasks))
    lines += ["", *[f"![{name}]({path.name})" for name, path in out.items() if path.suffix == ".png"]]
    out["md"].write_text("\n".join(lines) + "\n")
    return out


def _by_size(rows: list[dict], tasks: list[str]) -> list[str]:
    """Methods side by side at the same ratio or target (and recovery, fraction, quantization): the
    mean task score, retention and achieved ratio per method, the best in bold. Empty unless some
    size was cut by more than one method."""
    groups: dict[tuple, dict[str, tuple[float, dict]]] = {}
    for r in rows:
        scores = [r[t] for t in tasks if r.get(t) is not None]
        if r["status"] == "done" and scores:
            size = r["target"] if r.get("target") else f"ratio={r['ratio']:g}"
            key = (size, r["recipe"], r["fraction"] or 0, r.get("quantization") or "")
            groups.setdefault(key, {})[method_label(r)] = (sum(scores) / len(scores), r)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return []
    methods = sorted({m for v in groups.values() for m in v})
    lines = ["", "## Methods at the same size", "",
             "Mean task score (retention; ratio of the whole model's parameters removed); the best of each row "
             "in bold.", "",
             "| size | recovery | data fraction | quantization | " + " | ".join(methods) + " |",
             "|---|---|---:|---|" + "---:|" * len(methods)]
    for (size, recipe, fraction, scheme), cells in sorted(groups.items()):
        best = max(score for score, _ in cells.values())
        shown = []
        for m in methods:
            if m not in cells:
                shown.append("")
                continue
            score, r = cells[m]
            text = (f"{_fmt(score)} ({_fmt(r.get('mean_retention'), True) or 'n/a'}; "
                    f"{_fmt(r.get('achieved_ratio'), True)})")
            shown.append(f"**{text}**" if score == best else text)
        lines.append(f"| {size} | {recipe} | {_fmt(fraction or None, True)} | {scheme} | " + " | ".join(shown) + " |")
    return lines


def _plots(run: Path, original: dict, rows: list[dict], tasks: list[str]) -> dict[str, Path]:
    finished = [r for r in rows if r["status"] == "done"]
    done = [r for r in finished if r.get("mean_retention") is not None]  # retention needs a score > 0 to compare to
    paths = {}
    if finished:
        paths.update(_accuracy_plot(run, original, finished, tasks))
        sized = [r for r in finished if r.get("disk_bytes")]
        if sized and original.get("disk_bytes"):  # runs before sizes were recorded have none
            paths.update(_accuracy_plot(run, original, sized, tasks, size="disk_bytes"))
    if not done:
        return paths
    # 1. retention per cut and recipe: against the share removed, or side by side when the grid has one size
    series = retention_series(done)
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    recipes = sorted({recipe for _, recipe in series})
    colour = {recipe: f"C{i % 10}" for i, recipe in enumerate(recipes)}  # one colour per recipe
    if all(len(pts) == 1 for pts in series.values()):
        cuts = sorted({cut for cut, _ in series})
        width = 0.8 / len(recipes)
        for j, recipe in enumerate(recipes):
            xs = [i + (j - (len(recipes) - 1) / 2) * width for i, cut in enumerate(cuts) if (cut, recipe) in series]
            ys = [series[(cut, recipe)][0][1] for cut in cuts if (cut, recipe) in series]
            ax.bar(xs, ys, width=width, color=colour[recipe], label=recipe)
        ax.set_xticks(range(len(cuts)), [f"{cut}\n{series[next(k for k in series if k[0] == cut)][0][0]:.1f}% removed"
                                         for cut in cuts], fontsize=7)
        values = [y for pts in series.values() for _, y in pts]
        ax.set_ylim(min(values) * 0.9, max(101, max(values) + 2))
    else:
        for (cut, recipe), pts in series.items():
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=colour[recipe],
                    linestyle="-" if cut.startswith("width") else "--", label=f"{cut} / {recipe}")
        ax.set_xlabel("parameters removed (% of the whole model)")
    ax.set_ylabel("mean retention (% of the original's score)")
    ax.set_title("Retention per cut and recovery recipe")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, handlelength=3)
    fig.tight_layout()
    paths["retention_vs_ratio"] = run / "retention_vs_ratio.png"
    fig.savefig(paths["retention_vs_ratio"], dpi=120)
    # 2. retention vs data fraction
    sweeps = {}
    for r in done:
        if r["fraction"] is not None:
            size = r["target"] if r.get("target") else f"{r['ratio']:.0%}"
            sweeps.setdefault((r["method"], r["recipe"], size), []).append(r)
    sweeps = {k: v for k, v in sweeps.items() if len({r["fraction"] for r in v}) > 1}
    if sweeps:
        fig = Figure(figsize=(7, 4.5))
        ax = fig.subplots()
        for (method, recipe, size), pts in sorted(sweeps.items()):
            pts = sorted(pts, key=lambda r: r["fraction"])
            ax.plot([100 * r["fraction"] for r in pts], [100 * r["mean_retention"] for r in pts], marker="o",
                    label=f"{method} {size} / {recipe}")
        ax.set_xscale("log")
        ax.set_xlabel("recovery data (% of the training set, log scale)")
        ax.set_ylabel("mean retention (%)")
        ax.set_title("Retention vs data fraction")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths["retention_vs_fraction"] = run / "retention_vs_fraction.png"
        fig.savefig(paths["retention_vs_fraction"], dpi=120)
    return paths


def _accuracy_plot(run: Path, original: dict, rows: list[dict], tasks: list[str],
                   size: str = "params") -> dict[str, Path]:
    """Mean accuracy against parameters (or bytes of weights on disk, ``size="disk_bytes"``: what
    fits in N MB), with the Pareto front (no smaller model is better) marked."""
    paths = {}
    tasks = [t for t in tasks if _is_fraction(original, t)] or tasks  # a mean of fractions, not of MME sums
    mean_acc = lambda r: sum(r[t] for t in tasks if r.get(t) is not None) / len(tasks)  # noqa: E731
    scale, label, name = ((1e6, "parameters (millions)", "accuracy_vs_params") if size == "params"
                          else (2**20, "weights on disk (MB)", "accuracy_vs_disk"))
    points = [(r[size], mean_acc(r), cell_words(r)) for r in rows]
    points.append((original["parameters"]["total"] if size == "params" else original[size],
                   sum(original["tasks"][t]["accuracy"] for t in tasks) / len(tasks), "original"))
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p[0], -p[1])):
        if p[1] > best:
            front.append(p)
            best = p[1]
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    ax.scatter([p[0] / scale for p in points], [100 * p[1] for p in points], color="tab:gray", s=18)
    ax.plot([p[0] / scale for p in front], [100 * p[1] for p in front], color="tab:red", marker="o",
            label="Pareto front")
    for p in points:  # every point named in words (the front in red, the others grey)
        ax.annotate(p[2], (p[0] / scale, 100 * p[1]), fontsize=6, xytext=(3, 3), textcoords="offset points",
                    color="tab:red" if p in front else "dimgray")
    ax.set_xlabel(label)
    ax.set_ylabel("mean accuracy (%)")
    ax.set_title("Accuracy vs size")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths[name] = run / f"{name}.png"
    fig.savefig(paths[name], dpi=120)
    return paths
