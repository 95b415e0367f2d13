"""`vlmprune demo`: the whole job on the embedded default model, as a small study."""

from __future__ import annotations

import time
from pathlib import Path

from vlmprune.report import write_report
from vlmprune.study import load_study_config, run_study

DEMO_CONFIG = Path(__file__).with_name("demo.yaml")
# Reduced mode (tests, a first look): a few images per dataset, a few samples and steps.
QUICK = ["demo_data_limit=12", "calibration.num_samples=4", "calibration.batch_size=2", "evaluation.limit=4",
         "evaluation.batch_size=4", "recovery.max_steps=2", "recovery.per_device_train_batch_size=2",
         "recovery.save_steps=1", "recovery.logging_steps=1"]


def run_demo(output: str | Path | None = None, quick: bool = False, overrides: list[str] | None = None,
             console=None) -> Path:
    """Build (or reuse) the demo model, run the demo grid, write report.md; return the run dir."""
    started = time.time()
    extra = list(QUICK if quick else []) + list(overrides or [])
    if output is not None:
        extra.append(f"output={output}")
    run = run_study(load_study_config(DEMO_CONFIG, extra), console)
    paths = write_report(run)
    minutes = (time.time() - started) / 60
    text = paths["md"].read_text().replace("# Study results", "# vlmprune demo", 1)
    report = run / "report.md"
    report.write_text(text + f"\nWall time: {minutes:.1f} min{' (reduced mode)' if quick else ''}.\n")
    if console is not None:
        console.print(text, markup=False, highlight=False)
    else:
        print(text)
    say = console.print if console is not None else print
    say(f"vlmprune demo finished in {minutes:.1f} min -> {report}")
    return run
