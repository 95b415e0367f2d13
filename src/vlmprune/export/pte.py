"""A (pruned) vision-language model as one ExecuTorch program (``model.pte``) for PyTorch's on-device runtime.

The program holds the three methods ExecuTorch's multimodal LLM runner calls, lowered to XNNPACK (CPU):

* ``vision_encoder(pixel_values [1, 3, S, S] float32) -> [1, n_image_tokens, hidden]``: the vision tower
  and the projector, for one image of the export's size (the processor saved beside it resizes to it);
* ``token_embedding(input_ids [1, n]) -> [1, n, hidden]``;
* ``text_decoder(inputs_embeds [1, n, hidden], cache_position [n]) -> logits [1, n, vocab]`` (float32),
  with a static KV cache held in the program, one buffer per layer **in that layer's own shape** (a
  pruned layer with fewer kv heads has a smaller cache: transformers' exportable wrapper sizes every
  layer from the config's global head count, which fails on per-layer widths);

plus the runner's metadata (``get_max_seq_len``, ``get_vocab_size``, ``get_eos_ids``, ...) as constant
methods. Idefics3 / SmolVLM export with image splitting off (one tile per image); Gemma 3's encoders return
one channel more (ones for an image, zeros for text), which tells ``text_decoder`` to let an image's tokens
see each other. Qwen2.5-VL's are marked the same way, and ``text_decoder`` computes the decoder's 3-D rotary
positions (M-RoPE) from the cache position (an image's rows and columns at the export's fixed grid, the text
after it shifted by a delta it keeps); its vision tower is written for that grid (:func:`_windowed_tower_encoder`).
Families whose inputs the runner cannot express are refused before anything is written
(see :func:`check_family`). Before the directory is published, the program is loaded in the ExecuTorch runtime
and run on the export's sample prompt (the chat template, one synthetic image): its logits over the
whole prompt and its greedy tokens must reproduce the PyTorch modules it was exported from.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlmprune.config import PTE_DTYPES, PTE_QUANTS
from vlmprune.errors import VlmpruneError
from vlmprune.export.pte_runtime import METHODS, PTE_FILE, image_input, require_executorch

log = logging.getLogger("vlmprune")

RECORD_FILE = "export.json"
DEFAULT_MAX_SEQ_LEN = 1024
QUANT_GROUP = 32  # int4: one scale per 32 input channels
CHECK_TOKENS = 8  # greedy tokens compared after the sample prompt
# largest max|logits_pte - logits_pytorch| / max|logits_pytorch| the export publishes: float32 programs are
# exact up to kernel rounding (1e-7 on the tiny models, 1e-5 on the demo); bfloat16 and the int8-activation
# kernels round differently from their eager references, by about as much as the reduced precision moves
# the eager model itself, so a reduced program may also be off by REDUCED_SLACK x that move (the eager
# reduced model against float32): a compensated 28-shape cut of the demo gave 8.6e-2 in int8 with the
# greedy tokens equal. What the check exists to catch, a wrong graph or wrong weights, is off by O(1).
TOLERANCE = {"float32": 1e-3, "reduced": 5e-2}
REDUCED_SLACK = 2.0

# families whose language model reads more than (embeddings, positions): refused, with the reason
_BLOCKERS = {
    "qwen2_vl": "Qwen2-VL tower",
    "qwen3_vl": "M-RoPE",
    "qwen3_5": "M-RoPE",
    "gemma4": "bidirectional",
}
_WHY = {
    "M-RoPE": ("its decoder places image tokens with 3-D rotary positions (M-RoPE: time, row, column) that depend "
               "on where the image sits in the prompt, and ExecuTorch's multimodal runner gives the text decoder "
               "only cache positions; the export derives them from the cache position for Qwen2.5-VL only (this "
               "family's interleaved M-RoPE and its tower with deepstack features are not written yet)"),
    "Qwen2-VL tower": ("the export writes Qwen2.5-VL's vision tower for a fixed image (windowed attention as a "
                       "constant mask), not yet Qwen2-VL's (LayerNorm blocks, QuickGELU MLP, full attention); its "
                       "decoder is the Qwen2.5-VL one"),
    "bidirectional": ("its decoder lets the image tokens attend to each other in both directions (a mask built "
                      "from token_type_ids), and ExecuTorch's multimodal runner runs the text decoder on embeddings "
                      "alone; the export marks the image block for Gemma 3, not yet for this family"),
}
TILED = ("idefics3", "smolvlm")  # processors that split images into tiles: exported with splitting off
IMAGE_BLOCK = ("gemma3",)  # decoders whose image tokens see each other: the embeddings say whether they are an image
MROPE = ("qwen2_5_vl",)  # decoders with 3-D rotary positions: the embeddings say whether they are an image
SUPPORTED = ("llava", *TILED, *IMAGE_BLOCK, *MROPE)


def check_family(model) -> str:
    """The model's family, or a refusal naming what ExecuTorch's runner cannot express (nothing written yet)."""
    family = getattr(model.config, "model_type", "?")
    if family in _BLOCKERS:
        raise VlmpruneError(f"ExecuTorch export of {family} is refused: {_WHY[_BLOCKERS[family]]}; nothing was "
                            f"written. Use `vlmprune quantize` for a smaller Hugging Face checkpoint instead")
    if family not in SUPPORTED:
        raise VlmpruneError(f"ExecuTorch export of {family} models is not supported yet (supported: "
                            f"{', '.join(SUPPORTED)}: LLaVA-style models with a Llama, Mistral or Qwen2 backbone, "
                            f"Idefics3 / SmolVLM with one image tile, Gemma 3, Qwen2.5-VL with one fixed-size "
                            f"image); nothing was written")
    return family


def _check_text(model, adapter, max_seq_len: int) -> list:
    from vlmprune.summary import layer_shapes

    config = adapter.text_config(model)
    shapes = layer_shapes(model, adapter)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or []
    sliding = "sliding_attention" in types or (window and getattr(config, "use_sliding_window", True)
                                               and getattr(config, "model_type", "") == "mistral")
    if sliding and window and window < max_seq_len:
        raise VlmpruneError(f"the language model has sliding-window attention ({window} tokens) and --max-seq-len "
                            f"{max_seq_len} is longer; the program's KV cache holds every position, so export with "
                            f"--max-seq-len {window} or less")
    limit = getattr(config, "max_position_embeddings", None)
    if limit and max_seq_len > limit:
        raise VlmpruneError(f"--max-seq-len {max_seq_len} is longer than the model's max_position_embeddings "
                            f"({limit})")
    return shapes


# ------------------------------------------------------------------------------------------ the methods


def _modules(model, adapter, shapes: list, max_seq_len: int, image_size: int):
    """The three torch.nn.Modules exported as the program's methods."""
    import torch
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    # the decoder's dtype (its embeddings and KV cache); a bfloat16 export keeps the vision side in float32
    # (export_executorch), so each image encoder casts its features to this one
    dtype = next(adapter.language_model(model).parameters()).dtype
    vision_dtype = next(adapter.vision(model).parameters()).dtype

    family = model.config.model_type
    marked = family in IMAGE_BLOCK + MROPE  # embeddings carry a last channel: 1 image, 0 text
    if family in MROPE:
        merge = model.model.visual.spatial_merge_size
        grid = image_size // model.config.vision_config.patch_size // merge  # merged patches per row and column

    class VisionEncoder(torch.nn.Module):
        def __init__(self, vlm):
            super().__init__()
            self.vlm = vlm

        def forward(self, pixel_values):
            cfg = self.vlm.config
            select = {"vision_feature_layer": cfg.vision_feature_layer,
                      "vision_feature_select_strategy": cfg.vision_feature_select_strategy} \
                if hasattr(cfg, "vision_feature_layer") else {}
            out = self.vlm.model.get_image_features(pixel_values=pixel_values.to(vision_dtype), **select)
            feats = out.pooler_output
            feats = (torch.cat(list(feats), 0)[None] if isinstance(feats, (list, tuple)) else feats).to(dtype)
            return _mark(feats, 1.0) if marked else feats

    class TileEncoder(torch.nn.Module):
        """Idefics3 / SmolVLM: the tower on one tile of the export's size (no padding: every patch is
        real), its post-LayerNorm, then the connector (pixel shuffle + matrix). The tower's position ids
        come from bucketed fractional patch coordinates (torch.bucketize, which ExecuTorch has no kernel
        for); for a full tile of a fixed size they are a constant: the ids the tower computes, stored."""

        def __init__(self, vlm):
            super().__init__()
            self.vlm = vlm
            self.register_buffer("position_ids", _tile_position_ids(vlm.model.vision_model, image_size),
                                 persistent=False)

        def forward(self, pixel_values):
            tower = self.vlm.model.vision_model
            emb = tower.embeddings
            hidden = emb.patch_embedding(pixel_values.to(vision_dtype)).flatten(2).transpose(1, 2)
            hidden = hidden + emb.position_embedding(self.position_ids)
            hidden = tower.post_layernorm(tower.encoder(inputs_embeds=hidden).last_hidden_state)
            return self.vlm.model.connector(hidden).to(dtype)

    class TokenEmbedding(torch.nn.Module):
        def __init__(self, embed):
            super().__init__()
            self.embed = embed

        def forward(self, input_ids):
            return _mark(self.embed(input_ids), 0.0) if marked else self.embed(input_ids)

    class TextDecoder(TorchExportableModuleWithStaticCache):
        """transformers' static-cache wrapper with every cache layer in its own layer's shape."""

        def __init__(self, vlm):
            vlm.generation_config.use_cache = True
            vlm.generation_config.cache_implementation = "static"
            super().__init__(vlm, batch_size=1, max_cache_len=max_seq_len)
            layers = self.static_cache.layers
            if len(layers) != len(shapes):
                raise VlmpruneError(f"the static cache has {len(layers)} layers but the model {len(shapes)}")
            for i, (layer, shape) in enumerate(zip(layers, shapes)):
                probe = torch.zeros(1, shape.num_kv_heads, 1, shape.head_dim, dtype=dtype)
                layer.is_initialized = False
                layer.lazy_initialization(probe, probe)
                self.register_buffer(f"key_cache_{i}", layer.keys, persistent=False)
                self.register_buffer(f"value_cache_{i}", layer.values, persistent=False)
                self.register_buffer(f"cumulative_length_{i}", layer.cumulative_length, persistent=False)

            if family in MROPE:
                # how far the rotary position of the tokens after the prompt's image runs behind their cache position
                self.register_buffer("rope_delta", torch.zeros(1, dtype=torch.long), persistent=False)

        def forward(self, inputs_embeds, cache_position):
            if not marked:
                return super().forward(inputs_embeds=inputs_embeds, cache_position=cache_position).float()
            image = inputs_embeds[0, 0, -1] > 0.5
            inputs_embeds = inputs_embeds[..., :-1]
            for layer in self.static_cache.layers:  # as transformers' wrapper: the cache's write position
                layer.cumulative_length.copy_(cache_position[0])
            if family in MROPE:
                return self._mrope(inputs_embeds, cache_position, image)
            # Gemma 3: causal, and a call that carries an image (the whole call is the image block) also
            # lets its tokens see each other; the windows of sliding layers are at least the cache's length
            keys = torch.arange(max_seq_len, dtype=cache_position.dtype)
            causal = keys[None, :] <= cache_position[:, None]
            block = (keys <= cache_position[-1]) & image
            mask = (causal | block[None, :])[None, None]
            out = self.model(inputs_embeds=inputs_embeds, attention_mask={"full_attention": mask,
                                                                        "sliding_attention": mask},
                             cache=self.static_cache, use_cache=True)
            return out.logits.float()

        def _mrope(self, inputs_embeds, cache_position, image):
            """Qwen2.5-VL's 3-D positions (time, row, column), as transformers' get_rope_index gives them: text
            at its cache position plus the prompt's delta; an image call's tokens at (start, start + row,
            start + column) of the merged grid from its first cache position; the text after the image
            continues at start + the grid's side, so the delta grows by the side less the image tokens. A
            call at cache position 0 starts a prompt (delta 0)."""
            start = cache_position[0]
            delta = torch.where(start == 0, torch.zeros_like(self.rope_delta), self.rope_delta)
            k = cache_position - start
            axes = torch.stack([torch.where(image, torch.zeros_like(k), k), torch.where(image, k // grid, k),
                                torch.where(image, k % grid, k)])
            positions = (axes + start + delta)[:, None, :]  # [3, batch 1, n]
            self.rope_delta.copy_(delta + image.long() * (grid - grid * grid))
            out = self.model(inputs_embeds=inputs_embeds, position_ids=positions, attention_mask=None,
                             cache=self.static_cache, use_cache=True)
            return out.logits.float()

    if family in MROPE:
        vision = _windowed_tower_encoder()(model.model.visual, image_size, dtype)
    else:
        vision = TileEncoder(model) if family in TILED else VisionEncoder(model)
    return vision, TokenEmbedding(model.get_input_embeddings()), TextDecoder(model)


def _windowed_tower_encoder():
    import torch
    import torch.nn.functional as F

    class WindowedTowerEncoder(torch.nn.Module):
        """Qwen2.5-VL's vision tower and patch merger for one image of ``image_size`` px, in the shape torch.export
        traces and XNNPACK lowers: input the processor's normalized image [1, 3, S, S] (the runner's image input;
        :func:`~vlmprune.export.pte_runtime.image_from_patches` makes it from the processor's flattened patches),
        output [1, n / 4, hidden] marked as an image (a last channel of ones). For a fixed grid, what
        transformers computes from ``grid_thw`` per call is a constant: the rotary table, the window order and
        its inverse, and the windows as a block-diagonal attention mask (transformers splits the sequence per
        window with ``cu_seqlens.tolist()``). The Conv3d patch embedding over a picture's two identical frames is
        a Conv2d with the kernel summed over the frames, its output put in the merger's 2x2 order."""

        def __init__(self, tower, image_size: int, out_dtype):
            from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

            super().__init__()
            config = tower.config
            if image_size % (config.patch_size * tower.spatial_merge_size):
                raise VlmpruneError(f"--image-size {image_size} is not a multiple of the tower's merged patch "
                                    f"({config.patch_size * tower.spatial_merge_size} px)")
            self.tower = tower
            side = image_size // config.patch_size
            grid = torch.tensor([[1, side, side]])
            n = side * side
            window_index, cu_windows = get_vision_window_index(grid, tower.spatial_merge_size, config.window_size,
                                                               config.patch_size)
            with torch.no_grad():
                positions = get_vision_position_ids(grid, tower.spatial_merge_size)
                cos, sin = tower.rotary_pos_emb(torch.zeros(n, 1), positions)
            dtype = next(tower.parameters()).dtype
            self.register_buffer("window_index", window_index, persistent=False)
            self.register_buffer("reverse", torch.argsort(window_index), persistent=False)
            self.register_buffer("cos", tower.permute_input_for_window_attn(cos, window_index, n), persistent=False)
            self.register_buffer("sin", tower.permute_input_for_window_attn(sin, window_index, n), persistent=False)
            lengths = (cu_windows[1:] - cu_windows[:-1]).long()
            segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
            self.register_buffer("window_mask", segment[:, None] == segment[None, :], persistent=False)
            self.dtype, self.out_dtype = dtype, out_dtype
            self.merge = tower.spatial_merge_size

        def forward(self, pixel_values):
            tower = self.tower
            weight = tower.patch_embed.proj.weight.sum(2)  # [hidden, 3, p, p]: both frames are the picture
            hidden = F.conv2d(pixel_values.to(self.dtype), weight, stride=weight.shape[-1])[0]  # [hidden, h, w]
            width, side, m = hidden.shape[0], hidden.shape[1], self.merge
            hidden = hidden.reshape(width, side // m, m, side // m, m).permute(1, 3, 2, 4, 0).reshape(-1, width)
            n = hidden.shape[0]
            hidden = tower.permute_input_for_window_attn(hidden, self.window_index, n)
            for i, block in enumerate(tower.blocks):
                mask = None if i in tower.fullatt_block_indexes else self.window_mask  # one image: full is all
                hidden = hidden + self._attention(block.attn, block.norm1(hidden), mask)
                hidden = hidden + block.mlp(block.norm2(hidden))
            return _mark(tower.merger(hidden)[self.reverse][None].to(self.out_dtype), 1.0)

        def _attention(self, attn, x, mask):
            from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

            n = x.shape[0]
            q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q, k = apply_rotary_pos_emb_vision(q, k, self.cos, self.sin)
            q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
            return attn.proj(out[0].transpose(0, 1).reshape(n, -1))

    return WindowedTowerEncoder


def _mark(embeds, value: float):
    """``embeds`` [1, n, hidden] with one more channel holding ``value`` (1: an image's embeddings, 0: text's),
    read and dropped by ``text_decoder``."""
    import torch

    return torch.cat([embeds, torch.full_like(embeds[..., :1], value)], -1)


def _tile_position_ids(tower, image_size: int):
    """The position ids an Idefics3 / SmolVLM tower gives a full (unpadded) tile of ``image_size`` px, as
    its embeddings compute them (read off its position embedding's input)."""
    import torch

    seen = []
    hook = tower.embeddings.position_embedding.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    try:
        with torch.no_grad():
            pixels = torch.zeros(1, 3, image_size, image_size, dtype=next(tower.parameters()).dtype)
            tower.embeddings(pixel_values=pixels, patch_attention_mask=torch.ones(
                1, image_size // tower.config.patch_size, image_size // tower.config.patch_size, dtype=torch.bool))
    finally:
        hook.remove()
    return seen[0].clone()


def _fix_position_table_(model, image_size: int) -> bool:
    """Store DINOv2's position table interpolated for ``image_size``, so that the exported encoder does not
    interpolate (its bicubic interpolation does not lower); the numbers are the ones it would compute."""
    import torch

    emb = getattr(getattr(model.model, "vision_tower", None), "embeddings", None)
    if emb is None or type(emb).__name__ != "Dinov2Embeddings":
        return False
    patch = model.config.vision_config.patch_size
    n = (image_size // patch) ** 2
    with torch.no_grad():
        table = emb.interpolate_pos_encoding(torch.zeros(1, n + 1, emb.position_embeddings.shape[-1]),
                                             image_size, image_size)
    emb.position_embeddings = torch.nn.Parameter(table.to(emb.position_embeddings.dtype), requires_grad=False)
    return True


def _quantize_(model, adapter, quant: str) -> dict:
    """XNNPACK's weight formats on the language model's decoder Linear layers (torchao, int8 activations
    quantized per token at run time); a layer whose input width is not a multiple of the int4 group stays
    in the float type and is reported."""
    import torch
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    if quant == "int8":
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    else:
        config = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4,
                                                       weight_granularity=PerGroup(QUANT_GROUP))
    kept: list[dict] = []
    count = 0

    def chosen(module, fqn: str) -> bool:
        nonlocal count
        if not isinstance(module, torch.nn.Linear):
            return False
        if quant == "int4" and module.in_features % QUANT_GROUP:
            kept.append({"module": fqn, "shape": list(module.weight.shape),
                         "reason": f"input width {module.in_features} is not a multiple of {QUANT_GROUP}"})
            return False
        count += 1
        return True

    for layer in adapter.layers(model):
        quantize_(layer, config, filter_fn=chosen)
    return {"quantized_linears": count, "kept_float": kept}


def bfloat16_language_(model, adapter) -> None:
    """The model in bfloat16 but its vision tower and projector, which keep their float32 weights exactly
    (ExecuTorch 1.5.1 lowered the demo's bfloat16 DINOv2 tower to features 1.9 off in relative terms, where
    the bfloat16 decoder is within 3e-2 of its eager self)."""
    import torch

    parts = [adapter.vision(model), adapter.projector(model)]
    saved = [{k: v.clone() for k, v in part.state_dict().items()} for part in parts]
    model.to(torch.bfloat16)
    for part, state in zip(parts, saved):
        part.float()
        part.load_state_dict(state)


def _export(modules, sample: dict, max_seq_len: int, progress) -> dict:
    import warnings

    import torch

    vision, embedding, decoder = modules
    seq = torch.export.Dim("seq", min=1, max=max_seq_len - 1)
    ids = sample["input_ids"][:, :4]
    hidden = embedding(ids)
    programs = {}
    with torch.no_grad(), warnings.catch_warnings():
        # dynamo lists transformers' module-level hook registries as side effects of tracing; they are
        # not part of the exported graphs
        warnings.filterwarnings("ignore", message="While compiling, we found certain side effects")
        # strict=False for the vision encoder only: transformers' output-capturing hooks do not trace strictly,
        # and the decoder needs strict tracing to lower (to_edge fails on its non-strict graph)
        progress("export vision_encoder")
        pixels = image_input(sample)  # [1, 3, S, S]
        programs["vision_encoder"] = torch.export.export(vision, (pixels,), strict=False)
        progress("export token_embedding")
        programs["token_embedding"] = torch.export.export(embedding, (ids,), dynamic_shapes=({1: seq},), strict=True)
        progress("export text_decoder")
        programs["text_decoder"] = torch.export.export(
            decoder, (hidden, torch.arange(ids.shape[1])), dynamic_shapes=({1: seq}, {0: seq}), strict=True)
    return {name: _explicit_tanh_gelu(program) for name, program in programs.items()}


def _gelu_tanh(x, approximate="none"):
    if approximate != "tanh":
        return NotImplemented  # the exact GELU stays one op (XNNPACK's)
    import torch

    return 0.5 * x * (1 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))  # sqrt(2 / pi)


def _explicit_tanh_gelu(program):
    """GELU's tanh approximation (SigLIP towers, Gemma's MLPs) written out as the formula it is: ExecuTorch
    1.5.1's XNNPACK partitioner lowers ``gelu(approximate='tanh')`` to XNNPACK's exact (erf) GELU, another
    function (up to 3e-4 apart per activation; 1e-4 relative on a tiny Idefics3's logits)."""
    import torch

    gelu = torch.ops.aten.gelu.default
    if not any(node.target is gelu and (node.kwargs.get("approximate") == "tanh" or node.args[1:] == ("tanh",))
               for node in program.graph.nodes):
        return program
    return program.run_decompositions({gelu: _gelu_tanh})


def _lower(programs: dict, metadata: dict, progress) -> bytes:
    import warnings

    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    with warnings.catch_warnings():
        # the emitter notes, once per cache buffer, that a mutated buffer's initial values are not stored:
        # the decoder writes every cache position before it reads it (the causal mask hides the rest)
        warnings.filterwarnings("ignore", message="Mutation on a buffer in the model is detected")
        # torch deprecates pytree's LeafSpec, and ExecuTorch 1.5's passes still copy graphs that hold it: a note
        # to ExecuTorch's authors, printed dozens of times per lowering
        warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        progress("lower to XNNPACK")
        edge = to_edge_transform_and_lower(programs, partitioner=[XnnpackPartitioner()],
                                           compile_config=EdgeCompileConfig(_check_ir_validity=False),
                                           constant_methods=metadata)
        progress("serialize")
        return edge.to_executorch().buffer


# ------------------------------------------------------------------------------------------ the check


def rel_diff(got, ref) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def sample_inputs(processor, image_size: int) -> dict:
    """The export's sample prompt: one synthetic image (a seeded pattern) and a question, through the model's
    own chat template and processor, as ``vlmprune evaluate`` builds its prompts."""
    import numpy as np
    from PIL import Image

    from vlmprune.export.pte_runtime import prompt_inputs

    rng = np.random.default_rng(0)
    grid = np.linspace(0, 255, image_size, dtype=np.float32)
    pixels = np.stack([grid[None, :].repeat(image_size, 0), grid[:, None].repeat(image_size, 1),
                       rng.uniform(0, 255, (image_size, image_size))], -1)
    return prompt_inputs(processor, Image.fromarray(pixels.astype(np.uint8)), "What is in the picture? Answer briefly.")


def reference(model, sample: dict, tokens: int) -> tuple:
    """PyTorch's logits over the sample prompt and its greedy tokens (the modules the program was made from)."""
    import torch

    with torch.no_grad():
        logits = model(**sample).logits[0].float()
        out = model.generate(**sample, max_new_tokens=tokens, do_sample=False)  # stops at an end id, as the runtime
    return logits, out[0, sample["input_ids"].shape[1]:].tolist()


# ------------------------------------------------------------------------------------------ the command


@dataclass
class PtePlan:
    family: str
    dtype: str
    quant: str
    max_seq_len: int
    image_size: int
    image_token_id: int
    image_tokens: int
    vocab_size: int
    eos_ids: list[int]
    layers: int
    kv_heads: list[int]
    head_dim: list[int]
    notes: list[str] = field(default_factory=list)
    processor_settings: dict = field(default_factory=dict)  # changed from the model's own processor
    resize_images: int | None = None  # the runtime resizes images to this square size before the processor


def export_executorch(model_dir: str | Path, output: str | Path, dtype: str = "float32", quant: str = "none",
                      max_seq_len: int | None = None, image_size: int | None = None, overwrite: bool = False,
                      trust_remote_code: bool = False) -> dict:
    """Write ``model.pte`` (+ the processor files and export.json) for ``model_dir`` into ``output``; return
    the record. Refusals (family, options, a program that does not reproduce PyTorch) write nothing."""
    import torch

    from vlmprune import __version__
    from vlmprune.adapters import get_adapter
    from vlmprune.checkpoint import load, load_processor
    from vlmprune.export.pte_runtime import PteModel, set_image_size
    from vlmprune.paths import atomic_output_dir, check_output

    if dtype not in PTE_DTYPES:
        raise VlmpruneError(f"--dtype {dtype}: choose one of {', '.join(PTE_DTYPES)}")
    if quant not in PTE_QUANTS:
        raise VlmpruneError(f"--quant {quant}: --format executorch takes {', '.join(PTE_QUANTS)}")
    if quant != "none" and dtype != "float32":
        raise VlmpruneError("--quant int8/int4 with --dtype bfloat16: XNNPACK's quantized kernels take float32 "
                            "activations; export the quantized program in float32")
    Runtime = require_executorch()
    check_output(output, [("input model", model_dir)], overwrite)  # before the (slow) load
    max_seq_len = max_seq_len or DEFAULT_MAX_SEQ_LEN
    if max_seq_len < 16:
        raise VlmpruneError(f"--max-seq-len {max_seq_len} is too short for a prompt with an image")
    model = load(model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
    adapter = get_adapter(model)
    family = check_family(model)
    config = adapter.text_config(model)
    if getattr(config, "max_position_embeddings", None):
        max_seq_len = min(max_seq_len, config.max_position_embeddings)
    shapes = _check_text(model, adapter, max_seq_len)
    processor = load_processor(model_dir, trust_remote_code=trust_remote_code)
    size = set_image_size(processor, image_size)
    sample = sample_inputs(processor, size)
    image_token_id = adapter.image_token_id(model)
    n_image = int((sample["input_ids"] == image_token_id).sum())
    if sample["input_ids"].shape[1] >= max_seq_len - CHECK_TOKENS:
        raise VlmpruneError(f"the sample prompt with one image is {sample['input_ids'].shape[1]} tokens, too long "
                            f"for --max-seq-len {max_seq_len}; raise it")
    notes = []
    settings = {}
    if family in TILED:
        settings["do_image_splitting"] = False
        notes.append(f"images are not split into tiles: the processor saved beside the program resizes each image to "
                     f"one {size} px tile ({n_image} image tokens; do_image_splitting false), where the model's own "
                     f"processor adds a tile per {size} px of the image and a global view")
    resize = None
    if family in MROPE:
        if "mm_token_type_ids" not in sample:
            raise VlmpruneError("the model's processor gives no mm_token_type_ids (which tokens are the image's): "
                                "transformers would place the sample's image with 1-D positions, not the M-RoPE rows "
                                "and columns the program computes, so the export cannot be checked; use the "
                                "model's own Qwen2.5-VL processor (transformers >= 5, with torchvision)")
        resize = size
        settings["size"] = dict(processor.image_processor.size)
        notes.append(f"one image size: the runtime resizes each image to {size} x {size} px before the processor "
                     f"({n_image} image tokens), where the model's own processor keeps the aspect ratio within a "
                     f"pixel budget; the vision tower's windows, rotary table and the decoder's image positions are "
                     f"those of that grid")
    if _fix_position_table_(model, size):
        notes.append(f"DINOv2's position table is stored interpolated for {size} px images (DINOv2's own bicubic "
                     f"interpolation, computed once)")
    try:
        float_logits, float_tokens = reference(model, sample, CHECK_TOKENS)
    except (RuntimeError, ValueError) as exc:
        raise VlmpruneError(f"the model does not run on an image of {size} px ({exc}); pick another --image-size"
                            ) from None
    quant_record = None
    if dtype == "bfloat16":
        bfloat16_language_(model, adapter)
        notes.append("bfloat16 applies to the language model; the vision tower and projector stay float32 (ExecuTorch "
                     "1.5.1 lowered the demo's bfloat16 DINOv2 tower to features 1.9 off in relative terms)")
    if quant != "none":
        quant_record = _quantize_(model, adapter, quant)
    exported_logits, exported_tokens = (float_logits, float_tokens) if dtype == "float32" and quant == "none" \
        else reference(model, sample, CHECK_TOKENS)
    generation = getattr(model, "generation_config", None)
    eos = _eos_ids(processor, generation)
    plan = PtePlan(family, dtype, quant, max_seq_len, size, int(image_token_id), n_image,
                   int(model.get_input_embeddings().weight.shape[0]), eos, len(shapes),
                   [s.num_kv_heads for s in shapes], [s.head_dim for s in shapes], notes, settings, resize)
    metadata = {"get_max_seq_len": max_seq_len, "get_max_context_len": max_seq_len,
                "get_vocab_size": plan.vocab_size, "get_eos_ids": eos, "use_kv_cache": True,
                "enable_dynamic_shape": True, "use_sdpa_with_kv_cache": False}
    bos = getattr(getattr(processor, "tokenizer", processor), "bos_token_id", None)
    if bos is not None:
        metadata["get_bos_id"] = int(bos)

    timings: dict[str, float] = {}
    from tqdm.auto import tqdm

    steps = ["export vision_encoder", "export token_embedding", "export text_decoder", "lower to XNNPACK",
             "serialize", "check in the ExecuTorch runtime"]
    bar = tqdm(total=len(steps), desc="executorch", unit="step")
    clock = {"step": None, "t": time.perf_counter()}

    def progress(step: str) -> None:
        now = time.perf_counter()
        if clock["step"] is not None:
            timings[clock["step"]] = round(now - clock["t"], 2)
            bar.update(1)
        clock.update(step=step, t=now)
        bar.set_postfix_str(step)

    try:
        modules = _modules(model, adapter, shapes, max_seq_len, size)
        try:
            programs = _export(modules, sample, max_seq_len, progress)
            buffer = _lower(programs, metadata, progress)
        except Exception as exc:  # noqa: BLE001 - torch.export / ExecuTorch's own errors: refused, named
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise VlmpruneError(f"{clock['step']} failed for this model ({type(exc).__name__}: {message}); "
                                f"nothing was written") from exc
        progress("check in the ExecuTorch runtime")
        record: dict = {"vlmprune": __version__, "source": str(model_dir), "format": "executorch",
                        "file": PTE_FILE, **asdict(plan), "methods": list(METHODS),
                        "metadata": metadata, "backend": "XNNPACK", "quantization": quant_record}
        with atomic_output_dir(output, overwrite=overwrite, inputs=[("input model", model_dir)]) as tmp:
            (tmp / PTE_FILE).write_bytes(buffer)
            processor.save_pretrained(tmp)
            model.config.save_pretrained(tmp)  # what the processor files name (no weights: those are in the .pte)
            runner = PteModel(tmp, runtime=Runtime, image_token_id=plan.image_token_id, processor=processor)
            missing = set(METHODS) - set(runner.program.method_names)
            if missing:
                raise VlmpruneError(f"the lowered program lacks {sorted(missing)}; nothing was written")
            logits, tokens = runner.prompt_logits_and_tokens(sample, CHECK_TOKENS)
            check = {"prompt_tokens": int(sample["input_ids"].shape[1]), "image_tokens": n_image,
                     "rel_diff": rel_diff(logits, exported_logits), "tokens": tokens, "pytorch_tokens": exported_tokens,
                     "rel_diff_vs_float32": rel_diff(logits, float_logits),
                     "tokens_match_float32": tokens == float_tokens}
            exact = dtype == "float32" and quant == "none"
            if exact:
                tol = TOLERANCE["float32"]
            else:  # the reduced eager model's own move from float32 (see TOLERANCE)
                check["reduced_rel_diff_vs_float32"] = rel_diff(exported_logits, float_logits)
                tol = max(TOLERANCE["reduced"], REDUCED_SLACK * check["reduced_rel_diff_vs_float32"])
            check["tolerance"] = tol
            if not check["rel_diff"] <= tol or (exact and tokens != exported_tokens):
                raise VlmpruneError(
                    f"the ExecuTorch program does not reproduce the PyTorch model on the sample prompt (logits rel. "
                    f"diff {check['rel_diff']:.2e}, tolerance {tol:.1e}; greedy tokens {tokens} vs "
                    f"{exported_tokens}); nothing was published. Please report it with the model's config.json")
            timings["check in the ExecuTorch runtime"] = round(time.perf_counter() - clock["t"], 2)
            bar.update(1)
            record.update(check=check, timings_s=timings, bytes=(tmp / PTE_FILE).stat().st_size,
                          files=sorted(p.name for p in tmp.iterdir() if not p.name.startswith(".")) + [RECORD_FILE])
            (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    finally:
        bar.close()
    record["output"] = str(Path(output).resolve())
    return record


def _eos_ids(processor, generation) -> list[int]:
    ids: list[int] = []
    for source in (getattr(generation, "eos_token_id", None),
                   getattr(getattr(processor, "tokenizer", processor), "eos_token_id", None)):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids
