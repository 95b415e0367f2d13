"""lmms-eval: the vlmprune model plugin, `vlmprune evaluate --lmms-tasks`, the packaged offline tasks.

The first tests need no lmms-eval (config, result conversion, the missing-extra message, the report).
The others run lmms-eval offline through the ``lmms_eval.models`` entry point and check that it scores
the same questions exactly as `vlmprune evaluate` does. They skip where the extra is not installed,
except in CI (``CI`` set), where `make test` installs it and a skip would hide a broken install.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest

import vlmprune
from vlmprune.config import EvalConfig, build
from vlmprune.errors import VlmpruneError

ROOT = Path(__file__).resolve().parents[2]
HAVE_LMMS = importlib.util.find_spec("lmms_eval") is not None
if not HAVE_LMMS and os.environ.get("CI"):
    raise RuntimeError("lmms-eval is not installed in CI: `make test` installs the [lmms] extra; see the Makefile")
needs_lmms = pytest.mark.skipif(not HAVE_LMMS, reason="lmms-eval is not installed: pip install -e '.[lmms]' "
                                                      "(make test installs it)")


@pytest.fixture
def offline(monkeypatch):
    """No hub: the environment variables, and the flags huggingface_hub and datasets read at import."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


# ------------------------------------------------------------------------------ without lmms-eval


def test_config_lmms_tasks():
    cfg = build(EvalConfig, model="m", lmms_tasks="mme, pope")
    # no built-in tasks unless asked for
    assert cfg.evaluation.lmms_tasks == ["mme", "pope"] and cfg.evaluation.tasks == []
    default = build(EvalConfig, model="m").evaluation
    assert default.tasks == ["easyvqa", "digits"] and default.lmms_tasks == []
    both = build(EvalConfig, model="m", tasks="easyvqa", lmms_tasks=["easyvqa_lmms"]).evaluation
    assert both.tasks == ["easyvqa"] and both.lmms_tasks == ["easyvqa_lmms"]
    with pytest.raises(VlmpruneError, match="names a task twice"):
        build(EvalConfig, model="m", lmms_tasks="mme,mme")
    with pytest.raises(VlmpruneError, match="--lmms-include adds task YAMLs"):
        build(EvalConfig, model="m", lmms_include="somewhere")
    with pytest.raises(VlmpruneError, match="--efficiency measures a prompt"):
        build(EvalConfig, model="m", lmms_tasks="mme", efficiency=True)
    with pytest.raises(VlmpruneError, match="nothing to evaluate: give --tasks, --task-file and/or --lmms-tasks"):
        build(EvalConfig, model="m", tasks="")
    with pytest.raises(VlmpruneError, match="--lmms-tasks must be"):
        build(EvalConfig, model="m", lmms_tasks=[3])


def test_cli_flags_reach_the_config(monkeypatch, tmp_path):
    from vlmprune import cli

    seen = {}
    monkeypatch.setitem(cli.STAGES, "evaluate", (EvalConfig, lambda cfg: seen.setdefault("cfg", cfg) and 0, ""))
    assert cli.main(["evaluate", "--model", "m", "--lmms-tasks", "mme,pope", "--limit", "5",
                     "--lmms-include", str(tmp_path)]) == 0
    cfg = seen["cfg"]
    e = cfg.evaluation
    assert (e.lmms_tasks, e.tasks, e.limit, e.lmms_include) == (["mme", "pope"], [], 5, str(tmp_path))


