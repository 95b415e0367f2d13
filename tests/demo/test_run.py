"""`vlmprune demo` end to end in reduced mode, and `vlmprune evaluate` on a tiny model."""

from __future__ import annotations

import json

import pytest

from vlmprune.cli import main


def test_demo_quick_end_to_end(tmp_path):
    for module in ("easy_vqa", "gguf", "onnx", "sklearn"):
        pytest.importorskip(module)
    assert main(["demo", "--quick", "--output", str(tmp_path / "demo")]) == 0
    run = tmp_path / "demo"
    results = json.loads((run / "results.json").read_text())
    assert len(results["cells"]) == 4 and all(c["status"] == "done" for c in results["cells"])
    assert set(results["original"]["tasks"]) == {"easyvqa", "digits"}
    achieved = {c["method"]: c["achieved_ratio"] for c in results["cells"]}
    assert abs(achieved["layer"] - 0.15) < 0.05 and abs(achieved["width"] - 0.15) < 0.02
    report = (run / "report.md").read_text()
    assert "Wall time" in report and "![accuracy_vs_params](accuracy_vs_params.png)" in report
    assert (run / "accuracy_vs_params.png").exists()


def test_evaluate_cli_with_task_file_and_efficiency(tiny_repo, tmp_path):
    out = tmp_path / "results.json"
    model = str(tiny_repo.model)
    assert main(["evaluate", "--model", model, "--tasks", "", "--task-file", str(tiny_repo.task_file), "--limit", "4",
                 "--efficiency", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["tasks"]["test"]["count"] == 4
    eff = result["efficiency"]
    assert eff["flops_per_sample"] > 1e6 and eff["prefill_s"] > 0 and eff["decode_tokens_per_s"] > 0
    assert eff["parameters"]["total"] == sum(v for k, v in eff["parameters"].items() if k != "total")
    assert main(["evaluate", "--model", model, "--tasks", "nope"]) == 2
