"""A small, open task evaluator: greedy answers through the model's chat template, exact match.

``evaluate`` runs the built-in demo tasks (``easyvqa``, ``digits``: the ``test.json`` files that
``vlmprune.demo.datasets`` writes) and/or any LLaVA-format test file, and returns accuracy overall
and per question type. ``score`` is the pure part: (prediction, reference, type) rows -> metrics.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Iterable
from pathlib import Path

from vlmprune.data.collate import chat_inputs
from vlmprune.vocab import DATASETS as BUILTIN_TASKS  # the built-in data sets are the built-in tasks

NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
ARTICLES = {"a", "an", "the"}
_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_CHOICE = re.compile(r"^\s*(?:answer\s*[:\-]?\s*)?\(?([a-e])\)?(?:[\s.):,]|$)", re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, map number words to numerals, squeeze spaces."""
    words = str(text).strip().split("\n")[0].lower().translate(_PUNCT).split()
    words = [NUMBER_WORDS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def is_choice_letter(reference: str) -> bool:
    """A multiple-choice reference: a single option letter such as "B", "(b)" or "C."."""
    return bool(re.fullmatch(r"\s*\(?[a-eA-E]\)?\.?\s*", str(reference)))


def match(prediction: str, reference: str) -> bool:
    """Exact match after normalisation; an option letter is read off the front of the prediction."""
    if is_choice_letter(reference):
        found = _CHOICE.match(str(prediction))
        return bool(found) and found.group(1).lower() == str(reference).strip(" ().").lower()
    return normalize_answer(prediction) == normalize_answer(reference)


def score(rows: Iterable[tuple[str, str, str]]) -> dict:
    """Exact-match accuracy of (prediction, reference, type) rows, overall and per type."""
    correct: dict[str, int] = {}
    count: dict[str, int] = {}
    for prediction, reference, kind in rows:
        count[kind] = count.get(kind, 0) + 1
        correct[kind] = correct.get(kind, 0) + int(match(prediction, reference))
    total = sum(count.values())
    right = sum(correct.values())
    return {
        "accuracy": right / total if total else 0.0,
        "correct": right,
        "count": total,
        "per_type": {
            kind: {"accuracy": correct[kind] / count[kind], "correct": correct[kind], "count": count[kind]}
            for kind in sorted(count)
        },
    }


def load_task(path: str | Path, limit: int | None = None, seed: int = 0) -> list[dict]:
    """Single-question records of a LLaVA-format JSON list (images relative to the file); ``limit`` takes
    a seeded subset. Every record and image is checked first: a DataError names the record and the fix."""
    from vlmprune.data import open_image
    from vlmprune.errors import DataError
    from vlmprune.readers import read_json

    path = Path(path)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"--limit must be an integer >= 1, got {limit!r}")
    if not path.exists():
        raise DataError(f"task file not found: {path}")
    if path.is_dir():
        raise DataError(f"task file {path} is a directory; give the JSON file of test records")
    records = read_json(path, f"task file {path}", DataError)
    if not isinstance(records, list):
        raise DataError(f"task file {path} must hold a JSON list of records, not a {type(records).__name__}")
    if not records:
        raise DataError(f"task file {path} holds no records")
    items, checked = [], {}
    for index, r in enumerate(records):
        where = f"{path} record {index}"
        if not isinstance(r, dict):
            raise DataError(f"{where} is not a JSON object (got {type(r).__name__})")
        where += f" (id {r['id']!r})" if isinstance(r.get("id"), (str, int)) else ""
        turns = r.get("conversations")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
            raise DataError(f"{where} has no conversations: expected a list of {{from, value}} turns")
        question = next((t.get("value") for t in turns if t.get("from") in ("human", "user")), None)
        answer = next((t.get("value") for t in turns if t.get("from") in ("gpt", "assistant")), None)
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where} has no question: expected a 'human' turn with a 'value'")
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool) or not str(answer).strip():
            raise DataError(f"{where} has no answer: expected a 'gpt' turn with the reference 'value'")
        image = r.get("image")
        if image is not None and not isinstance(image, str):
            raise DataError(f"{where}: 'image' must be a path relative to the task file, not {image!r}")
        image_path = str(path.parent / image) if image else None
        if image_path is not None and image_path not in checked:
            if not Path(image_path).is_file():
                raise DataError(f"{where}: image file not found: {image_path}")
            try:
                open_image(image_path)
            except DataError as err:
                raise DataError(f"{where}: {err}") from None
            checked[image_path] = True
        items.append({
            "id": r.get("id", len(items)),
            "image": image_path,
            "question": question.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip(),
            "answer": str(answer),
            "type": str(r.get("type", "all")),
        })
    if limit is not None and limit < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in keep]
    return items


def prompt_batch(processor, items: list[dict]) -> dict:
    """Processor inputs for questions (with their images), rendered by the chat template with
    the generation prompt, left-padded for batched generation."""
    from vlmprune.data import open_image

    return chat_inputs(processor, [([open_image(it["image"])] if it["image"] else [], it["question"]) for it in items])


def generate_answers(model, processor, items: list[dict], batch_size: int = 32, max_new_tokens: int = 10,
                     desc: str = "") -> list[str]:
    """Greedy answers, batched with left padding, prompts built by the processor's chat template."""
    import torch
    from tqdm.auto import tqdm

    tokenizer = getattr(processor, "tokenizer", processor)
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc or "evaluate", unit="batch"):
        inputs = prompt_batch(processor, items[start : start + batch_size]).to(device)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        answers += [a.strip() for a in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return answers


def evaluate(
    model,
    processor,
    tasks: Iterable[str] | None = BUILTIN_TASKS,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    task_file: str | Path | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 10,
    keep_predictions: int = 20,
) -> dict:
    """Exact-match accuracy of ``model`` on built-in tasks and/or a LLaVA-format ``task_file``.

    Built-in tasks read ``<data_dir>/<task>/test.json`` (default data_dir: the user cache,
    ``~/.cache/vlmprune/data``, written by ``vlmprune.demo.datasets``). ``limit`` evaluates a seeded
    subset of each task. Returns ``{"tasks": {name: score + examples}, "accuracy": mean over tasks}``.
    """
    if data_dir is None and tasks:
        from vlmprune.paths import cache_root

        data_dir = cache_root() / "data"
    files = {name: Path(data_dir) / name / "test.json" for name in (tasks or [])}
    if task_file is not None:
        files[Path(task_file).stem] = Path(task_file)
    was_training = getattr(model, "training", False)
    model.eval()
    results: dict = {"tasks": {}, "data_dir": None if data_dir is None else str(data_dir)}
    try:
        for name, path in files.items():
            items = load_task(path, limit=limit)
            predictions = generate_answers(model, processor, items, batch_size, max_new_tokens, desc=name)
            res = score((p, it["answer"], it["type"]) for p, it in zip(predictions, items))
            res["examples"] = [
                {"id": it["id"], "question": it["question"], "answer": it["answer"], "prediction": p}
                for p, it in list(zip(predictions, items))[:keep_predictions]
            ]
            res["limit"] = limit
            results["tasks"][name] = res
    finally:
        model.train(was_training)
    accs = [r["accuracy"] for r in results["tasks"].values()]
    results["accuracy"] = sum(accs) / len(accs) if accs else 0.0
    return results
