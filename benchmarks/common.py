"""Shared builders for the benchmark scripts: LLaVA-style models with real LM shapes, random weights."""

from __future__ import annotations

import torch
import transformers

# Language-model shapes of real checkpoints (random weights are fine for cost and speed).
LM_SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}
IMAGE_TOKEN_ID = 3


def build_llava(shape: str, dtype=torch.float32, image_size: int = 112, seed: int = 0):
    """A LlavaForConditionalGeneration whose language model is shaped like ``shape`` (a Llama config
    with head_dim kept explicit), with a ViT-S/14 vision tower (DINOv2-small shape)."""
    text = transformers.LlamaConfig(**LM_SHAPES[shape], max_position_embeddings=4096, pad_token_id=0,
                                    head_dim=LM_SHAPES[shape]["hidden_size"] // LM_SHAPES[shape]["num_attention_heads"])
    vision = transformers.CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                                           num_attention_heads=6, image_size=image_size, patch_size=14)
    config = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID,
                                      tie_word_embeddings=LM_SHAPES[shape]["tie_word_embeddings"])
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).to(dtype).eval()
    return model


def image_tokens(model) -> int:
    v = model.config.vision_config
    return (v.image_size // v.patch_size) ** 2  # the "default" strategy drops CLS


def fake_batch(model, batch: int, text: int = 40, answer: int = 8, seed: int = 0, image_size: int | None = None):
    """input_ids with one image's worth of image tokens, random text, the last ``answer`` tokens labelled."""
    gen = torch.Generator().manual_seed(seed)
    n_img = image_tokens(model)
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(10, vocab, (batch, 1 + n_img + text), generator=gen)
    ids[:, 1 : 1 + n_img] = IMAGE_TOKEN_ID
    size = image_size or model.config.vision_config.image_size
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(batch, 3, size, size, generator=gen), "labels": labels}
