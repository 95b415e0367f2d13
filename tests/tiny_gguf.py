"""Tiny models with real byte-level BPE tokenizers, and a llama.cpp runner (xllamacpp), for the GGUF tests.

* :func:`bpe_tokenizer`: a byte-level BPE trained here on a few sentences (SmolLM2's pre-tokenizer:
  single digits, then GPT-2's regex), with ChatML specials and ``<image>``;
* :func:`save_tiny_llava`: a tiny LLaVA (Llama or Qwen2 backbone, CLIP or Dinov2 tower) whose
  vocabulary is that tokenizer's, saved with a LlavaProcessor;
* :class:`LlamaCpp`: a llama.cpp server in this process (xllamacpp) answering completions with the
  top-n token probabilities, chat completions, and per-token embeddings.
"""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from vlmprune.demo.assemble import CHAT_TEMPLATE  # the demo model's own template (ChatML with an <image> item)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 12345 apples and 678 pears.",
    "What colour is the circle? The circle is blue. What shape is it? A triangle.",
    "llama.cpp runs GGUF files on laptops, phones and small boards.",
    "Pruning removes heads, channels and whole layers; recovery trains them back.",
    "Is there a red square in the image? Yes, there is. No, there is not.",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
# a chat prompt with digits (single-digit pre-tokenization) and, split around where an image goes, its question
PROMPT = "<|im_start|>user\nWhat colour is the circle? 12 apples<|im_end|>\n<|im_start|>assistant\n"
PRE, POST = "<|im_start|>user\n", "What colour is the circle?<|im_end|>\n<|im_start|>assistant\n"


def png_image(height: int, width: int | None = None, seed: int = 0) -> tuple[object, str]:
    """A random RGB image (height x width, square without width): the PIL image and its PNG as base64."""
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 255, (height, width or height, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return img, base64.b64encode(buf.getvalue()).decode()


def export_with_processor(folder: Path, out: Path, processor, **kwargs) -> dict:
    """export_gguf of ``folder`` with ``processor`` handed to it in place of load_processor (the processors
    these tests assemble by hand: transformers' own need torchvision)."""
    import pytest

    import vlmprune.checkpoint as checkpoint
    from vlmprune.export import export_gguf

    patch = pytest.MonkeyPatch()
    patch.setattr(checkpoint, "load_processor", lambda *args, **kw: processor)
    try:
        return export_gguf(folder, out, **kwargs)
    finally:
        patch.undo()


def bpe_tokenizer(vocab_size: int = 400, pre: str = "smollm", extra: dict[str, str] | None = None):
    """``extra``: more special tokens by role (e.g. Gemma 3's ``boi_token``), set as tokenizer attributes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("llama3", "qwen2"):  # a regex split, then bytes (Llama 3 / Qwen2 tokenizer.json layout)
        from tokenizers import Regex

        from vlmprune.export.gguf import _LLAMA3_REGEX, _QWEN2_REGEX

        split = pre_tokenizers.Split(Regex(_LLAMA3_REGEX if pre == "llama3" else _QWEN2_REGEX), behavior="isolated")
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        backend.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                                 if pre == "smollm" else byte_level)
    backend.decoder = decoders.ByteLevel()
    extra = extra or {}
    specials = SPECIALS + [t for t in extra.values() if t not in SPECIALS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token=None,
                                   additional_special_tokens=specials[1:], extra_special_tokens=extra,
                                   chat_template=CHAT_TEMPLATE)


def tiny_llava(tokenizer, text: str = "llama", vision: str = "clip", layers: int = 4, seed: int = 0,
               vocab_pad: int = 0, **text_kwargs):
    """A tiny LLaVA whose vocabulary is ``tokenizer``'s (plus ``vocab_pad`` unused rows)."""
    from transformers import (
        CLIPVisionConfig,
        Dinov2Config,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Phi3Config,
        Qwen2Config,
        SiglipVisionConfig,
    )

    n_vocab = len(tokenizer) + vocab_pad
    common = {"vocab_size": n_vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": layers,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                  "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                  "pad_token_id": tokenizer.pad_token_id, "rms_norm_eps": 1e-5}
    common.update(text_kwargs)
    text_config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "phi3": Phi3Config}[text](**common)
    if vision == "clip":
        vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=28, patch_size=7, projection_dim=32)
        extra = {"vision_feature_layer": -2, "vision_feature_select_strategy": "default"}
    elif vision == "siglip":  # LLaVA-OneVision's layout: no class token, every patch, the last block
        vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                image_size=28, patch_size=7, vision_use_head=False)
        extra = {"vision_feature_layer": -1, "vision_feature_select_strategy": "full"}
    else:  # the demo's layout: Dinov2, CLS kept, a middle layer read
        vc = Dinov2Config(hidden_size=32, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                          image_size=42, patch_size=7, layer_norm_eps=1e-6, layerscale_value=0.5)
        extra = {"vision_feature_layer": -2, "vision_feature_select_strategy": "full"}
    config = LlavaConfig(vision_config=vc, text_config=text_config,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"), **extra)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():  # LayerScale and biases away from their init, so folding them is tested
        for name, p in model.named_parameters():
            if "lambda1" in name or "lambda2" in name or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "lambda" in name else 0.0))
            if "multi_modal_projector" in name:  # image tokens that differ from each other (not bias-dominated)
                p.copy_(torch.randn_like(p) * (0.02 if name.endswith(".bias") else 0.3))
            elif "vision_tower" in name and "norm" not in name and "lambda" not in name:
                # blocks, positions and class token that matter (at their init scale a block barely
                # changes the residual stream, and a wrong layer count or position would go unseen)
                p.copy_(torch.randn_like(p) * (1.0 if p.ndim < 2 or "position" in name else 0.25))
    return model.eval()


