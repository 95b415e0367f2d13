"""Tests of vlmprune.data: reading both formats, seeded subsets, collation with answer-only labels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_data import (
    DEFAULT_SYSTEM,
    END_OF_TURN,
    IMAGE_TOKENS_PER_IMAGE,
    tiny_llava_processor,
    write_hf_dataset,
    write_llava_dataset,
)
from tiny_models import IMAGE_ID, PAD_ID, build_tiny

from vlmprune.data import IGNORE_INDEX, Collator, Sample, read_samples, select, token_masks
from vlmprune.errors import DataError, VlmpruneError

N = 6


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llava")
    write_llava_dataset(root, N)
    return root


@pytest.fixture(scope="module")
def llava_samples(llava_dir) -> list[Sample]:
    return read_samples(llava_dir / "llava.json", image_folder=llava_dir / "images")


@pytest.fixture(scope="module")
def processor():
    return tiny_llava_processor()


def _write_records(tmp_path: Path, records, name: str = "data.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def _text(sample_messages, index) -> str:
    return "".join(part.get("text", "") for part in sample_messages[index]["content"])


def _label_runs(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of labelled token ids in one row."""
    runs, current = [], []
    for value in labels.tolist():
        if value == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(value)
    if current:
        runs.append(current)
    return runs


def _answers(sample: Sample) -> list[str]:
    return [
        "".join(part["text"] for part in m["content"] if part["type"] == "text")
        for m in sample.messages
        if m["role"] == "assistant"
    ]


# --------------------------------------------------------------------------- reading: LLaVA


