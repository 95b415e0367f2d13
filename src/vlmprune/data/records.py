"""Reading instruction data into one in-memory form, and choosing seeded subsets of it.

Two input formats are accepted (see DESIGN.md, "Decisions" -> Data format):

* the LLaVA conversation format: a JSON list or a JSONL file of records with ``image`` and
  ``conversations`` (``from``/``value`` turns, ``<image>`` placeholders);
* Hugging Face datasets with ``messages`` + ``images`` columns, either a ``save_to_disk``
  directory or a hub id.

Both become a list of :class:`Sample`, whose ``messages`` are in the HF chat format that
processors' chat templates understand. Images are never decoded here: a sample holds paths (or
the encoded bytes of an image stored inside a dataset), and the collator opens them when a batch
is built, so a large data set never sits decoded in memory.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmprune.errors import DataError
from vlmprune.readers import check_depth, parse_json

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"

# LLaVA turn roles -> HF chat roles. "user"/"assistant" are accepted too: some converted data
# sets mix the two spellings, and refusing them would only make people edit their files.
_LLAVA_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass
class Sample:
    """One conversation, ready for a processor's chat template.

    Attributes:
        id: the record's ``id`` field, else its index in the file/dataset as a string.
        messages: HF chat format, content always a list of parts, e.g.
            ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "..."}]}]``.
        images: one entry per ``{"type": "image"}`` part, in order of appearance. An entry is a
            file path (``str``), a PIL image, or the encoded bytes of an image file (what a
            dataset stores inline); :func:`open_image` turns any of them into an RGB image.
        source: the record's ``source`` field, else the first directory of the image path
            relative to the image folder (``coco/train2017/x.jpg`` -> ``coco``), else ``None``.
            Used to stratify subsets.
    """

    id: str
    messages: list[dict]
    images: list
    source: str | None = None


def open_image(image: Any):
    """Return ``image`` (path, PIL image or encoded bytes) as a decoded RGB PIL image.

    A path is opened and closed here, so no file handle outlives the call; a PIL image is
    converted (which copies it), so the caller's object is never modified.
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as img:
                return img.convert("RGB")
        except Image.DecompressionBombError as err:
            raise DataError(f"image {str(image)!r} is refused as a decompression bomb ({err}); a vision model "
                            f"sees a few hundred pixels a side: resize it, or remove the record") from None
        except (OSError, ValueError) as err:
            raise DataError(f"cannot open image {str(image)!r}: {err}") from err
    if isinstance(image, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(image)) as img:
                return img.convert("RGB")
        except Image.DecompressionBombError as err:
            raise DataError(f"an image stored in the dataset is refused as a decompression bomb ({err}); resize "
                            f"it, or remove the record") from None
        except (OSError, ValueError) as err:
            raise DataError(f"cannot decode an image stored in the dataset: {err}") from err
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise DataError(f"unsupported image entry of type {type(image).__name__}; expected a path, PIL image or bytes")


# --------------------------------------------------------------------------- reading


def read_samples(data: str | Path, image_folder: str | Path | None = None, split: str = "train") -> list[Sample]:
    """Read a data set into a list of :class:`Sample`.

    Args:
        data: a ``.json`` (list of records) or ``.jsonl`` file in the LLaVA conversation format,
            a directory written by ``datasets.Dataset(Dict).save_to_disk``, or a hub dataset id.
        image_folder: the folder that relative image paths are relative to. Defaults to the
            directory of the JSON file (for datasets: the current directory).
        split: the split to take from a ``DatasetDict`` or a hub dataset.

    Raises:
        DataError: the data is missing, empty or malformed, or an image file does not exist.
            The message names the record (index and id) and what is wrong.
    """
    path = Path(data)
    if path.is_dir():
        return _read_hf_dataset(_load_from_disk(path, split), image_folder, origin=str(path))
    if path.is_file():
        return _read_llava_file(path, image_folder)
    if path.suffix.lower() in (".json", ".jsonl") or os.sep in str(data) or str(data).startswith("."):
        # Looks like a path, not a hub id: say it is missing rather than asking the hub.
        raise DataError(f"data file or directory not found: {str(data)!r}")
    return _read_hf_dataset(_load_hub(str(data), split), image_folder, origin=str(data))


