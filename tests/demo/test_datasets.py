"""The demo data writers produce complete LLaVA-format splits."""

import json
from collections import Counter

from .conftest import require_demo_extras


def _check_split(folder, split, source):
    records = json.loads((folder / f"{split}.json").read_text())
    for r in records:
        assert r["source"] == source
        assert (folder / r["image"]).is_file()
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt["from"] == "gpt" and gpt["value"]
    assert len({r["id"] for r in records}) == len(records)
    return records


def test_write_easyvqa_round_trips(tmp_path):
    require_demo_extras("easy_vqa")
    import easy_vqa

    from vlmprune.demo.datasets import write_easyvqa

    summary = write_easyvqa(tmp_path / "easyvqa", limit=6)
    folder = tmp_path / "easyvqa"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["easyvqa"]  # no temporary left behind
    for split, questions in (("train", easy_vqa.get_train_questions()), ("test", easy_vqa.get_test_questions())):
        records = _check_split(folder, split, "easyvqa")
        expected = sum(1 for i in questions[2] if i < 6)  # image ids sort as 0..5 first
        assert summary[split] == len(records) == expected
        assert {r["type"] for r in records} <= {"shape", "color", "yes/no"}
    assert summary["images"] == 12


def test_write_digits_round_trips(tmp_path):
    require_demo_extras("sklearn")
    from vlmprune.demo.datasets import DIGITS_QUESTION, write_digits

    summary = write_digits(tmp_path / "digits")
    train = _check_split(tmp_path / "digits", "train", "digits")
    test = _check_split(tmp_path / "digits", "test", "digits")
    assert (summary["train"], summary["test"]) == (len(train), len(test)) == (1437, 360)
    assert not {r["image"] for r in train} & {r["image"] for r in test}
    assert all(r["conversations"][0]["value"] == "<image>\n" + DIGITS_QUESTION for r in test)
    assert set(Counter(r["conversations"][1]["value"] for r in test)) == {str(d) for d in range(10)}
