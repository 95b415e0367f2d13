"""The vision tower and projector of a VLM as an ``mmproj`` GGUF for llama.cpp (libmtmd).

One llama.cpp projector graph per family (``clip.projector_type``), each checked in the tests
against transformers token by token:

* ``mlp`` (LLaVA: CLIP, SigLIP, DINOv2 towers; ``tools/mtmd/models/llava.cpp``): patch embedding,
  optional class token, learned positions, optional pre-LayerNorm, ViT blocks, Linear-GELU-Linear;
* ``gemma3`` and ``idefics3`` (``models/siglip.cpp``): SigLIP blocks and post-LayerNorm, then an
  average pool + soft-embedding RMSNorm + matrix (Gemma 3) or a pixel shuffle + matrix (Idefics3 /
  SmolVLM);
* ``internvl`` (``models/internvl.cpp``): InternViT with its class token appended after the patches
  (positions written in that order, as for LLaVA below), the class token dropped, pixel shuffle,
  LayerNorm + Linear-GELU-Linear;
* ``qwen2.5vl_merger`` (Qwen2.5-VL; ``models/qwen2vl.cpp``): the Conv3d patch embedding as two
  2-D kernels (an image is its own second frame), 2-D rotary ViT blocks with RMS norms, SwiGLU MLPs
  and window attention (full attention every ``n_wa_pattern``-th block), the RMSNorm + 2x2 patch
  merger; images at their own (dynamic) size;
* ``pixtral`` (Mistral 3; ``models/pixtral.cpp``): the Pixtral tower (RMS norms, SwiGLU, axial 2-D RoPE
  with q / k rows permuted to the graph's interleaved pairs), RMSNorm + patch merger, Linear-GELU-Linear,
  and the text embedding of ``[IMG_BREAK]``, which the graph appends after each row of image tokens but
  the last; images at their own (dynamic) size.

Everything else is refused with the reason before anything is written.

How an LLaVA file fits the ``mlp`` graph (facts of the llama.cpp build in xllamacpp 2026.10, measured by the tests):

* The layer read: LLaVA reads ``hidden_states[vision_feature_layer]`` (before any final norm).
  Without an explicit ``clip.vision.feature_layer`` the graph runs one block fewer than written
  (ggml-org/llama.cpp#25817); the file records the block count to run as that key and holds exactly
  those blocks, and no post-LayerNorm.
* The class token (``v.class_embd``) is concatenated AFTER the patches and positions are taken in
  that order (ggml-org/llama.cpp#25814): the position table is written in the graph's order (patch
  rows, then the class row), so every token gets its own position (measured: every embedding
  llama.cpp outputs matches PyTorch's to cosine 1.0000; with the table in Hugging Face's order,
  0.82-0.99). The graph then outputs tokens 2..n+1 of that sequence: patches 2..n and the class
  token. The first patch is never output; that is the graph's, no file can change it, and the
  export says so in export.json.
* DINOv2: LayerScale is folded into ``attn_out`` and ``ffn_down`` (weights and biases), the position
  table is interpolated in advance to the processor's image size (its own bicubic interpolation),
  the patch projection's bias is kept.
* GELU: CLIP's quick-GELU is the graph's default; exact / tanh GELU towers set ``clip.use_gelu``
  (llama.cpp computes the tanh approximation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmprune.errors import VlmpruneError

TOWERS = ("clip_vision_model", "siglip_vision_model", "dinov2")


@dataclass
class VisionPlan:
    tower: str
    image_size: int
    patch_size: int
    blocks: int  # blocks the graph must run (= the hidden state LLaVA reads)
    has_cls: bool
    keeps_cls: bool  # vision_feature_select_strategy == "full"
    mean: list[float]
    std: list[float]
    ffn: int
    notes: list[str]
    projector: str = "mlp"  # llama.cpp's projector type (clip.projector_type)
    merge: int = 1  # gemma3: the average-pool kernel (patches per side / tokens per side); idefics3: pixel shuffle
    longest_edge: int = 0  # idefics3: the processor resizes the longest image edge to this before tiling
    tiles: tuple[int, int] = (1, 12)  # internvl: the fewest and most tiles an image is cut into
    wa_pattern: int = 0  # qwen2.5vl: every wa_pattern-th block attends to the whole image, the others to windows
    pixels: tuple[int, int] = (0, 0)  # qwen2.5vl: the fewest and most pixels an image is resized to
    break_id: int = -1  # pixtral: the text token id of [IMG_BREAK]


# model_type -> llama.cpp projector graph written for it
PROJECTORS = {"llava": "mlp", "gemma3": "gemma3", "idefics3": "idefics3", "smolvlm": "idefics3", "internvl": "internvl",
              "qwen2_5_vl": "qwen2.5vl_merger", "mistral3": "pixtral"}
# text tokens llama.cpp's pixtral path needs as one token each: [IMG_BREAK] (its text embedding goes into the
# mmproj, after every row of image tokens but the last) and [IMG_END] (written by tools/mtmd after the image)
PIXTRAL_TOKENS = ("[IMG_BREAK]", "[IMG_END]")
# facts of llama.cpp's pixtral loader (tools/mtmd/clip.cpp), not read from the file
PIXTRAL_ROPE_THETA = 10000.0
PIXTRAL_EPS = 1e-5  # Pixtral's RMSNorms (fixed in its code); llama.cpp's graph also uses it for the merger's norm
PIXTRAL_TOKENS_RANGE = (8, 1024)  # the fewest and most merged tokens it resizes an image to
# projector graph -> (how the docs name it, the vision towers written for it)
GRAPH_TOWERS = {"mlp": ("LLaVA (mlp)", TOWERS), "idefics3": ("idefics3", ("idefics3_vision", "smolvlm_vision")),
                "internvl": ("internvl", ("internvl_vision",)),
                "qwen2.5vl_merger": ("qwen2.5vl", ("qwen2_5_vl_vision",)),
                "pixtral": ("pixtral", ("pixtral",)), "gemma3": ("gemma3 (SigLIP)", ("siglip_vision_model",))}
# text llama.cpp puts around an idefics3 image by looking each up as ONE token of the text model's vocabulary
# (tools/mtmd/mtmd.cpp); a missing one would become an invalid token id
IDEFICS3_TOKENS = ("\n\n", "\n", "<fake_token_around_image>", "<global-img>")
_NOT_YET = {
    "qwen2_vl": "its text model needs llama.cpp's qwen2vl architecture (M-RoPE sections), which the text export "
                "does not write yet, so an mmproj alone would not run",
}


def check_family(model) -> None:
    """Refuse a model whose vision part this export cannot write (before its processor is even loaded)."""
    config = model.config
    projector = PROJECTORS.get(config.model_type)
    if projector is None:
        why = _NOT_YET.get(config.model_type, "llama.cpp may have a graph for it, but this export does not write it")
        raise VlmpruneError(
            f"mmproj export of a {config.model_type} model is not supported ({why}); supported: "
            f"{', '.join(PROJECTORS)}. Export the text model alone with --no-vision")
    tower = config.vision_config.model_type
    graph, towers = GRAPH_TOWERS[projector]
    if tower not in towers:
        raise VlmpruneError(f"a {config.model_type} model with a {tower} vision tower: llama.cpp's {graph} graph "
                            f"takes {', '.join(towers)} towers only; use --no-vision to export the text model alone")


def _image_processor(processor):
    """The processor's image processor (its size and normalisation go into the mmproj), or a clear refusal."""
    ip = getattr(processor, "image_processor", None)
    if ip is None:
        raise VlmpruneError("the model's processor has no image processor; the mmproj needs its size and normalisation")
    return ip


