"""Tiny, offline data and processor for the tiny LLaVA models of ``tests/tiny_models.py``.

* :func:`tiny_llava_processor`: a character-level tokenizer (each printable ASCII character is
  one token, ids 3..102; ``<|im_start|>``/``<|im_end|>`` 103/104; ``<image>`` = ``IMAGE_ID``
  300; ``<pad>``/``<s>``/``</s>`` = 0/1/2, as the tiny models expect) with a ChatML chat
  template, wrapped in a ``LlavaProcessor`` whose 28x28 CLIP image processing expands one
  ``<image>`` to exactly 16 tokens (4x4 patches of 7 px, CLS dropped: the tiny LLaVA config).
  Like SmolLM2's template, it injects a default system prompt when a conversation has none,
  so the tests exercise the same alignment problem the demo model has.
* :func:`write_llava_dataset` / :func:`write_hf_dataset`: small data sets on disk in the two
  accepted formats, with random PNG images.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

from tiny_models import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID

DEFAULT_SYSTEM = "You are tiny."
END_OF_TURN = "<|im_end|>"
IMAGE_TOKENS_PER_IMAGE = 16
SOURCES = ("coco", "vg", "ocr")

# ChatML, like SmolLM2-Instruct's, but content may be a string or a list of image/text parts.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer():
    """The character-level ``PreTrainedTokenizerFast`` described in the module docstring."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    # \x0b and \x0c are "printable" to Python but useless here; keep the 98 others.
    for char in string.printable:
        if char not in "\x0b\x0c":
            vocab[char] = len(vocab)
    vocab["<|im_start|>"] = len(vocab)
    vocab["<|im_end|>"] = len(vocab)
    assert len(vocab) < IMAGE_ID
    vocab["<image>"] = IMAGE_ID

    model = models.WordLevel(vocab, unk_token="<pad>")
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    backend.decoder = decoders.Fuse()  # join the characters back
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>"],
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )


def tiny_llava_processor():
    """A ``LlavaProcessor`` that fits ``build_tiny("llava_*")``: one image -> 16 ``<image>`` tokens."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    # The Pil backend: the default CLIPImageProcessor wants torchvision and warns without it.
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        patch_size=7,
        vision_feature_select_strategy="default",  # as LlavaConfig: CLS dropped ...
        num_additional_image_tokens=1,  # ... from the 16 patches + CLS that CLIP produces
        chat_template=CHAT_TEMPLATE,
    )


def _write_png(path: Path, rng: random.Random) -> None:
    """A random RGB PNG of 16..40 px per side (not square, so resizing and cropping run)."""
    from PIL import Image

    width, height = rng.randint(16, 40), rng.randint(16, 40)
    image = Image.new("RGB", (width, height))
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(width * height)])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _question(rng: random.Random) -> str:
    return rng.choice(["What colour is it?", "Is there a cat?", "How many dots?", "Describe it."])


def _answer(rng: random.Random) -> str:
    return rng.choice(["Red.", "Yes, one cat.", "Three dots.", "A blue square on grey."])


def write_llava_dataset(root: Path, n: int, seed: int = 0) -> Path:
    """Write ``n`` (>= 3) LLaVA records and their images under ``root``; return the JSON path.

    Records: ``id`` ``s{k}``; images ``images/<source>/<k>.png`` with sources cycling over
    ``SOURCES``; record 1 is text-only (source ``None``), record 2 multi-turn (two exchanges,
    the image in the first). Images resolve relative to ``root/"images"``.
    """
    if n < 3:
        raise ValueError("n must be >= 3 (a text-only and a multi-turn record are always written)")
    rng = random.Random(seed)
    root = Path(root)
    records = []
    for k in range(n):
        record = {"id": f"s{k}"}
        if k == 1:
            record["conversations"] = [
                {"from": "human", "value": "Say hi."},
                {"from": "gpt", "value": "Hi!"},
            ]
        else:
            name = f"{SOURCES[k % len(SOURCES)]}/{k}.png"
            _write_png(root / "images" / name, rng)
            record["image"] = name
            record["conversations"] = [
                {"from": "human", "value": f"<image>\n{_question(rng)}"},
                {"from": "gpt", "value": _answer(rng)},
            ]
            if k == 2:
                record["conversations"] += [
                    {"from": "human", "value": _question(rng)},
                    {"from": "gpt", "value": _answer(rng)},
                ]
        records.append(record)
    path = root / "llava.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def write_hf_dataset(root: Path, n: int, seed: int = 0, split: str | None = "train") -> Path:
    """Write ``n`` (>= 2) rows with ``messages`` + ``images`` columns via ``save_to_disk``.

    Images are stored inside the dataset (``datasets.Image``). Row 1 is text-only. With
    ``split`` set, a ``DatasetDict`` with that split (and a one-row ``"other"`` split) is
    written; with ``split=None`` a plain ``Dataset``. Returns the directory.
    """
    import datasets
    from PIL import Image

    if n < 2:
        raise ValueError("n must be >= 2")
    rng = random.Random(seed)
    rows = {"id": [], "messages": [], "images": []}
    for k in range(n):
        question = [{"type": "text", "text": _question(rng)}]
        images = []
        if k != 1:
            question = [{"type": "image", "text": None}] + question
            images = [Image.new("RGB", (rng.randint(16, 40), rng.randint(16, 40)), (rng.randrange(256), 0, 0))]
        rows["id"].append(f"h{k}")
        rows["messages"].append(
            [
                {"role": "user", "content": question},
                {"role": "assistant", "content": [{"type": "text", "text": _answer(rng)}]},
            ]
        )
        rows["images"].append(images)
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "messages": datasets.List(
                {
                    "role": datasets.Value("string"),
                    "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
                }
            ),
            "images": datasets.List(datasets.Image()),
        }
    )
    dataset = datasets.Dataset.from_dict(rows, features=features)
    path = Path(root) / "hf"
    if split is None:
        dataset.save_to_disk(str(path))
    else:
        datasets.DatasetDict({split: dataset, "other": dataset.select([0])}).save_to_disk(str(path))
    return path


if __name__ == "__main__":  # end-to-end check: tiny processor + collator + tiny LLaVA model
    import sys
    import tempfile

    import torch

    sys.path.insert(0, str(Path(__file__).parent.parent / "src"))
    from tiny_models import build_tiny

    from vlmprune.data import Collator, read_samples

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        json_path = write_llava_dataset(Path(tmp), 6)
        samples = read_samples(json_path, image_folder=Path(tmp) / "images")
        batch = Collator(tiny_llava_processor())(samples)
        model = build_tiny("llava_llama_gqa")
        with torch.no_grad():
            loss = model(**batch).loss
        print({k: tuple(v.shape) for k, v in batch.items()}, "loss", float(loss))
        assert torch.isfinite(loss)
