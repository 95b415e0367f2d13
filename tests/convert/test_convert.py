"""`vlmprune convert`: Bunny and Mini-InternVL-Chat against logits their ORIGINAL code produced.

The reference fixtures (tiny models built and run with the original remote code, see
``<repo>/../shared/fixtures/seed-families/README.md``) hold the original checkpoints, inputs and
logits; ``VLMPRUNE_SEED_FIXTURES`` points elsewhere. Without them these tests skip, saying why.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from checks import assert_close, check_config
from reference import skipped, zeroed
from safetensors.torch import load_file, save_file

import vlmprune
from vlmprune.cli import main
from vlmprune.errors import UnsupportedModelError, VlmpruneError
from vlmprune.planning.plan import PruningPlan

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(os.environ.get("VLMPRUNE_SEED_FIXTURES", REPO.parent / "shared" / "fixtures" / "seed-families"))
pytestmark = pytest.mark.skipif(
    not (FIXTURES / "bunny" / "model.safetensors").is_file(),
    reason=f"seed-family reference fixtures not found at {FIXTURES} (set VLMPRUNE_SEED_FIXTURES)",
)

BUNNY_IMAGE_INDEX = -200  # the original's IMAGE_TOKEN_INDEX
BUNNY_TOKENS_PER_IMAGE = 729  # 27 x 27 SigLIP patches at 384 px / 14
INTERNVL_IMAGE_TOKEN_ID = 93  # <IMG_CONTEXT> of the tiny InternVL vocabulary (internvl/README.md)
REL_TOL = 1e-4  # the bound: max |converted - original| <= 1e-4 * max |original|


def writable_copy(src: Path, dst: Path) -> Path:
    """A copy of a (read-only) fixture folder that a test may edit."""
    shutil.copytree(src, dst)
    for path in [dst, *dst.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    return dst


def load_eager(path) -> torch.nn.Module:
    """The converted checkpoint through plain transformers, fp32, eager attention (as the fixtures ran)."""
    model, info = transformers.AutoModelForImageTextToText.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def bunny_inputs(image_token_id: int) -> tuple[dict, torch.Tensor]:
    """The fixture's inputs as the native LLaVA takes them: each -200 becomes 729 image-token ids."""
    raw = load_file(FIXTURES / "bunny" / "inputs.safetensors")
    pixels = ((raw["pixel_values_u8_96"].float() - 128) / 128).repeat_interleave(4, 2).repeat_interleave(4, 3)
    rows, masks = [], []
    for ids, mask in zip(raw["input_ids"].tolist(), raw["attention_mask"].tolist()):
        row, m = [], []
        for token, keep in zip(ids, mask):
            n = BUNNY_TOKENS_PER_IMAGE if token == BUNNY_IMAGE_INDEX else 1
            row += [image_token_id if token == BUNNY_IMAGE_INDEX else token] * n
            m += [keep] * n
        rows.append(row)
        masks.append(m)
    inputs = {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks), "pixel_values": pixels}
    return inputs, inputs["attention_mask"].bool()