GEMMA3_SPECIALS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image>"}


def save_tiny_gemma3(folder: Path, layers: int = 5, seed: int = 0, sliding_window: int = 8) -> Path:
    """A tiny Gemma 3 (sliding and full attention layers, window 8, shorter than the test prompts;
    a 2-block SigLIP tower, 28 px in 7-px patches pooled to 4 image tokens) with the byte-level
    tokenizer (plus Gemma's image delimiters) and a Gemma3Processor."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
        SiglipVisionConfig,
    )

    tok = bpe_tokenizer(extra=GEMMA3_SPECIALS)
    kinds = ["sliding_attention", "sliding_attention", "full_attention"]
    text = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32,
                            sliding_window=sliding_window, layer_types=[kinds[i % 3] for i in range(layers)],
                            max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=28, patch_size=7, vision_use_head=False, layer_norm_eps=1e-6)
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=4,
                          image_token_index=tok.image_token_id, boi_token_index=tok.boi_token_id,
                          eoi_token_index=tok.eoi_token_id)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():  # norms away from their zero init (the +1 of Gemma's norms is tested), a tower that matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") and "vision_tower" not in name:
                p.copy_(torch.randn_like(p) * 0.3)
            elif "vision_tower" in name and "norm" not in name:
                p.copy_(torch.randn_like(p) * (1.0 if p.ndim < 2 or "position" in name else 0.25))
            elif "mm_input_projection" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    model.eval().save_pretrained(folder)
    half = [0.5, 0.5, 0.5]
    ip = Gemma3ImageProcessorPil(size={"height": 28, "width": 28}, image_mean=half, image_std=half)
    template = CHAT_TEMPLATE.replace("'<image>\n'", "'<start_of_image>'")
    processor = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=template)
    processor.save_pretrained(folder)
    return folder


IDEFICS3_SPECIALS = {"fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>",
                     "image_token": "<image>", "paragraph": "\n\n", "row_1_col_1": "<row_1_col_1>"}


def save_tiny_idefics3(folder: Path, seed: int = 0) -> Path:
    """A tiny Idefics3 (SmolVLM's layout: SigLIP-style tower, pixel shuffle 2, Llama text) with the
    byte-level tokenizer plus Idefics3's image tokens ("\n\n" one token, as in SmolLM2's vocabulary),
    and an Idefics3Processor cutting 28-px tiles after resizing the longest edge to 28 px."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
        LlamaConfig,
    )

    half = [0.5, 0.5, 0.5]
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 28}, max_image_size={"longest_edge": 28},
                                   image_mean=half, image_std=half)
    processor = Idefics3Processor(image_processor=ip, tokenizer=bpe_tokenizer(extra=IDEFICS3_SPECIALS),
                                  image_seq_len=4, chat_template=CHAT_TEMPLATE)
    tok = processor.tokenizer  # the processor adds <end_of_utterance>
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=28, patch_size=7)
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=2,
                            image_token_id=tok.image_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():  # a tower and a connector that matter (see tiny_llava)
        for name, p in model.named_parameters():
            if "vision_model" in name and "norm" not in name:
                p.copy_(torch.randn_like(p) * (1.0 if p.ndim < 2 or "position" in name else 0.25))
            elif "connector" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    model.eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