def _read_llava_file(path: Path, image_folder: str | Path | None) -> list[Sample]:
    """Parse a LLaVA JSON/JSONL file and convert every record."""
    records = _load_json_records(path)
    folder = Path(image_folder) if image_folder is not None else path.parent
    samples = [_llava_record_to_sample(record, index, folder) for index, record in enumerate(records)]
    logger.info("read %d samples from %s", len(samples), path)
    return samples


def _load_json_records(path: Path) -> list:
    """Return the records of a JSON list or JSONL file; errors name the file and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}") from err
    if not text.strip():
        raise DataError(f"{path} is empty: no records to read")
    if path.suffix.lower() != ".jsonl":
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as err:
            # "Extra data" after the first value is what a JSONL file saved as .json gives.
            if not err.msg.startswith("Extra data"):
                raise DataError(
                    f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
                ) from err
        except (RecursionError, ValueError):
            parse_json(text, str(path), DataError)  # says why: nested too deep, or a number past Python's limit
            raise
        else:
            check_depth(loaded, str(path), DataError)
            if not isinstance(loaded, list):
                raise DataError(f"{path} must hold a JSON list of records, not a {type(loaded).__name__}")
            if not loaded:
                raise DataError(f"{path} is empty: the JSON list has no records")
            return loaded
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        records.append(parse_json(line, f"{path} line {lineno}", DataError))
    if not records:
        raise DataError(f"{path} is empty: no records to read")
    return records


def _llava_record_to_sample(record: Any, index: int, folder: Path) -> Sample:
    """Convert one LLaVA record (validated here) into a Sample."""
    if not isinstance(record, dict):
        raise DataError(f"record {index} is not a JSON object (got {type(record).__name__})")
    sample_id = str(record["id"]) if record.get("id") is not None else str(index)
    where = f"record {index} (id {sample_id!r})"

    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where} has no conversations: expected a non-empty list under 'conversations'")

    image_field = record.get("image")
    if image_field is None:
        image_names: list = []
    elif isinstance(image_field, str):
        image_names = [image_field]
    elif isinstance(image_field, list) and all(isinstance(name, str) for name in image_field):
        image_names = list(image_field)
    else:
        raise DataError(f"{where}: 'image' must be a path or a list of paths, not {image_field!r}")

    messages = []
    for turn_index, turn in enumerate(conversations):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turn {turn_index} is not an object")
        speaker = turn.get("from")
        role = _LLAVA_ROLES.get(speaker) if isinstance(speaker, str) else None
        if role is None:
            raise DataError(
                f"{where}: turn {turn_index} has unknown role {speaker!r}; expected 'human', 'gpt' or 'system'"
            )
        value = turn.get("value")
        if not isinstance(value, str):
            raise DataError(f"{where}: turn {turn_index} ({speaker}) has no 'value' text")
        if role != "user" and IMAGE_PLACEHOLDER in value:
            raise DataError(
                f"{where}: turn {turn_index} ({speaker}) contains {IMAGE_PLACEHOLDER}; only human turns may"
            )
        messages.append({"role": role, "content": _split_placeholders(value)})
    _check_roles(messages, where)

    n_placeholders = sum(part["type"] == "image" for message in messages for part in message["content"])
    if n_placeholders == 0 and image_names:
        # LLaVA's own loader puts the image first in the first human turn when the text has no
        # placeholder; do the same so such records still see their image.
        first_user = next(message for message in messages if message["role"] == "user")
        first_user["content"] = [{"type": "image"}] * len(image_names) + first_user["content"]
    elif n_placeholders != len(image_names):
        raise DataError(
            f"{where} has {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(image_names)} image(s)"
        )

    images = []
    for name in image_names:
        resolved = Path(name) if os.path.isabs(name) else folder / name
        if not resolved.is_file():
            raise DataError(f"{where}: image file not found: {resolved}")
        images.append(str(resolved))

    source = record.get("source")
    if source is None and image_names:
        source = _source_from_path(image_names[0], folder)
    return Sample(id=sample_id, messages=messages, images=images, source=None if source is None else str(source))


def _split_placeholders(text: str) -> list[dict]:
    """Turn ``"<image>\\nWhat is it?"`` into ``[{"type": "image"}, {"type": "text", "text": "What is it?"}]``.

    Whitespace next to a placeholder is dropped (LLaVA writes ``<image>\\n`` as a separator);
    the chat template decides how parts are joined.
    """
    parts: list[dict] = []
    pieces = text.split(IMAGE_PLACEHOLDER)
    for piece_index, piece in enumerate(pieces):
        if piece_index > 0:
            parts.append({"type": "image"})
        if len(pieces) > 1:
            piece = piece.strip()
        if piece:
            parts.append({"type": "text", "text": piece})
    if not parts:
        parts.append({"type": "text", "text": ""})
    return parts


def _source_from_path(name: str, folder: Path) -> str | None:
    """First directory of ``name`` relative to ``folder``; None for a bare file name or a path outside it."""
    if os.path.isabs(name):
        try:
            name = os.path.relpath(name, folder)
        except ValueError:  # another drive on Windows
            return None
        if name.startswith(".."):
            return None
    parts = Path(name).parts
    return parts[0] if len(parts) > 1 else None


def _check_roles(messages: list[dict], where: str) -> None:
    """Require: optional system turn, then user/assistant alternating, ending with an answer."""
    roles = [message["role"] for message in messages]
    body = roles[1:] if roles and roles[0] == "system" else roles
    if not body:
        raise DataError(f"{where} has only a system turn; expected human/gpt turns after it")
    for position, role in enumerate(body):
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            turn = position + (len(roles) - len(body))
            raise DataError(
                f"{where}: roles must alternate human/gpt (user/assistant) after an optional system turn; "
                f"turn {turn} is {role!r}, expected {expected!r}"
            )
    if body[-1] != "assistant":
        raise DataError(f"{where}: the last turn is from the user; expected it to end with an answer (gpt/assistant)")


# --------------------------------------------------------------------------- HF datasets


def _load_from_disk(path: Path, split: str):
    """``datasets.load_from_disk``; a DatasetDict gives its ``split``."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except IndexError as err:
        # datasets (5.2) fails this way on a saved dataset with no rows: it wrote no Arrow shard.
        raise DataError(f"dataset {path} is empty: it has no data files to load") from err
    except (FileNotFoundError, ValueError, OSError) as err:
        raise DataError(f"{path} is not a dataset written by save_to_disk: {err}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path} has no split {split!r}; it has {sorted(loaded)}")
        loaded = loaded[split]
    return loaded


