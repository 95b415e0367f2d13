"""The vision tower and projector of a LLaVA-style model as an ``mmproj`` GGUF for llama.cpp (libmtmd).

llama.cpp runs LLaVA's towers on its ``mlp`` projector graph (``tools/mtmd/models/llava.cpp``): patch
embedding, optional class token, learned positions, optional pre-LayerNorm, ViT blocks, then
Linear -> GELU -> Linear. Written here for CLIP, SigLIP and DINOv2 towers; everything else is
refused with the reason before anything is written.

How the file fits that graph (facts of the llama.cpp build in xllamacpp 2026.10, measured by the tests):

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


def check_family(model) -> None:
    """Refuse a model whose vision part this export cannot write (before its processor is even loaded)."""
    config = model.config
    if config.model_type != "llava":
        raise VlmpruneError(
            f"mmproj export supports LLaVA-style models (model_type llava) only, not {config.model_type}: llama.cpp "
            f"has graphs for other families, but this export does not write them yet. Export the text model alone "
            f"with --no-vision")
    if config.vision_config.model_type not in TOWERS:
        raise VlmpruneError(f"vision tower {config.vision_config.model_type}: the mmproj export handles "
                            f"{', '.join(TOWERS)} towers on llama.cpp's LLaVA (mlp) graph; use --no-vision to export "
                            f"the text model alone")


def plan_vision(model, adapter, processor) -> VisionPlan:
    """What the mmproj will hold, or a refusal naming the reason (nothing written yet)."""
    check_family(model)
    config = model.config
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
    ip = getattr(processor, "image_processor", None)
    if ip is None:
        raise VlmpruneError("the model's processor has no image processor; the mmproj needs its size and normalisation")
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


def _first_block(model, tower: str):
    vt = model.model.vision_tower if hasattr(model, "model") else model.vision_tower
    body = getattr(vt, "vision_model", vt)
    return body.encoder.layer[0] if tower == "dinov2" else body.encoder.layers[0]


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
    writer.add_clip_projector_type("mlp")
    writer.add_vision_image_size(plan.image_size)
    writer.add_vision_patch_size(plan.patch_size)
    writer.add_vision_embedding_length(vc.hidden_size)
    writer.add_vision_feed_forward_length(plan.ffn)
    writer.add_vision_projection_dim(projector.linear_2.out_features)
    writer.add_vision_block_count(plan.blocks)
    writer.add_vision_head_count(vc.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(float(getattr(vc, "layer_norm_eps", 1e-5)))
    writer.add_vision_image_mean(plan.mean)
    writer.add_vision_image_std(plan.std)
    if vc.hidden_act in ("gelu", "gelu_pytorch_tanh", "gelu_new"):
        writer.add_vision_use_gelu(True)
    elif vc.hidden_act != "quick_gelu":
        raise VlmpruneError(f"vision activation {vc.hidden_act}: not on llama.cpp's LLaVA graph")
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

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"file": path.name, "projector": "mlp", "tower": plan.tower, "blocks": plan.blocks,
            "blocks_in_model": vc.num_hidden_layers, "image_size": plan.image_size, "image_tokens": n_patches,
            "image_tokens_in_model": n_patches + (1 if plan.keeps_cls and plan.has_cls else 0),
            "bytes": path.stat().st_size, "tensor_types": tensors.counts, "fallbacks": tensors.fallbacks,
            "notes": plan.notes}


def _add_block(tensors, tname, np32, T, block, i: int, tower: str) -> None:
    if tower == "dinov2":
        attn = block.attention
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        ln1, ln2, fc1, fc2 = block.norm1, block.norm2, block.mlp.fc1, block.mlp.fc2
        s1 = np32(block.layer_scale1.lambda1)
        s2 = np32(block.layer_scale2.lambda1)
    else:
        attn = block.self_attn
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj
        ln1, ln2, fc1, fc2 = block.layer_norm1, block.layer_norm2, block.mlp.fc1, block.mlp.fc2
        s1 = s2 = None
    for kind, lin, scale in ((T.V_ENC_ATTN_Q, q, None), (T.V_ENC_ATTN_K, k, None), (T.V_ENC_ATTN_V, v, None),
                             (T.V_ENC_ATTN_O, o, s1), (T.V_ENC_FFN_UP, fc1, None), (T.V_ENC_FFN_DOWN, fc2, s2)):
        w, b = np32(lin.weight), np32(lin.bias)
        if scale is not None:  # LayerScale folded: diag(s) (W x + b)
            w, b = w * scale[:, None], b * scale
        tensors.add(tname(kind, i), w)
        tensors.add(tname(kind, i, "bias"), b)
    for kind, norm in ((T.V_ENC_INPUT_NORM, ln1), (T.V_ENC_POST_ATTN_NORM, ln2)):
        tensors.add(tname(kind, i), np32(norm.weight))
        tensors.add(tname(kind, i, "bias"), np32(norm.bias))