INTERNVL_SPECIALS = {"start_image_token": "<img>", "end_image_token": "</img>",
                     "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}


QWEN_VL_SPECIALS = {"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
                    "image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}


def save_tiny_qwen2_5_vl(folder: Path, seed: int = 0, window_size: int = 112) -> Path:
    """A tiny Qwen2.5-VL (M-RoPE text, sections 2/3/3 of a 16-wide head; a 3-block tower with window attention
    in blocks 0 and 2 and full attention in block 1, 112-px windows of 7-px patches, SwiGLU MLPs, RMS norms, the
    2x2 patch merger) with the byte-level tokenizer (Qwen2's pre-tokenizer, plus Qwen's vision tokens); its
    processor: :func:`qwen2_5_vl_processor`."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
    )

    tok = bpe_tokenizer(pre="qwen2", extra=QWEN_VL_SPECIALS)
    text = Qwen2_5_VLTextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                rms_norm_eps=1e-6, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [2, 3, 3]})
    vision = Qwen2_5_VLVisionConfig(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                    patch_size=7, spatial_merge_size=2, temporal_patch_size=2, window_size=window_size,
                                    fullatt_block_indexes=[1])
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in QWEN_VL_SPECIALS.items()}
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=ids["image_token"],
                              video_token_id=ids["video_token"], vision_start_token_id=ids["vision_start_token"],
                              vision_end_token_id=ids["vision_end_token"])
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():  # a tower and a merger that matter (see tiny_llava)
        for name, p in model.named_parameters():
            if "visual" in name and "norm" not in name and "ln_q" not in name:
                p.copy_(torch.randn_like(p) * (1.0 if p.ndim < 2 else 0.25))
            elif "visual" in name:  # RMSNorm weights away from 1
                p.copy_(torch.randn_like(p) * 0.3 + 1.0)
        # llama.cpp's qwen2vl text graph reads no RMS-norm epsilon from the file (it normalises with 0, see
        # export/gguf.py): token embeddings of unit scale, as in trained models, where an epsilon of 1e-6 does not
        # show (at the init scale, 0.02, it moves the log-probs by 1e-4), and no zero row (the pad token's, at
        # init: 0 / 0 = NaN logits in llama.cpp)
        emb = model.get_input_embeddings().weight
        emb.copy_(torch.randn_like(emb))
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def qwen2_5_vl_processor(folder: Path):
    """What the GGUF export reads of a Qwen2.5-VL processor (image processor, tokenizer, chat template).
    transformers' Qwen2_5_VLProcessor needs a video processor, which needs torchvision (not installed)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(patch_size=7, merge_size=2, temporal_patch_size=2, min_pixels=14 * 14 * 4,
                                  max_pixels=14 * 14 * 256)
    return SimpleNamespace(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(folder),
                           chat_template=CHAT_TEMPLATE)


# Qwen2.5-VL's chat layout (ChatML, the image as vision start, one image pad token, vision end)
QWEN_VL_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("{{ '<image>\n' }}",
                                              "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}")


class Qwen2_5_VLTestProcessor:
    """What ``Qwen2_5_VLProcessor`` does for images, for the ExecuTorch tests: transformers' class cannot be built
    without torchvision (its video processor), absent here. The chat template renders an image as one
    ``<|image_pad|>``, which the call expands to the image's merged patches (grid t * h * w / merge**2), and
    marks the image's tokens in ``mm_token_type_ids``, as transformers' processor does; ``save_pretrained`` writes
    the image processor and the tokenizer."""

    image_token = "<|image_pad|>"

    def __init__(self, folder: Path, image_processor=None):
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

        self.image_processor = image_processor or Qwen2VLImageProcessorPil(
            patch_size=7, merge_size=2, temporal_patch_size=2, min_pixels=14 * 14 * 4, max_pixels=14 * 14 * 256)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.chat_template = QWEN_VL_CHAT_TEMPLATE
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=tokenize,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, text, images=None, padding=False, return_tensors="pt"):
        from transformers import BatchFeature

        text, extra = list(text), {}
        if images:
            extra = dict(self.image_processor(images=images, return_tensors=return_tensors))
            counts = iter((extra["image_grid_thw"].prod(-1) // self.image_processor.merge_size ** 2).tolist())
            expanded = []
            for line in text:
                parts = line.split(self.image_token)
                expanded.append(parts[0] + "".join(self.image_token * next(counts) + p for p in parts[1:]))
            text = expanded
        tokens = self.tokenizer(text, padding=padding, return_tensors=return_tensors)
        # which tokens are the image's: transformers' model places them with M-RoPE only when it is given this
        tokens["mm_token_type_ids"] = (tokens["input_ids"] == self.image_token_id).int()
        return BatchFeature({**tokens, **extra})

    def save_pretrained(self, folder) -> None:
        self.image_processor.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


def save_tiny_internvl(folder: Path, seed: int = 0) -> Path:
    """A tiny InternVL (InternViT with a class token, LayerScale and qkv biases; pixel shuffle 0.5;
    Qwen2 text) with the byte-level tokenizer plus InternVL's image tokens; its processor:
    :func:`internvl_processor` (28-px tiles, 4 image tokens each)."""
    from transformers import (
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        Qwen2Config,
    )

    tok = bpe_tokenizer(extra=INTERNVL_SPECIALS)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=28, patch_size=7, attention_bias=True, layer_scale_init_value=0.5)
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.context_image_token_id,
                            image_seq_length=4, downsample_ratio=0.5, vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():  # LayerScale, tower and projector away from their init (see tiny_llava)
        for name, p in model.named_parameters():
            if "lambda" in name:
                p.copy_(torch.randn_like(p) * 0.3 + 1.0)
            elif "vision_tower" in name and "norm" not in name:
                p.copy_(torch.randn_like(p) * (1.0 if p.ndim < 2 or "position" in name or "cls" in name else 0.25))
            elif "multi_modal_projector" in name and "norm" not in name:
                p.copy_(torch.randn_like(p) * 0.3)
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def internvl_processor(folder: Path):
    """What the GGUF export reads of an InternVL processor (image processor, tokenizer, chat template).
    transformers' InternVLProcessor cannot be built here: it needs a video processor, which needs
    torchvision, which this environment lacks."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer, GotOcr2ImageProcessorPil

    ip = GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=True, min_patches=1,
                                  max_patches=4, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return SimpleNamespace(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(folder),
                           chat_template=CHAT_TEMPLATE)


def processor_for(tokenizer, model):
    from transformers import BitImageProcessor, CLIPImageProcessorPil, LlavaProcessor

    vc = model.config.vision_config
    size = 28
    if vc.model_type == "clip_vision_model":
        ip = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        extra = {"vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    elif vc.model_type == "siglip_vision_model":
        from transformers import SiglipImageProcessor

        ip = SiglipImageProcessor(size={"height": size, "width": size})
        extra = {"vision_feature_select_strategy": "full", "num_additional_image_tokens": 0}
    else:
        ip = BitImageProcessor(size={"height": size, "width": size}, do_center_crop=False, do_resize=True,
                               image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        extra = {"vision_feature_select_strategy": "full", "num_additional_image_tokens": 1}
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=vc.patch_size,
                          chat_template=CHAT_TEMPLATE, **extra)


def save_tiny_llava(folder: Path, pre: str = "smollm", extra: dict[str, str] | None = None, **kwargs) -> Path:
    tok = bpe_tokenizer(pre=pre, extra=extra)
    model = tiny_llava(tok, **kwargs)
    model.save_pretrained(folder)
    processor_for(tok, model).save_pretrained(folder)
    return folder


MEDIA_MARKER = "<__media__>"
# llama-server draws a random media marker per process unless this is set (read once, at first use)
os.environ.setdefault("LLAMA_MEDIA_MARKER", MEDIA_MARKER)


class LlamaCpp:
    """llama.cpp (xllamacpp's in-process server) on a GGUF file, with an optional mmproj."""

    def __init__(self, model: Path, mmproj: Path | None = None, n_ctx: int = 256, pooling: str | None = None,
                 chat_template: str | None = None):
        import xllamacpp as xlc

        params = xlc.CommonParams()
        params.model.path = str(model)
        if mmproj is not None:
            params.mmproj.path = str(mmproj)
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.cpuparams.n_threads = 2
        params.warmup = False
        # exact comparisons: f32 KV cache (llama.cpp's default is f16), no flash attention
        params.cache_type_k = xlc.ggml_type.GGML_TYPE_F32
        params.cache_type_v = xlc.ggml_type.GGML_TYPE_F32
        params.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
        if chat_template is not None:
            params.chat_template = chat_template
            params.use_jinja = True
        if pooling is not None:  # an embedding server: "mean" or "last" over the prompt's final hidden states
            params.embedding = True
            params.pooling_type = getattr(xlc.llama_pooling_type, f"LLAMA_POOLING_TYPE_{pooling.upper()}")
        self.server = xlc.Server(params)
        # never sampled (partial UTF-8 tokens: the server holds their text and logprobs back)
        self.banned: list[int] = []

    def completion(self, prompt, n_predict: int = 1, n_probs: int = 0, **extra) -> dict:
        request = {"prompt": prompt, "n_predict": n_predict, "temperature": 0.0, "n_probs": n_probs,
                   "cache_prompt": False, "samplers": ["top_k"], "top_k": 1,
                   "logit_bias": [[i, False] for i in self.banned], **extra}
        out = self.server.handle_completions(request)
        if isinstance(out, str):
            out = json.loads(out)
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def chat(self, messages: list[dict], max_tokens: int = 1, top_logprobs: int = 0, **extra) -> dict:
        request = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "cache_prompt": False,
                   "samplers": ["top_k"], "top_k": 1, "logit_bias": [[i, False] for i in self.banned], **extra}
        if top_logprobs:
            request.update(logprobs=True, top_logprobs=top_logprobs)
        out = self.server.handle_chat_completions(request)
        if isinstance(out, str):
            out = json.loads(out)
        if "error" in out:
            raise RuntimeError(out["error"])
        return out

    def first_logprobs(self, prompt, vocab: int) -> dict[int, float]:
        """log p(token) over the whole vocabulary for the position after ``prompt`` (pre-sampling)."""
        out = self.completion(prompt, n_predict=1, n_probs=vocab, ignore_eos=True)
        probs = out["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        return {p["id"]: p["logprob"] for p in probs}

    def greedy(self, prompt, n: int) -> list[int]:
        """``n`` greedy token ids after ``prompt`` (decoded one by one with the KV cache)."""
        out = self.completion(prompt, n_predict=n, n_probs=1, ignore_eos=True)
        return [t["id"] for t in out["choices"][0]["logprobs"]["content"]]

    def prompt_tokens(self, prompt) -> int:
        return self.completion(prompt, n_predict=1)["usage"]["prompt_tokens"]


RAW_TEMPLATE = ("{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
                "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}<__media__>{% endif %}"
                "{% endfor %}{% endif %}{% endfor %}")


def probe_model(tokenizer, hidden: int, silent: list[str], distance: int, sharpness: float = 400.0):
    """A one-layer LLaVA text model whose last position reads out the input embedding ``distance``
    positions back, so that llama.cpp's image embeddings can be read one by one through logits.

    One attention head of width ``hidden``; q and k are constant (biases only) and chosen so that
    after RoPE the score peaks sharply at that relative distance; v and o are the identity, the MLP
    adds nothing, the norms have weight one and lm_head row j is e_j for j < hidden (row ``hidden``
    is zero: logit 0, a reference). The ``silent`` tokens embed to zero, so the last token adds
    nothing of its own: logits[:hidden] - logits[hidden] = x / rms(x) of the token read.
    """
    model = tiny_llava(tokenizer, layers=1, hidden_size=hidden, num_attention_heads=1, num_key_value_heads=1,
                       head_dim=hidden, intermediate_size=64, rms_norm_eps=1e-12, attention_bias=True)
    layer = model.model.language_model.layers[0]
    half = hidden // 2
    theta = 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / hidden)
    r = sharpness ** 0.5
    with torch.no_grad():
        attn = layer.self_attn
        for lin in (attn.q_proj, attn.k_proj):
            lin.weight.zero_()
        q = torch.zeros(hidden, dtype=torch.float64)
        q[:half] = r  # rotate-half pairs (i, i + half): q_i = r
        k = torch.zeros(hidden, dtype=torch.float64)  # k_i = r * exp(+i * distance * theta_i)
        k[:half] = r * torch.cos(distance * theta)
        k[half:] = r * torch.sin(distance * theta)
        attn.q_proj.bias.copy_(q.float())
        attn.k_proj.bias.copy_(k.float())
        attn.v_proj.weight.copy_(torch.eye(hidden))
        attn.v_proj.bias.zero_()
        attn.o_proj.weight.copy_(torch.eye(hidden))
        attn.o_proj.bias.zero_()
        layer.mlp.down_proj.weight.zero_()
        layer.input_layernorm.weight.fill_(1.0)
        model.model.language_model.norm.weight.fill_(1.0)
        for t in silent:
            model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(t)] = 0.0
        head = model.get_output_embeddings().weight
        head.zero_()
        head[:hidden, :hidden] = torch.eye(hidden)
    return model


