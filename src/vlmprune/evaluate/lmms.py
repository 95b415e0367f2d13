"""lmms-eval tasks in `vlmprune evaluate --lmms-tasks`, and the entry point that makes
``lmms-eval --model vlmprune`` work.

- ``manifest()`` is the ``lmms_eval.models`` entry point (pyproject.toml): it tells lmms-eval where
  the model class lives (``vlmprune.evaluate.lmms_model.VlmpruneLMM``).
- ``write_task()`` turns a LLaVA-format test file (the built-in tasks' ``test.json``, or yours) into an
  lmms-eval task: the records saved with ``datasets.save_to_disk`` and a task YAML over them (the
  template and its functions: ``vlmprune/evaluate/lmms_tasks/``), so lmms-eval runs offline.
- ``run_lmms_tasks()`` runs lmms-eval tasks on a loaded model through that plugin and returns one
  result entry per headline metric, in the shape of the built-in tasks' entries.

Nothing here imports lmms-eval at module level: it is an optional extra (``vlmprune[lmms]``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from vlmprune.config import BUILTIN_TASKS, LMMS_PACKAGED_TASKS
from vlmprune.environment import check_torchvision
from vlmprune.errors import VlmpruneError

TEMPLATE_DIR = Path(__file__).parent / "lmms_tasks"
INSTALL_HINT = 'pip install "vlmprune[lmms]" (after torch; see the README: it pins a torchvision that keeps your torch)'

# The study's benchmarks as lmms-eval 0.7.3 names them. All but the packaged ones download their data
# from the Hugging Face hub on first use; mathvista_testmini is scored by a GPT judge (OPENAI_API_KEY).
PAPER_TASKS = ("mmmu_val", "scienceqa_img", "mathvista_testmini", "ai2d", "mme", "pope", "docvqa_val", "gqa")
# tasks whose result holds more than one headline number (entry name -> metric); any other task's
# headline is the first metric of its YAML's metric_list
HEADLINE = {"mme": {"mme_perception": "mme_perception_score", "mme_cognition": "mme_cognition_score"}}
# metrics that are not fractions in [0, 1] (MME: sums of per-subtask scores; judge scores: percent)
NOT_FRACTION = {"mme_perception_score", "mme_cognition_score", "llm_as_judge_eval", "gpt_eval_score"}


def manifest():
    """The ``lmms_eval.models`` entry point: ``--model vlmprune``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="vlmprune", simple_class_path="vlmprune.evaluate.lmms_model.VlmpruneLMM")


def require_lmms() -> None:
    """A clear error naming the fix when the extra is not installed, or when a torchvision is
    installed that does not run beside this torch (transformers and lmms-eval would fail obscurely)."""
    check_torchvision()
    try:
        import lmms_eval  # noqa: F401
    except ImportError as exc:
        raise VlmpruneError(f"--lmms-tasks needs lmms-eval, which is not installed ({exc}); install the extra: "
                            f"{INSTALL_HINT}") from None


def write_task(task_file: str | Path, output: str | Path, name: str, limit: int | None = None,
               max_new_tokens: int = 10, seed: int = 0) -> Path:
    """Write ``output/<name>/`` (a task YAML, its functions and the saved data set) for the records of a
    LLaVA-format ``task_file``; ``limit`` keeps the same seeded subset as `vlmprune evaluate --limit`
    does for the built-in task. Returns the folder (pass it to lmms-eval's ``include_path``)."""
    import datasets

    from vlmprune.evaluate.tasks import load_task

    items = load_task(task_file, limit=limit, seed=seed)
    folder = Path(output) / name
    folder.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "type": datasets.Value("string"),
                                  "image": datasets.Image()})
    rows = {"id": [str(it["id"]) for it in items], "question": [it["question"] for it in items],
            "answer": [it["answer"] for it in items], "type": [it["type"] for it in items],
            # the image bytes go into the data set: the saved task does not depend on the test file's folder
            "image": [None if it["image"] is None else {"bytes": Path(it["image"]).read_bytes(), "path": None}
                      for it in items]}
    data = folder / "data"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(data))
    template = (TEMPLATE_DIR / "task.yaml").read_text()
    yaml_text = (template.replace("{task}", name).replace("{dataset_path}", str(data.resolve()))
                 .replace("{max_new_tokens}", str(int(max_new_tokens))))
    (folder / f"{name}.yaml").write_text(yaml_text)
    shutil.copy(TEMPLATE_DIR / "utils.py", folder / "utils.py")
    return folder


def _scale(metric: str, value: float) -> str:
    return "fraction" if metric not in NOT_FRACTION and 0 <= value <= 1 else "score"


def _examples(samples: list[dict], keep: int) -> list[dict]:
    """The first ``keep`` logged samples as the built-in tasks' examples (question, answer, prediction)."""
    out = []
    for sample in samples[:keep]:
        doc, responses = sample.get("doc", {}), sample.get("filtered_resps") or [""]
        prediction = responses[0][0] if isinstance(responses[0], list) and responses[0] else responses[0]
        out.append({"id": doc.get("id", sample.get("doc_id")), "question": doc.get("question"),
                    "answer": sample.get("target"), "prediction": prediction})
    return out


def entries_from_results(raw: dict, limit: int | None = None, keep_predictions: int = 20) -> dict[str, dict]:
    """lmms-eval's ``simple_evaluate`` output -> result entries ``{name: {"accuracy": headline value,
    "metric", "metrics" (every metric of the task), "count", "scale", "source": "lmms-eval",
    "examples"}}``."""
    entries: dict[str, dict] = {}
    samples = raw.get("n-samples", {})
    order = {task: list(flags) for task, flags in raw.get("higher_is_better", {}).items()}
    for task, metrics in raw.get("results", {}).items():
        values = {}
        for key, value in metrics.items():
            metric = key.split(",")[0]
            if "," in key and "_stderr" not in metric and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                values[metric] = float(value)
        if not values:  # a group without an aggregate, or a task whose metric failed
            continue
        first = next((m for m in order.get(task, []) if m in values), next(iter(values)))
        count = samples.get(task, {}).get("effective")
        for name, metric in (HEADLINE.get(task) or {task: first}).items():
            if metric not in values:
                continue
            entries[name] = {"accuracy": values[metric], "metric": metric, "metrics": values, "count": count,
                             "correct": None, "per_type": {}, "scale": _scale(metric, values[metric]),
                             "source": "lmms-eval", "lmms_task": task, "limit": limit,
                             "examples": _examples(raw.get("samples", {}).get(task, []), keep_predictions)}
    return entries


def _known_tasks(manager) -> set[str]:
    names = set()
    for attr in ("all_tasks", "all_groups", "all_subtasks", "all_tags"):
        try:
            names.update(getattr(manager, attr))
        except Exception:  # an attribute this lmms-eval version lacks
            pass
    return names


def _unwrap(exc: BaseException) -> BaseException:
    """The error behind a tenacity RetryError (lmms-eval retries its downloads)."""
    attempt = getattr(exc, "last_attempt", None)
    inner = attempt.exception() if attempt is not None and hasattr(attempt, "exception") else None
    return inner or exc


