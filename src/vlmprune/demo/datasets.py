"""The demo's instruction data and benchmarks, written in the LLaVA conversation format.

Each writer produces ``<output>/train.json``, ``<output>/test.json`` and ``<output>/images/``:

    [{"id": "easyvqa-test-0", "image": "images/test/0.png", "source": "easyvqa", "type": "shape",
      "conversations": [{"from": "human", "value": "<image>\\nwhat is the blue shape?"},
                        {"from": "gpt", "value": "rectangle"}]}, ...]

Both build into a temporary sibling directory and rename it into place, so an interrupted write
leaves nothing behind and a finished one is complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from vlmprune.paths import DATA_SET, atomic_output_dir
from vlmprune.vocab import DATASETS

EASYVQA_COLORS = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}
EASYVQA_SHAPES = {"circle", "rectangle", "triangle"}
DIGITS_QUESTION = "What digit is this?"
DIGITS_IMAGE_SIZE = 56  # 8 x 8 digits upscaled 7x with nearest neighbour: no interpolation blur
DIGITS_TEST_FRACTION = 0.2
DIGITS_SEED = 0


def easyvqa_type(answer: str) -> str:
    """Question type of an easy-VQA question, from its answer."""
    if answer in ("yes", "no"):
        return "yes/no"
    if answer in EASYVQA_COLORS:
        return "color"
    if answer in EASYVQA_SHAPES:
        return "shape"
    raise ValueError(f"unexpected easy-VQA answer {answer!r}")


def record(id_: str, image: str, source: str, type_: str, question: str, answer: str) -> dict:
    """One LLaVA-format sample with a single question and answer."""
    return {
        "id": id_,
        "image": image,
        "source": source,
        "type": type_,
        "conversations": [
            {"from": "human", "value": "<image>\n" + question},
            {"from": "gpt", "value": answer},
        ],
    }


def _atomic_dir(output: Path, fill, overwrite: bool) -> dict:
    """Call ``fill(tmp_dir) -> summary`` in a temporary directory that becomes ``output`` at the end (replacing
    an earlier data set only with ``overwrite``, and never another kind of output)."""
    with atomic_output_dir(output, overwrite=overwrite, kind=DATA_SET) as tmp:
        summary = fill(tmp)
    summary["output"] = str(output)
    return summary


def _dump(records: list[dict], path: Path) -> None:
    path.write_text(json.dumps(records, indent=1))


def write_easyvqa(output: str | Path, limit: int | None = None, overwrite: bool = False) -> dict:
    """Write easy-VQA (4,000 train / 1,000 test images; 38,575 / 9,673 questions) to ``output``.

    ``limit`` keeps only the first ``limit`` images of each split (and their questions), for tests.
    Returns ``{"train": n_questions, "test": n_questions, "images": n_images, "output": path}``.
    """
    import easy_vqa

    splits = {
        "train": (easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()),
        "test": (easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()),
    }

    def fill(tmp: Path) -> dict:
        summary = {"images": 0}
        for split, ((texts, answers, image_ids), paths) in splits.items():
            keep = sorted(paths) if limit is None else sorted(paths)[:limit]
            (tmp / "images" / split).mkdir(parents=True)
            for image_id in keep:
                shutil.copyfile(paths[image_id], tmp / "images" / split / f"{image_id}.png")
            kept = set(keep)
            records = [
                record(f"easyvqa-{split}-{k}", f"images/{split}/{i}.png", "easyvqa", easyvqa_type(a), q, a)
                for k, (q, a, i) in enumerate(zip(texts, answers, image_ids))
                if i in kept
            ]
            _dump(records, tmp / f"{split}.json")
            summary[split] = len(records)
            summary["images"] += len(keep)
        return summary

    return _atomic_dir(Path(output), fill, overwrite)


def write_digits(output: str | Path, limit: int | None = None, overwrite: bool = False) -> dict:
    """Write scikit-learn's 8 x 8 digits (1,797 images) as a seeded 80/20 stratified split.

    Images are upscaled to 56 px, dark ink on white; the answer is the numeral ("7").
    ``limit`` keeps only the first ``limit`` samples of each split, for tests.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(
        index, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SEED, stratify=digits.target
    )
    scale = DIGITS_IMAGE_SIZE // 8

    def fill(tmp: Path) -> dict:
        summary = {"images": 0}
        for split, chosen in (("train", sorted(train_idx)), ("test", sorted(test_idx))):
            chosen = chosen if limit is None else chosen[:limit]
            (tmp / "images" / split).mkdir(parents=True)
            records = []
            for i in chosen:
                pixels = (255 - digits.images[i] * (255 / 16)).round().astype(np.uint8)
                pixels = np.kron(pixels, np.ones((scale, scale), dtype=np.uint8))
                Image.fromarray(pixels, mode="L").convert("RGB").save(tmp / "images" / split / f"{i}.png")
                answer = str(int(digits.target[i]))
                records.append(record(f"digits-{split}-{i}", f"images/{split}/{i}.png", "digits", "digit",
                                      DIGITS_QUESTION, answer))
            _dump(records, tmp / f"{split}.json")
            summary[split] = len(records)
            summary["images"] += len(records)
        return summary

    return _atomic_dir(Path(output), fill, overwrite)


def demo_data(root: str | Path | None = None, limit: int | None = None) -> dict[str, Path]:
    """easy-VQA and digits under ``root`` (written once), plus ``root/train.json`` joining both
    training sets with image paths relative to ``root`` and a ``source`` per record (recovery
    stratifies on it). Default root: the user cache (``data``, or ``data-limit<N>`` with a limit,
    so a reduced set never stands in for the full one)."""
    if root is None:
        from vlmprune.paths import cache_root

        root = cache_root() / ("data" if limit is None else f"data-limit{limit}")
    root = Path(root)
    writers = {"easyvqa": write_easyvqa, "digits": write_digits}
    for name in DATASETS:
        writer = writers[name]
        if not (root / name / "test.json").exists():
            writer(root / name, limit=limit, overwrite=True)  # an unfinished copy in the cache (data sets only)
    train = root / "train.json"
    if not train.exists():
        joined = []
        for name in DATASETS:
            for r in json.loads((root / name / "train.json").read_text()):
                joined.append({**r, "image": f"{name}/{r['image']}"})
        tmp = train.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(joined))
        tmp.replace(train)
    return {"root": root, "train": train, "easyvqa": root / "easyvqa" / "test.json",
            "digits": root / "digits" / "test.json"}
