"""Turning samples into model batches with answer-only labels.

Prompts go through the model's own processor and chat template (so each family builds its own
``pixel_values``, ``image_grid_thw``, ``pixel_attention_mask``, ... and expands image
placeholders its own way); labels are found by rendering conversation prefixes, never from the
pad token id (SmolLM2's end-of-turn token is also its pad token, see DESIGN.md).
"""

from __future__ import annotations

import logging

import torch

from vlmprune.data.records import Sample, open_image
from vlmprune.errors import DataError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100

# Batch entries that have one value per token and must be truncated with input_ids.
_PER_TOKEN_KEYS = {
    "input_ids",
    "attention_mask",
    "labels",
    "token_type_ids",
    "mm_token_type_ids",
    "position_ids",
    "special_tokens_mask",
}


def image_token_id_of(processor) -> int:
    """The id of the token that stands for one image feature in ``processor``'s output."""
    token_id = getattr(processor, "image_token_id", None)
    if isinstance(token_id, int):
        return token_id
    token = getattr(processor, "image_token", None)
    tokenizer = getattr(processor, "tokenizer", processor)
    if token is not None:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            return token_id
    raise DataError(f"cannot find the image token id of {type(processor).__name__}")


class Collator:
    """Batch :class:`Sample` s for ``model(**batch)``: processor outputs plus answer-only ``labels``.

    Args:
        processor: the model's processor (chat template + tokenizer + image processor).
        max_length: truncate every sequence on the right to this many tokens; a sample whose
            image tokens would be cut raises :class:`DataError` instead (cutting them would
            break the model's image-feature count).
        system_prompt: when not None, the system message of samples that have none. Without
            it, some templates inject their own default (SmolLM2: 24 tokens per sample).

    Sequences are padded on the right. ``labels`` equals ``input_ids`` on the tokens of every
    assistant answer, including the end-of-turn token the template closes the answer with (but
    not whitespace the template puts after it), and ``-100`` elsewhere (prompt, image and
    padding tokens). Labels are not shifted; HF models shift them in their loss.
    """

    def __init__(self, processor, max_length: int | None = None, system_prompt: str | None = None):
        if max_length is not None and max_length < 1:
            raise DataError(f"max_length must be >= 1, got {max_length}")
        self.processor = processor
        self.max_length = max_length
        self.system_prompt = system_prompt
        self.image_token_id = image_token_id_of(processor)

    # ------------------------------------------------------------------ public

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """Build one batch from ``samples``; images are opened here and released with the batch."""
        if not samples:
            raise DataError("cannot collate an empty list of samples")
        conversations = [self._messages(sample) for sample in samples]
        images = [[open_image(image) for image in sample.images] for sample in samples]
        texts = [self._render(messages) for messages in conversations]

        batch = dict(self._process(texts, images, padding=True, return_tensors="pt"))
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
            batch["attention_mask"] = attention_mask
        lengths = attention_mask.sum(dim=1)
        positions = torch.arange(input_ids.shape[1])
        if not torch.equal(attention_mask.bool(), positions[None, :] < lengths[:, None]):
            raise DataError(f"{type(self.processor).__name__} did not pad on the right; labels need right padding")

        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row, (sample, messages, sample_images, text) in enumerate(zip(samples, conversations, images, texts)):
            row_ids = input_ids[row, : int(lengths[row])].tolist()
            for start, end in self._answer_spans(sample, messages, sample_images, text, row_ids):
                labels[row, start:end] = input_ids[row, start:end]
        batch["labels"] = labels

        if self.max_length is not None and input_ids.shape[1] > self.max_length:
            batch = self._truncate(batch, samples, lengths)
        return batch

    def too_long(self, samples: list[Sample], positions: int) -> list[tuple[str, int]]:
        """(id, estimated tokens) of the samples longer than ``positions`` (what the model was trained to hold).

        The estimate is the tokens of the rendered conversation plus the processor's image tokens per image,
        where it says how many; only samples whose text is long enough to pass are tokenized (a token
        spans at least one character, so the others cannot).
        """
        per_image = next((int(v) for v in (getattr(self.processor, a, None) for a in ("image_seq_length",
                                                                                    "num_image_tokens"))
                          if isinstance(v, int)), 0)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        found = []
        for sample in samples:
            chars = sum(len(part.get("text") or "") for m in sample.messages for part in m["content"])
            if chars + 256 + per_image * len(sample.images) <= positions:  # 256: the template's own tokens
                continue
            tokens = len(tokenizer(self._render(self._messages(sample)), add_special_tokens=False)["input_ids"])
            tokens += per_image * len(sample.images)
            if tokens > positions:
                found.append((sample.id, tokens))
        return found

    # ------------------------------------------------------------------ helpers

    def _messages(self, sample: Sample) -> list[dict]:
        """The sample's messages, with ``system_prompt`` put first when it has no system message."""
        messages = list(sample.messages)
        if self.system_prompt is not None and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        return messages

    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat template's text for ``messages``."""
        text = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        if isinstance(text, list):  # some versions return a one-element batch
            text = text[0]
        return text

    def _process(self, texts: list[str], images: list[list], **kwargs):
        """Run the processor on ``texts``; ``images`` is one (possibly empty) list per text.

        The nested form is what multi-image processors (Idefics3, Gemma3) need, and the generic
        processor flattens it for the others.
        """
        nested = images if any(images) else None
        try:
            return self.processor(text=texts, images=nested, padding_side="right", **kwargs)
        except (ValueError, TypeError) as err:
            raise DataError(f"{type(self.processor).__name__} rejected the batch: {err}") from err

    def _answer_spans(
        self, sample: Sample, messages: list[dict], images: list, full_text: str, row_ids: list[int]
    ) -> list[tuple[int, int]]:
        """Token ranges ``[start, end)`` of each assistant answer in ``row_ids``.

        For assistant turn ``i``: ``start`` is the token count of the conversation up to it with
        the generation prompt (what a model sees before answering) and ``end`` the count of the
        conversation up to and including it. Counts come from the same processor call as the
        batch (with the images occurring in each prefix), so image expansion is counted exactly.
        A boundary where the tokenizer would merge across the cut is handled by comparing
        token ids: ``start``/``end`` are where the prefix's tokens stop matching the full row.
        """
        boundaries: list[str] = []
        boundary_images: list[list] = []
        turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        for i in turns:
            prefix = self._render(messages[:i], add_generation_prompt=True)
            # Whitespace after the end-of-turn token is template glue, not part of the answer.
            upto = self._render(messages[: i + 1]).rstrip()
            for text in (prefix, upto):
                if not full_text.startswith(text):
                    raise DataError(
                        f"sample {sample.id!r}: the chat template renders the conversation up to turn {i} "
                        f"differently from the whole conversation, so the answer cannot be located "
                        f"(prefix {text[-80:]!r} is not a prefix of the full text)"
                    )
            n_images = sum(part["type"] == "image" for message in messages[:i] for part in message["content"])
            boundaries += [prefix, upto]
            boundary_images += [images[:n_images], images[:n_images]]
        encoded = self._process(boundaries, boundary_images)["input_ids"]

        spans = []
        for turn, k in zip(turns, range(0, len(boundaries), 2)):
            start = _common_prefix(encoded[k], row_ids)
            end = _common_prefix(encoded[k + 1], row_ids)
            if end > start:
                spans.append((start, end))
            else:
                logger.debug("sample %r: answer %d is empty", sample.id, turn)
        return spans

    def _truncate(self, batch: dict, samples: list[Sample], lengths: torch.Tensor) -> dict:
        """Cut per-token tensors to ``max_length``; refuse to cut image tokens."""
        limit = self.max_length
        input_ids = batch["input_ids"]
        for row, sample in enumerate(samples):
            length = int(lengths[row])
            if length > limit and (input_ids[row, limit:length] == self.image_token_id).any():
                last_image = int((input_ids[row, :length] == self.image_token_id).nonzero().max()) + 1
                raise DataError(
                    f"sample {sample.id!r} is {length} tokens long and its image tokens reach position "
                    f"{last_image}; truncating to max_length={limit} would cut them. Use a larger --max-length "
                    f"(at least {last_image}, or {length} to keep the whole sample)."
                )
        shape = tuple(input_ids.shape)
        out = {}
        for key, value in batch.items():
            per_token = key in _PER_TOKEN_KEYS or (
                isinstance(value, torch.Tensor)
                and tuple(value.shape) == shape
                and not key.startswith(("pixel", "image"))
            )
            out[key] = value[:, :limit].contiguous() if per_token else value
        return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def token_masks(batch: dict, image_token_id: int) -> dict[str, torch.Tensor]:
    """Boolean ``[B, T]`` masks over a collated batch.

    ``all``: real (non-padding) tokens; ``image``: image tokens among them; ``text``: the other
    real tokens; ``answer``: labelled tokens (``labels != -100``), present when the batch has
    ``labels``. The masks are in input positions: a loss on next-token predictions must shift
    them like the labels.
    """
    input_ids = batch["input_ids"]
    attention_mask = batch.get("attention_mask")
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask == 1
    image = real & (input_ids == image_token_id)
    masks = {"all": real, "image": image, "text": real & ~image}
    if "labels" in batch:
        masks["answer"] = batch["labels"] != IGNORE_INDEX
    return masks


