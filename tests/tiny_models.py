"""Tiny, randomly initialised vision-language models for vlmprune tests.

Every model is built offline from native ``transformers`` config classes (nothing is
downloaded from the Hub).  All families share the same language-backbone shape so
tests can compare them:

* 4 decoder layers (Gemma 4: 6, so that KV sharing has producers and consumers), hidden size 64, intermediate
  size 128, 4 attention heads with 2 key/value heads (GQA) unless stated otherwise, vocabulary of 320 tokens;
* a 2-layer vision tower of width 32 on 28x28 or 56x56 images;
* float32 weights, eval mode, ``attn_implementation="sdpa"`` (the default that
  ``from_pretrained`` picks, so a save/reload round trip is bit-exact).

Token ids are laid out so that random text never collides with a special token:
``0`` pad, ``1`` bos, ``2`` eos, ``3..299`` ordinary text, ``300..`` image and other
special tokens (see ``IMAGE_ID`` and friends).

``make_inputs`` builds what the family's processor would produce for one image per
sample: the ``<image>`` placeholder is expanded to exactly the number of image
features the model produces (computed from the config), and row 1 of the batch is
left-padded by ``LEFT_PAD`` tokens.

Run ``python tests/tiny_models.py`` for a self-check of every family (forward,
generate, save/reload) and a summary of the module paths of each architecture.
"""

from __future__ import annotations

import logging
import math
import tempfile

import torch
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    Phi3Config,
    PhiConfig,
    PixtralVisionConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLTextConfig,
    Qwen2VLVisionConfig,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5TextConfig,
    Qwen3_5VisionConfig,
    Qwen3Config,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLTextConfig,
    Qwen3VLVisionConfig,
    SiglipVisionConfig,
)
from transformers.image_processing_utils import select_best_resolution

FAMILIES: list[str] = [
    "llava_llama_mha",
    "llava_llama_gqa",
    "llava_phi",
    "llava_phi3",
    "internvl_phi3",
    "qwen2_vl",
    "qwen2_5_vl",
    "internvl_qwen2",
    "idefics3",
    "gemma3",
    "llava_onevision",
    "llava_next",
    "mistral3",
    "qwen3_vl",
    "internvl_qwen3",
    "qwen3_5",
    "gemma4",
]

ATTN_IMPLEMENTATION = "sdpa"

VOCAB_SIZE = 320
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TEXT_ID_RANGE = (3, 300)  # random text tokens are drawn from [3, 300)
IMAGE_ID = 300  # <image> / <|image_pad|> / <IMG_CONTEXT> / <image_soft_token>
VIDEO_ID = 301  # Qwen <|video_pad|>, LLaVA-OneVision <video>
IMAGE_START_ID = 302  # Qwen <|vision_start|>, InternVL <img>, Gemma3 <start_of_image>
IMAGE_END_ID = 303  # Qwen <|vision_end|>, InternVL </img>, Gemma3 <end_of_image>
FAKE_IMAGE_ID = 304  # Idefics3 <fake_token_around_image>
GLOBAL_IMAGE_ID = 305  # Idefics3 <global-img>

LEFT_PAD = 3  # padding tokens on the left of row 1
PREFIX_LEN = 4  # text tokens between BOS and the image block
SUFFIX_LEN = 20  # text tokens after the image block (row 0)

_TEXT_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)

_VISION_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


# --------------------------------------------------------------------------- configs


def _llava_config(text_config) -> LlavaConfig:
    """LLaVA-1.5 layout: CLIP tower (CLS dropped), 2-layer MLP projector, any text backbone."""
    vision = CLIPVisionConfig(**_VISION_COMMON, image_size=28, patch_size=7, projection_dim=32)
    return LlavaConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_index=IMAGE_ID,
        image_seq_length=(28 // 7) ** 2,
    )


def _internvl_config(text_config) -> InternVLConfig:
    """InternVL layout: InternViT tower, pixel-shuffle (0.5) + MLP projector."""
    vision = InternVLVisionConfig(**_VISION_COMMON, image_size=28, patch_size=7)
    return InternVLConfig(
        vision_config=vision,
        text_config=text_config,
        image_token_id=IMAGE_ID,
        image_seq_length=int((28 // 7) ** 2 * 0.5**2),
    )


def _qwen_text_kwargs() -> dict:
    """Text kwargs shared by Qwen2-VL and Qwen2.5-VL.

    head_dim = 64 / 4 = 16, so the rotary half-dim is 8 and ``mrope_section``
    (temporal, height, width) must sum to 8.
    """
    return dict(
        **_TEXT_COMMON,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )


def _config_llava_llama_mha():
    return _llava_config(LlamaConfig(**{**_TEXT_COMMON, "num_key_value_heads": 4}))


def _config_llava_llama_gqa():
    return _llava_config(LlamaConfig(**{**_TEXT_COMMON, "num_attention_heads": 8, "num_key_value_heads": 2}))


def _config_llava_phi():
    text = PhiConfig(**{**_TEXT_COMMON, "num_key_value_heads": 4}, partial_rotary_factor=0.5)
    return _llava_config(text)


def _config_llava_phi3():
    return _llava_config(Phi3Config(**_TEXT_COMMON))


def _config_internvl_phi3():
    return _internvl_config(Phi3Config(**_TEXT_COMMON))


def _config_internvl_qwen2():
    return _internvl_config(Qwen2Config(**_TEXT_COMMON))


# the special tokens every Qwen-VL family config takes
_QWEN_VL_TOKENS = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=IMAGE_START_ID,
                       vision_end_token_id=IMAGE_END_ID)


def _config_qwen2_vl():
    vision = Qwen2VLVisionConfig(
        depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=7, spatial_merge_size=2
    )
    return Qwen2VLConfig(
        vision_config=vision,
        text_config=Qwen2VLTextConfig(**_qwen_text_kwargs()),
        **_QWEN_VL_TOKENS,
    )


def _config_qwen2_5_vl():
    # window_size=28 px -> 28 // 7 // 2 = 2x2 merged patches per attention window
    vision = Qwen2_5_VLVisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=7,
        spatial_merge_size=2,
        window_size=28,
        fullatt_block_indexes=[1],
    )
    return Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=Qwen2_5_VLTextConfig(**_qwen_text_kwargs()),
        **_QWEN_VL_TOKENS,
    )


def _config_idefics3():
    vision = Idefics3VisionConfig(**_VISION_COMMON, image_size=56, patch_size=7)
    return Idefics3Config(
        vision_config=vision,
        text_config=LlamaConfig(**_TEXT_COMMON),
        image_token_id=IMAGE_ID,
        scale_factor=2,
        pad_token_id=PAD_ID,
    )


def _config_gemma3():
    # head_dim=32 != 64 / 4; sliding window of 16 tokens, shorter than every sequence.
    text = Gemma3TextConfig(
        **_TEXT_COMMON,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    )
    vision = SiglipVisionConfig(**_VISION_COMMON, image_size=28, patch_size=7, vision_use_head=False)
    return Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=4,
        image_token_index=IMAGE_ID,
        boi_token_index=IMAGE_START_ID,
        eoi_token_index=IMAGE_END_ID,
    )


def _config_llava_onevision():
    # 28 px tiles of 2x2 patches; grid pinpoints up to 2x2 tiles (anyres).
    vision = SiglipVisionConfig(**_VISION_COMMON, image_size=28, patch_size=14, vision_use_head=False)
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=Qwen2Config(**_TEXT_COMMON),
        image_token_index=IMAGE_ID,
        video_token_index=VIDEO_ID,
        image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]],
    )