def internvl_inputs(prefix: str = "") -> tuple[dict, torch.Tensor]:
    raw = load_file(FIXTURES / "internvl" / "inputs.safetensors")
    inputs = {k: raw[prefix + k] for k in ("input_ids", "attention_mask", "pixel_values")}
    return inputs, inputs["attention_mask"].bool()


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def relative_error(actual: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    diff = (actual - expected).abs()[mask].max().item()
    return diff, diff / expected[mask].abs().max().item()


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """Both fixtures converted once through the command line."""
    root = tmp_path_factory.mktemp("converted")
    out = {"bunny": root / "bunny", "internvl": root / "internvl"}
    assert main(["convert", "--from", "bunny", str(FIXTURES / "bunny"), "--output", str(out["bunny"])]) == 0
    assert main(["convert", "--from", "internvl-chat", str(FIXTURES / "internvl"), "--image-token-id",
                 str(INTERNVL_IMAGE_TOKEN_ID), "--output", str(out["internvl"])]) == 0
    return out


def test_bunny_logits_equal_the_original(converted):
    model = load_eager(converted["bunny"])
    record = json.loads((converted["bunny"] / "conversion.json").read_text())
    expected = load_file(FIXTURES / "bunny" / "outputs.safetensors")
    inputs, mask = bunny_inputs(record["image_token_id"])
    # the fixture has no tokenizer: the image token gets a new row after the 100 original ones
    assert record["image_token_id"] == 100 and model.config.text_config.vocab_size == 101
    assert model.generation_config.suppress_tokens == [100]
    assert torch.equal(mask, expected["expanded_attention_mask"].bool())  # lengths 740 and 737
    assert model.config.vision_config.num_hidden_layers == 2  # the tower's 3 minus its last
    got = logits(model, inputs)[..., :100]  # the original vocabulary
    for row in range(2):
        diff, rel = relative_error(got[row], expected["logits"][row], mask[row])
        print(f"bunny row {row}: max abs {diff:.2e}, rel {rel:.2e}")
        assert rel <= REL_TOL


@pytest.mark.parametrize("prefix", ["", "short_"], ids=["long-rope-branch", "short-rope-branch"])
def test_internvl_logits_equal_the_original(converted, prefix):
    model = load_eager(converted["internvl"])
    assert model.config.text_config.rope_parameters["rope_type"] == "longrope"
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()  # not tied
    inputs, mask = internvl_inputs(prefix)
    expected = load_file(FIXTURES / "internvl" / "outputs.safetensors")[prefix + "logits"]
    diff, rel = relative_error(logits(model, inputs), expected, mask)
    print(f"internvl {prefix or 'long '}: max abs {diff:.2e}, rel {rel:.2e}")
    assert rel <= REL_TOL


def test_internvl_v1_pixel_shuffle_is_refused(tmp_path, capsys):
    out = tmp_path / "v1"
    assert main(["convert", "--from", "internvl-chat", str(FIXTURES / "internvl-v1"), "--image-token-id", "93",
                 "--output", str(out)]) == 2
    assert "ps_version = 'v1'" in capsys.readouterr().err.replace("\n", " ")
    assert not out.exists() and not list(tmp_path.glob(".v1*"))


def test_fused_query_key_value_of_the_first_bunny_release(tmp_path):
    """6986cac's Phi kept one ``query_key_value`` with rows [h0 q | h0 k | h0 v | h1 q | ...]."""
    src = writable_copy(FIXTURES / "bunny", tmp_path / "bunny-6986cac")
    state = load_file(src / "model.safetensors")
    heads = json.loads((src / "config.json").read_text())["num_attention_heads"]
    for layer in range(2):
        prefix = f"model.layers.{layer}.self_attn."
        for kind in ("weight", "bias"):
            parts = [state.pop(f"{prefix}{p}_proj.{kind}") for p in "qkv"]
            per_head = [p.reshape(heads, -1, *p.shape[1:]) for p in parts]
            state[f"{prefix}query_key_value.{kind}"] = torch.stack(per_head, 1).reshape(-1, *parts[0].shape[1:])
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "native"
    assert main(["convert", "--from", "bunny", str(src), "--output", str(out)]) == 0
    assert json.loads((out / "conversion.json").read_text())["fused_qkv_split"] is True
    inputs, mask = bunny_inputs(100)
    expected = load_file(FIXTURES / "bunny" / "outputs.safetensors")["logits"]
    assert relative_error(logits(load_eager(out), inputs)[..., :100], expected, mask)[1] <= REL_TOL


def _edit_config(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    for key, value in changes.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    path.write_text(json.dumps(config))


def _add_tensor(path: Path, name: str, tensor: torch.Tensor) -> None:
    state = load_file(path)
    state[name] = tensor
    save_file(state, path, metadata={"format": "pt"})


REFUSALS = {
    "bunny-projector": ("bunny", lambda d: _edit_config(d / "config.json", mm_projector_type="linear"),
                        "mm_projector_type = 'linear'"),
    "bunny-lm-head-bias": ("bunny", lambda d: _add_tensor(d / "model.safetensors", "lm_head.bias", torch.zeros(100)),
                           "lm_head.bias"),
    "bunny-vision-depth": ("bunny", lambda d: _edit_config(d / "siglip-tiny-patch14-384" / "config.json",
                                                           num_hidden_layers=4), "vision depth"),
    "bunny-aspect-ratio": ("bunny", lambda d: _edit_config(d / "config.json", image_aspect_ratio="anyres"),
                           "image_aspect_ratio"),
    "internvl-rope": ("internvl", lambda d: _edit_config(d / "config.json", **{"llm_config.rope_scaling.type": "yarn"}),
                      "rope_scaling.type = 'yarn'"),
    "internvl-lm-head-bias": ("internvl", lambda d: _add_tensor(d / "model.safetensors", "language_model.lm_head.bias",
                                                                torch.zeros(100)), "lm_head.bias"),
    "internvl-vision-depth": ("internvl", lambda d: _edit_config(d / "config.json",
                                                                 **{"vision_config.num_hidden_layers": 3}),
                              "vision depth"),
    "internvl-llm": ("internvl", lambda d: _edit_config(d / "config.json",
                                                        **{"llm_config.architectures": ["InternLM2ForCausalLM"]}),
                     "llm_config.architectures"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_what_cannot_be_expressed_is_refused_by_name(case, tmp_path, capsys):
    folder, edit, message = REFUSALS[case]
    src = writable_copy(FIXTURES / folder, tmp_path / "src")
    edit(src)
    family = "bunny" if folder == "bunny" else "internvl-chat"
    out = tmp_path / "out"
    assert main(["convert", "--from", family, str(src), "--image-token-id", "93", "--output", str(out)]
                if family == "internvl-chat" else ["convert", "--from", family, str(src), "--output", str(out)]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")
    assert not out.exists()


@pytest.mark.parametrize("folder, family", [("bunny", "bunny"), ("internvl", "internvl-chat")])
def test_prune_and_load_name_the_convert_command(folder, family, tmp_path, capsys):
    src = FIXTURES / folder
    with pytest.raises(UnsupportedModelError, match=f"vlmprune convert --from {family} {src}"):
        vlmprune.load(src)
    assert main(["prune", "--model", str(src), "--method", "layer", "--ratio", "0.2", "--criterion", "last",
                 "--output", str(tmp_path / "out")]) == 2
    assert f"vlmprune convert --from {family}" in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "out").exists()


def test_a_cached_hub_id_of_a_convertible_family_is_named(tmp_path, monkeypatch):
    """A hub id is recognised from the hub cache (no network): the error says how to download and convert."""
    import huggingface_hub.constants

    snapshot = tmp_path / "models--BAAI--Bunny-v1_0-3B" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    shutil.copy(FIXTURES / "bunny" / "config.json", snapshot / "config.json")
    (tmp_path / "models--BAAI--Bunny-v1_0-3B" / "refs").mkdir()
    (tmp_path / "models--BAAI--Bunny-v1_0-3B" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnsupportedModelError, match="hf download BAAI/Bunny-v1_0-3B --local-dir Bunny-v1_0-3B-src "
                       "&& vlmprune convert --from bunny Bunny-v1_0-3B-src --output Bunny-v1_0-3B-native"):
        vlmprune.load("BAAI/Bunny-v1_0-3B")


def test_wrong_family_is_named(tmp_path):
    with pytest.raises(VlmpruneError, match="use --from internvl-chat"):
        vlmprune.convert.convert("bunny", FIXTURES / "internvl", tmp_path / "out")


PRUNE_CASES = [("bunny", "width", "magnitude"), ("bunny", "layer", "last"),
               ("internvl", "width", "magnitude"), ("internvl", "layer", "last")]


@pytest.mark.parametrize("name, method, criterion", PRUNE_CASES)
def test_converted_model_prunes_saves_and_reloads(converted, name, method, criterion, tmp_path):
    """``vlmprune prune --ratio 0.2`` on a converted fixture equals the zeroed / skipped original."""
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(converted[name]), "--method", method, "--ratio", "0.2",
                 "--criterion", criterion, "--output", str(out)]) == 0
    plan = PruningPlan.load(out / "pruning_plan.json")
    original = load_eager(converted[name])
    if name == "bunny":
        inputs, mask = bunny_inputs(original.config.image_token_id)
    else:
        inputs, mask = internvl_inputs()
    if method == "width":
        assert plan.layers and not plan.drop_layers
        reference = zeroed(original, plan)
    else:
        assert plan.drop_layers and not plan.layers
        reference = skipped(original, plan.drop_layers)
    saved = json.loads((out / "config.json").read_text())["text_config"]
    if saved.get("vlmprune_layer_widths"):
        # Phi-3's longrope check derives the rotary size from hidden_size // num_attention_heads
        # (not head_dim), so fewer heads cannot be written as a stock config: vlmprune.load builds it
        assert method == "width" and saved["rope_parameters"]["rope_type"] == "longrope"
        # transformers' shape-mismatch refusal, not another failure
        with pytest.raises(RuntimeError, match=r"You set `ignore_mismatched_sizes` to `False`, thus raising an error"):
            transformers.AutoModelForImageTextToText.from_pretrained(str(out))
        pruned = vlmprune.load(out, dtype=torch.float32, attn_implementation="eager")
    else:
        pruned = load_eager(out)  # a stock checkpoint: no missing, unexpected or mismatched keys
    check_config(pruned)
    assert pruned.num_parameters() < original.num_parameters()
    mask = mask[..., None].expand(-1, -1, pruned.config.text_config.vocab_size)
    assert_close(logits(pruned, inputs)[mask], logits(reference, inputs)[mask])


# --------------------------------------------------------------------------- processors
# The expected values below follow the ORIGINAL preprocessing as written in the projects' code,
# computed here with PIL/numpy/tokenizers only (never with vlmprune or a transformers processor).


def _word_tokenizer(words: list[str], specials: list[str], fixed: dict[str, int], bos: str | None = None):
    """A small word-level tokenizer (ids < the fixtures' vocabulary of 100) saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = dict(fixed)
    free = (i for i in range(1000) if i not in fixed.values())
    for word in ["[UNK]", *specials, *words]:
        vocab.setdefault(word, next(free))
    for i in range(max(vocab.values())):  # no gaps: ids run 0..N-1 as in a real vocabulary
        if i not in vocab.values():
            vocab[f"[unused{i}]"] = i
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos is not None:  # a Llama-style tokenizer: BOS before every encoded text
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", additional_special_tokens=specials,
                                   **({"bos_token": bos} if bos else {}))


def _test_image(width: int, height: int, seed: int = 7):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def test_bunny_processor_matches_the_original_preprocessing(tmp_path):
    from PIL import Image
    from tokenizers import Tokenizer, pre_tokenizers

    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the user's questions.")
    question = "What colour is the square?"
    pieces = pre_tokenizers.Whitespace().pre_tokenize_str(f"{system} USER: ASSISTANT: {question}")
    words = sorted({w for w, _ in pieces})
    src = writable_copy(FIXTURES / "bunny", tmp_path / "bunny")
    _word_tokenizer(words, ["<|endoftext|>"], {}).save_pretrained(src)
    original = Tokenizer.from_file(str(src / "tokenizer.json"))
    out = tmp_path / "native"
    assert main(["convert", "--from", "bunny", str(src), "--output", str(out)]) == 0
    processor = transformers.AutoProcessor.from_pretrained(out)

    # conv_bunny.get_prompt() (bunny/conversation.py, SeparatorStyle.TWO) for one question + image
    prompt = f"{system} USER: <image>\n{question} ASSISTANT:"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == prompt
    follow_up = messages + [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
                            {"role": "user", "content": [{"type": "text", "text": "Why?"}]}]
    assert processor.apply_chat_template(follow_up, add_generation_prompt=True) == (
        f"{system} USER: <image>\n{question} ASSISTANT: Red.<|endoftext|>USER: Why? ASSISTANT:")

    image = _test_image(50, 30)
    got = processor(images=image, text=prompt, return_tensors="pt")
    # tokenizer_image_token: the chunks around <image> tokenized separately, -200 between them; the
    # native model takes one <image> id (the next free id) per image feature instead of -200
    image_id = original.get_vocab_size()
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == image_id
    before, after = (original.encode(chunk).ids for chunk in prompt.split("<image>"))
    expected_ids = before + [image_id] * BUNNY_TOKENS_PER_IMAGE + after
    assert got["input_ids"][0].tolist() == expected_ids

    # process_images with image_aspect_ratio "pad": expand2square with int(0.5 * 255) = 127 grey,
    # the pasted image centred; SigLipImageProcessor: 384x384 bicubic, * 1/255, (x - 0.5) / 0.5
    square = Image.new("RGB", (50, 50), (127, 127, 127))
    square.paste(image, (0, (50 - 30) // 2))
    pixels = np.asarray(square.resize((384, 384), Image.BICUBIC)).astype(np.float32) * np.float32(1 / 255)
    expected_pixels = torch.from_numpy(((pixels - 0.5) / 0.5).transpose(2, 0, 1).copy())[None]
    assert got["pixel_values"].shape == (1, 3, 384, 384)
    torch.testing.assert_close(got["pixel_values"], expected_pixels, rtol=0, atol=1e-6)


def _closest_tiling(width: int, height: int, tile: int, min_num: int, max_num: int) -> tuple[int, int]:
    """InternVL's find_closest_aspect_ratio (over dynamic_preprocess's candidate grids)."""
    ratios = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if min_num <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    best, best_diff = (1, 1), float("inf")
    for ratio in ratios:
        diff = abs(width / height - ratio[0] / ratio[1])
        if diff < best_diff:
            best, best_diff = ratio, diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * ratio[0] * ratio[1]:
            best = ratio
    return best


def test_internvl_processor_matches_the_original_preprocessing(tmp_path, monkeypatch):
    from PIL import Image
    from tokenizers import Tokenizer, pre_tokenizers

    from vlmprune.convert.internvl_chat import SYSTEM_MESSAGE

    question = "What is in the picture?"
    fixed = {"<s>": 1, "<|endoftext|>": 80, "<img>": 91, "</img>": 92, "<IMG_CONTEXT>": 93}  # internvl/meta.json
    specials = ["<|system|>", "<|end|>", "<|user|>", "<|assistant|>", "<img>", "</img>", "<IMG_CONTEXT>"]
    words = sorted({w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(f"{SYSTEM_MESSAGE} {question}")})
    src = writable_copy(FIXTURES / "internvl", tmp_path / "internvl")
    _word_tokenizer(words, specials, fixed, bos="<s>").save_pretrained(src)
    original = Tokenizer.from_file(str(src / "tokenizer.json"))
    out = tmp_path / "native"
    assert main(["convert", "--from", "internvl-chat", str(src), "--output", str(out)]) == 0  # id from tokenizer
    assert json.loads((out / "conversion.json").read_text())["image_token_id"] == INTERNVL_IMAGE_TOKEN_ID
    # chat() stops at EOS and at the template's separator
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [80, original.token_to_id("<|end|>")]
    # InternVLProcessor needs torchvision for its video part only; build it from the saved parts
    # with no video processor (this image + text path never touches it)
    from transformers import AutoTokenizer, GotOcr2ImageProcessorPil, InternVLProcessor
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    monkeypatch.setattr(ProcessorMixin, "check_argument_for_proper_class",
                        lambda self, name, arg: None if arg is None else check(self, name, arg))
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessorPil.from_pretrained(out), tokenizer=AutoTokenizer.from_pretrained(out),
        video_processor=None, chat_template=(out / "chat_template.jinja").read_text(),
        **{k: v for k, v in json.loads((out / "processor_config.json").read_text()).items() if k != "processor_class"})

    image = _test_image(100, 45)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    follow_up = messages + [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
                            {"role": "user", "content": [{"type": "text", "text": "Why?"}]}]
    # MPT style: system_template + sep, then role + message + sep per turn (the image placeholder
    # here is the native one, <IMG_CONTEXT>, which the processor expands like chat() expands <image>)
    assert processor.apply_chat_template(follow_up, add_generation_prompt=True) == (
        f"<|system|>\n{SYSTEM_MESSAGE}<|end|><|user|>\n<IMG_CONTEXT>\n{question}<|end|><|assistant|>\nA cat.<|end|>"
        f"<|user|>\nWhy?<|end|><|assistant|>\n")
    got = processor(images=image, text=text, return_tensors="pt")

    # load_image(): dynamic_preprocess with the config's 56-px tiles, 1..12 tiles and a thumbnail
    tile = 56
    cols, rows = _closest_tiling(100, 45, tile, 1, 12)
    assert (cols, rows) == (2, 1)
    resized = image.resize((cols * tile, rows * tile), Image.BICUBIC)
    tiles = [resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
             for r in range(rows) for c in range(cols)]
    tiles.append(image.resize((tile, tile), Image.BICUBIC))
    # build_transform: ToTensor (x / 255) then Normalize with the ImageNet mean / std
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    expected_pixels = torch.stack([torch.from_numpy(
        ((np.asarray(t).astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1).copy()) for t in tiles])
    torch.testing.assert_close(got["pixel_values"], expected_pixels, rtol=0, atol=1e-6)

    # chat(): the phi3-chat template (MPT style), "<image>\n" before the question, then <image> ->
    # <img> + <IMG_CONTEXT> x (4 tokens per tile x tiles) + </img>; the tokenizer adds BOS
    context = "<IMG_CONTEXT>" * 4 * len(tiles)
    query = (f"<|system|>\n{SYSTEM_MESSAGE}<|end|><|user|>\n<img>{context}</img>\n{question}<|end|>"
             f"<|assistant|>\n")
    assert got["input_ids"][0].tolist() == original.encode(query).ids


@pytest.mark.parametrize("perturb", [False, True], ids=["tower-equals-checkpoint", "tower-differs"])
def test_bunny_takes_the_vision_weights_from_the_tower_like_the_original(tmp_path, perturb):
    """With the tower's own weights at hand, they win (the original reloads the tower from them)."""
    src = writable_copy(FIXTURES / "bunny", tmp_path / "bunny")
    prefix = "model.vision_tower.vision_tower."
    state = load_file(src / "model.safetensors")
    tower = {k[len(prefix):]: v.clone() for k, v in state.items() if k.startswith(prefix)}
    gen = torch.Generator().manual_seed(5)
    for name, value in list(tower.items()):  # the layer and head the original deletes on loading
        if ".layers.1." in name:
            tower[name.replace(".layers.1.", ".layers.2.")] = torch.randn(value.shape, generator=gen)
    tower["vision_model.head.probe"] = torch.randn(1, 1, 32, generator=gen)
    changed = "vision_model.encoder.layers.0.mlp.fc1.weight"
    if perturb:
        tower[changed] = tower[changed] + 0.5
    save_file(tower, src / "siglip-tiny-patch14-384" / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "native"
    assert main(["convert", "--from", "bunny", str(src), "--output", str(out)]) == 0
    record = json.loads((out / "conversion.json").read_text())
    model = load_eager(out)
    native = model.model.vision_tower.encoder.layers[0].mlp.fc1.weight
    assert torch.equal(native, tower[changed])
    if perturb:
        assert "differs in 1 tensor(s), e.g. encoder.layers.0.mlp.fc1.weight" in record["vision_weights"]
    else:
        assert record["vision_weights"] == "tower's own weights (equal to the checkpoint's copy)"
        inputs, mask = bunny_inputs(100)
        expected = load_file(FIXTURES / "bunny" / "outputs.safetensors")["logits"]
        assert relative_error(logits(model, inputs)[..., :100], expected, mask)[1] <= REL_TOL


def test_converted_bunny_with_tokenizer_takes_calibrated_pruning(tmp_path):
    """The converted processor and chat template feed vlmprune's own collator (answer-only labels)."""
    from tiny_data import write_llava_dataset

    src = writable_copy(FIXTURES / "bunny", tmp_path / "bunny")
    _word_tokenizer(["What", "is", "the", "colour", "?", "red"], ["<|endoftext|>"], {}).save_pretrained(src)
    data = write_llava_dataset(tmp_path / "data", 4)
    native = tmp_path / "native"
    assert main(["convert", "--from", "bunny", str(src), "--output", str(native)]) == 0
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(native), "--method", "width", "--ratio", "0.2", "--criterion", "taylor",
                 "--calibration", str(data), "--image-folder", str(tmp_path / "data" / "images"),
                 "--num-samples", "4", "--output", str(out)]) == 0
    plan = json.loads((out / "pruning_plan.json").read_text())
    assert json.loads((out / "run.json").read_text())["prune"]["criterion"] == "taylor" and plan["layers"]
    check_config(load_eager(out))
    assert transformers.AutoProcessor.from_pretrained(out).tokenizer.convert_tokens_to_ids("<image>") == \
        load_eager(out).config.image_token_id


def test_sharded_checkpoint(tmp_path):
    """Real checkpoints come in shards listed by model.safetensors.index.json."""
    src = writable_copy(FIXTURES / "internvl", tmp_path / "internvl")
    state = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, src / file, metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}))
    out = tmp_path / "native"
    assert main(["convert", "--from", "internvl-chat", str(src), "--image-token-id", "93", "--output", str(out)]) == 0
    inputs, mask = internvl_inputs()
    expected = load_file(FIXTURES / "internvl" / "outputs.safetensors")["logits"]
    assert relative_error(logits(load_eager(out), inputs), expected, mask)[1] <= REL_TOL