def test_read_llava_json(llava_samples, llava_dir):
    assert len(llava_samples) == N
    first = llava_samples[0]
    assert first.id == "s0"
    assert first.source == "coco"
    assert first.images == [str(llava_dir / "images" / "coco" / "0.png")]
    # "<image>\n" becomes an image part followed by the question text (separator newline dropped).
    assert first.messages[0]["role"] == "user"
    assert first.messages[0]["content"][0] == {"type": "image"}
    assert first.messages[0]["content"][1]["type"] == "text"
    assert not first.messages[0]["content"][1]["text"].startswith("\n")
    assert first.messages[1]["role"] == "assistant"

    text_only = llava_samples[1]
    assert text_only.images == [] and text_only.source is None
    assert text_only.messages == [
        {"role": "user", "content": [{"type": "text", "text": "Say hi."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hi!"}]},
    ]
    assert [m["role"] for m in llava_samples[2].messages] == ["user", "assistant", "user", "assistant"]
    assert [s.source for s in llava_samples] == ["coco", None, "ocr", "coco", "vg", "ocr"]


def test_read_llava_jsonl_equals_json(llava_samples, llava_dir, tmp_path):
    records = json.loads((llava_dir / "llava.json").read_text())
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert read_samples(path, image_folder=llava_dir / "images") == llava_samples


def test_read_llava_variants(llava_dir, tmp_path):
    image = str(llava_dir / "images" / "coco" / "0.png")
    records = [
        # no placeholder: the image goes first in the first human turn, as LLaVA does
        {"image": "coco/0.png", "conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]},
        # several images, an absolute path, a placeholder in the middle, an explicit source, a system turn
        {
            "id": 7,
            "source": "mine",
            "image": ["vg/4.png", image],
            "conversations": [
                {"from": "system", "value": "Sys."},
                {"from": "human", "value": "Left <image> right <image>"},
                {"from": "gpt", "value": "Both."},
            ],
        },
    ]
    samples = read_samples(_write_records(tmp_path, records), image_folder=llava_dir / "images")
    assert samples[0].id == "0"
    assert samples[0].messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Q?"}]
    assert samples[0].source == "coco"
    assert samples[1].id == "7" and samples[1].source == "mine"
    assert samples[1].images == [str(llava_dir / "images" / "vg" / "4.png"), image]
    assert samples[1].messages[0] == {"role": "system", "content": [{"type": "text", "text": "Sys."}]}
    assert samples[1].messages[1]["content"] == [
        {"type": "text", "text": "Left"},
        {"type": "image"},
        {"type": "text", "text": "right"},
        {"type": "image"},
    ]


def test_image_folder_defaults_to_json_directory(llava_dir):
    turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]
    records = [{"image": "images/coco/0.png", "conversations": turns}]
    path = _write_records(llava_dir, records, name="rel.json")
    (sample,) = read_samples(path)
    assert sample.images == [str(llava_dir / "images" / "coco" / "0.png")]
    assert sample.source == "images"


_OK = [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]
_Q, _A = _OK
_REVERSED = [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]
_TWO_IMAGES = [{"from": "human", "value": "<image><image>"}, _A]
_IMAGE_IN_ANSWER = [_Q, {"from": "gpt", "value": "<image>"}]


@pytest.mark.parametrize(
    "record, expected",
    [
        (["not", "an", "object"], r"record 1 is not a JSON object"),
        ({"id": "x"}, r"record 1 \(id 'x'\) has no conversations"),
        ({"conversations": []}, r"record 1 .*has no conversations"),
        ({"conversations": [{"from": "bot", "value": "A"}]}, r"record 1 .*turn 0 has unknown role 'bot'"),
        ({"conversations": [{"from": "human"}, _A]}, r"record 1 .*turn 0 \(human\) has no 'value'"),
        ({"conversations": _REVERSED}, r"record 1 .*must alternate.*turn 0 is 'assistant'"),
        ({"conversations": _OK + [{"from": "gpt", "value": "B"}]}, r"record 1 .*must alternate.*turn 2"),
        ({"conversations": _OK + [{"from": "system", "value": "S"}]}, r"record 1 .*must alternate"),
        ({"conversations": _OK + [{"from": "human", "value": "Q2"}]}, r"record 1 .*last turn is from the user"),
        ({"conversations": [{"from": "system", "value": "S"}]}, r"record 1 .*only a system turn"),
        ({"image": "coco/0.png", "conversations": _TWO_IMAGES},
         r"record 1 .*has 2 <image> placeholder\(s\) but 1 image\(s\)"),
        ({"conversations": [{"from": "human", "value": "<image>Q"}, {"from": "gpt", "value": "A"}]},
         r"record 1 .*has 1 <image> placeholder\(s\) but 0 image\(s\)"),
        ({"image": "coco/0.png", "conversations": _IMAGE_IN_ANSWER},
         r"record 1 .*turn 1 \(gpt\) contains <image>"),
        ({"image": 3, "conversations": _OK}, r"record 1 .*'image' must be a path"),
    ],
)
def test_malformed_records(llava_dir, tmp_path, record, expected):
    good = {"conversations": _OK}
    path = _write_records(tmp_path, [good, record])
    with pytest.raises(DataError, match=expected):
        read_samples(path, image_folder=llava_dir / "images")


def test_missing_image_names_sample_and_path(llava_dir, tmp_path):
    records = [{"conversations": _OK}, {"id": "gone", "image": "coco/nope.png", "conversations": _OK}]
    with pytest.raises(DataError) as info:
        read_samples(_write_records(tmp_path, records), image_folder=llava_dir / "images")
    message = str(info.value)
    assert "record 1" in message and "'gone'" in message
    assert str(llava_dir / "images" / "coco" / "nope.png") in message
    assert isinstance(info.value, VlmpruneError)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("empty.json", "", r"empty\.json is empty"),
        ("blank.jsonl", "\n \n", r"blank\.jsonl is empty"),
        ("list.json", "[]", r"list\.json is empty: the JSON list has no records"),
        ("dict.json", '{"a": 1}', r"must hold a JSON list"),
        ("bad.json", '[\n{"a": 1},\n{"b": ]', r"bad\.json is not valid JSON: .* at line 3"),
        ("bad.jsonl", '{"conversations": []}\n{"a": 1}\n{oops}\n', r"bad\.jsonl line 3 is not valid JSON"),
    ],
)
def test_unreadable_files(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=expected):
        read_samples(path)


def test_jsonl_saved_as_json_is_read_per_line(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text(json.dumps({"conversations": _OK}) + "\n" + json.dumps({"conversations": _OK}) + "\n")
    assert len(read_samples(path)) == 2


def test_missing_data_path(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_samples(tmp_path / "nope.json")


# --------------------------------------------------------------------------- reading: HF datasets


def test_read_hf_dataset_dict(tmp_path, processor):
    path = write_hf_dataset(tmp_path, 4)
    samples = read_samples(path)
    assert [s.id for s in samples] == ["h0", "h1", "h2", "h3"]
    assert samples[0].messages[0]["content"][0] == {"type": "image"}  # Arrow's "text": None dropped
    assert isinstance(samples[0].images[0], bytes)  # kept encoded, decoded by the collator
    assert samples[1].images == [] and samples[1].source is None
    assert len(read_samples(path, split="other")) == 1
    with pytest.raises(DataError, match=r"no split 'test'.*\['other', 'train'\]"):
        read_samples(path, split="test")
    batch = Collator(processor)(samples)
    assert int((batch["input_ids"] == IMAGE_ID).sum()) == 3 * IMAGE_TOKENS_PER_IMAGE


def test_read_hf_dataset_plain_and_string_content(tmp_path):
    import datasets

    assert len(read_samples(write_hf_dataset(tmp_path, 3, split=None))) == 3
    rows = {"messages": [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "text"))
    (sample,) = read_samples(tmp_path / "text")
    assert sample.id == "0" and sample.images == []
    assert sample.messages[1] == {"role": "assistant", "content": [{"type": "text", "text": "Yo"}]}


@pytest.mark.parametrize(
    "rows, expected",
    [
        ({"text": ["a"]}, r"has no 'messages' column"),
        ({"messages": [[{"role": "bot", "content": "x"}]]}, r"row 0 .*unknown role 'bot'"),
        (
            {"messages": [[{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]]},
            r"row 0 .*must alternate",
        ),
        (
            {
                "messages": [
                    [
                        {"role": "user", "content": [{"type": "image", "text": None}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "x"}]},
                    ]
                ],
                "images": [[]],
            },
            r"row 0 .*1 image part\(s\) in its messages but 0 image\(s\)",
        ),
        (
            {"messages": [[{"role": "user", "content": [{"type": "video", "text": None}]}]]},
            r"row 0 .*invalid content part",
        ),
    ],
)
def test_malformed_hf_rows(tmp_path, rows, expected):
    import datasets

    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=expected):
        read_samples(tmp_path / "bad")


def test_empty_hf_dataset(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"messages": []}).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="is empty"):
        read_samples(tmp_path / "empty")