def _config_llava_next():
    # LLaVA-NeXT (1.6): CLIP tiles of 28 px (4x4 patches, CLS dropped), anyres grid up to 2x2 tiles,
    # a learned image_newline after every feature row; a Mistral text backbone (llava-v1.6-mistral).
    vision = CLIPVisionConfig(**_VISION_COMMON, image_size=28, patch_size=7, projection_dim=32)
    return LlavaNextConfig(
        vision_config=vision,
        text_config=MistralConfig(**_TEXT_COMMON),
        image_token_index=IMAGE_ID,
        image_grid_pinpoints=[[28, 28], [28, 56], [56, 28], [56, 56]],
    )


def _config_mistral3():
    # Mistral 3 (Mistral-Small-3.1): Pixtral tower (7 px patches, 2D rope), RMSNorm + 2x2 patch
    # merger + MLP projector, Mistral text backbone with an explicit head_dim.
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 head_dim=16, image_size=56, patch_size=7)
    return Mistral3Config(
        vision_config=vision,
        text_config=MistralConfig(**_TEXT_COMMON, head_dim=16),
        image_token_index=IMAGE_ID,
        spatial_merge_size=2,
        vision_feature_layer=-1,
    )


def _config_qwen3_vl():
    # DeepStack on, as in every Qwen3-VL checkpoint (3 of 36 layers in the 8B; 1 of 4 here): the
    # features of vision block 0 are added after language layer 0. head_dim 16 (explicit, q/k norm
    # over it), interleaved M-RoPE sections summing to 8.
    vision = Qwen3VLVisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                 patch_size=7, spatial_merge_size=2, temporal_patch_size=2,
                                 num_position_embeddings=16, deepstack_visual_indexes=[0])
    text = Qwen3VLTextConfig(**_TEXT_COMMON, head_dim=16, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    return Qwen3VLConfig(
        vision_config=vision,
        text_config=text,
        **_QWEN_VL_TOKENS,
    )


def _config_internvl_qwen3():
    # InternVL3.5: InternViT + a Qwen3 text backbone (q_norm / k_norm, explicit head_dim).
    return _internvl_config(Qwen3Config(**_TEXT_COMMON, head_dim=16))


def _config_qwen3_5():
    # Qwen3.5: hybrid layer_types as in the checkpoints (three Gated DeltaNet layers, then one gated
    # full-attention layer: full_attention_interval 4); full attention with head_dim 32 and a quarter
    # of it rotated (partial_rotary_factor 0.25 -> 8 dims, M-RoPE sections summing to 4); linear
    # attention with 2 k heads and 4 v heads of 8 dims, conv kernel 4.
    vision = Qwen3_5VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                 patch_size=7, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
    text = Qwen3_5TextConfig(
        **_TEXT_COMMON, head_dim=32, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_conv_kernel_dim=4,
        layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    return Qwen3_5Config(
        vision_config=vision,
        text_config=text,
        **_QWEN_VL_TOKENS,
    )


def _config_gemma4():
    # Gemma 4 (E2B/E4B layout, 6 layers here): per-layer inputs on (8 dims per layer), KV sharing on
    # (the last 2 layers reuse the keys/values of layer 3, the last sliding layer, and of layer 0, the
    # only full-attention layer before them), full-attention layers with their own head_dim (32) and
    # one kv head with k = v, sliding window 16. Double-wide MLPs (E2B) are off: see the README.
    text = Gemma4TextConfig(
        **{**_TEXT_COMMON, "num_hidden_layers": 6}, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        attention_k_eq_v=True, sliding_window=16,
        layer_types=["full_attention"] + ["sliding_attention"] * 4 + ["full_attention"],
        vocab_size_per_layer_input=VOCAB_SIZE, hidden_size_per_layer_input=8, num_kv_shared_layers=2,
    )
    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=16, patch_size=7, pooling_kernel_size=2,
                                position_embedding_size=64)
    return Gemma4Config(text_config=text, vision_config=vision, audio_config=None, image_token_id=IMAGE_ID,
                        video_token_id=VIDEO_ID, boi_token_id=IMAGE_START_ID, eoi_token_id=IMAGE_END_ID)


_REGISTRY = {
    "llava_llama_mha": (_config_llava_llama_mha, LlavaForConditionalGeneration),
    "llava_llama_gqa": (_config_llava_llama_gqa, LlavaForConditionalGeneration),
    "llava_phi": (_config_llava_phi, LlavaForConditionalGeneration),
    "llava_phi3": (_config_llava_phi3, LlavaForConditionalGeneration),
    "internvl_phi3": (_config_internvl_phi3, InternVLForConditionalGeneration),
    "qwen2_vl": (_config_qwen2_vl, Qwen2VLForConditionalGeneration),
    "qwen2_5_vl": (_config_qwen2_5_vl, Qwen2_5_VLForConditionalGeneration),
    "internvl_qwen2": (_config_internvl_qwen2, InternVLForConditionalGeneration),
    "idefics3": (_config_idefics3, Idefics3ForConditionalGeneration),
    "gemma3": (_config_gemma3, Gemma3ForConditionalGeneration),
    "llava_onevision": (_config_llava_onevision, LlavaOnevisionForConditionalGeneration),
    "llava_next": (_config_llava_next, LlavaNextForConditionalGeneration),
    "mistral3": (_config_mistral3, Mistral3ForConditionalGeneration),
    "qwen3_vl": (_config_qwen3_vl, Qwen3VLForConditionalGeneration),
    "internvl_qwen3": (_config_internvl_qwen3, InternVLForConditionalGeneration),
    "qwen3_5": (_config_qwen3_5, Qwen3_5ForConditionalGeneration),
    "gemma4": (_config_gemma4, Gemma4ForConditionalGeneration),
}


def build_tiny(family: str, seed: int = 0) -> torch.nn.Module:
    """Build the tiny model of ``family`` with weights determined by ``seed`` (float32, eval mode)."""
    if family not in _REGISTRY:
        raise KeyError(f"unknown family {family!r}; expected one of {FAMILIES}")
    config_fn, model_cls = _REGISTRY[family]
    torch.manual_seed(seed)
    model = model_cls._from_config(config_fn(), attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.float32)
    return model.eval()


# --------------------------------------------------------------------------- inputs


def _assemble(image_block: list[int], batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Build ``input_ids``/``attention_mask`` around one image block per row.

    Row layout: ``[pad]*k + [BOS] + text*PREFIX_LEN + image_block + text*(SUFFIX_LEN - k)``
    with ``k = LEFT_PAD`` on odd rows and ``0`` on even rows, so every row has the same length.
    """
    rows, masks = [], []
    for row in range(batch):
        pad = LEFT_PAD if row % 2 == 1 else 0
        text = torch.randint(*TEXT_ID_RANGE, (PREFIX_LEN + SUFFIX_LEN - pad,), generator=gen).tolist()
        ids = [PAD_ID] * pad + [BOS_ID] + text[:PREFIX_LEN] + image_block + text[PREFIX_LEN:]
        rows.append(ids)
        masks.append([0] * pad + [1] * (len(ids) - pad))
    return {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks)}


def _pixels(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Random normalised pixel values."""
    return torch.randn(*shape, generator=gen)


def _inputs_llava(config, batch, gen):
    vision = config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    if config.vision_feature_select_strategy == "full":
        n += 1  # CLS token is kept
    inputs = _assemble([config.image_token_id] * n, batch, gen)
    inputs["pixel_values"] = _pixels(gen, batch, 3, vision.image_size, vision.image_size)
    return inputs


def _inputs_internvl(config, batch, gen):
    vision = config.vision_config
    side = vision.image_size[0]
    n = int((side // vision.patch_size[0]) ** 2 * config.downsample_ratio**2)
    assert n == config.image_seq_length
    block = [IMAGE_START_ID] + [config.image_token_id] * n + [IMAGE_END_ID]
    inputs = _assemble(block, batch, gen)
    inputs["pixel_values"] = _pixels(gen, batch, 3, side, side)  # one 28x28 tile per image
    return inputs


def _inputs_qwen_vl(config, batch, gen):
    vision = config.vision_config
    grid_t, grid_h, grid_w = 1, 4, 8  # a 28x56 image with 7px patches
    n = grid_t * grid_h * grid_w // vision.spatial_merge_size**2
    block = [config.vision_start_token_id] + [config.image_token_id] * n + [config.vision_end_token_id]
    inputs = _assemble(block, batch, gen)
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    inputs["pixel_values"] = _pixels(gen, batch * grid_t * grid_h * grid_w, patch_dim)
    inputs["image_grid_thw"] = torch.tensor([[grid_t, grid_h, grid_w]] * batch)
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == config.image_token_id).int()
    return inputs


def _inputs_idefics3(config, batch, gen):
    vision = config.vision_config
    n = int((vision.image_size // vision.patch_size) ** 2 / config.scale_factor**2)
    # a single, unsplit image: <fake><global-img><image>*n<fake>
    block = [FAKE_IMAGE_ID, GLOBAL_IMAGE_ID] + [config.image_token_id] * n + [FAKE_IMAGE_ID]
    inputs = _assemble(block, batch, gen)
    side = vision.image_size
    inputs["pixel_values"] = _pixels(gen, batch, 1, 3, side, side)
    inputs["pixel_attention_mask"] = torch.ones(batch, 1, side, side, dtype=torch.bool)
    return inputs


def _inputs_gemma3(config, batch, gen):
    block = [config.boi_token_index] + [config.image_token_index] * config.mm_tokens_per_image
    block += [config.eoi_token_index]
    inputs = _assemble(block, batch, gen)
    side = config.vision_config.image_size
    inputs["pixel_values"] = _pixels(gen, batch, 3, side, side)
    inputs["token_type_ids"] = (inputs["input_ids"] == config.image_token_index).long()
    return inputs


def _onevision_num_image_tokens(config, height: int, width: int) -> int:
    """Number of ``<image>`` tokens, as ``LlavaOnevisionProcessor._get_number_of_features`` computes it."""
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    base = side * side + (1 if config.vision_feature_select_strategy == "default" else 0)
    best_h, best_w = select_best_resolution([height, width], config.image_grid_pinpoints)
    cur_h, cur_w = side * (best_h // tile), side * (best_w // tile)
    if width / height > cur_w / cur_h:
        cur_h -= 2 * ((cur_h - int(round(height * (cur_w / width), 7))) // 2)
    else:
        cur_w -= 2 * ((cur_w - int(round(width * (cur_h / height), 7))) // 2)
    unpadded, newlines = cur_h * cur_w, cur_h
    max_tiles = int(config.vision_aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(cur_h * cur_w / (max_tiles * side**2))
    if ratio > 1.1:
        unpadded = int(cur_h // ratio) * int(cur_w // ratio)
        newlines = int(cur_h // ratio)
    return unpadded + newlines + base


def _inputs_llava_onevision(config, batch, gen):
    # A 30x50 image: best pinpoint 56x56 (2x2 tiles + base tile), whose 4x4 feature grid is
    # unpadded to 2x4, giving 8 unpadded + 2 newline + 4 base = 14 tokens.
    height, width = 30, 50
    tile = config.vision_config.image_size
    best_h, best_w = select_best_resolution([height, width], config.image_grid_pinpoints)
    num_tiles = (best_h // tile) * (best_w // tile) + 1
    n = _onevision_num_image_tokens(config, height, width)
    inputs = _assemble([config.image_token_id] * n, batch, gen)
    inputs["pixel_values"] = _pixels(gen, batch, num_tiles, 3, tile, tile)
    inputs["image_sizes"] = torch.tensor([[height, width]] * batch)
    return inputs


def _llava_next_num_image_tokens(config, height: int, width: int) -> int:
    """Number of ``<image>`` tokens, as ``LlavaNextProcessor._get_number_of_features`` computes it."""
    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    best_h, best_w = select_best_resolution([height, width], config.image_grid_pinpoints)
    cur_h, cur_w = side * (best_h // tile), side * (best_w // tile)
    if width / height > cur_w / cur_h:
        cur_h -= 2 * ((cur_h - int(round(height * (cur_w / width), 7))) // 2)
    else:
        cur_w -= 2 * ((cur_w - int(round(width * (cur_h / height), 7))) // 2)
    base = side * side + (1 if config.vision_feature_select_strategy == "full" else 0)
    return cur_h * cur_w + cur_h + base


def _inputs_llava_next(config, batch, gen):
    # A 30x50 image: best pinpoint 56x56 (2x2 tiles + the base tile).
    height, width = 30, 50
    tile = config.vision_config.image_size
    best_h, best_w = select_best_resolution([height, width], config.image_grid_pinpoints)
    num_tiles = (best_h // tile) * (best_w // tile) + 1
    n = _llava_next_num_image_tokens(config, height, width)
    inputs = _assemble([config.image_token_id] * n, batch, gen)
    inputs["pixel_values"] = _pixels(gen, batch, num_tiles, 3, tile, tile)
    inputs["image_sizes"] = torch.tensor([[height, width]] * batch)
    return inputs


def _inputs_mistral3(config, batch, gen):
    # A 28x42 image (Pixtral keeps the aspect ratio): 4x6 patches, merged 2x2 -> 2x3 features, laid
    # out as the processor does: a row of [IMG] tokens, [IMG_BREAK] after each row, [IMG_END] last.
    height, width = 28, 42
    step = config.vision_config.patch_size * config.spatial_merge_size
    rows, cols = height // step, width // step
    block = []
    for r in range(rows):
        block += [config.image_token_id] * cols + [IMAGE_START_ID if r < rows - 1 else IMAGE_END_ID]
    inputs = _assemble(block, batch, gen)
    inputs["pixel_values"] = _pixels(gen, batch, 3, height, width)
    inputs["image_sizes"] = torch.tensor([[height, width]] * batch)
    return inputs


def _inputs_gemma4(config, batch, gen):
    # A 28x28 image: 4x4 patches of 7 px, flattened ([patches, 3 * 7 * 7]) with their (x, y)
    # positions, pooled 2x2 -> 4 soft tokens between <boi> and <eoi>.
    vision = config.vision_config
    side = 4
    n = side * side // vision.pooling_kernel_size**2
    block = [config.boi_token_id] + [config.image_token_id] * n + [config.eoi_token_id]
    inputs = _assemble(block, batch, gen)
    inputs["pixel_values"] = torch.rand(batch, side * side, 3 * vision.patch_size**2, generator=gen)
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), -1).reshape(-1, 2)
    inputs["image_position_ids"] = grid[None].expand(batch, -1, -1).clone()
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == config.image_token_id).long()
    return inputs


_INPUT_BUILDERS = {
    "llava_llama_mha": _inputs_llava,
    "llava_llama_gqa": _inputs_llava,
    "llava_phi": _inputs_llava,
    "llava_phi3": _inputs_llava,
    "internvl_phi3": _inputs_internvl,
    "qwen2_vl": _inputs_qwen_vl,
    "qwen2_5_vl": _inputs_qwen_vl,
    "internvl_qwen2": _inputs_internvl,
    "idefics3": _inputs_idefics3,
    "gemma3": _inputs_gemma3,
    "llava_onevision": _inputs_llava_onevision,
    "llava_next": _inputs_llava_next,
    "mistral3": _inputs_mistral3,
    "qwen3_vl": _inputs_qwen_vl,
    "internvl_qwen3": _inputs_internvl,
    "qwen3_5": _inputs_qwen_vl,
    "gemma4": _inputs_gemma4,
}


def make_inputs(family: str, model, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Processor-like inputs for ``model(**inputs)`` and ``model.generate(**inputs)``.

    One image per row; row 1 (and every odd row) is left-padded by ``LEFT_PAD`` tokens.
    """
    gen = torch.Generator().manual_seed(seed)
    return _INPUT_BUILDERS[family](model.config, batch, gen)


# --------------------------------------------------------------------------- self-check

_VISION_PATHS = ("model.vision_tower", "model.visual", "model.vision_model")
_PROJECTOR_PATHS = ("model.multi_modal_projector", "model.connector", "model.visual.merger", "model.embed_vision")
_LM_PATHS = ("model.language_model", "model.text_model")


def _first_existing(model, paths) -> str:
    """Return the first of ``paths`` that names a submodule of ``model``."""
    for path in paths:
        try:
            model.get_submodule(path)
            return path
        except AttributeError:
            continue
    raise LookupError(f"none of {paths} exists in {type(model).__name__}")


def _describe(model) -> None:
    """Print the module paths an architecture adapter needs."""
    lm_path = _first_existing(model, _LM_PATHS)
    layer0 = model.get_submodule(f"{lm_path}.layers.0")
    text = model.config.get_text_config()
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    print(f"  class            {type(model).__name__} / text {type(text).__name__}")
    for label, paths in (("vision tower", _VISION_PATHS), ("projector", _PROJECTOR_PATHS)):
        path = _first_existing(model, paths)
        print(f"  {label:<16} {path} ({type(model.get_submodule(path)).__name__})")
    print(f"  language model   {lm_path} ({type(model.get_submodule(lm_path)).__name__})")
    print(f"  decoder layers   {lm_path}.layers  x{len(model.get_submodule(lm_path + '.layers'))}")
    print(f"  lm_head          lm_head  tied={tied}")
    for child_name, child in layer0.named_children():
        print(f"  layer.{child_name:<14} {type(child).__name__}")
        for name, param in child.named_parameters():
            print(f"      {name:<22} {tuple(param.shape)}")
    raw = getattr(text, "_getattr_without_heterogeneous_validation", lambda k, d=None: getattr(text, k, d))
    print(
        f"  text: heads={text.num_attention_heads} kv={raw('num_key_value_heads')} "
        f"head_dim={raw('head_dim', None)} layer_types={getattr(text, 'layer_types', None)} "
        f"rope={text.rope_parameters}"
    )


def _self_check(family: str) -> None:
    """Forward, greedy generate and a save/reload round trip, then print the module summary."""
    print(f"=== {family}")
    model = build_tiny(family)
    inputs = make_inputs(family, model)
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    print(f"  input_ids {tuple(inputs['input_ids'].shape)} logits {tuple(logits.shape)} generate {tuple(out.shape)}")
    assert torch.isfinite(logits).all()
    assert out.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 5)

    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(handler)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            reloaded, info = AutoModelForImageTextToText.from_pretrained(tmp, output_loading_info=True)
    finally:
        hf_logger.removeHandler(handler)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"loading info: {problems}"
    messages = [record.getMessage() for record in records]
    key_warnings = [m for m in messages if any(w in m.lower() for w in ("load report", "missing", "unexpected"))]
    assert not key_warnings, key_warnings
    assert type(reloaded) is type(model)
    with torch.no_grad():
        diff = (reloaded.eval()(**inputs).logits - logits).abs().max().item()
    assert diff < 1e-6, f"reloaded logits differ by {diff}"
    print(f"  reload: max |diff| = {diff:.1e}, loading info clean, {len(messages)} warning(s)")
    for message in messages:
        print(f"    warning: {message[:200]}")
    _describe(model)


if __name__ == "__main__":
    import sys

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    for name in sys.argv[1:] or FAMILIES:
        _self_check(name)
    print("all families OK")