def _data_error(exc: BaseException) -> bool:
    """Does this exception say a data set could not be fetched (offline, not in the cache, no access)?"""
    seen = _unwrap(exc)
    while seen is not None:
        kind = type(seen).__name__
        text = str(seen)
        if any(k in kind for k in ("Offline", "ConnectionError", "DatasetNotFound", "LocalEntryNotFound",
                                   "GatedRepo", "RepositoryNotFound", "HfHubHTTPError")) \
                or any(k in text for k in ("offline mode", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                                           "Couldn't reach", "couldn't be found on the Hugging Face Hub")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def run_lmms_tasks(model, processor, tasks: list[str], *, limit: int | None = None, batch_size: int = 8,
                   max_new_tokens: int = 10, data_dir: str | Path | None = None,
                   include: str | Path | None = None, keep_predictions: int = 20) -> dict[str, dict]:
    """Run lmms-eval ``tasks`` on a loaded ``model`` through the vlmprune plugin; return result entries.

    The packaged tasks (``easyvqa_lmms``, ``digits_lmms``) are written from the built-in tasks' data
    under ``data_dir`` (the same seeded ``limit`` subset); any other task comes from lmms-eval's own
    task list or from ``include`` (a folder of your task YAMLs); lmms-eval takes its first ``limit``
    documents.
    """
    import tempfile

    require_lmms()
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vlmprune.evaluate.lmms_model import VlmpruneLMM

    os.environ.setdefault("WANDB_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="vlmprune-lmms-") as tmp:
        paths = [str(include)] if include else []
        for name in tasks:
            if name in LMMS_PACKAGED_TASKS:
                base = BUILTIN_TASKS[LMMS_PACKAGED_TASKS.index(name)]
                if data_dir is None:
                    from vlmprune.paths import cache_root

                    data_dir = cache_root() / "data"
                test = Path(data_dir) / base / "test.json"
                if not test.is_file():
                    raise VlmpruneError(f"lmms-eval task {name} reads the {base} test set, not found at {test}: "
                                        f"write it with `vlmprune data {base} --output {Path(data_dir) / base}`")
                paths.append(str(write_task(test, tmp, name, limit=limit, max_new_tokens=max_new_tokens)))
        # indexing lmms-eval's own task folder takes seconds: skip it when the given folders hold every task
        manager = TaskManager(include_path=paths, include_defaults=False) if paths else None
        if manager is None or any(t not in _known_tasks(manager) for t in tasks):
            manager = TaskManager(include_path=paths or None)
        unknown = [t for t in tasks if t not in _known_tasks(manager)]
        if unknown:
            raise VlmpruneError(f"lmms-eval does not know the task(s) {unknown}; the study's benchmarks are "
                                f"{', '.join(PAPER_TASKS)}; vlmprune ships {', '.join(LMMS_PACKAGED_TASKS)}; "
                                f"your own task YAMLs go in a folder given with --lmms-include")
        lm = VlmpruneLMM(model=model, processor=processor, batch_size=batch_size)
        try:
            raw = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                                  batch_size=batch_size, log_samples=True, bootstrap_iters=0,
                                  verbosity="WARNING")
        except Exception as exc:
            if _data_error(exc):
                cause = _unwrap(exc)
                raise VlmpruneError(
                    f"lmms-eval could not load the data of {tasks} ({type(cause).__name__}: "
                    f"{(str(cause).splitlines() or [''])[0][:300]}"
                    f"). These tasks download their data sets from the Hugging Face hub on first use: run once "
                    f"online (HF_HUB_OFFLINE and HF_DATASETS_OFFLINE unset; gated sets need `hf auth login`) to "
                    f"fill the cache, or point a task YAML at a local copy (dataset_path: DIR, dataset_kwargs: "
                    f"{{load_from_disk: true}}) in a folder given with --lmms-include") from exc
            raise
    if raw is None:  # not the main process
        return {}
    entries = entries_from_results(raw, limit, keep_predictions)
    for entry in entries.values():
        entry["lmms_eval_version"] = _version()
    missing = [t for t in tasks if not any(e["lmms_task"] == t or n == t for n, e in entries.items())
               and t not in raw.get("groups", {})]
    if missing:
        raise VlmpruneError(f"lmms-eval returned no metric for {missing}: {json.dumps(raw.get('results', {}))[:300]}")
    return entries


def _version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmms-eval")
    except PackageNotFoundError:
        return None