def _load_hub(name: str, split: str):
    """``datasets.load_dataset(name, split=split)`` with a DataError on failure."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many unrelated types; report them all the same way
        raise DataError(f"cannot load dataset {name!r} (split {split!r}): {type(err).__name__}: {err}") from err


def _read_hf_dataset(dataset, image_folder: str | Path | None, origin: str) -> list[Sample]:
    """Convert a ``datasets.Dataset`` with ``messages`` (+ ``images``) columns."""
    import datasets

    if len(dataset) == 0:
        raise DataError(f"dataset {origin} is empty: no rows to read")
    if "messages" not in dataset.column_names:
        raise DataError(f"dataset {origin} has no 'messages' column (columns: {dataset.column_names})")
    has_images = "images" in dataset.column_names
    if has_images and isinstance(getattr(dataset.features["images"], "feature", None), datasets.Image):
        # Keep images encoded (path or bytes): decoding them all here would hold every pixel in memory.
        dataset = dataset.cast_column("images", datasets.List(datasets.Image(decode=False)))
    folder = Path(image_folder) if image_folder is not None else Path(".")
    columns = ["messages"] + (["images"] if has_images else [])
    columns += [name for name in ("id", "source") if name in dataset.column_names]
    samples = []
    for index, row in enumerate(dataset.select_columns(columns)):
        samples.append(_hf_row_to_sample(row, index, folder))
    logger.info("read %d samples from %s", len(samples), origin)
    return samples


def _hf_row_to_sample(row: dict, index: int, folder: Path) -> Sample:
    """Validate and normalise one ``messages``/``images`` row."""
    sample_id = str(row["id"]) if row.get("id") is not None else str(index)
    where = f"row {index} (id {sample_id!r})"
    raw_messages = row["messages"]
    if not isinstance(raw_messages, list) or not raw_messages:
        raise DataError(f"{where} has no messages")
    messages = []
    for turn_index, message in enumerate(raw_messages):
        if not isinstance(message, dict):
            raise DataError(f"{where}: message {turn_index} is not an object")
        role = message.get("role")
        if role not in ("system", "user", "assistant"):
            raise DataError(f"{where}: message {turn_index} has unknown role {role!r}; expected system/user/assistant")
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = []
            for part in content:
                # Arrow stores parts as structs with every key, so an image part reads back as
                # {"type": "image", "text": None}: keep only the keys that matter.
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    parts.append({"type": "image"})
                elif kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                else:
                    raise DataError(f"{where}: message {turn_index} has an invalid content part {part!r}")
        else:
            raise DataError(f"{where}: message {turn_index} has no content (string or list of parts)")
        if role != "user" and any(part["type"] == "image" for part in parts):
            raise DataError(f"{where}: message {turn_index} ({role}) has an image part; only user messages may")
        messages.append({"role": role, "content": parts})
    _check_roles(messages, where)

    images = []
    for position, image in enumerate(row.get("images") or []):
        images.append(_hf_image_entry(image, folder, f"{where}, image {position}"))
    n_parts = sum(part["type"] == "image" for message in messages for part in message["content"])
    if n_parts != len(images):
        raise DataError(f"{where} has {n_parts} image part(s) in its messages but {len(images)} image(s)")

    source = row.get("source")
    if source is None and images and isinstance(row["images"][0], str):
        source = _source_from_path(row["images"][0], folder)
    return Sample(id=sample_id, messages=messages, images=images, source=None if source is None else str(source))


def _hf_image_entry(image: Any, folder: Path, where: str):
    """An ``images`` cell -> path (checked to exist), encoded bytes, or PIL image."""
    if isinstance(image, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        if image.get("bytes") is not None:
            return image["bytes"]
        image = image.get("path")
    if isinstance(image, str):
        resolved = Path(image) if os.path.isabs(image) else folder / image
        if not resolved.is_file():
            raise DataError(f"{where}: image file not found: {resolved}")
        return str(resolved)
    if image is None:
        raise DataError(f"{where} is empty")
    return image  # a PIL image (an undeclared column); kept as is


# --------------------------------------------------------------------------- subsets


def select(
    samples: list[Sample],
    num_samples: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    stratify: bool = True,
) -> list[Sample]:
    """Return a seeded, reproducible subset of ``samples``, in their original order.

    The result depends only on the arguments (a local ``random.Random(seed)``), so every process
    of a distributed run and every rerun picks the same samples. When ``stratify`` is set and
    the samples carry sources, each source (``None`` counting as one) gets a share proportional
    to its size, rounded by largest remainder so the shares add up to exactly the requested
    number.

    Args:
        num_samples: how many samples to keep (at least 1; more than there are keeps all).
        fraction: the fraction to keep, in (0, 1]; rounded to the nearest count.
            At most one of ``num_samples`` and ``fraction``; with neither, all samples are kept.
        seed: the seed of the choice.
        stratify: allocate per ``source``.

    Raises:
        DataError: invalid arguments, no samples, or a request that selects no samples.
    """
    if num_samples is not None and fraction is not None:
        raise DataError("give either num_samples or fraction, not both")
    if not samples:
        raise DataError("there are no samples to select from")
    total = len(samples)
    if num_samples is not None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise DataError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        count = min(num_samples, total)
        if num_samples > total:
            logger.warning("num_samples=%d exceeds the %d samples available; keeping all", num_samples, total)
    elif fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise DataError(f"fraction must be in (0, 1], got {fraction!r}")
        count = int(fraction * total + 0.5)  # round half up, independent of float banker's rounding
        if count == 0:
            raise DataError(
                f"fraction={fraction} of {total} samples selects no samples; use a larger fraction or num_samples"
            )
    else:
        count = total

    rng = random.Random(seed)
    groups: dict[str | None, list[int]] = {}
    for index, sample in enumerate(samples):
        groups.setdefault(sample.source, []).append(index)
    if stratify and len(groups) > 1:
        chosen = []
        for indices, quota in zip(groups.values(), _allocate(count, [len(g) for g in groups.values()])):
            chosen.extend(rng.sample(indices, quota))
    else:
        chosen = rng.sample(range(total), count)
    if not chosen:
        raise DataError("the request selects no samples")
    return [samples[index] for index in sorted(chosen)]


def _allocate(count: int, sizes: list[int]) -> list[int]:
    """Split ``count`` over groups of ``sizes`` proportionally; largest remainder, exact total.

    Integer arithmetic throughout, so the result never depends on float rounding; ties go to
    the group that appears first in the data.
    """
    total = sum(sizes)
    quotas = [count * size // total for size in sizes]
    remainders = [count * size % total for size in sizes]
    order = sorted(range(len(sizes)), key=lambda g: -remainders[g])  # stable: ties by first appearance
    for group in order[: count - sum(quotas)]:
        quotas[group] += 1
    return quotas
