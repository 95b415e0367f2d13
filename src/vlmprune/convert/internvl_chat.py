"""Mini-InternVL-Chat-V1-5 (``InternVLChatModel``: InternViT + ``mlp1`` + Phi-3)
-> native ``InternVLForConditionalGeneration``.

What the original code (OpenGVLab/InternVL, internvl_chat/internvl/model) computes, and how the
native classes express it exactly:

- InternViT: CLS token + absolute position embeddings, pre-norm layers with a fused ``attn.qkv``
  (rows [q | k | v], biased), ``attn.proj``, layer scale ``ls1``/``ls2`` and no final norm;
  features are the last layer's output without the CLS token. Native: ``internvl_vision`` with
  ``attention_bias=True``, ``use_mean_pooling=True`` (its final norm is then Identity),
  ``vision_feature_layer=-1``, ``vision_feature_select_strategy="default"`` (drops CLS).
- ``mlp1``: LayerNorm -> Linear -> GELU -> Linear over pixel-shuffled features; the native pixel
  shuffle is the original's ``ps_version`` "v2". "v1" skips the final transpose and cannot be
  expressed: it is refused.
- Phi-3: the fused ``qkv_proj``/``gate_up_proj`` layout is the native one; rope scaling "su" is
  the native "longrope" (short/long factors, ``original_max_position_embeddings``); the word
  embeddings are NOT tied (the native InternVL default ties them).
- ``img_context_token_id`` is not in config.json (the original sets it from the tokenizer at run
  time): it is read from the tokenizer, or given with ``--image-token-id``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from vlmprune.convert.common import (
    ConversionError,
    KeyMapper,
    has_tokenizer,
    load_native,
    load_state_dict,
    load_tokenizer,
    read_family_config,
    require,
    source_dtype,
)
from vlmprune.convert.detect import SIGNATURES

MODEL_TYPES, ARCHITECTURES = SIGNATURES["internvl-chat"]
IMG_CONTEXT, IMG_START, IMG_END = "<IMG_CONTEXT>", "<img>", "</img>"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# The "phi3-chat" conversation template of internvl_chat/internvl/conversation.py (MPT separator
# style): "<|system|>\n{system}<|end|>" then "<|user|>\n{message}<|end|>" and
# "<|assistant|>\n{message}<|end|>" turns; chat() puts "<image>\n" before the first question and
# the tokenizer adds BOS. The system message is the template's default (model.system_message).
SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
    "英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
CHAT_TEMPLATE = (
    "{% set system = namespace(text='" + SYSTEM_MESSAGE + "') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set system.text = message['content'] if message['content'] is string else message['content'][0]['text'] %}"
    "{% endif %}{% endfor %}"
    "{{ '<|system|>\n' + system.text + '<|end|>' }}"
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<|end|>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def _vision_layer(rest: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One InternViT tensor (name after ``encoder.layers.``) -> native name(s); the fused qkv is split."""
    match = re.fullmatch(r"(\d+)\.(.+)", rest)
    if not match:
        raise ConversionError(f"unexpected vision tensor vision_model.encoder.layers.{rest}")
    idx, name = match.groups()
    prefix = f"{idx}."
    if name in ("attn.qkv.weight", "attn.qkv.bias"):
        kind = name.rsplit(".", 1)[1]
        q, k, v = tensor.chunk(3, dim=0)  # rows [q heads | k heads | v heads]
        return {f"{prefix}attention.{p}_proj.{kind}": t.clone() for p, t in zip("qkv", (q, k, v))}
    renames = {"attn.proj.": "attention.projection_layer.", "ls1": "lambda_1", "ls2": "lambda_2",
               "norm1.": "layernorm_before.", "norm2.": "layernorm_after.", "mlp.fc1.": "mlp.fc1.",
               "mlp.fc2.": "mlp.fc2."}
    for old, new in renames.items():
        if name.startswith(old):
            return {prefix + new + name[len(old):]: tensor}
    raise ConversionError(f"vision_model.encoder.layers.{rest}: an InternViT tensor the converter does not know "
                          f"(qk normalisation or another InternViT variant)")