def write_probe(path: Path, tokenizer_folder: Path, hidden: int, silent: list[str], distance: int) -> int:
    """:func:`probe_model` as a GGUF (the export's own writer); returns the vocabulary size."""
    from transformers import AutoTokenizer

    import vlmprune.export.gguf as text
    from vlmprune.adapters import get_adapter

    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    model = probe_model(tok, hidden, silent, distance)
    adapter = get_adapter(model)
    plan = text.plan_text(model, adapter)
    text.write_text_gguf(path, model, adapter, plan, text.TokenizerSource(tokenizer_folder, None), "f32", "probe")
    return model.config.text_config.vocab_size


def write_mrope_probe(path: Path, tokenizer_folder: Path, hidden: int, quiet: list[str],
                      distances: tuple[int, int, int], sharpness: float = 400.0, theta: float = 3.0,
                      sections: tuple[int, int, int] = (4, 14, 14)) -> int:
    """:func:`probe_model` for an M-RoPE text model (llama.cpp's qwen2vl; the mmproj of Qwen2.5-VL needs one): a
    one-layer Qwen2.5-VL text model whose last position reads out the input embedding at the (time, row, column)
    position distances ``distances`` back, i.e. one image token. The rotary pairs of each M-RoPE section are
    tuned to their own distance (a small rope base keeps every section's frequencies high enough to tell
    neighbours apart). llama.cpp's qwen2vl graph normalises with epsilon 0 (see export/gguf.py), so the
    ``quiet`` tokens embed to 1e-4-scale vectors instead of zero. Written by the export's own writer; returns
    the vocabulary size."""
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    import vlmprune.export.gguf as text
    from vlmprune.adapters import get_adapter

    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 1, "num_key_value_heads": 1, "rms_norm_eps": 1e-12,
                     "max_position_embeddings": 512, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
                     "rope_parameters": {"rope_type": "default", "rope_theta": theta,
                                         "mrope_section": list(sections)}},
        vision_config={"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": hidden, "patch_size": 7, "fullatt_block_indexes": [0]})
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    layer = model.model.language_model.layers[0]
    half = hidden // 2
    inv = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / hidden)
    owner = torch.repeat_interleave(torch.arange(3), torch.tensor(sections))  # the section of each rotary pair
    d = torch.tensor(distances, dtype=torch.float64)[owner]
    r = sharpness ** 0.5
    with torch.no_grad():
        attn = layer.self_attn
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        q = torch.zeros(hidden, dtype=torch.float64)
        q[:half] = r
        k = torch.zeros(hidden, dtype=torch.float64)
        k[:half] = r * torch.cos(d * inv)
        k[half:] = r * torch.sin(d * inv)
        attn.q_proj.bias.copy_(q.float())
        attn.k_proj.bias.copy_(k.float())
        attn.v_proj.weight.copy_(torch.eye(hidden))
        attn.v_proj.bias.zero_()
        attn.o_proj.weight.copy_(torch.eye(hidden))
        layer.mlp.down_proj.weight.zero_()
        layer.input_layernorm.weight.fill_(1.0)
        model.model.language_model.norm.weight.fill_(1.0)
        emb = model.get_input_embeddings().weight
        for t in quiet:
            emb[tok.convert_tokens_to_ids(t)] = torch.randn(hidden) * 1e-4
        head = model.get_output_embeddings().weight
        head.zero_()
        head[:hidden, :hidden] = torch.eye(hidden)
    adapter = get_adapter(model)
    plan = text.plan_text(model, adapter)
    text.write_text_gguf(path, model, adapter, plan, text.TokenizerSource(tokenizer_folder, None), "f32", "probe")
    return len(tok)