def _image_processor_and_tokenizer(processor):
    """The processor's image processor and tokenizer (the graphs that look image tokens up in the text
    vocabulary need both), or a clear refusal."""
    ip, tokenizer = _image_processor(processor), getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise VlmpruneError("the model's processor has no tokenizer; the mmproj needs it to look up the image tokens")
    return ip, tokenizer


def plan_vision(model, adapter, processor) -> VisionPlan:
    """What the mmproj will hold, or a refusal naming the reason (nothing written yet)."""
    check_family(model)
    config = model.config
    if PROJECTORS[config.model_type] == "gemma3":
        return _plan_gemma3(model, processor)
    if PROJECTORS[config.model_type] == "idefics3":
        return _plan_idefics3(model, processor)
    if PROJECTORS[config.model_type] == "internvl":
        return _plan_internvl(model, processor)
    if PROJECTORS[config.model_type] == "qwen2.5vl_merger":
        return _plan_qwen25vl(model, processor)
    if PROJECTORS[config.model_type] == "pixtral":
        return _plan_mistral3(model, processor)
    vc = config.vision_config
    tower = vc.model_type
    act = getattr(config, "projector_hidden_act", "gelu")
    if act not in ("gelu", "gelu_pytorch_tanh"):
        raise VlmpruneError(f"projector activation {act}: llama.cpp's LLaVA projector applies GELU only")
    if not getattr(config, "multimodal_projector_bias", True):
        raise VlmpruneError("a projector without biases: llama.cpp's LLaVA projector needs them (not supported)")
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise VlmpruneError(f"vision_feature_layer={layer}: several feature layers are not supported by the mmproj "
                            f"export (llama.cpp's LLaVA graph reads one)")
    n = vc.num_hidden_layers
    blocks = n + 1 + layer if layer < 0 else layer
    if not 1 <= blocks <= n:
        raise VlmpruneError(f"vision_feature_layer={layer} of a {n}-block tower reads no block output; not supported")
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    ip = _image_processor(processor)
    size = _image_size(ip)
    if tower != "dinov2" and size != vc.image_size:
        raise VlmpruneError(f"the image processor makes {size}-px images but the tower was built for "
                            f"{vc.image_size} px; llama.cpp would not interpolate the positions the same way")
    if size % vc.patch_size:
        raise VlmpruneError(f"image size {size} is not a multiple of the patch size {vc.patch_size}")
    if tower == "dinov2" and getattr(vc, "use_swiglu_ffn", False):
        raise VlmpruneError("a DINOv2 tower with a SwiGLU MLP: llama.cpp's LLaVA graph has a plain GELU MLP")
    if tower == "siglip_vision_model" and strategy != "full":
        raise VlmpruneError("a SigLIP tower with vision_feature_select_strategy='default' (drops a first token SigLIP "
                            "does not have): not supported")
    has_cls = tower != "siglip_vision_model"
    notes = []
    if has_cls:
        notes.append("llama.cpp's LLaVA graph puts the class token after the patches and outputs tokens 2..n+1 of "
                     "that sequence (ggml-org/llama.cpp#25814): every image embedding it gives is exact, but they are "
                     "patches 2..n and the class token, where the model was trained on "
                     + ("the class token and patches 1..n (one token fewer in llama.cpp)" if strategy == "full" else
                        "patches 1..n (the first patch is lost, the class token comes last)"))
    ffn = _first_block(model, tower).mlp.fc1.out_features
    return VisionPlan(tower, size, vc.patch_size, blocks, has_cls, strategy == "full",
                      [float(x) for x in ip.image_mean], [float(x) for x in ip.image_std], ffn, notes)


