"""vlmprune models in lmms-eval: ``lmms-eval --model vlmprune --model_args pretrained=DIR,...``.

Registered through the ``lmms_eval.models`` entry point (``vlmprune.evaluate.lmms:manifest``). Any
vlmprune output loads (uniform or per-layer widths, quantized too: ``vlmprune.load``), and any
family vlmprune supports; prompts go through the model's own processor and chat template, the
same way as `vlmprune evaluate`'s built-in tasks (``vlmprune.data.collate.chat_inputs``).

Model arguments (``--model_args key=value,...``):

``pretrained``      the model directory (or hub id)
``device``          cpu, cuda, cuda:1, ... (default: cuda when there is one, else cpu)
``dtype``           float32, float16, bfloat16 or auto (default: auto, the checkpoint's)
``batch_size``      questions per generation batch (default 8; ``--batch_size`` sets it too)
``max_new_tokens``  a cap on every task's ``max_new_tokens`` (default: none, the task's value)
``trust_remote_code``  off by default

Only ``generate_until`` is implemented (every task of the study uses it); ``loglikelihood`` and
multi-round generation raise NotImplementedError.
"""

from __future__ import annotations

import json

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm.auto import tqdm

from vlmprune.data.collate import chat_inputs

IMAGE_MARKERS = ("<image>\n", "\n<image>", "<image>")  # LLaVA-style markers some task prompts carry


def _flag(value, default: bool = False) -> bool:
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def cut_at(text: str, until: list[str]) -> str:
    """``text`` up to the first of the stop strings (the whole text when none occurs)."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class VlmpruneLMM(lmms):
    """A vlmprune checkpoint (or an already loaded model and processor) as an lmms-eval model."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, device: str | None = None, dtype: str | None = "auto",
                 batch_size: int | str | None = 8, max_new_tokens: int | str | None = None,
                 trust_remote_code: bool | str = False, model=None, processor=None, **kwargs) -> None:
        super().__init__()
        from vlmprune.errors import VlmpruneError

        unknown = sorted(k for k in kwargs if k not in ("max_batch_size",))
        if unknown:  # a typo in --model_args must not pass silently
            raise VlmpruneError(f"vlmprune model: unknown model_args {unknown}; known: pretrained, device, dtype, "
                                f"batch_size, max_new_tokens, trust_remote_code")
        if model is None:
            if not pretrained:
                raise VlmpruneError("vlmprune model: give --model_args pretrained=MODEL_DIR")
            from vlmprune.checkpoint import load, load_processor
            from vlmprune.config import check_device
            from vlmprune.vocab import DTYPES

            if dtype not in (None, *DTYPES):
                raise VlmpruneError(f"vlmprune model: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            check_device(device)
            remote = _flag(trust_remote_code)
            model = load(pretrained, dtype=dtype, trust_remote_code=remote)
            model = model.to(device)
            processor = load_processor(pretrained, trust_remote_code=remote)
        elif processor is None:
            raise VlmpruneError("vlmprune model: a loaded model needs its processor")
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.batch_size = 8 if batch_size in (None, "", "auto") else int(str(batch_size).split(":")[0])
        self.max_new_tokens = None if max_new_tokens in (None, "") else int(max_new_tokens)
        if self.batch_size < 1 or (self.max_new_tokens is not None and self.max_new_tokens < 1):
            raise VlmpruneError("vlmprune model: batch_size and max_new_tokens must be >= 1")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _generate(self, prompts: list[tuple[list, str]], gen_kwargs: dict) -> list[str]:
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        new_tokens = int(kwargs.pop("max_new_tokens", 128))
        if self.max_new_tokens is not None:
            new_tokens = min(new_tokens, self.max_new_tokens)
        temperature = float(kwargs.pop("temperature", 0) or 0)
        sample = _flag(kwargs.pop("do_sample", None)) or temperature > 0
        options = {"max_new_tokens": new_tokens, "do_sample": sample,
                   "num_beams": int(kwargs.pop("num_beams", 1) or 1)}
        if sample:
            options["temperature"] = temperature or 1.0
            if kwargs.get("top_p") is not None:
                options["top_p"] = float(kwargs["top_p"])
        inputs = chat_inputs(self.processor, prompts)
        dtype = next(self.model.parameters()).dtype
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point() and dtype.is_floating_point:
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.no_grad():
            out = self.model.generate(**inputs, **options)
        texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [cut_at(t.strip(), until).strip() for t in texts]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Batched generation, grouped by generation options; answers in the order of ``requests``."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            gen_kwargs = request.args[1]
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        answers: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="vlmprune (lmms-eval)", disable=self.rank != 0)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                prompts = []
                for i in chunk:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args[:6]
                    visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
                    visuals = [v.convert("RGB") for v in _flatten(visuals)]
                    for marker in IMAGE_MARKERS:
                        context = context.replace(marker, "")
                    prompts.append((visuals, context.strip()))
                for i, text in zip(chunk, self._generate(prompts, requests[chunk[0]].args[1])):
                    answers[i] = text
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), text)
                bar.update(len(chunk))
        bar.close()
        return answers  # type: ignore[return-value]

    def loglikelihood(self, requests):
        raise NotImplementedError("the vlmprune lmms-eval model implements generate_until only (the output_type of "
                                  "every task of the study); loglikelihood tasks are not supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the vlmprune lmms-eval model implements generate_until only; multi-round "
                                  "generation is not supported")


def _flatten(visuals) -> list:
    from PIL import Image

    out = []
    for v in visuals or []:
        if isinstance(v, (list, tuple)):
            out += _flatten(v)
        elif isinstance(v, Image.Image):
            out.append(v)
        else:  # video paths, audio arrays: not what an image-text model takes
            raise NotImplementedError(f"the vlmprune lmms-eval model takes images only, got {type(v).__name__}")
    return out