def test_missing_extra_names_the_fix(monkeypatch, tiny_repo):
    from vlmprune.evaluate import lmms, run

    monkeypatch.setitem(__import__("sys").modules, "lmms_eval", None)  # import lmms_eval -> ImportError
    monkeypatch.setattr(run, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(VlmpruneError, match=re.escape('pip install "vlmprune[lmms]"')):
        run.evaluate_model_dir(build(EvalConfig, model=str(tiny_repo.model), lmms_tasks="pope"))
    with pytest.raises(VlmpruneError, match="not installed"):
        lmms.require_lmms()


def test_entries_from_results():
    from vlmprune.evaluate.lmms import entries_from_results

    raw = {"results": {"mme": {"alias": "mme", "mme_perception_score,none": 1201.5,
                               "mme_perception_score_stderr,none": "N/A", "mme_cognition_score,none": 250.0},
                       "pope": {"pope_accuracy,none": 0.85, "pope_f1_score,none": 0.84,
                                "pope_accuracy_stderr_clt,none": 0.01}},
           "higher_is_better": {"pope": {"pope_accuracy": True, "pope_f1_score": True}},
           "n-samples": {"mme": {"original": 2374, "effective": 2374}, "pope": {"original": 9000, "effective": 50}},
           "samples": {"pope": [{"doc_id": 0, "doc": {"question": "a dog?", "question_id": 7}, "target": "yes",
                                 "filtered_resps": ["Yes"]}]}}
    entries = entries_from_results(raw, limit=50)
    assert set(entries) == {"mme_perception", "mme_cognition", "pope"}
    assert entries["mme_perception"]["accuracy"] == 1201.5 and entries["mme_perception"]["scale"] == "score"
    assert entries["pope"]["accuracy"] == 0.85 and entries["pope"]["metric"] == "pope_accuracy"
    assert entries["pope"]["scale"] == "fraction" and entries["pope"]["count"] == 50
    assert set(entries["pope"]["metrics"]) == {"pope_accuracy", "pope_f1_score"}  # no stderr
    assert entries["pope"]["examples"] == [{"id": 0, "question": "a dog?", "answer": "yes", "prediction": "Yes"}]


def test_report_shows_lmms_tasks_beside_builtin(tmp_path):
    from vlmprune.report import write_report
    from vlmprune.study import load_study_config

    config = tmp_path / "study.yaml"
    config.write_text("grid: [{method: layer, ratio: 0.2}]\nevaluation: {tasks: [easyvqa], lmms_tasks: [mme, pope]}\n")
    assert load_study_config(config)["evaluation"]["lmms_tasks"] == ["mme", "pope"]  # accepted and checked
    with pytest.raises(VlmpruneError, match="names a task twice"):
        load_study_config(config, ["evaluation.lmms_tasks=[pope,pope]"])

    def result(easy, mme, pope):
        lmms = {"source": "lmms-eval", "per_type": {}, "count": 10}
        return {"tasks": {"easyvqa": {"accuracy": easy},
                          "mme_perception": {**lmms, "accuracy": mme, "metric": "mme_perception_score",
                                             "scale": "score"},
                          "pope": {**lmms, "accuracy": pope, "metric": "pope_accuracy", "scale": "fraction"}},
                "parameters": {"total": 100}}

    run = tmp_path / "run"
    (run / "original").mkdir(parents=True)
    (run / "original" / "eval.json").write_text(json.dumps(result(0.8, 1500.0, 0.9)))
    cell = run / "cells" / "layer-c-r0.2-none"
    cell.mkdir(parents=True)
    (cell / "cell.json").write_text(json.dumps({"id": cell.name, "method": "layer", "criterion": "c", "ratio": 0.2,
                                                "recipe": "none", "fraction": None}))
    (cell / "status.json").write_text(json.dumps({"status": "done"}))
    (cell / "eval.json").write_text(json.dumps({**result(0.4, 750.0, 0.45), "achieved": {"ratio": 0.2}}))
    paths = write_report(run)
    row = json.loads(paths["json"].read_text())["cells"][0]
    assert row["mme_perception_retention"] == pytest.approx(0.5) and row["pope_retention"] == pytest.approx(0.5)
    md = paths["md"].read_text()
    assert "mme_perception (retention)" in md and "750.000 (50.0%)" in md and "45.0% (50.0%)" in md
    assert "mme_perception 1500.000" in md


def test_lmms_extra_keeps_torch():
    """`make test` installs the [lmms] extra after torch 2.13.0: torch must still be that one, and any
    torchvision left must import (a broken one breaks transformers' image processors)."""
    import torch

    pinned = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    if HAVE_LMMS:
        assert torch.__version__.split("+")[0] == pinned
    extra = re.search(r'^lmms = \[(.*)\]$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert '"torchvision==0.28.*"' in extra and '"filelock<4"' in extra  # 0.28 is the release for torch 2.13
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision  # noqa: F401


# ------------------------------------------------------------------------------ with lmms-eval


def _task_with_known_answers(tiny_repo, model_dir, tmp_path) -> Path:
    """The tiny task file with references rewritten so that the model gets every other question
    right (its own greedy answers, from the built-in path): a score that can disagree, not 0 == 0."""
    from vlmprune.evaluate.tasks import generate_answers, load_task

    items = load_task(tiny_repo.task_file)
    answers = generate_answers(vlmprune.load(model_dir), vlmprune.load_processor(model_dir), items, batch_size=4,
                               max_new_tokens=10)
    records = json.loads(tiny_repo.task_file.read_text())
    assert [str(r.get("id")) for r in records] == [str(it["id"]) for it in items]
    for k, (record, answer) in enumerate(zip(records, answers)):
        record["conversations"][1]["value"] = (answer or "x") if k % 2 == 0 else "never said " + str(k)
    path = tmp_path / "images" / "known.json"  # beside a copy of the images (they resolve relative to the file)
    shutil.copytree(tiny_repo.images, tmp_path / "images")
    path.write_text(json.dumps(records))
    return path


def _per_layer_width_model(tiny_repo, tmp_path) -> Path:
    from vlmprune.planning.plan import PruningPlan

    model = vlmprune.load(tiny_repo.model)
    plan = PruningPlan(drop_layers=[3], layers={1: {"mlp_channels": list(range(0, 128, 2))}})
    vlmprune.apply_plan_(model, plan)
    assert set(model.config.get_text_config().vlmprune_layer_widths) == {"1"}
    out = vlmprune.save_model(model, tmp_path / "pruned", plan=plan, source=tiny_repo.model)
    return Path(out)


@needs_lmms
@pytest.mark.parametrize("kind", ["uniform", "per-layer widths"])
def test_lmms_eval_through_the_entry_point_agrees_with_evaluate(kind, tiny_repo, tmp_path, offline):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vlmprune.evaluate.lmms import entries_from_results, write_task
    from vlmprune.evaluate.run import evaluate_model_dir
    from vlmprune.evaluate.tasks import normalize_answer

    model_dir = tiny_repo.model if kind == "uniform" else _per_layer_width_model(tiny_repo, tmp_path)
    task_file = _task_with_known_answers(tiny_repo, model_dir, tmp_path)
    builtin = evaluate_model_dir(build(EvalConfig, model=str(model_dir), tasks="", task_file=str(task_file),
                                       batch_size=4))
    expected = builtin["tasks"]["known"]
    assert 0.3 < expected["accuracy"] < 0.7

    # lmms-eval resolves `vlmprune` through the entry point and loads the checkpoint itself
    folder = write_task(task_file, tmp_path / "lmms", "tiny_known")
    raw = simple_evaluate(model="vlmprune", model_args=f"pretrained={model_dir},device=cpu,dtype=float32,batch_size=4",
                          tasks=["tiny_known"], task_manager=TaskManager(include_path=[str(folder)],
                                                                         include_defaults=False),
                          log_samples=True, bootstrap_iters=0)
    got = entries_from_results(raw, keep_predictions=100)["tiny_known"]
    assert got["accuracy"] == pytest.approx(expected["accuracy"]) and got["count"] == expected["count"]
    assert [normalize_answer(e["prediction"]) for e in got["examples"]] == \
        [normalize_answer(e["prediction"]) for e in expected["examples"]]

    if kind == "uniform":  # and `vlmprune evaluate --lmms-tasks` merges it beside the built-in task
        both = evaluate_model_dir(build(EvalConfig, model=str(model_dir), tasks="", task_file=str(task_file),
                                             lmms_tasks="tiny_known", lmms_include=str(tmp_path / "lmms"),
                                             batch_size=4))
        assert both["tasks"]["tiny_known"]["accuracy"] == pytest.approx(both["tasks"]["known"]["accuracy"])
        assert both["tasks"]["tiny_known"]["source"] == "lmms-eval"
        assert both["accuracy"] == pytest.approx(expected["accuracy"])


@needs_lmms
def test_packaged_task_same_questions_as_builtin(tiny_repo, tmp_path, offline, capsys):
    """easyvqa_lmms: the built-in easyvqa test set as an lmms-eval task, the same seeded --limit subset."""
    from vlmprune import cli

    data = tmp_path / "data"
    shutil.copytree(tiny_repo.images, data / "easyvqa")  # the tiny task file stands in for easy-VQA's test.json
    out = tmp_path / "results.json"
    assert cli.main(["evaluate", "--model", str(tiny_repo.model), "--tasks", "easyvqa", "--lmms-tasks",
                     "easyvqa_lmms", "--data-dir", str(data), "--limit", "7", "--batch-size", "4",
                     "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    builtin, packaged = result["tasks"]["easyvqa"], result["tasks"]["easyvqa_lmms"]
    assert packaged["count"] == builtin["count"] == 7
    assert [str(e["id"]) for e in packaged["examples"]] == [str(e["id"]) for e in builtin["examples"]]
    assert packaged["accuracy"] == pytest.approx(builtin["accuracy"])
    assert "easyvqa_lmms" in capsys.readouterr().out


@needs_lmms
def test_unknown_task_and_offline_data_errors_name_the_fix(tiny_repo, tmp_path, offline, monkeypatch):
    from lmms_eval.api.task import ConfigurableTask
    from tenacity import stop_after_attempt, wait_none

    from vlmprune.evaluate.lmms import PAPER_TASKS
    from vlmprune.evaluate.run import evaluate_model_dir

    # lmms-eval retries a download five times, two seconds apart: once is enough here
    monkeypatch.setattr(ConfigurableTask.download.retry, "stop", stop_after_attempt(1))
    monkeypatch.setattr(ConfigurableTask.download.retry, "wait", wait_none())
    folder = tmp_path / "hub"
    folder.mkdir()
    template = (ROOT / "src/vlmprune/evaluate/lmms_tasks/task.yaml").read_text()
    (folder / "hub.yaml").write_text(template.replace("{task}", "hub_only").replace("{max_new_tokens}", "5")
                                     .replace('"{dataset_path}"', "nobody-here/no-such-dataset")
                                     .replace("  load_from_disk: true\n", "  token: false\n"))
    shutil.copy(ROOT / "src/vlmprune/evaluate/lmms_tasks/utils.py", folder / "utils.py")
    cfg = dict(model=str(tiny_repo.model), tasks="", lmms_include=str(folder))
    with pytest.raises(VlmpruneError, match=r"could not load the data of \['hub_only'\].*run once online.*"
                                            r"--lmms-include"):
        evaluate_model_dir(build(EvalConfig, **cfg, lmms_tasks="hub_only"))
    # refused before any data loads; the study's eight benchmarks (the README's command) are known tasks
    assert len(PAPER_TASKS) == 8
    with pytest.raises(VlmpruneError, match=r"does not know the task\(s\) \['no_such_task'\]; the study's "
                                            r"benchmarks are mmmu_val"):
        evaluate_model_dir(build(EvalConfig, **cfg, lmms_tasks=["hub_only", "no_such_task", *PAPER_TASKS]))


@needs_lmms
def test_plugin_honours_generation_options_and_keeps_request_order(tiny_repo):
    """Requests with different generation options are batched apart and answered in their own order;
    ``max_new_tokens`` and ``until`` from gen_kwargs apply, and the model argument caps the length."""
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from vlmprune.evaluate.lmms_model import VlmpruneLMM, cut_at

    assert cut_at("a.b\n\nc", ["\n\n"]) == "a.b" and cut_at("abc", ["", "x"]) == "abc"
    lm = VlmpruneLMM(pretrained=str(tiny_repo.model), device="cpu", dtype="float32", batch_size=2)
    images = [Image.new("RGB", (28, 28), (40 * k, 0, 0)) for k in range(5)]
    lm.task_dict = {"t": {"test": [{"image": im} for im in images]}}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    long, short = {"max_new_tokens": 12}, {"max_new_tokens": 2}
    options = [long, short, long, short, long]

    def requests(opts):
        return [Instance("generate_until", (f"question {k}?", dict(o), visual, k, "t", "test"), k,
                         {"task": "t", "doc_id": k, "repeats": 1}) for k, o in enumerate(opts)]

    count = lambda text: len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    answers = lm.generate_until(requests(options))
    assert answers[0] == lm.generate_until(requests([long]))[0]  # batched or alone, in its place
    assert max(count(answers[1]), count(answers[3])) <= 2 and max(map(count, answers)) > 2
    stop = answers[0][1:2]
    assert stop and stop not in lm.generate_until(requests([{"max_new_tokens": 12, "until": [stop]}]))[0]
    capped = VlmpruneLMM(model=lm.model, processor=lm.processor, max_new_tokens=1)
    capped.task_dict = lm.task_dict
    assert count(capped.generate_until(requests([long]))[0]) <= 1
    with pytest.raises(NotImplementedError, match="generate_until only"):
        lm.loglikelihood([])
    with pytest.raises(VlmpruneError, match="unknown model_args"):
        VlmpruneLMM(pretrained=str(tiny_repo.model), tempreature=0)
