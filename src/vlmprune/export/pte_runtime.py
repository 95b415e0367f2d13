"""Run a ``vlmprune export --format executorch`` directory in the ExecuTorch runtime (its Python Module API).

``PteModel`` answers (image, question) turns the way ExecuTorch's multimodal runner does: the prompt is
split around its run of image tokens, each piece in turn through its encoder (``token_embedding`` for text,
``vision_encoder`` for the image) and then ``text_decoder``, which fills the KV cache; then greedy decoding
one token at a time until an end-of-sequence id. The prompt is the model's own chat template through the
processor saved beside the program (``vlmprune.data.collate.chat_inputs``, as ``vlmprune evaluate`` builds
prompts for Hugging Face models). ``vlmprune.evaluate.gguf`` scores tasks with it.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from vlmprune.errors import VlmpruneError
from vlmprune.quiet import native_stderr

PTE_FILE = "model.pte"
METHODS = ("vision_encoder", "token_embedding", "text_decoder")
QWEN_IMAGE_SIZE = 448  # Qwen2.5-VL without --image-size: 16 x 16 = 256 image tokens


def require_executorch():
    """ExecuTorch's runtime class, or the install hint."""
    try:
        from executorch.runtime import Runtime
    except ImportError:
        raise VlmpruneError("--format executorch needs PyTorch's ExecuTorch: pip install 'vlmprune[executorch]' "
                            "(executorch 1.5, built for this torch)") from None
    return Runtime


def is_pte_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / PTE_FILE).is_file()


def set_image_size(processor, image_size: int | None) -> int:
    """The (square) image size the processor resizes to, set to ``image_size`` when given. An image
    processor that splits images into tiles (Idefics3 / SmolVLM) is set not to: every image becomes one
    tile of its tower's size (``max_image_size``), the only size its prompt's image token count fits.
    Qwen2.5-VL's, which sizes each image's grid by its own, takes ``image_size`` squared pixels (448 px
    by default)."""
    from vlmprune.export.gguf_vision import _image_size

    ip = getattr(processor, "image_processor", None)
    if ip is None:
        raise VlmpruneError("the model's processor has no image processor; the ExecuTorch export needs one")
    if hasattr(ip, "merge_size") and hasattr(ip, "temporal_patch_size"):
        # Qwen2.5-VL: the processor resizes each image to its own grid (aspect ratio kept, a pixel budget); the
        # program takes one: images of image_size x image_size (the runtime resizes them to it first)
        factor = ip.patch_size * ip.merge_size
        size = image_size or QWEN_IMAGE_SIZE
        if size % factor:
            raise VlmpruneError(f"--image-size {size}: this model's images are cut into {factor} px squares (patch "
                                f"{ip.patch_size} px, merged {ip.merge_size}x{ip.merge_size}); give a multiple of "
                                f"{factor}")
        ip.size = {"shortest_edge": size * size, "longest_edge": size * size}  # the pixel budget: that one size
        return size
    if hasattr(ip, "do_image_splitting"):
        tile = ip.max_image_size
        tile = int(tile["longest_edge"] if isinstance(tile, dict) else tile.longest_edge)
        if image_size is not None and image_size != tile:
            raise VlmpruneError(f"--image-size {image_size}: this model's processor makes the image tokens of one "
                                f"{tile} px tile (its max_image_size), so the program takes {tile} px images; leave "
                                f"--image-size out")
        ip.do_image_splitting = False
        return tile
    if image_size is not None:
        ip.size = {"height": image_size, "width": image_size}
        if getattr(ip, "do_center_crop", False):
            ip.crop_size = {"height": image_size, "width": image_size}
    return _image_size(ip)


def prompt_inputs(processor, image, question: str) -> dict:
    """Processor inputs (batch of one) for a user turn: the image (a PIL image or None), then the question."""
    from vlmprune.data.collate import chat_inputs

    return chat_inputs(processor, [([image] if image is not None else [], question)])