# --------------------------------------------------------------------------- select


def _sourced(sizes: dict) -> list[Sample]:
    samples = []
    for source, size in sizes.items():
        samples += [Sample(id=f"{source}{k}", messages=[], images=[], source=source) for k in range(size)]
    # interleave so that original order differs from grouping
    return samples[::2] + samples[1::2]


def test_select_reproducible_and_seeded():
    samples = _sourced({"a": 50, "b": 30, "c": 20})
    first = select(samples, num_samples=10, seed=3)
    assert select(samples, num_samples=10, seed=3) == first
    assert select(samples, num_samples=10, seed=4) != first
    positions = [samples.index(s) for s in first]
    assert positions == sorted(positions)  # original order kept


def test_select_same_in_another_process():
    # records.py needs only the standard library: load it without the package __init__ (which
    # imports torch and transformers) so the fresh interpreter starts in milliseconds.
    src = Path(__file__).resolve().parents[2] / "src" / "vlmprune"
    code = (
        "import sys, types\n"
        "for name, path in (('vlmprune', {src!r}), ('vlmprune.data', {src_data!r})):\n"
        "    module = types.ModuleType(name); module.__path__ = [path]; sys.modules[name] = module\n"
        "from vlmprune.data.records import Sample, select\n"
        "s = [Sample(id=str(i), messages=[], images=[], source=('x', 'y', None)[i % 3]) for i in range(97)]\n"
        "print(','.join(t.id for t in select(s, fraction=0.2, seed=11)))\n"
    ).format(src=str(src), src_data=str(src / "data"))
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    samples = [Sample(id=str(i), messages=[], images=[], source=("x", "y", None)[i % 3]) for i in range(97)]
    assert out.strip() == ",".join(t.id for t in select(samples, fraction=0.2, seed=11))


