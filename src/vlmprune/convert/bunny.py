"""Bunny-v1.0 (``BunnyPhiForCausalLM``: SigLIP + ``mlp2x_gelu`` + Phi-2) -> native ``LlavaForConditionalGeneration``.

What the original code (BAAI-DCAI/Bunny, bunny/model) computes, and how the native classes
express it exactly:

- Vision: ``SigLipVisionTower.load_model`` deletes the tower's LAST encoder layer and replaces the
  pooling head by Identity; features are ``hidden_states[-1]`` (the remaining last layer's output,
  before ``post_layernorm``), all patches, no CLS. Native: a SigLIP vision model with one layer
  fewer than the tower config, ``vision_use_head=False``, ``vision_feature_layer=-1`` (LLaVA reads
  ``hidden_states[-1]``, also before the final norm) and ``vision_feature_select_strategy="full"``.
- Projector ``mlp2x_gelu``: Linear -> exact GELU -> Linear with biases = LLaVA's projector with
  ``projector_hidden_act="gelu"``.
- Language model: Phi-2 = native ``phi`` with ``partial_rotary_factor`` written explicitly (the
  5.x default is 0.5, Phi-2 uses 0.4).
- Images: the original splices the projected features in place of the id -200, which no tokenizer
  produces. Native LLaVA needs a real ``<image>`` token repeated once per feature; it is added to
  the tokenizer (next free id) and gets an embedding/lm_head row only if the vocabulary has none
  free. That row's embedding is never read (image features replace it) and the token is suppressed
  in ``generation_config`` so it is never generated.
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

MODEL_TYPES, ARCHITECTURES = SIGNATURES["bunny"]
IMAGE_TOKEN = "<image>"

_VISION = "model.vision_tower.vision_tower.vision_model."
# The "bunny" conversation template (bunny/conversation.py: conv_bunny, SeparatorStyle.TWO):
# system + " ", then "USER: {message} " and "ASSISTANT: {message}<|endoftext|>" per turn, and
# "ASSISTANT:" to prompt an answer; get_prompt moves the image to the front of the first user
# message as "<image>\n". A system message, when given, replaces the default system prompt.
SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
CHAT_TEMPLATE = (
    "{% set system = namespace(text='" + SYSTEM_PROMPT.replace("'", "\\'") + "') %}"
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{% set system.text = message['content'] if message['content'] is string else message['content'][0]['text'] %}"
    "{% endif %}{% endfor %}"
    "{{ system.text + ' ' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<|endoftext|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _vision_config(src: Path, config: dict, vision_tower: str | Path | None):
    """The SigLIP tower config ``mm_vision_tower`` names (it is not part of Bunny's config.json)."""
    from transformers import SiglipVisionConfig

    name = str(vision_tower or config.get("mm_vision_tower") or "")
    if "siglip" not in name.lower() and vision_tower is None:
        raise ConversionError(f"config.json: mm_vision_tower = {name!r} is not a SigLIP tower; vlmprune convert "
                              f"--from bunny supports the SigLIP towers of Bunny-v1.0 (e.g. "
                              f"google/siglip-so400m-patch14-384)")
    for candidate in (Path(name), Path(src) / name):
        if (candidate / "config.json").is_file():
            return SiglipVisionConfig.from_pretrained(str(candidate)), candidate.resolve()
    try:  # a hub id: the config comes from the local hub cache, or the hub when online
        return SiglipVisionConfig.from_pretrained(name), name
    except Exception as exc:  # noqa: BLE001 - re-raised with what to do
        raise ConversionError(
            f"cannot read the vision tower config mm_vision_tower = {name!r} ({type(exc).__name__}). Download it "
            f"(`hf download {name} config.json --local-dir tower/`) and pass --vision-tower tower/") from exc


def _check_vision(vision, tower_name: str, state: dict[str, torch.Tensor], config: dict) -> int:
    """Tower config against the checkpoint's tensors; returns the number of encoder layers kept."""
    layers = {int(m.group(1)) for k in state if (m := re.match(re.escape(_VISION) + r"encoder\.layers\.(\d+)\.", k))}
    if not layers:
        raise ConversionError(f"the checkpoint has no vision tower weights ({_VISION}encoder.layers.*); Bunny "
                              f"checkpoints saved by the original code contain them")
    depth = max(layers) + 1
    if depth != vision.num_hidden_layers - 1:
        raise ConversionError(
            f"vision depth: the checkpoint has {depth} SigLIP encoder layers but {tower_name} has num_hidden_layers = "
            f"{vision.num_hidden_layers}; the original code removes exactly the tower's last layer, so {depth + 1} "
            f"was expected (a different Bunny version or a modified tower: not converted)")
    patch = state[_VISION + "embeddings.patch_embedding.weight"]
    checks = {
        "hidden_size": (vision.hidden_size, patch.shape[0]),
        "patch_size": (vision.patch_size, patch.shape[-1]),
        "intermediate_size": (vision.intermediate_size, state[_VISION + "encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "(image_size // patch_size) ** 2": ((vision.image_size // vision.patch_size) ** 2,
                                            state[_VISION + "embeddings.position_embedding.weight"].shape[0]),
        "mm_hidden_size (Bunny config)": (config.get("mm_hidden_size"), patch.shape[0]),
    }
    for field, (declared, found) in checks.items():
        if declared != found:
            raise ConversionError(f"vision tower {tower_name}: {field} = {declared} but the checkpoint's weights "
                                  f"have {found}")
    if vision.hidden_size % vision.num_attention_heads:
        raise ConversionError(f"vision tower {tower_name}: hidden_size {vision.hidden_size} is not divisible by "
                              f"num_attention_heads {vision.num_attention_heads}")
    return depth


def _use_tower_weights(tower, state: dict[str, torch.Tensor]) -> str:
    """Take the vision weights from the tower's own checkpoint when it is a local directory that has one.

    That is what the original runs: from_pretrained skips the checkpoint's vision keys (the tower is
    built lazily) and ``load_model`` reloads the tower from ``mm_vision_tower``, then drops its last
    layer and its head. Without local tower weights the checkpoint's copy is used; the record says
    which, and whether the two copies agree.
    """
    from vlmprune.convert.common import load_state_dict, safetensors_files

    if not isinstance(tower, Path) or not safetensors_files(tower):
        return "checkpoint copy (no local tower weights to compare with)"
    prefix = "vision_model."
    tower_state = load_state_dict(tower, prefix)
    differ = []
    for key in [k for k in state if k.startswith(_VISION)]:
        rest = key[len(_VISION):]
        if prefix + rest not in tower_state:
            raise ConversionError(f"the vision tower at {tower} has no {prefix + rest}, which the checkpoint has")
        # the original casts the fp32 tower to the model's dtype: compare and take it in that dtype
        theirs = tower_state[prefix + rest].to(state[key].dtype)
        if theirs.shape != state[key].shape:
            raise ConversionError(f"{prefix + rest}: shape {tuple(theirs.shape)} in {tower} but "
                                  f"{tuple(state[key].shape)} in the checkpoint")
        if not torch.equal(theirs, state[key]):
            differ.append(rest)
        state[key] = theirs
    if differ:
        return (f"tower's own weights (as the original loads them); the checkpoint's copy differs in "
                f"{len(differ)} tensor(s), e.g. {', '.join(differ[:3])}")
    return "tower's own weights (equal to the checkpoint's copy)"


def _split_fused_qkv(rest: str, tensor: torch.Tensor, heads: int) -> dict[str, torch.Tensor]:
    """6986cac-era Phi: one ``query_key_value`` whose rows are per head [q | k | v] (Bloom layout)."""
    match = re.fullmatch(r"(\d+\.self_attn\.)query_key_value\.(weight|bias)", rest)
    if not match:
        return {rest: tensor}
    prefix, kind = match.groups()
    split = tensor.reshape(heads, 3, -1, *tensor.shape[1:])
    return {f"{prefix}{name}.{kind}": split[:, i].reshape(-1, *tensor.shape[1:]).clone()
            for i, name in enumerate(("q_proj", "k_proj", "v_proj"))}


def build(src: str | Path, vision_tower: str | Path | None = None):
    """Read a Bunny-Phi checkpoint directory; return (native model, processor or None, record)."""
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, PhiConfig
    from transformers.initialization import no_init_weights

    src = Path(src)
    config = read_family_config(src, MODEL_TYPES, ARCHITECTURES,
                                "Bunny-Phi (BunnyPhiForCausalLM); other Bunny language models are not converted")
    require(config, "mm_projector_type", "mlp2x_gelu")
    # Only "pad" works in the original: its other branch calls the processor object, which the
    # SigLIP processor of Bunny does not support.
    require(config, "image_aspect_ratio", "pad")
    require(config, "rope_scaling", None)
    require(config, "tie_word_embeddings", (False, None))
    require(config, "use_mm_proj", (True, None))
    state = load_state_dict(src)
    if "lm_head.bias" in state:
        raise ConversionError("lm_head.bias: the checkpoint's lm_head has a bias; the native LLaVA lm_head has none")

    vision, tower = _vision_config(src, config, vision_tower)
    tower_name = str(tower)
    depth = _check_vision(vision, tower_name, state, config)
    vision_weights = _use_tower_weights(tower, state)
    vocab = config["vocab_size"]
    heads = config["num_attention_heads"]

    tokenizer = load_tokenizer(src) if has_tokenizer(src) else None
    if tokenizer is not None:
        if len(tokenizer) > vocab:
            raise ConversionError(f"the tokenizer has {len(tokenizer)} tokens but vocab_size is {vocab}")
        if IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]},
                                         replace_extra_special_tokens=False)
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if tokenizer.pad_token is None:  # batches need one; Bunny's train.py pads with unk (Phi-2: EOS)
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    else:
        image_token_id = vocab  # no tokenizer to take an id from: one new row after the vocabulary
    new_vocab = max(vocab, image_token_id + 1)

    mapper = KeyMapper(state)
    mapper.move(_VISION, "model.vision_tower.")
    mapper.move("model.mm_projector.0.", "model.multi_modal_projector.linear_1.")
    mapper.move("model.mm_projector.2.", "model.multi_modal_projector.linear_2.")
    mapper.move("model.layers.", "model.language_model.layers.", lambda r, t: _split_fused_qkv(r, t, heads))
    mapper.move("model.final_layernorm.", "model.language_model.final_layernorm.")
    weights = mapper.out
    for src_key, dst_key in (("model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
                             ("lm_head.weight", "lm_head.weight")):
        table = mapper.pop(src_key)
        if table.shape[0] != vocab:
            raise ConversionError(f"{src_key} has {table.shape[0]} rows but vocab_size is {vocab}")
        # the image token's extra row: its embedding is replaced by image features and its logit
        # is suppressed at generation, so zeros are as good as anything and change no other logit
        weights[dst_key] = torch.cat([table, table.new_zeros(new_vocab - vocab, table.shape[1])])
    mapper.finish()

    dtype = source_dtype(config)
    text = PhiConfig(
        vocab_size=new_vocab,
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=config.get("num_key_value_heads") or heads,
        hidden_act=config["hidden_act"],
        max_position_embeddings=config["max_position_embeddings"],
        layer_norm_eps=config["layer_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": config.get("rope_theta", 10000.0),
                         "partial_rotary_factor": config["partial_rotary_factor"]},
        qk_layernorm=config.get("qk_layernorm", False),
        tie_word_embeddings=False,
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=config.get("eos_token_id"),
        pad_token_id=tokenizer.pad_token_id if tokenizer is not None else config.get("pad_token_id"),
    )
    vision_dict = vision.to_dict()
    vision_dict.update(num_hidden_layers=depth, vision_use_head=False)
    vision_dict.pop("image_mean", None)  # a Bunny-era processor field, not a model field
    native = LlavaConfig(
        vision_config=vision_dict,
        text_config=text,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
        tie_word_embeddings=False,
    )
    with no_init_weights():
        model = LlavaForConditionalGeneration._from_config(native, dtype=dtype)
    load_native(model, weights)
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
        suppress_tokens=[image_token_id])

    processor = _processor(vision, tokenizer) if tokenizer is not None else None
    record = {"family": "bunny", "vision_tower": tower_name, "vision_layers_kept": depth,
              "vision_weights": vision_weights,
              "image_token_id": image_token_id, "rows_added": new_vocab - vocab,
              "fused_qkv_split": any("query_key_value" in k for k in state)}
    return model.eval(), processor, record


def _processor(vision, tokenizer):
    """Bunny's preprocessing: pad to square with the mean colour, bicubic resize, mean/std 0.5."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    # Bunny's SigLipImageProcessor (siglip_encoder.py): mean/std (0.5, 0.5, 0.5), 1/255, BICUBIC,
    # a square resize (no crop); process_images pads with int(mean * 255) first (do_pad).
    image_processor = LlavaImageProcessorPil(
        do_pad=True, do_resize=True, size={"height": vision.image_size, "width": vision.image_size},
        resample=3, do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision.patch_size,
                          vision_feature_select_strategy="full", num_additional_image_tokens=0,
                          image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)