class PteModel:
    """The program in ``folder/model.pte`` and the processor saved beside it, in this process."""

    def __init__(self, folder: str | Path, runtime=None, threads: int | None = None, image_token_id: int | None = None,
                 processor=None):
        """``image_token_id``: the model's (export.json's; a processor's own attribute may name another token,
        Gemma 3's the start-of-image one). ``processor``: the one to use instead of the files beside the program
        (the export's check passes the processor it saved there)."""
        import transformers

        folder = Path(folder)
        if not is_pte_dir(folder):
            raise VlmpruneError(f"{folder} has no {PTE_FILE}: give a directory `vlmprune export --format executorch` "
                                f"wrote")
        runtime = runtime or require_executorch()
        if threads:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(threads)
        debug = logging.getLogger("vlmprune").isEnabledFor(logging.DEBUG)
        try:
            with native_stderr(passthrough=debug) as said:  # XNNPACK's cpuinfo probing, shown at DEBUG
                self.program = runtime.get().load_program(folder / PTE_FILE)
                self.methods = {name: self.program.load_method(name) for name in METHODS}
        except (RuntimeError, ValueError) as exc:
            log_text = "".join(said).strip()
            raise VlmpruneError(f"ExecuTorch could not load {folder / PTE_FILE}: {exc}"
                                + (f"\nExecuTorch said:\n{log_text}" if log_text else "")) from None
        self.max_seq_len = int(self._constant("get_max_seq_len"))
        self.eos_ids = {int(i) for i in self._constant("get_eos_ids", many=True)}
        try:  # the processor files beside the program (no weights there, so not vlmprune.load_processor)
            self.processor = processor or transformers.AutoProcessor.from_pretrained(str(folder))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise VlmpruneError(f"cannot load the processor saved beside {folder / PTE_FILE} ({exc}); export the "
                                f"model again") from None
        record = folder / "export.json"
        self.record = json.loads(record.read_text()) if record.is_file() else {}
        # Qwen2.5-VL: the processor keeps an image's aspect ratio, the program takes one grid: images are resized
        # to the export's square size first
        self.resize_images = self.record.get("resize_images")
        self.image_token_id = image_token_id if image_token_id is not None else \
            self.record.get("image_token_id", _image_token_id(self.processor))

    def _constant(self, name: str, many: bool = False):
        out = self.program.load_method(name).execute([])
        return [int(v) for v in out] if many else out[0]

    def _run(self, name: str, *inputs):
        return self.methods[name].execute(list(inputs))[0]

    def pieces(self, inputs: dict) -> list[tuple[str, object]]:
        """The prompt as the runner's inputs: ("text", ids [1, k]) before and after the run of image tokens,
        ("image", pixel_values [1, 3, S, S]) in its place."""
        import torch

        ids = inputs["input_ids"]
        if ids.shape[0] != 1:
            raise VlmpruneError("the ExecuTorch program runs one prompt at a time")
        ids = ids[0].to(torch.long)
        where = (ids == self.image_token_id).nonzero().flatten().tolist() if self.image_token_id is not None else []
        if not where:
            return [("text", ids[None])]
        first, last = where[0], where[-1]
        grid = inputs.get("image_grid_thw")  # Qwen2.5-VL: one grid per image
        images = grid.shape[0] if grid is not None else inputs["pixel_values"].reshape(
            -1, *inputs["pixel_values"].shape[-3:]).shape[0]
        if last - first + 1 != len(where) or images != 1:
            raise VlmpruneError("the ExecuTorch program takes one image per prompt (one run of image tokens)")
        expected = self.record.get("image_tokens")
        if expected is not None and len(where) != expected:
            raise VlmpruneError(f"the prompt has {len(where)} image tokens and the program's vision encoder makes "
                                f"{expected}: the image was not resized to the export's size (use PteModel.inputs)")
        mask = inputs.get("pixel_attention_mask")
        if mask is not None and not bool(mask.all()):
            raise VlmpruneError("the processor padded the image (pixel_attention_mask); the program takes one "
                                "unpadded image of the export's size")
        parts = [("text", ids[None, :first])] if first else []
        parts.append(("image", (image_input(inputs), len(where))))
        if last + 1 < len(ids):
            parts.append(("text", ids[None, last + 1:]))
        return parts

    def prefill(self, inputs: dict):
        """The logits over the whole prompt [1, n, vocab] and n, filling the KV cache in ExecuTorch's
        multimodal runner's order: for each input, its encoder (``token_embedding`` for a text piece,
        ``vision_encoder`` for the image), then ``text_decoder`` on that output at the next cache positions.
        (A program whose decoder treats image embeddings differently, e.g. Gemma 3's bidirectional image
        block, relies on this order: ``vision_encoder`` marks the next decoder call as an image.)"""
        import torch

        pieces = self.pieces(inputs)
        n = sum(value.shape[1] if kind == "text" else value[1] for kind, value in pieces)
        if n >= self.max_seq_len:
            raise VlmpruneError(f"the prompt is {n} tokens; the program's KV cache holds {self.max_seq_len} "
                                f"(export with a larger --max-seq-len)")
        pos, logits = 0, []
        for kind, value in pieces:
            if kind == "text":
                embeds = self._run("token_embedding", value)
            else:
                embeds = self._run("vision_encoder", value[0])
                if embeds.shape[1] != value[1]:
                    raise VlmpruneError(f"the vision encoder gives {embeds.shape[1]} image tokens but the prompt has "
                                        f"{value[1]}: the image was not resized to the export's size")
            k = embeds.shape[1]
            logits.append(self._run("text_decoder", embeds, torch.arange(pos, pos + k, dtype=torch.long)))
            pos += k
        return torch.cat(logits, 1), pos

    def generate(self, inputs: dict, max_new_tokens: int) -> tuple[list[int], dict]:
        """Greedy new token ids (the end-of-sequence id included when reached) and llama.cpp-style timings
        (prompt_n / prompt_ms: embedding, image and prefill; predicted_n / predicted_ms: decoding)."""
        ids, timings, _ = self._generate(inputs, max_new_tokens)
        return ids, timings

    def prompt_logits_and_tokens(self, inputs: dict, max_new_tokens: int):
        """The logits over the whole prompt [n, vocab] and the greedy new tokens (the export's check)."""
        ids, _, logits = self._generate(inputs, max_new_tokens)
        return logits, ids

    def _generate(self, inputs: dict, max_new_tokens: int):
        import torch

        started = time.perf_counter()
        logits, pos = self.prefill(inputs)
        prompt_ms = 1000 * (time.perf_counter() - started)
        new: list[int] = []
        started = time.perf_counter()
        token = int(logits[0, -1].argmax())
        while True:
            new.append(token)
            if token in self.eos_ids or len(new) >= max_new_tokens or pos >= self.max_seq_len:
                break
            step = self._run("token_embedding", torch.tensor([[token]], dtype=torch.long))
            token = int(self._run("text_decoder", step, torch.tensor([pos], dtype=torch.long))[0, -1].argmax())
            pos += 1
        timings = {"prompt_n": int(logits.shape[1]), "prompt_ms": prompt_ms, "predicted_n": len(new),
                   "predicted_ms": 1000 * (time.perf_counter() - started)}
        return new, timings, logits[0]

    def inputs(self, image, question: str) -> dict:
        """The processor inputs for one user turn (``image``: a PIL image or None), the image resized to the
        export's size first where the processor would keep its aspect ratio (Qwen2.5-VL)."""
        if image is not None and self.resize_images:
            from PIL import Image

            image = image.convert("RGB").resize((self.resize_images, self.resize_images), Image.Resampling.BICUBIC)
        return prompt_inputs(self.processor, image, question)

    def answer(self, image: str | Path | None, question: str, max_new_tokens: int = 10) -> tuple[str, dict]:
        """The greedy answer to one user turn (the image first, then the text, as the HF evaluator builds
        it) and the timings, in the shape of :class:`vlmprune.export.runtime.LlamaCppModel`'s answer."""
        from PIL import Image

        picture = Image.open(image).convert("RGB") if image is not None else None
        new, timings = self.generate(self.inputs(picture, question), max_new_tokens)
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        return tokenizer.decode(new, skip_special_tokens=True).strip(), {"timings": timings}