def _plan_gemma3(model, processor) -> VisionPlan:
    """Gemma 3: SigLIP (every block, then its post-LayerNorm), average pool to mm_tokens_per_image,
    RMSNorm (1 + w), one projection matrix: llama.cpp's gemma3 graph, the same computation."""
    config = model.config
    vc = config.vision_config
    ip = _image_processor(processor)
    size = _image_size(ip)
    if size != vc.image_size or size % vc.patch_size:
        raise VlmpruneError(f"the image processor makes {size}-px images for a {vc.image_size}-px tower with "
                            f"{vc.patch_size}-px patches; not supported")
    side = size // vc.patch_size
    tokens_side = round(config.mm_tokens_per_image ** 0.5)
    if tokens_side ** 2 != config.mm_tokens_per_image or side % tokens_side:
        raise VlmpruneError(f"mm_tokens_per_image={config.mm_tokens_per_image} does not pool a {side}x{side} patch "
                            f"grid evenly; llama.cpp's gemma3 graph cannot hold it")
    if vc.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
        raise VlmpruneError(f"a Gemma 3 tower with hidden_act={vc.hidden_act}: llama.cpp's SigLIP graph uses GELU")
    notes = []
    if getattr(ip, "do_pan_and_scan", False):
        notes.append("the image processor pans and scans (extra crops); llama.cpp gives each image one "
                     f"{size}-px view")
    return VisionPlan(vc.model_type, size, vc.patch_size, vc.num_hidden_layers, False, False,
                      [float(x) for x in ip.image_mean], [float(x) for x in ip.image_std],
                      _first_block(model, vc.model_type).mlp.fc1.out_features, notes, "gemma3", side // tokens_side)


def _plan_idefics3(model, processor) -> VisionPlan:
    """Idefics3 / SmolVLM: a SigLIP-style tower (post-LayerNorm), pixel shuffle by scale_factor, one
    matrix: llama.cpp's idefics3 graph. Images are split into tower-sized tiles plus a global view by
    both (the longest edge resized to the processor's size first)."""
    config = model.config
    vc = config.vision_config
    ip, tokenizer = _image_processor_and_tokenizer(processor)
    tile = int((getattr(ip, "max_image_size", None) or {}).get("longest_edge", vc.image_size))
    if tile != vc.image_size or tile % vc.patch_size:
        raise VlmpruneError(f"the image processor cuts {tile}-px tiles for a {vc.image_size}-px tower with "
                            f"{vc.patch_size}-px patches; not supported")
    side = tile // vc.patch_size
    scale = int(config.scale_factor)
    if side % scale:
        raise VlmpruneError(f"scale_factor={scale} does not divide the {side}x{side} patch grid; not supported")
    if vc.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
        raise VlmpruneError(f"an Idefics3 tower with hidden_act={vc.hidden_act}: llama.cpp's SigLIP graph uses GELU")
    missing = [t for t in IDEFICS3_TOKENS if len(tokenizer.encode(t, add_special_tokens=False)) != 1]
    if missing:
        raise VlmpruneError(f"llama.cpp writes {[*IDEFICS3_TOKENS]} around each idefics3 image, each as one token of "
                            f"the text model's vocabulary, but this tokenizer splits {missing}; not supported")
    longest = int((getattr(ip, "size", None) or {}).get("longest_edge", tile))
    notes = []
    if longest <= tile:
        notes.append(f"the image processor resizes the longest edge to {longest} px, one tile: Hugging Face then "
                     f"gives the global view alone, llama.cpp one {tile}-px tile and the global view")
    if not getattr(ip, "do_image_splitting", True):
        notes.append("the image processor does not split images, llama.cpp's idefics3 path always does (tiles of "
                     f"{tile} px after resizing the longest edge to {longest} px, then the global view)")
    return VisionPlan(vc.model_type, tile, vc.patch_size, vc.num_hidden_layers, False, False,
                      [float(x) for x in ip.image_mean], [float(x) for x in ip.image_std],
                      _first_block(model, vc.model_type).mlp.fc1.out_features, notes, "idefics3", scale, longest)


def _plan_mistral3(model, processor) -> VisionPlan:
    """Mistral 3: the Pixtral tower (RMS norms, 2-D RoPE, SwiGLU), RMSNorm + patch merger (spatial_merge_size),
    Linear-GELU-Linear: llama.cpp's pixtral graph, with [IMG_BREAK] after each row of tokens but the last.
    Images at their own size (the longest edge at most the processor's), as in transformers."""
    config = model.config
    vc = config.vision_config
    ip, tokenizer = _image_processor_and_tokenizer(processor)
    n = vc.num_hidden_layers
    layer = config.vision_feature_layer
    if layer != -1:
        raise VlmpruneError(f"vision_feature_layer={layer}: llama.cpp's pixtral graph reads the last block's output "
                            f"(-1) only; not supported")
    if vc.hidden_act != "silu":
        raise VlmpruneError(f"a Pixtral tower with hidden_act={vc.hidden_act}: this export writes the SwiGLU (silu) "
                            f"MLP only")
    if getattr(config, "projector_hidden_act", "gelu") not in ("gelu", "gelu_pytorch_tanh"):
        raise VlmpruneError(f"projector activation {config.projector_hidden_act}: llama.cpp's pixtral projector "
                            f"applies GELU only")
    rope = (getattr(vc, "rope_parameters", None) or {})
    if rope.get("rope_type", "axial") != "axial":
        raise VlmpruneError(f"a Pixtral tower with rope_type={rope.get('rope_type')}: llama.cpp's pixtral graph "
                            f"has the axial 2-D RoPE only")
    missing = [t for t in PIXTRAL_TOKENS if len(tokenizer.encode(t, add_special_tokens=False)) != 1]
    if missing:
        raise VlmpruneError(f"llama.cpp's pixtral path needs {[*PIXTRAL_TOKENS]} as one token each of the text "
                            f"model's vocabulary, but this tokenizer splits {missing}; not supported")
    size = getattr(ip, "size", None) or {}
    longest = int(size.get("longest_edge", 0) if isinstance(size, dict) else getattr(size, "longest_edge", 0) or 0)
    if not longest:
        raise VlmpruneError(f"cannot tell the longest image edge from the image processor ({size}); not supported")
    theta = float((getattr(vc, "rope_parameters", None) or {}).get("rope_theta", getattr(vc, "rope_theta", 10000.0)))
    if theta != PIXTRAL_ROPE_THETA:
        raise VlmpruneError(f"a Pixtral tower with rope_theta={theta:g}: llama.cpp's pixtral graph fixes it at "
                            f"{PIXTRAL_ROPE_THETA:g} (whatever the file says); not supported")
    step = vc.patch_size * config.spatial_merge_size
    notes = [f"llama.cpp resizes every image (aspect kept) to multiples of {step} px holding "
             f"{PIXTRAL_TOKENS_RANGE[0]} to {PIXTRAL_TOKENS_RANGE[1]} merged tokens of {step}x{step} px; transformers' "
             f"processor to at most {longest} px on the longest edge, in multiples of {vc.patch_size} px: an image "
             f"outside both (fewer than {PIXTRAL_TOKENS_RANGE[0]} or more than {PIXTRAL_TOKENS_RANGE[1]} tokens, "
             f"longer than {longest} px, or sides not multiples of {step} px) reaches the two at different sizes"]
    eps = float(config.text_config.rms_norm_eps)
    if eps != PIXTRAL_EPS:
        notes.append(f"the merger's RMSNorm uses eps {eps:g} (the text model's) in transformers, {PIXTRAL_EPS:g} (the "
                     f"tower's) in llama.cpp's graph")
    return VisionPlan(vc.model_type, longest, vc.patch_size, n, False, False,
                      [float(x) for x in ip.image_mean], [float(x) for x in ip.image_std],
                      model.model.vision_tower.transformer.layers[0].feed_forward.up_proj.out_features, notes,
                      "pixtral", config.spatial_merge_size, longest,
                      break_id=tokenizer.convert_tokens_to_ids(PIXTRAL_TOKENS[0]))


def _plan_internvl(model, processor) -> VisionPlan:
    """InternVL: InternViT (class token, LayerScale, qkv biases), the class token dropped, pixel shuffle
    (1 / downsample_ratio), LayerNorm + Linear-GELU-Linear: llama.cpp's internvl graph. Like its LLaVA
    graph it appends the class token after the patches and takes positions in that order, so the
    position table is written in that order (then every token is exact); it drops the class token
    from the end, so the patches it keeps are the model's."""
    config = model.config
    vc = config.vision_config
    ip = _image_processor(processor)
    size = _image_size(ip)
    vsize = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
    patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
    if size != vsize or size % patch:
        raise VlmpruneError(f"the image processor makes {size}-px tiles for a {vsize}-px tower with {patch}-px "
                            f"patches; not supported")
    scale = round(1 / config.downsample_ratio)
    if scale * config.downsample_ratio != 1 or (size // patch) % scale:
        raise VlmpruneError(f"downsample_ratio={config.downsample_ratio}: llama.cpp's pixel shuffle needs 1 / ratio "
                            f"to be an integer dividing the {size // patch}-patch side")
    if getattr(config, "vision_feature_select_strategy", "default") != "default":
        raise VlmpruneError("vision_feature_select_strategy='full' (the class token kept): llama.cpp's internvl graph "
                            "always drops it; not supported")
    if getattr(vc, "use_qk_norm", False) or getattr(vc, "norm_type", "layer_norm") != "layer_norm":
        raise VlmpruneError("an InternViT with qk-norm or RMS norms (the 6B tower): not written by this export")
    if getattr(config, "projector_hidden_act", "gelu") != "gelu" or vc.hidden_act != "gelu":
        raise VlmpruneError("llama.cpp's internvl graph applies GELU in the tower and the projector; this model uses "
                            f"{vc.hidden_act} / {config.projector_hidden_act}: not supported")
    layer = config.vision_feature_layer
    n = vc.num_hidden_layers
    if not isinstance(layer, int):
        raise VlmpruneError(f"vision_feature_layer={layer}: several feature layers are not supported")
    blocks = n if layer == -1 else (n + 1 + layer if layer < 0 else layer)
    if not 1 <= blocks <= n:
        raise VlmpruneError(f"vision_feature_layer={layer} of a {n}-block tower reads no block output; not supported")
    notes = []
    if not getattr(ip, "crop_to_patches", False):
        notes.append(f"the image processor gives each image one {size}-px view; llama.cpp's internvl path tiles "
                     f"larger images ({getattr(ip, 'min_patches', 1)}..{getattr(ip, 'max_patches', 12)} tiles and a "
                     f"thumbnail) as InternVL's crop_to_patches does")
    return VisionPlan(vc.model_type, size, patch, blocks, True, False,
                      [float(x) for x in ip.image_mean], [float(x) for x in ip.image_std],
                      _first_block(model, vc.model_type).mlp.fc1.out_features, notes, "internvl", scale,
                      tiles=(int(getattr(ip, "min_patches", 1)), int(getattr(ip, "max_patches", 12))))


def _plan_qwen25vl(model, processor) -> VisionPlan:
    """Qwen2.5-VL: llama.cpp's qwen2vl vision graph with RMS norms, SiLU-gated MLPs and window attention.
    What that graph fixes and the model must match: 2x2 merging, 2-frame patches, rotary base 10000,
    windows of 112 px, full attention in every n-th block (a regular pattern)."""
    config = model.config
    vc = config.vision_config
    ip = _image_processor(processor)
    patch, merge = int(getattr(ip, "patch_size", vc.patch_size)), int(getattr(ip, "merge_size", 2))
    if patch != vc.patch_size or merge != vc.spatial_merge_size or merge != 2:
        raise VlmpruneError(f"the image processor cuts {patch}-px patches merged {merge}x{merge} for a tower of "
                            f"{vc.patch_size}-px patches merged {vc.spatial_merge_size}x{vc.spatial_merge_size}; "
                            f"llama.cpp's qwen2.5vl graph merges 2x2: not supported")
    if vc.temporal_patch_size != 2 or getattr(ip, "temporal_patch_size", 2) != 2:
        raise VlmpruneError(f"temporal_patch_size={vc.temporal_patch_size}: llama.cpp's qwen2.5vl graph takes "
                            f"two frames per patch; not supported")
    if vc.hidden_act != "silu":
        raise VlmpruneError(f"a Qwen2.5-VL tower with hidden_act={vc.hidden_act}: llama.cpp's graph gates with SiLU")
    if int(vc.window_size) != 112:
        raise VlmpruneError(f"window_size={vc.window_size}: llama.cpp's qwen2.5vl graph attends in windows of 112 px "
                            f"(fixed in its code), so the GGUF would differ; not supported")
    theta = float((getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0))
    if theta != 10000.0:
        raise VlmpruneError(f"a vision rotary base of {theta}: llama.cpp's qwen2.5vl graph uses 10000; not supported")
    depth, full = vc.depth, sorted(int(i) for i in vc.fullatt_block_indexes)
    wa = full[0] + 1 if full else 0
    if not full or full != [i for i in range(depth) if (i + 1) % wa == 0]:
        raise VlmpruneError(f"fullatt_block_indexes={full} in a {depth}-block tower: llama.cpp's qwen2.5vl graph "
                            f"attends to the whole image in every n-th block (n-1, 2n-1, ...) and in windows "
                            f"elsewhere; this pattern is not one of those (after dropping vision blocks, keep the "
                            f"pattern regular); not supported")
    if vc.out_hidden_size != config.text_config.hidden_size:
        raise VlmpruneError(f"the merger gives {vc.out_hidden_size}-wide tokens to a {config.text_config.hidden_size}"
                            f"-wide text model; the checkpoint disagrees with its config")
    size = getattr(ip, "size", None) or {}
    size = dict(size) if isinstance(size, dict) else {k: getattr(size, k, None)
                                                      for k in ("shortest_edge", "longest_edge")}
    low = int(getattr(ip, "min_pixels", None) or size.get("shortest_edge") or 0)
    high = int(getattr(ip, "max_pixels", None) or size.get("longest_edge") or 0)
    if not 0 < low <= high:
        raise VlmpruneError("cannot tell the image processor's min_pixels / max_pixels; the mmproj needs both")
    factor = patch * merge
    side = max(factor, int(high ** 0.5) // factor * factor)  # the largest square image it keeps
    notes = [f"images are resized to multiples of {factor} px within {low}..{high} pixels (as the image processor "
             f"does); llama.cpp resizes with its own interpolation, so images of another size can differ slightly"]
    return VisionPlan(vc.model_type, side, patch, depth, False, False,
                      [float(x) for x in ip.image_mean], [float(x) for x in ip.image_std], int(vc.intermediate_size),
                      notes, "qwen2.5vl_merger", merge, wa_pattern=wa, pixels=(low, high))


def _first_block(model, tower: str):
    inner = model.model if hasattr(model, "model") else model
    vt = getattr(inner, "vision_tower", None) or inner.vision_model
    body = getattr(vt, "vision_model", vt)
    return body.encoder.layer[0] if tower in ("dinov2", "internvl_vision") else body.encoder.layers[0]


def _image_size(ip) -> int:
    crop = getattr(ip, "crop_size", None) if getattr(ip, "do_center_crop", False) else None
    size = crop or getattr(ip, "size", None)
    if size is not None and not isinstance(size, (dict, int)):  # transformers' SizeDict
        import dataclasses

        raw = dataclasses.asdict(size) if dataclasses.is_dataclass(size) else dict(size)
        size = {k: v for k, v in raw.items() if v is not None}
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            if size["height"] != size["width"]:
                raise VlmpruneError(f"non-square image size {size}: the exports take square images only (llama.cpp's "
                                    f"LLaVA graph; ExecuTorch: give one with --image-size)")
            return int(size["height"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
    if isinstance(size, int):
        return size
    raise VlmpruneError(f"cannot tell the image size from the image processor ({size}); not supported")


def write_mmproj(path: Path, model, adapter, plan: VisionPlan, quant: str, name: str) -> dict:
    import gguf
    import torch

    from vlmprune.export.gguf import TensorWriter, file_type

    vc = model.config.vision_config
    tower = adapter.vision(model)
    projector = adapter.projector(model)
    T = gguf.MODEL_TENSOR

    def tname(kind, bid: int | None = None, suffix: str = "weight") -> str:
        base = gguf.TENSOR_NAMES[kind]
        return (base.format(bid=bid) if bid is not None else base) + "." + suffix

    def np32(t) -> np.ndarray:
        return t.detach().to(torch.float32).cpu().numpy()

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MMPROJ])
    tensors = TensorWriter(writer, quant)
    writer.add_type(gguf.GGUFType.MMPROJ)
    writer.add_name(name)
    writer.add_file_type(file_type(quant))
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(plan.projector)
    writer.add_vision_image_size(plan.image_size)
    writer.add_vision_patch_size(plan.patch_size)
    writer.add_vision_embedding_length(vc.hidden_size)
    writer.add_vision_feed_forward_length(plan.ffn)
    writer.add_vision_projection_dim(model.config.text_config.hidden_size)
    writer.add_vision_block_count(plan.blocks)
    writer.add_vision_head_count(vc.num_attention_heads)
    writer.add_vision_image_mean(plan.mean)
    writer.add_vision_image_std(plan.std)
    if plan.projector == "qwen2.5vl_merger":
        writer.add_vision_attention_layernorm_eps(1e-6)  # Qwen2.5-VL's vision RMSNorms (fixed in its code)
        writer.add_vision_use_silu(True)
        writer.add_vision_n_wa_pattern(plan.wa_pattern)
        writer.add_vision_spatial_merge_size(plan.merge)
        writer.add_vision_min_pixels(plan.pixels[0])
        writer.add_vision_max_pixels(plan.pixels[1])
        _write_qwen25vl(tensors, tname, np32, T, tower, projector, plan)
        return _finish(writer, path, plan, vc, tensors)
    if plan.projector == "pixtral":
        writer.add_vision_attention_layernorm_eps(PIXTRAL_EPS)
        writer.add_vision_use_silu(True)
        writer.add_vision_spatial_merge_size(plan.merge)
        writer.add_rope_freq_base(PIXTRAL_ROPE_THETA)  # as the converter writes it (the loader fixes it anyway)
        _write_pixtral(tensors, tname, np32, T, tower, projector, plan, model)
        return _finish(writer, path, plan, vc, tensors)
    writer.add_vision_attention_layernorm_eps(float(getattr(vc, "layer_norm_eps", 1e-5)))
    if vc.hidden_act in ("gelu", "gelu_pytorch_tanh", "gelu_new"):
        writer.add_vision_use_gelu(True)
    elif vc.hidden_act != "quick_gelu":
        raise VlmpruneError(f"vision activation {vc.hidden_act}: not on llama.cpp's LLaVA graph")
    if plan.projector == "internvl":
        writer.add_vision_projector_scale_factor(plan.merge)
        writer.add_vision_preproc_min_tiles(plan.tiles[0])
        writer.add_vision_preproc_max_tiles(plan.tiles[1])
        _write_internvl(tensors, tname, np32, T, tower, projector, plan, vc)
        return _finish(writer, path, plan, vc, tensors)
    if plan.projector in ("gemma3", "idefics3"):
        writer.add_vision_projector_scale_factor(plan.merge)
        if plan.projector == "idefics3":
            writer.add_vision_preproc_image_size(plan.longest_edge)
        _write_siglip(tensors, tname, np32, T, tower, projector, plan)
        return _finish(writer, path, plan, vc, tensors)
    # run exactly `blocks` blocks and read their output (without the key the graph runs one fewer)
    writer.add_array("clip.vision.feature_layer", [plan.blocks])

    n_patches = (plan.image_size // plan.patch_size) ** 2
    if plan.tower == "dinov2":
        emb = tower.embeddings
        tensors.add(tname(T.V_ENC_EMBD_PATCH), np32(emb.patch_embeddings.projection.weight), "f32")
        tensors.add(tname(T.V_ENC_EMBD_PATCH, suffix="bias"), np32(emb.patch_embeddings.projection.bias))
        tensors.add(gguf.TENSOR_NAMES[T.V_ENC_EMBD_CLS], np32(emb.cls_token.reshape(-1)))
        dummy = torch.zeros(1, n_patches + 1, vc.hidden_size)
        pos = emb.interpolate_pos_encoding(dummy, plan.image_size, plan.image_size)[0]  # [1 + n, D], CLS first
        blocks = tower.encoder.layer
    else:
        emb = tower.vision_model.embeddings if hasattr(tower, "vision_model") else tower.embeddings
        tensors.add(tname(T.V_ENC_EMBD_PATCH), np32(emb.patch_embedding.weight), "f32")
        if emb.patch_embedding.bias is not None:
            tensors.add(tname(T.V_ENC_EMBD_PATCH, suffix="bias"), np32(emb.patch_embedding.bias))
        pos = emb.position_embedding.weight
        if plan.has_cls:
            tensors.add(gguf.TENSOR_NAMES[T.V_ENC_EMBD_CLS], np32(emb.class_embedding.reshape(-1)))
        body = tower.vision_model if hasattr(tower, "vision_model") else tower
        pre = getattr(body, "pre_layrnorm", None)
        if pre is not None:
            tensors.add(tname(T.V_PRE_NORM), np32(pre.weight))
            tensors.add(tname(T.V_PRE_NORM, suffix="bias"), np32(pre.bias))
        blocks = body.encoder.layers
    if pos.shape[0] != n_patches + plan.has_cls:
        raise VlmpruneError(f"the position table has {pos.shape[0]} rows for {n_patches} patches; not supported")
    if plan.has_cls:  # the graph's order: patches, then the class token
        pos = torch.cat([pos[1:], pos[:1]])
    tensors.add(tname(T.V_ENC_EMBD_POS), np32(pos), "f32")

    for i in range(plan.blocks):
        _add_block(tensors, tname, np32, T, blocks[i], i, plan.tower)
    tensors.add(tname(T.V_MMPROJ, 0), np32(projector.linear_1.weight))
    tensors.add(tname(T.V_MMPROJ, 0, "bias"), np32(projector.linear_1.bias))
    tensors.add(tname(T.V_MMPROJ, 2), np32(projector.linear_2.weight))
    tensors.add(tname(T.V_MMPROJ, 2, "bias"), np32(projector.linear_2.bias))

    return _finish(writer, path, plan, vc, tensors)


def _finish(writer, path: Path, plan: VisionPlan, vc, tensors) -> dict:
    """Write the file out; its record (image tokens as llama.cpp gives them and as the model reads them)."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    n_patches = (plan.image_size // plan.patch_size // plan.merge) ** 2
    if plan.projector == "pixtral":  # dynamic size: rows x cols merged tokens, [IMG_BREAK] between rows
        return {"file": path.name, "projector": plan.projector, "tower": plan.tower, "blocks": plan.blocks,
                "blocks_in_model": vc.num_hidden_layers, "longest_edge": plan.longest_edge,
                "tokens_per_image": list(PIXTRAL_TOKENS_RANGE),
                "pixels_per_token": (plan.patch_size * plan.merge) ** 2, "bytes": path.stat().st_size,
                "tensor_types": tensors.counts, "fallbacks": tensors.fallbacks, "notes": plan.notes}
    if plan.pixels[1]:  # dynamic size: (height / patch / merge) x (width / patch / merge) tokens per image
        return {"file": path.name, "projector": plan.projector, "tower": plan.tower, "blocks": plan.blocks,
                "blocks_in_model": vc.num_hidden_layers, "min_pixels": plan.pixels[0], "max_pixels": plan.pixels[1],
                "pixels_per_token": (plan.patch_size * plan.merge) ** 2, "window_attention_every": plan.wa_pattern,
                "bytes": path.stat().st_size, "tensor_types": tensors.counts, "fallbacks": tensors.fallbacks,
                "notes": plan.notes}
    return {"file": path.name, "projector": plan.projector, "tower": plan.tower, "blocks": plan.blocks,
            "blocks_in_model": vc.num_hidden_layers, "image_size": plan.image_size, "image_tokens": n_patches,
            "image_tokens_in_model": n_patches + (1 if plan.keeps_cls and plan.has_cls else 0),
            "bytes": path.stat().st_size, "tensor_types": tensors.counts, "fallbacks": tensors.fallbacks,
            "notes": plan.notes}


def _write_internvl(tensors, tname, np32, T, tower, projector, plan: VisionPlan, vc) -> None:
    import gguf

    emb = tower.embeddings
    tensors.add(tname(T.V_ENC_EMBD_PATCH), np32(emb.patch_embeddings.projection.weight), "f32")
    tensors.add(tname(T.V_ENC_EMBD_PATCH, suffix="bias"), np32(emb.patch_embeddings.projection.bias))
    tensors.add(gguf.TENSOR_NAMES[T.V_ENC_EMBD_CLS], np32(emb.cls_token.reshape(-1)))
    pos = emb.position_embeddings[0]  # [1 + n, D], class token first
    n_patches = (plan.image_size // plan.patch_size) ** 2
    if pos.shape[0] != n_patches + 1:
        raise VlmpruneError(f"the position table has {pos.shape[0]} rows for {n_patches} patches; not supported")
    tensors.add(tname(T.V_ENC_EMBD_POS), np32(torch_cat_cls_last(pos)), "f32")  # the graph's order
    for i in range(plan.blocks):
        _add_block(tensors, tname, np32, T, tower.encoder.layer[i], i, plan.tower)
    norm = getattr(tower, "layernorm", None)
    if plan.blocks == vc.num_hidden_layers and hasattr(norm, "weight"):  # last_hidden_state is normed
        tensors.add(tname(T.V_POST_NORM), np32(norm.weight))
        tensors.add(tname(T.V_POST_NORM, suffix="bias"), np32(norm.bias))
    # mm.model.mlp.{0: LayerNorm, 1: Linear, 3: Linear} (the numbering of InternVL's own nn.Sequential)
    for idx, part in ((0, projector.layer_norm), (1, projector.linear_1), (3, projector.linear_2)):
        tensors.add(tname(T.V_MMPROJ_MLP, idx), np32(part.weight))
        tensors.add(tname(T.V_MMPROJ_MLP, idx, "bias"), np32(part.bias))


def _write_qwen25vl(tensors, tname, np32, T, tower, projector, plan: VisionPlan) -> None:
    """Qwen2.5-VL's tower and merger under llama.cpp's names: the Conv3d kernel as its two frames' 2-D
    kernels, the fused qkv as q / k / v."""
    import gguf

    kernel = np32(tower.patch_embed.proj.weight)  # [D, 3, 2 frames, p, p]
    tensors.add(tname(T.V_ENC_EMBD_PATCH), kernel[:, :, 0], "f32")
    tensors.add(gguf.TENSOR_NAMES[T.V_ENC_EMBD_PATCH] + ".weight.1", kernel[:, :, 1], "f32")
    for i in range(plan.blocks):
        block = tower.blocks[i]
        qkv_w, qkv_b = np32(block.attn.qkv.weight), np32(block.attn.qkv.bias)
        for kind, w, b in zip((T.V_ENC_ATTN_Q, T.V_ENC_ATTN_K, T.V_ENC_ATTN_V), np.split(qkv_w, 3),
                              np.split(qkv_b, 3)):
            tensors.add(tname(kind, i), w)
            tensors.add(tname(kind, i, "bias"), b)
        for kind, lin in ((T.V_ENC_ATTN_O, block.attn.proj), (T.V_ENC_FFN_GATE, block.mlp.gate_proj),
                          (T.V_ENC_FFN_UP, block.mlp.up_proj), (T.V_ENC_FFN_DOWN, block.mlp.down_proj)):
            tensors.add(tname(kind, i), np32(lin.weight))
            tensors.add(tname(kind, i, "bias"), np32(lin.bias))
        tensors.add(tname(T.V_ENC_INPUT_NORM, i), np32(block.norm1.weight))
        tensors.add(tname(T.V_ENC_POST_ATTN_NORM, i), np32(block.norm2.weight))
    tensors.add(tname(T.V_POST_NORM), np32(projector.ln_q.weight))
    tensors.add(tname(T.V_MMPROJ, 0), np32(projector.mlp[0].weight))
    tensors.add(tname(T.V_MMPROJ, 0, "bias"), np32(projector.mlp[0].bias))
    tensors.add(tname(T.V_MMPROJ, 2), np32(projector.mlp[2].weight))
    tensors.add(tname(T.V_MMPROJ, 2, "bias"), np32(projector.mlp[2].bias))


def _write_pixtral(tensors, tname, np32, T, tower, projector, plan: VisionPlan, model) -> None:
    """Pixtral's tower, Mistral 3's merger and projector under llama.cpp's names; q / k rows permuted from
    rotate-half pairs to the interleaved pairs of the graph's 2-D RoPE; [IMG_BREAK]'s text embedding."""
    import gguf

    from vlmprune.export.gguf import permute_rows

    tensors.add(tname(T.V_ENC_EMBD_PATCH), np32(tower.patch_conv.weight), "f32")
    if tower.patch_conv.bias is not None:
        tensors.add(tname(T.V_ENC_EMBD_PATCH, suffix="bias"), np32(tower.patch_conv.bias))
    tensors.add(tname(T.V_PRE_NORM), np32(tower.ln_pre.weight))
    heads = model.config.vision_config.num_attention_heads
    for i in range(plan.blocks):
        block = tower.transformer.layers[i]
        attn, ffn = block.attention, block.feed_forward
        for kind, lin, permute in ((T.V_ENC_ATTN_Q, attn.q_proj, True), (T.V_ENC_ATTN_K, attn.k_proj, True),
                                   (T.V_ENC_ATTN_V, attn.v_proj, False), (T.V_ENC_ATTN_O, attn.o_proj, False),
                                   (T.V_ENC_FFN_GATE, ffn.gate_proj, False), (T.V_ENC_FFN_UP, ffn.up_proj, False),
                                   (T.V_ENC_FFN_DOWN, ffn.down_proj, False)):
            w = np32(lin.weight)
            tensors.add(tname(kind, i), permute_rows(w, heads) if permute else w)
            if lin.bias is not None:
                b = np32(lin.bias)
                tensors.add(tname(kind, i, "bias"), permute_rows(b, heads) if permute else b)
        tensors.add(tname(T.V_ENC_INPUT_NORM, i), np32(block.attention_norm.weight))
        tensors.add(tname(T.V_ENC_POST_ATTN_NORM, i), np32(block.ffn_norm.weight))
    tensors.add(tname(T.V_MM_INP_NORM), np32(projector.norm.weight))
    tensors.add(tname(T.V_MM_PATCH_MERGER), np32(projector.patch_merger.merging_layer.weight))
    for idx, lin in ((1, projector.linear_1), (2, projector.linear_2)):
        tensors.add(tname(T.V_MMPROJ, idx), np32(lin.weight))
        if lin.bias is not None:
            tensors.add(tname(T.V_MMPROJ, idx, "bias"), np32(lin.bias))
    # the text embedding of [IMG_BREAK]: the graph appends it after each row of image tokens but the last
    tokenizer_id = plan.break_id
    emb = model.get_input_embeddings().weight[tokenizer_id]
    tensors.add(gguf.TENSOR_NAMES[T.V_TOK_EMBD_IMG_BREAK], np32(emb), "f32")  # no .weight (clip.cpp)


def torch_cat_cls_last(pos):
    """A [class, patch 1..n] position table in the order llama.cpp's graphs add it: patches, then class."""
    import torch

    return torch.cat([pos[1:], pos[:1]])


def _write_siglip(tensors, tname, np32, T, tower, projector, plan: VisionPlan) -> None:
    """A SigLIP-style tower (every block, then the post-LayerNorm) and the gemma3 or idefics3 projector."""
    import gguf

    body = tower.vision_model if hasattr(tower, "vision_model") else tower
    emb = body.embeddings
    tensors.add(tname(T.V_ENC_EMBD_PATCH), np32(emb.patch_embedding.weight), "f32")
    tensors.add(tname(T.V_ENC_EMBD_PATCH, suffix="bias"), np32(emb.patch_embedding.bias))
    n_patches = (plan.image_size // plan.patch_size) ** 2
    pos = emb.position_embedding.weight
    if pos.shape[0] != n_patches:
        raise VlmpruneError(f"the position table has {pos.shape[0]} rows for {n_patches} patches; not supported")
    tensors.add(tname(T.V_ENC_EMBD_POS), np32(pos), "f32")
    for i in range(plan.blocks):
        _add_block(tensors, tname, np32, T, body.encoder.layers[i], i, plan.tower)
    tensors.add(tname(T.V_POST_NORM), np32(body.post_layernorm.weight))
    tensors.add(tname(T.V_POST_NORM, suffix="bias"), np32(body.post_layernorm.bias))
    if plan.projector == "idefics3":  # pixel shuffle (in the graph), then one matrix without bias
        tensors.add(tname(T.V_MMPROJ_FC), np32(projector.modality_projection.proj.weight))
        return
    # Gemma's RMSNorm scales by (1 + w), llama.cpp's by w
    tensors.add(gguf.TENSOR_NAMES[T.V_MM_SOFT_EMB_NORM] + ".weight", np32(projector.mm_soft_emb_norm.weight) + 1.0)
    # [vision, text] as Hugging Face holds it: the graph transposes it (a copy, so never block-quantized)
    matrix = "f32" if tensors.quant == "f32" else "f16"
    tensors.add(gguf.TENSOR_NAMES[T.V_MM_INP_PROJ] + ".weight", np32(projector.mm_input_projection_weight), matrix)


def _add_block(tensors, tname, np32, T, block, i: int, tower: str) -> None:
    if tower == "dinov2":
        attn = block.attention
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        ln1, ln2, fc1, fc2 = block.norm1, block.norm2, block.mlp.fc1, block.mlp.fc2
        s1 = np32(block.layer_scale1.lambda1)
        s2 = np32(block.layer_scale2.lambda1)
    elif tower == "internvl_vision":
        attn = block.attention
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.projection_layer
        ln1, ln2, fc1, fc2 = block.layernorm_before, block.layernorm_after, block.mlp.fc1, block.mlp.fc2
        s1, s2 = np32(block.lambda_1), np32(block.lambda_2)
    else:
        attn = block.self_attn
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj
        ln1, ln2, fc1, fc2 = block.layer_norm1, block.layer_norm2, block.mlp.fc1, block.mlp.fc2
        s1 = s2 = None
    for kind, lin, scale in ((T.V_ENC_ATTN_Q, q, None), (T.V_ENC_ATTN_K, k, None), (T.V_ENC_ATTN_V, v, None),
                             (T.V_ENC_ATTN_O, o, s1), (T.V_ENC_FFN_UP, fc1, None), (T.V_ENC_FFN_DOWN, fc2, s2)):
        w, b = np32(lin.weight), (np32(lin.bias) if lin.bias is not None else None)
        if scale is not None:  # LayerScale folded: diag(s) (W x + b)
            w, b = w * scale[:, None], (b * scale if b is not None else None)
        tensors.add(tname(kind, i), w)
        if b is not None:  # llama.cpp's ViT blocks take their biases where the file has them
            tensors.add(tname(kind, i, "bias"), b)
    for kind, norm in ((T.V_ENC_INPUT_NORM, ln1), (T.V_ENC_POST_ATTN_NORM, ln2)):
        tensors.add(tname(kind, i), np32(norm.weight))
        tensors.add(tname(kind, i, "bias"), np32(norm.bias))