def build(src: str | Path, image_token_id: int | None = None):
    """Read a Mini-InternVL-Chat checkpoint directory; return (native model, processor or None, record)."""
    from transformers import GenerationConfig, InternVLConfig, InternVLForConditionalGeneration, Phi3Config
    from transformers.initialization import no_init_weights

    src = Path(src)
    config = read_family_config(src, MODEL_TYPES, ARCHITECTURES, "InternVLChatModel")
    # v1 leaves every tile's token grid transposed; the native pixel shuffle always transposes back
    if config.get("ps_version") != "v2":
        raise ConversionError(
            f"config.json: ps_version = {config.get('ps_version')!r} cannot be converted exactly: the v1 pixel shuffle "
            f"leaves every tile's token grid transposed, and the native InternVL class implements only 'v2'")
    require(config, "select_layer", -1)
    require(config, "downsample_ratio", 0.5)
    require(config, "pad2square", (False, None))
    require(config, "template", "phi3-chat")
    llm, vis = config.get("llm_config") or {}, config.get("vision_config") or {}
    if (llm.get("architectures") or [None])[0] != "Phi3ForCausalLM":
        raise ConversionError(f"config.json: llm_config.architectures = {llm.get('architectures')} cannot be "
                              f"converted; vlmprune convert --from internvl-chat supports Phi3ForCausalLM "
                              f"(Mini-InternVL-Chat-4B-V1-5)")
    require(vis, "qk_normalization", (False, None), "config.json vision_config")
    require(vis, "norm_type", ("layer_norm", "rms_norm"), "config.json vision_config")
    require(llm, "tie_word_embeddings", (False, None), "config.json llm_config")
    rope = llm.get("rope_scaling")
    rope_type = (rope or {}).get("type") or (rope or {}).get("rope_type")
    if rope is not None and rope_type not in ("su", "longrope"):
        raise ConversionError(f"config.json llm_config: rope_scaling.type = {rope_type!r} cannot be converted; "
                              f"supported: 'su' (= native 'longrope') or none")

    state = load_state_dict(src)
    if "language_model.lm_head.bias" in state:
        raise ConversionError("language_model.lm_head.bias: the checkpoint's lm_head has a bias; the native "
                              "InternVL lm_head has none")
    depth = 1 + max((int(m.group(1)) for k in state
                     if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))), default=-1)
    if depth != vis.get("num_hidden_layers"):
        raise ConversionError(f"vision depth: vision_config.num_hidden_layers = {vis.get('num_hidden_layers')} but "
                              f"the checkpoint has {depth} InternViT layers")

    # InternVLProcessor finds its image tokens as named special tokens of the tokenizer; the video
    # token is only named (the original has no video input; it is not added to the vocabulary)
    tokenizer = load_tokenizer(src, start_image_token=IMG_START, end_image_token=IMG_END,
                               context_image_token=IMG_CONTEXT, video_token="<video>") if has_tokenizer(src) else None
    if tokenizer is not None:
        vocab_tokens = tokenizer.get_vocab()
        missing = [t for t in (IMG_CONTEXT, IMG_START, IMG_END) if t not in vocab_tokens]
        if missing:
            raise ConversionError(f"the tokenizer lacks {', '.join(missing)}, which the original chat() inserts")
        found = vocab_tokens[IMG_CONTEXT]
        if image_token_id is not None and image_token_id != found:
            raise ConversionError(f"--image-token-id {image_token_id} differs from the tokenizer's {IMG_CONTEXT} id "
                                  f"{found}")
        image_token_id = found
    if image_token_id is None:
        raise ConversionError(f"{src} has no tokenizer to read the {IMG_CONTEXT} id from: pass --image-token-id ID "
                              f"(the id the original model's img_context_token_id was set to)")

    mapper = KeyMapper(state)
    vt = "model.vision_tower."
    mapper.move("vision_model.embeddings.class_embedding", vt + "embeddings.cls_token")
    mapper.move("vision_model.embeddings.patch_embedding.", vt + "embeddings.patch_embeddings.projection.")
    mapper.move("vision_model.embeddings.position_embedding", vt + "embeddings.position_embeddings")
    mapper.move("vision_model.encoder.layers.", vt + "encoder.layer.", _vision_layer)
    mapper.move("mlp1.0.", "model.multi_modal_projector.layer_norm.")
    mapper.move("mlp1.1.", "model.multi_modal_projector.linear_1.")
    mapper.move("mlp1.3.", "model.multi_modal_projector.linear_2.")
    mapper.move("language_model.model.", "model.language_model.")
    mapper.move("language_model.lm_head.", "lm_head.")
    weights = mapper.finish()

    image_size = config.get("force_image_size") or vis["image_size"]
    patch = vis["patch_size"]
    rope_parameters = {"rope_type": "default", "rope_theta": llm.get("rope_theta", 10000.0)}
    if rope is not None:
        rope_parameters = {**rope_parameters, "rope_type": "longrope", "short_factor": list(rope["short_factor"]),
                           "long_factor": list(rope["long_factor"]),
                           "original_max_position_embeddings": llm["original_max_position_embeddings"],
                           # the ratio the original derives (Phi3SuScaledRotaryEmbedding), written out
                           # as 5.x asks; it sets the attention factor sqrt(1 + ln(f) / ln(original))
                           "factor": llm["max_position_embeddings"] / llm["original_max_position_embeddings"]}
    text = Phi3Config(
        vocab_size=llm["vocab_size"],
        hidden_size=llm["hidden_size"],
        intermediate_size=llm["intermediate_size"],
        num_hidden_layers=llm["num_hidden_layers"],
        num_attention_heads=llm["num_attention_heads"],
        num_key_value_heads=llm.get("num_key_value_heads") or llm["num_attention_heads"],
        hidden_act=llm["hidden_act"],
        max_position_embeddings=llm["max_position_embeddings"],
        original_max_position_embeddings=llm.get("original_max_position_embeddings", llm["max_position_embeddings"]),
        rms_norm_eps=llm["rms_norm_eps"],
        rope_parameters=rope_parameters,
        sliding_window=llm.get("sliding_window"),
        tie_word_embeddings=False,
        bos_token_id=llm.get("bos_token_id"),
        eos_token_id=llm.get("eos_token_id"),
        pad_token_id=llm.get("pad_token_id"),
    )
    vision = dict(
        hidden_size=vis["hidden_size"], intermediate_size=vis["intermediate_size"],
        num_hidden_layers=depth, num_attention_heads=vis["num_attention_heads"], hidden_act=vis["hidden_act"],
        layer_norm_eps=vis["layer_norm_eps"], norm_type=vis.get("norm_type", "layer_norm"),
        image_size=image_size, patch_size=patch, num_channels=vis.get("num_channels", 3),
        attention_bias=bool(vis.get("qkv_bias", True)), use_qk_norm=False, use_mean_pooling=True,
        use_absolute_position_embeddings=True, use_mask_token=False,
    )
    native = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=int((image_size // patch) ** 2 * config["downsample_ratio"] ** 2),
        downsample_ratio=config["downsample_ratio"],
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    with no_init_weights():
        model = InternVLForConditionalGeneration._from_config(native, dtype=source_dtype(config))
    load_native(model, weights)
    # chat() stops at the template's separator <|end|> as well as at EOS
    eos = [text.eos_token_id] if text.eos_token_id is not None else []
    if tokenizer is not None and "<|end|>" in tokenizer.get_vocab():
        eos.append(tokenizer.convert_tokens_to_ids("<|end|>"))
    model.generation_config = GenerationConfig(bos_token_id=text.bos_token_id, eos_token_id=eos or None,
                                               pad_token_id=text.pad_token_id)
    processor = _processor(config, image_size, native.image_seq_length, tokenizer) if tokenizer is not None else None
    record = {"family": "internvl-chat", "image_token_id": image_token_id, "vision_layers": depth,
              "rope": rope_parameters["rope_type"]}
    return model.eval(), processor, record


def _processor(config: dict, image_size: int, image_seq_length: int, tokenizer) -> InternVLProcessorFiles:
    """The original load_image(): dynamic 448-px tiles (+ thumbnail), bicubic, ImageNet mean/std."""
    from transformers import GotOcr2ImageProcessorPil

    dynamic = config.get("dynamic_image_size", True)
    if not config.get("use_thumbnail", True) and dynamic:
        raise ConversionError("config.json: use_thumbnail = false; the native image processor always adds the "
                              "thumbnail when an image is tiled")
    image_processor = GotOcr2ImageProcessorPil(
        do_resize=True, size={"height": image_size, "width": image_size}, resample=3, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
        do_convert_rgb=True, crop_to_patches=bool(dynamic), min_patches=config.get("min_dynamic_patch", 1),
        max_patches=config.get("max_dynamic_patch", 12) if dynamic else 1)
    tokenizer.chat_template = CHAT_TEMPLATE
    return InternVLProcessorFiles(image_processor, tokenizer, image_seq_length)


class InternVLProcessorFiles:
    """Writes what ``InternVLProcessor.from_pretrained`` reads, without building an ``InternVLProcessor``.

    ``InternVLProcessor`` cannot be constructed without torchvision (its video processor needs it),
    and vlmprune does not depend on torchvision; the files are the processor's own parts saved by
    their own classes, plus the processor's config.
    """

    def __init__(self, image_processor, tokenizer, image_seq_length: int):
        self.image_processor, self.tokenizer, self.image_seq_length = image_processor, tokenizer, image_seq_length

    def save_pretrained(self, dest) -> None:
        import json

        dest = Path(dest)
        self.image_processor.save_pretrained(dest)
        self.tokenizer.save_pretrained(dest)
        (dest / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        (dest / "processor_config.json").write_text(json.dumps(
            {"processor_class": "InternVLProcessor", "image_seq_length": self.image_seq_length}, indent=2) + "\n")
        # the original has no video path; this only lets InternVLProcessor build its video part
        ip = self.image_processor
        (dest / "video_preprocessor_config.json").write_text(json.dumps(
            {"video_processor_type": "InternVLVideoProcessor", "processor_class": "InternVLProcessor",
             "size": dict(ip.size), "resample": 3, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
             "do_normalize": True, "image_mean": list(ip.image_mean), "image_std": list(ip.image_std),
             "do_convert_rgb": True}, indent=2) + "\n")
