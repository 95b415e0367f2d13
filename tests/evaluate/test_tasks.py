"""The pure scorer on a hand-made answer file, and the answer normaliser."""

import json
from pathlib import Path

import pytest

from vlmprune.evaluate.tasks import load_task, match, normalize_answer, score


def test_score_hand_made_answer_file():
    rows = json.loads((Path(__file__).parent / "answers.json").read_text())
    result = score((r["prediction"], r["reference"], r["type"]) for r in rows)
    assert (result["correct"], result["count"]) == (8, 12)
    assert result["accuracy"] == pytest.approx(8 / 12)
    per = {t: (v["correct"], v["count"]) for t, v in result["per_type"].items()}
    assert per == {"choice": (3, 4), "color": (1, 1), "digit": (2, 3), "shape": (1, 2), "yes/no": (1, 2)}
    assert json.loads(json.dumps(result)) == result


@pytest.mark.parametrize(
    ("text", "expected"),
    [("The Circle!", "circle"), ("  an apple.\nmore", "apple"), ("Nine", "9"), ("gray", "gray")],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_choice_letters_need_a_clear_option():
    assert match("b) red", "B")
    assert not match("blue", "B")  # a word starting with the letter is not a choice


def test_score_empty():
    assert score([]) == {"accuracy": 0.0, "correct": 0, "count": 0, "per_type": {}}


def test_load_task_generic_file(tmp_path):
    records = [
        {"id": k, "image": f"img/{k}.png", "type": "t", "conversations": [
            {"from": "human", "value": f"<image>\nq{k}?"}, {"from": "gpt", "value": f"a{k}"}]}
        for k in range(10)
    ]
    (tmp_path / "test.json").write_text(json.dumps(records))
    from PIL import Image

    (tmp_path / "img").mkdir()
    for k in range(10):  # every image is opened once when the task loads
        Image.new("RGB", (8, 8), (k, k, k)).save(tmp_path / "img" / f"{k}.png")
    items = load_task(tmp_path / "test.json", limit=4)
    assert len(items) == 4 and items == load_task(tmp_path / "test.json", limit=4)
    assert all(it["question"].startswith("q") and it["image"].startswith(str(tmp_path)) for it in items)
