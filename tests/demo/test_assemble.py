"""The assembled demo checkpoint: plain transformers on reload, stable language model answers."""

import json

import pytest

from .conftest import require_demo_extras

PROMPT = "What is the capital of France?"
# Greedy answer of SmolLM2-135M-Instruct (GGUF Q4_1 de-quantized) with its own chat template.
RECORDED_ANSWER = "The capital of France is Paris."


def test_language_model_greedy_answer_is_stable():
    require_demo_extras("gguf", "torch", "transformers")
    from vlmprune.demo.assemble import load_language_model

    model, tokenizer = load_language_model()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip() == RECORDED_ANSWER


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory):
    require_demo_extras("gguf", "onnx", "torch", "transformers")
    from vlmprune.demo.assemble import build_demo_model

    root = tmp_path_factory.mktemp("demo")
    path = build_demo_model(root / "demo", weights_dir=root / "no-weights")
    assert build_demo_model(root / "demo", weights_dir=root / "no-weights") == path  # cached
    assert sorted(p.name for p in root.iterdir()) == ["demo"]  # no temporary left behind
    return path


@pytest.fixture(scope="module")
def reloaded(untrained_checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(untrained_checkpoint).eval()
    return model, AutoProcessor.from_pretrained(untrained_checkpoint)


def test_checkpoint_is_plain_transformers(untrained_checkpoint, reloaded):
    import torch
    from PIL import Image

    from vlmprune.demo.assemble import NUM_IMAGE_TOKENS

    config = json.loads((untrained_checkpoint / "config.json").read_text())
    assert "quantization_config" not in json.dumps(config)
    assert not list(untrained_checkpoint.glob("*.bin")) and list(untrained_checkpoint.glob("*.safetensors"))
    model, processor = reloaded
    assert type(model).__name__ == "LlavaForConditionalGeneration"

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.count("<image>") == 1 and text.endswith("<|im_start|>assistant\n")
    inputs = processor(text=[text], images=[Image.new("RGB", (64, 64), "red")], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == NUM_IMAGE_TOKENS
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_untrained_checkpoint_keeps_the_language_model(reloaded):
    import torch

    from vlmprune.demo.assemble import load_language_model

    model, processor = reloaded
    base, _ = load_language_model()
    text = processor.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor.tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        want = base.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert got.tolist() == want.tolist()


def test_evaluate_runs_on_the_checkpoint(reloaded, tmp_path):
    require_demo_extras("sklearn")
    from vlmprune.demo.datasets import write_digits
    from vlmprune.evaluate.tasks import evaluate

    model, processor = reloaded
    write_digits(tmp_path / "digits", limit=3)
    result = evaluate(model, processor, tasks=["digits"], data_dir=tmp_path, batch_size=2, max_new_tokens=4)
    digits = result["tasks"]["digits"]
    assert digits["count"] == 3 and set(digits["per_type"]) == {"digit"}
    assert len(digits["examples"]) == 3 and all(isinstance(e["prediction"], str) for e in digits["examples"])
    assert json.loads(json.dumps(result)) == result