def image_input(inputs: dict):
    """The image of processor ``inputs`` as ``vision_encoder`` (and ExecuTorch's runner) takes it: [1, 3, S, S]
    float32. Idefics3 / SmolVLM's [1, 1, 3, S, S] reshaped; Qwen2.5-VL's flattened patches put back into the
    normalized image they were cut from (:func:`image_from_patches`)."""
    import torch

    pixels = inputs["pixel_values"]
    if inputs.get("image_grid_thw") is not None:
        pixels = image_from_patches(pixels, inputs["image_grid_thw"])
    return pixels.reshape(-1, *pixels.shape[-3:]).to(torch.float32)


def image_from_patches(patches, grid_thw, merge_size: int = 2):
    """Qwen2-VL / Qwen2.5-VL processor output -> [1, 3, S_h, S_w]: ``patches`` [t * h * w, 3 * T * p * p] rows in
    the merger's order (row block, column block, 2x2 within), each a (channel, frame, row, column) patch; a
    picture's frames are copies of it (the first is taken). One image (``grid_thw`` [[1, h, w]])."""
    t, h, w = (int(v) for v in grid_thw[0])
    if grid_thw.shape[0] != 1 or t != 1:
        raise VlmpruneError("the ExecuTorch program takes one picture per prompt (no video)")
    frames = patches.shape[-1] // 3
    p = int(round((frames // 2) ** 0.5))
    m = merge_size
    x = patches.reshape(h // m, w // m, m, m, 3, 2, p, p)[:, :, :, :, :, 0]  # [H/m, W/m, m, m, C, p, p]
    return x.permute(4, 0, 2, 5, 1, 3, 6).reshape(1, 3, h * p, w * p)


def _image_token_id(processor) -> int | None:
    value = getattr(processor, "image_token_id", None)
    if value is None and getattr(processor, "image_token", None):
        tokenizer = getattr(processor, "tokenizer", processor)
        value = tokenizer.convert_tokens_to_ids(processor.image_token)
    return value
