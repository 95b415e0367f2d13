"""Median optimizer-step time of recovery training: SFT alone vs SFT + hidden + logit distillation.

    OMP_NUM_THREADS=1 python benchmarks/recover_step.py [--steps 8] [--seq 128] [--batch 1]

The model is SmolLM2-135M-shaped (30 layers, hidden 576, 9 heads / 3 kv heads, MLP 1536,
vocabulary 49152, tied embeddings) behind a DINOv2-small vision tower at 56 px (17 image tokens),
as in the demo, with random weights. The student drops 6 layers (layerwise, 20% of the language
model's layers); the teacher is the unpruned model. Steps run through RecoveryTrainer itself,
on the same fixed batch; the first two steps of each run are warm-up and not counted.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
import transformers

from vlmprune.planning.plan import PruningPlan
from vlmprune.prune import apply_plan_
from vlmprune.recover.run import hidden_pairs
from vlmprune.recover.trainable import set_trainable_
from vlmprune.recover.trainer import RecoveryTrainer

IMAGE_ID = 49151
WARMUP = 2


def smollm2_llava() -> transformers.LlavaForConditionalGeneration:
    text = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                                    tie_word_embeddings=True, rope_theta=100000.0)
    vision = transformers.Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                       intermediate_size=1536, image_size=56, patch_size=14, layer_norm_eps=1e-6)
    config = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_ID,
                                      vision_feature_select_strategy="full", vision_feature_layer=-1,
                                      image_seq_length=17, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlavaForConditionalGeneration(config).eval()


def batch(seq: int, size: int) -> dict[str, torch.Tensor]:
    """Prompt (with 17 image tokens) then an answer over the last quarter of the sequence."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49000, (size, seq), generator=gen)
    ids[:, 4:21] = IMAGE_ID
    labels = torch.full_like(ids, -100)
    labels[:, -seq // 4:] = ids[:, -seq // 4:]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(size, 3, 56, 56, generator=gen)}


class StepTimer(transformers.TrainerCallback):
    def __init__(self):
        self.times, self._start = [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def median_step(teacher, weights: dict[str, float], steps: int, data: dict, train: str) -> float:
    student = apply_plan_(copy.deepcopy(teacher), PruningPlan(drop_layers=list(range(20, 26))))
    model = set_trainable_(student, train)
    pairs = hidden_pairs(student, teacher, PruningPlan(drop_layers=list(range(20, 26))), "all") \
        if "hidden" in weights else ([], [], [])
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        args = transformers.TrainingArguments(output_dir=tmp, max_steps=steps + WARMUP, per_device_train_batch_size=1,
                                              learning_rate=1e-5, save_strategy="no", report_to="none",
                                              disable_tqdm=True, logging_steps=10**6, use_cpu=True)
        trainer = RecoveryTrainer(model=model, args=args, train_dataset=[data] * (steps + WARMUP),
                                  data_collator=lambda rows: rows[0], callbacks=[timer],
                                  teacher=teacher if set(weights) - {"sft"} else None, weights=weights,
                                  image_token_id=IMAGE_ID, student_layers=pairs[0], teacher_layers=pairs[1])
        trainer.train()
    return statistics.median(timer.times[WARMUP:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--train", default="all", choices=["projector", "lm", "lora", "all"])
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    teacher = smollm2_llava()
    data = batch(args.seq, args.batch)
    sft = median_step(teacher, {"sft": 1.0}, args.steps, data, args.train)
    kd = median_step(teacher, {"sft": 1.0, "hidden": 1.0, "logits": 1.0}, args.steps, data, args.train)
    print(f"SmolLM2-135M-shaped LLaVA, student 24/30 layers, batch {args.batch} x {args.seq} tokens, "
          f"--train {args.train}, {torch.get_num_threads()} thread(s), median of {args.steps} steps")
    print(f"sft                  {sft * 1000:9.1f} ms/step")
    print(f"sft+hidden+logits    {kd * 1000:9.1f} ms/step")
    print(f"ratio                {kd / sft:9.2f}x   (target <= 1.5x)")


if __name__ == "__main__":
    main()