@pytest.mark.parametrize(
    "sizes, kwargs, expected",
    [
        ({"a": 50, "b": 30, "c": 20}, {"num_samples": 10}, {"a": 5, "b": 3, "c": 2}),
        # 15 * (50, 30, 20) / 100 = 7.5, 4.5, 3: floors 7+4+3 = 14, one remainder seat goes to "a" (first)
        ({"a": 50, "b": 30, "c": 20}, {"fraction": 0.15}, {"a": 8, "b": 4, "c": 3}),
        # 7 * (5, 3, 1) / 9 = 3.89, 2.33, 0.78: floors 3+2+0 = 5, remainders 0.89 and 0.78 win
        ({"a": 5, "b": 3, None: 1}, {"num_samples": 7}, {"a": 4, "b": 2, None: 1}),
        ({"a": 4, "b": 4}, {"fraction": 1.0}, {"a": 4, "b": 4}),
    ],
)
def test_select_stratified_counts(sizes, kwargs, expected):
    chosen = select(_sourced(sizes), seed=0, **kwargs)
    counts = {}
    for sample in chosen:
        counts[sample.source] = counts.get(sample.source, 0) + 1
    assert counts == {k: v for k, v in expected.items() if v}


def test_select_unstratified_and_all():
    samples = _sourced({"a": 90, "b": 10})
    assert len(select(samples, num_samples=10, stratify=False)) == 10
    assert select(samples) == samples
    assert select(samples, num_samples=1000) == samples


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"num_samples": 2, "fraction": 0.5}, "either num_samples or fraction"),
        ({"fraction": 0.0}, r"fraction must be in \(0, 1\]"),
        ({"fraction": 1.5}, r"fraction must be in \(0, 1\]"),
        ({"num_samples": 0}, "num_samples must be an integer >= 1"),
        ({"num_samples": 2.5}, "num_samples must be an integer >= 1"),
        ({"fraction": 0.001}, "selects no samples"),
    ],
)
def test_select_validation(kwargs, expected):
    with pytest.raises(DataError, match=expected):
        select(_sourced({"a": 10, "b": 10}), **kwargs)


def test_select_empty():
    with pytest.raises(DataError, match="no samples"):
        select([], num_samples=1)


# --------------------------------------------------------------------------- collate


def test_labels_cover_exactly_the_answers(llava_samples, processor):
    batch = Collator(processor)(llava_samples)
    tokenizer = processor.tokenizer
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "labels"}
    for row, sample in enumerate(llava_samples):
        decoded = [tokenizer.decode(run) for run in _label_runs(batch["labels"][row])]
        assert decoded == [answer + END_OF_TURN for answer in _answers(sample)], sample.id
        # the default system prompt of the template is there, and never labelled
        text = tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row].bool()])
        assert DEFAULT_SYSTEM in text
    assert len(_label_runs(batch["labels"][2])) == 2  # the multi-turn sample
    assert batch["pixel_values"].shape[0] == N - 1  # one image per sample but the text-only one


def test_right_padding_never_labelled(llava_samples, processor):
    batch = Collator(processor)(llava_samples)
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1)
    assert lengths.min() < lengths.max()  # the batch really is padded
    for row in range(len(llava_samples)):
        length = int(lengths[row])
        assert mask[row, :length].all() and not mask[row, length:].any()  # padding on the right
        assert (batch["input_ids"][row, length:] == PAD_ID).all()
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
    # Every answer ends with its labelled end-of-turn token, right before any padding.
    end_of_turn = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN)
    for row in range(len(llava_samples)):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert int(labelled[-1]) == end_of_turn