def max_positions(config) -> int | None:
    """The positions the language model was trained to hold (``max_position_embeddings``), None when unknown."""
    text = getattr(config, "text_config", None) or config
    value = getattr(text, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def warn_too_long(collator: Collator, samples: list[Sample], config, what: str) -> None:
    """Say, before the long run starts, which samples pass the model's positions (with the estimate and the fix).

    Nothing to say when ``collator.max_length`` already truncates to at most the model's positions.
    """
    positions = max_positions(config)
    if positions is None or (collator.max_length is not None and collator.max_length <= positions):
        return
    found = collator.too_long(samples, positions)
    if found:
        sample, tokens = max(found, key=lambda item: item[1])
        logger.warning("%d of the %d %s samples are longer than the model's %s positions (max_position_embeddings): "
                       "the longest, %r, has about %s tokens; they are slow (attention grows with the square of "
                       "the length) and longer than anything the model was trained on. Pass --max-length %d to "
                       "truncate them, or remove them from the data", len(found), len(samples), what,
                       f"{positions:,}", sample, f"{tokens:,}", positions)


def chat_inputs(processor, prompts: list[tuple[list, str]]) -> dict:
    """Processor inputs for (images, text) user turns: the images first, then the text, rendered by
    the model's chat template with the generation prompt, left-padded for batched generation.
    The one prompt format of every evaluation path (the built-in tasks, the lmms-eval plugin, the
    exported programs)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    texts, images = [], []
    for pictures, text in prompts:
        content = [{"type": "image"} for _ in pictures] + [{"type": "text", "text": text}]
        images += list(pictures)
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}],
                                                   add_generation_prompt=True, tokenize=False))
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return processor(text=texts, images=images or None, padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = old_side