def partial_utf8_ids(tokenizer) -> list[int]:
    """Byte-level tokens that are not valid UTF-8 on their own."""
    from gguf.vocab import bytes_to_unicode

    decoder = {v: k for k, v in bytes_to_unicode().items()}
    bad = []
    for token, idx in tokenizer.get_vocab().items():
        try:
            bytes(decoder[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            if token not in tokenizer.all_special_tokens:
                bad.append(idx)
    return sorted(bad)


def hf_greedy(model, ids: list[int], n: int, banned: list[int], **inputs) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             suppress_tokens=banned or None, **inputs)
    return out[0, len(ids):].tolist()


def hf_logprobs(model, ids: list[int], **inputs) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), **inputs).logits[0, -1]
    return torch.log_softmax(logits.double(), -1)


def rel_diff(llama: dict[int, float], hf: torch.Tensor) -> float:
    """max |a - b| / max |b| over the tokens llama.cpp reported (log-probabilities, i.e. logits up to a
    per-position constant that cancels in softmax)."""
    ids = sorted(llama)
    a = torch.tensor([llama[i] for i in ids], dtype=torch.float64)
    b = hf[ids]
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


MISTRAL3_SPECIALS = {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}


def save_tiny_mistral3(folder: Path, seed: int = 0) -> Path:
    """A tiny Mistral 3 (a 2-block Pixtral tower of 7-px patches with 2-D RoPE and SwiGLU, RMSNorm + 2x2 patch
    merger + Linear-GELU-Linear; Mistral text with head_dim 16, no sliding window as in Mistral-Small-3.1) with
    the byte-level tokenizer plus Pixtral's image tokens; its processor: :func:`mistral3_processor` (longest
    edge 56 px)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    tok = bpe_tokenizer(extra=MISTRAL3_SPECIALS)
    text = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         sliding_window=None,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 head_dim=16, image_size=56, patch_size=7, hidden_act="silu")  # as the checkpoints
    config = Mistral3Config(vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
                            spatial_merge_size=2, vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():  # tower, merger and projector away from their init (see tiny_llava)
        for name, p in model.named_parameters():
            if ("vision_tower" in name or "multi_modal_projector" in name) and "norm" not in name:
                p.copy_(torch.randn_like(p) * (1.0 if p.ndim < 2 else 0.25))
            elif "vision_tower" in name or "multi_modal_projector" in name:  # RMSNorm weights away from 1
                p.copy_(torch.randn_like(p) * 0.3 + 1.0)
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def mistral3_processor(folder: Path):
    """What the GGUF export reads of a Mistral 3 processor (image processor, tokenizer, chat template)."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer, PixtralImageProcessorPil

    ip = PixtralImageProcessorPil(size={"longest_edge": 56}, patch_size=7)
    return SimpleNamespace(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(folder),
                           chat_template=CHAT_TEMPLATE)