def test_system_prompt(llava_samples, processor):
    system = {"role": "system", "content": [{"type": "text", "text": "Own."}]}
    with_sys = Sample(id="sys", messages=[system] + llava_samples[1].messages, images=[])
    samples = [llava_samples[0], with_sys]
    batch = Collator(processor, system_prompt="Be brief.")(samples)
    tokenizer = processor.tokenizer
    texts = [tokenizer.decode(row[m.bool()]) for row, m in zip(batch["input_ids"], batch["attention_mask"])]
    assert "Be brief." in texts[0] and DEFAULT_SYSTEM not in texts[0]
    assert "Own." in texts[1] and "Be brief." not in texts[1]
    for row, sample in enumerate(samples):
        decoded = [tokenizer.decode(run) for run in _label_runs(batch["labels"][row])]
        assert decoded == [a + END_OF_TURN for a in _answers(sample)]
    # an empty system prompt removes the default one (SmolLM2's 24 tokens)
    short = Collator(processor, system_prompt="")([llava_samples[1]])
    full = Collator(processor)([llava_samples[1]])
    assert short["input_ids"].shape[1] < full["input_ids"].shape[1]


def test_max_length_truncation(llava_samples, processor):
    full = Collator(processor)(llava_samples)
    lengths = full["attention_mask"].sum(1)
    image_end = max(int((row == IMAGE_ID).nonzero().max()) + 1 for row in full["input_ids"] if (row == IMAGE_ID).any())
    limit = image_end + 3  # inside the answers of the longer samples
    assert limit < int(lengths.max())
    batch = Collator(processor, max_length=limit)(llava_samples)
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (N, limit)
        assert torch.equal(batch[key], full[key][:, :limit])
    assert torch.equal(batch["pixel_values"], full["pixel_values"])


def test_max_length_never_cuts_images(llava_samples, processor):
    full = Collator(processor)(llava_samples[:1])
    length = int(full["attention_mask"].sum())
    first_image = int((full["input_ids"][0] == IMAGE_ID).nonzero().min())
    with pytest.raises(DataError, match=rf"sample 's0' is {length} tokens long.*--max-length"):
        Collator(processor, max_length=first_image + 5)(llava_samples[:1])


def test_template_mismatch_raises(llava_samples, processor):
    bad = tiny_llava_processor()
    # numbering the turns from the end makes a prefix render differently from the full text
    bad.chat_template = (
        "{% for m in messages %}{{ messages|length - loop.index }}{{ m['role'] }}"
        "{% for p in m['content'] %}{% if p['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endfor %}"
    )
    with pytest.raises(DataError, match="renders the conversation up to turn"):
        Collator(bad)(llava_samples[:1])


def test_token_masks(llava_samples, processor):
    batch = Collator(processor)(llava_samples)
    masks = token_masks(batch, IMAGE_ID)
    assert set(masks) == {"all", "image", "text", "answer"}
    assert torch.equal(masks["all"], batch["attention_mask"] == 1)
    per_row = masks["image"].sum(1).tolist()
    assert per_row == [IMAGE_TOKENS_PER_IMAGE * len(s.images) for s in llava_samples]
    assert torch.equal(masks["text"], masks["all"] & ~masks["image"])
    assert torch.equal(masks["answer"], batch["labels"] != IGNORE_INDEX)
    assert not (masks["answer"] & ~masks["text"]).any()  # answers are real text tokens
    assert "answer" not in token_masks({k: v for k, v in batch.items() if k != "labels"}, IMAGE_ID)


def test_tiny_llava_model_trains_on_batch(llava_samples, processor):
    model = build_tiny("llava_llama_gqa").train()
    batch = Collator(processor, max_length=512)(llava_samples)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        assert model(**batch).loss < loss.detach()  # one step on the collated labels lowers their loss
