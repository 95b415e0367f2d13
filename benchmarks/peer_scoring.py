"""Scoring time of the peer tools (LLM-Pruner's Taylor, ShortGPT's block influence), run from their own code.

Runs the peer's own script/module in a child process of a separate venv (the peers need an older
transformers than vlmprune), with the timing taken by wrapping the peer's own functions, so that
vlmprune's ``benchmarks/prune_cost.py --command`` rows and the peer rows can come from one run on one
machine and be compared as a ratio.

Setup (nothing here goes into vlmprune's .venv):

    python3.11 -m venv /tmp/peer-venv
    /tmp/peer-venv/bin/pip install torch==2.13.0          # the CPU build; never a looser spec
    /tmp/peer-venv/bin/pip install transformers==4.43.4 accelerate datasets sentencepiece "numpy<2"
    # LLM-Pruner's GQA path (llama3.py, July 2024) predates transformers 4.44; 4.43.4 is the last 4.43.
    # the peers' checkouts, e.g. from git: horseee/LLM-Pruner (128a07d) and icip-cas/ShortGPT (9a2ee8d)

    # a LlamaForCausalLM with SmolLM2-135M's shape, random weights, fp32, the benchmark's tokenizer:
    /tmp/peer-venv/bin/python benchmarks/peer_scoring.py build-model \
        --tokenizer-from /tmp/peerbench/model-smollm2-135m --out /tmp/peerbench/llama-smollm2-135m

    # one measurement (a fresh child process; appends a JSON row):
    /tmp/peer-venv/bin/python benchmarks/peer_scoring.py run --peer llm-pruner --checkout /tmp/llm-pruner \
        --model /tmp/peerbench/llama-smollm2-135m --calibration /tmp/peerbench/calibration.json \
        --threads 1 --jsonl benchmarks/results/peer_scoring.jsonl --label peers-same-run

Data: vlmprune's calibration.json (the benchmark's text conversations), each record's turns joined
with newlines and tokenized by the model's tokenizer; the first ``--samples`` records with at least
``--max-length`` tokens (LLM-Pruner's get_examples also keeps only texts that long), cut to that.
bookcorpus / pg19 cannot be downloaded here.

What runs, and what is patched at run time (no file of the peer is edited):

* llm-pruner: ``llama3.py`` (the GQA path; hf_prune.py's own Llama class has no GQA) run as
  ``__main__`` with ``--block_wise --pruner_type taylor --taylor param_first`` (the default), block
  layers 3..28 (range(3, 29): its default 3..31 of 32 layers, i.e. all but the first 3 and the last 1,
  adapted to 30 layers), ``--num_examples 10``, ``--pruning_ratio 0.5`` (its default),
  ``--device cpu --eval_device cpu``. Patches:
  (1) ``get_examples`` returns the tokens above instead of downloading bookcorpus;
  (2) ``from_pretrained`` loads float32 (llama3.py asks float16; vlmprune's benchmark is float32);
  (3) ``PPLMetric`` (wikitext2/ptb, after pruning) returns {} (no download).
  param_first does ONE forward/backward of the whole 10 x 64 batch, then ``pruner.step()``, which
  interleaves the importance of each group with its pruning.
  Phases: ``graph`` (MetaPruner construction: the dependency graph, one traced forward),
  ``fwd_bwd`` (get_examples returning to pruner.step starting), ``importance`` (TaylorImportance
  calls inside step), ``step`` (the whole pruner.step, importance + pruning).
  scoring = graph + fwd_bwd + importance (model loaded -> importance computed, less the data).
* shortgpt: ``shortgpt/shortgpt.py``'s ``ShortGPT`` driven as its ``run_shortgpt.py`` does (one text
  per call of ``eval_importance(prompts=[text], stride=256, max_gen_len=0)``, then ``remove_layers``).
  Patches: (1) ``from_pretrained`` loads float32 (it asks float16); (2) ``Tensor.to("cuda")`` goes
  to the CPU (eval_importance hard-codes "cuda"). The texts are the 64-token cuts decoded back to
  text (``tokens`` in the row says how many tokens ShortGPT's own tokenization gave).
  scoring = the eval_importance loop.

Each row: peer, threads, samples, max_length, wall_s and cpu_s (scoring; process CPU, all threads),
phases, whole_script (the child process from spawn to exit: interpreter, imports, load, scoring,
pruning, logging), loadavg (before, after) and uptime.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def load_texts(calibration: str) -> list[str]:
    records = json.loads(Path(calibration).read_text())
    return ["\n".join(turn["value"] for turn in r["conversations"]) for r in records]


def token_cuts(tokenizer, calibration: str, samples: int, max_length: int):
    """The first ``samples`` texts with at least ``max_length`` tokens, cut to that (as LLM-Pruner's
    get_examples keeps only texts at least seq_len long)."""
    import torch

    rows = []
    for text in load_texts(calibration):
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        if ids.numel() >= max_length:
            rows.append(ids[:max_length])
        if len(rows) == samples:
            return torch.stack(rows)
    raise SystemExit(f"fewer than {samples} calibration texts have {max_length} tokens")


class Clock:
    """Wall and process-CPU marks."""

    def __init__(self):
        self.marks: dict[str, tuple[float, float]] = {}
        self.acc: dict[str, list[float]] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = (time.perf_counter(), time.process_time())

    def span(self, a: str, b: str) -> dict:
        (wa, ca), (wb, cb) = self.marks[a], self.marks[b]
        return {"wall_s": round(wb - wa, 4), "cpu_s": round(cb - ca, 4)}

    def timed(self, name: str, fn):
        def wrapper(*args, **kwargs):
            w, c = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                acc = self.acc.setdefault(name, [0.0, 0.0, 0])
                acc[0] += time.perf_counter() - w
                acc[1] += time.process_time() - c
                acc[2] += 1
        return wrapper


def force_float32(cls) -> None:
    original = cls.from_pretrained.__func__

    def from_pretrained(klass, *args, **kwargs):
        import torch

        kwargs["torch_dtype"] = torch.float32
        return original(klass, *args, **kwargs)

    cls.from_pretrained = classmethod(from_pretrained)


def child_llm_pruner(args, clock: Clock) -> dict:
    import runpy

    import torch

    sys.path.insert(0, str(Path(args.checkout).resolve()))
    import LLMPruner.datasets.example_samples as examples
    import LLMPruner.pruner.hf_llama_pruner as llama_pruner
    import LLMPruner.torch_pruning as tp
    import transformers
    from LLMPruner.evaluator import ppl

    force_float32(transformers.LlamaForCausalLM)
    info = {}

    def get_examples(dataset, tokenizer, n_samples, seq_len=128):  # patch (1): no bookcorpus download
        clock.mark("examples_start")
        ids = token_cuts(tokenizer, args.calibration, n_samples, seq_len)
        info["examples_shape"] = list(ids.shape)
        clock.mark("examples_end")
        return ids

    examples.get_examples = get_examples
    ppl.PPLMetric = lambda *a, **k: {}  # patch (3): no wikitext2/ptb download

    Meta = tp.pruner.MetaPruner
    init, step = Meta.__init__, Meta.step

    def meta_init(self, *a, **k):
        clock.mark("graph_start")
        init(self, *a, **k)
        clock.mark("graph_end")

    def meta_step(self, *a, **k):
        clock.mark("step_start")
        out = step(self, *a, **k)
        clock.mark("step_end")
        return out

    Meta.__init__, Meta.step = meta_init, meta_step
    imp_call = llama_pruner.TaylorImportance.__call__
    llama_pruner.TaylorImportance.__call__ = clock.timed("importance", imp_call)
    load = transformers.LlamaForCausalLM.from_pretrained.__func__

    def timed_load(klass, *a, **k):
        clock.mark("load_start")
        model = load(klass, *a, **k)
        clock.mark("load_end")
        info["dtype"] = str(model.dtype)
        info["params"] = sum(p.numel() for p in model.parameters())
        return model

    transformers.LlamaForCausalLM.from_pretrained = classmethod(timed_load)

    end = args.layer_end
    sys.argv = ["llama3.py", "--base_model", args.model, "--pruning_ratio", str(args.pruning_ratio),
                "--block_wise", "--block_mlp_layer_start", "3", "--block_mlp_layer_end", str(end),
                "--block_attention_layer_start", "3", "--block_attention_layer_end", str(end),
                "--pruner_type", "taylor", "--taylor", "param_first", "--num_examples", str(args.samples),
                "--device", "cpu", "--eval_device", "cpu", "--save_ckpt_log_name", "peer_scoring"]
    os.chdir(args.workdir)  # its logger writes prune_log/ here
    clock.mark("script_start")
    runpy.run_path(str(Path(args.checkout) / "llama3.py"), run_name="__main__")
    clock.mark("script_end")
    imp_wall, imp_cpu, imp_calls = clock.acc["importance"]
    phases = {"load": clock.span("load_start", "load_end"), "graph": clock.span("graph_start", "graph_end"),
              "examples": clock.span("examples_start", "examples_end"),
              "fwd_bwd": clock.span("examples_end", "step_start"),
              "importance": {"wall_s": round(imp_wall, 4), "cpu_s": round(imp_cpu, 4), "calls": imp_calls},
              "step": clock.span("step_start", "step_end"), "script": clock.span("script_start", "script_end")}
    scoring = {k: round(phases["graph"][k] + phases["fwd_bwd"][k] + phases["importance"][k], 4)
               for k in ("wall_s", "cpu_s")}
    info["forward_backward"] = "one over the whole batch of {} x {}".format(*info["examples_shape"])
    info["layers"] = f"block_wise range(3, {end})"
    info["torch_threads"] = torch.get_num_threads()
    return {"scoring": scoring, "phases": phases, "info": info}


def child_shortgpt(args, clock: Clock) -> dict:
    import torch
    import transformers

    force_float32(transformers.AutoModelForCausalLM)
    to = torch.Tensor.to

    def to_cpu(self, *a, **k):  # patch (2): eval_importance hard-codes .to("cuda")
        if a and a[0] == "cuda" and not torch.cuda.is_available():
            a = ("cpu",) + a[1:]
        return to(self, *a, **k)

    torch.Tensor.to = to_cpu
    sys.path.insert(0, str(Path(args.checkout).resolve() / "shortgpt"))
    from shortgpt import ShortGPT

    clock.mark("load_start")
    short_model = ShortGPT(model_name=args.model, layers_path="model.layers", n_prune_layers=args.prune_layers)
    clock.mark("load_end")
    cuts = token_cuts(short_model.tokenizer, args.calibration, args.samples, args.max_length)
    prompts = [short_model.tokenizer.decode(ids) for ids in cuts]
    tokens = [len(short_model.tokenizer(p).input_ids) for p in prompts]
    clock.mark("examples_end")
    for prompt in prompts:  # as run_shortgpt.py: one text per call
        short_model.eval_importance(prompts=[prompt], stride=256, max_gen_len=0)
    clock.mark("scoring_end")
    removed = short_model.remove_layers()
    for layer_idx, module in enumerate(short_model.layers):
        module.self_attn.layer_idx = layer_idx
    clock.mark("removed")
    phases = {"load": clock.span("load_start", "load_end"), "examples": clock.span("load_end", "examples_end"),
              "scoring": clock.span("examples_end", "scoring_end"), "remove": clock.span("scoring_end", "removed")}
    info = {"tokens": tokens, "removed_layers": sorted(removed), "dtype": str(short_model.model.dtype),
            "torch_threads": torch.get_num_threads()}
    return {"scoring": phases["scoring"], "phases": phases, "info": info}


def child(args) -> None:
    clock = Clock()
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result = (child_llm_pruner if args.peer == "llm-pruner" else child_shortgpt)(args, clock)
    Path(args.result).write_text(json.dumps(result))


def git_commit(checkout: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def run(args) -> dict:
    import importlib.metadata as md

    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    result_file = Path(args.workdir) / f"result-{args.peer}.json"
    result_file.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    argv = [sys.executable, str(Path(__file__).resolve()), "child", "--result", str(result_file)]
    for key in ("peer", "checkout", "model", "calibration", "threads", "samples", "max_length", "workdir",
                "pruning_ratio", "layer_end", "prune_layers"):
        argv += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    load_before = os.getloadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0 or not result_file.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{args.peer}: the child failed (exit {proc.returncode})")
    result = json.loads(result_file.read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    row = {"label": args.label, "peer": args.peer, "repeat": args.repeat, "threads": args.threads,
           "samples": args.samples, "max_length": args.max_length,
           "wall_s": result["scoring"]["wall_s"], "cpu_s": result["scoring"]["cpu_s"],
           "whole_script": {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                            "peak_rss_mib": round(after.ru_maxrss / 1024, 1)},
           "phases": result["phases"], "info": result["info"],
           "commit": args.commit or git_commit(args.checkout),
           "versions": {p: md.version(p) for p in ("torch", "transformers", "accelerate")},
           "python": sys.version.split()[0], "loadavg": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
           "uptime": uptime}
    print(json.dumps(row))
    if args.jsonl:
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def build_model(args) -> None:
    """A LlamaForCausalLM with SmolLM2-135M's shape (vlmprune's benchmark LM), random weights, fp32."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=4096,
                         rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, hidden_act="silu",
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, torch_dtype="float32")
    out = Path(args.out)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(out, safe_serialization=True)
    src = Path(args.tokenizer_from)
    tok = json.loads((src / "tokenizer.json").read_text())
    # written by a newer tokenizers (merges as pairs); tokenizers 0.19 (what transformers 4.43 takes)
    # reads merges as "a b" strings (byte-level BPE: no token holds a space)
    tok["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    theirs = json.loads((src / "tokenizer_config.json").read_text())
    # the benchmark's tokenizer_config.json is transformers-5 style ("TokenizersBackend"); 4.43 reads
    # tokenizer.json through PreTrainedTokenizerFast with the same special tokens
    ours = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192}
    ours.update({k: theirs[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in theirs})
    (out / "tokenizer_config.json").write_text(json.dumps(ours, indent=1))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build-model")
    b.add_argument("--tokenizer-from", required=True)
    b.add_argument("--out", required=True)
    for name in ("run", "child"):
        p = sub.add_parser(name)
        p.add_argument("--peer", choices=["llm-pruner", "shortgpt"], required=True)
        p.add_argument("--checkout", required=True, help="the peer's source tree")
        p.add_argument("--model", required=True)
        p.add_argument("--calibration", required=True, help="vlmprune's benchmark calibration.json")
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--samples", type=int, default=10)
        p.add_argument("--max-length", type=int, default=64)
        p.add_argument("--workdir", default="/tmp/peer-scoring")
        p.add_argument("--pruning-ratio", type=float, default=0.5,
                       help="llm-pruner: its default 0.5 (with 3 kv heads of 64, a ratio under 1/3 prunes no kv "
                            "head and its prune_local fails on torch.cat of an empty list)")
        p.add_argument("--layer-end", type=int, default=29, help="llm-pruner: block layers range(3, END)")
        p.add_argument("--prune-layers", type=int, default=6, help="shortgpt: layers removed (20%% of 30)")
        if name == "run":
            p.add_argument("--jsonl")
            p.add_argument("--label", default="")
            p.add_argument("--repeat", type=int, default=0)
            p.add_argument("--commit", help="the peer's commit, when the checkout is not a git tree")
        else:
            p.add_argument("--result", required=True)
    args = parser.parse_args()
    {"build-model": build_model, "run": run, "child": child}[args.cmd](args)


if __name__ == "__main__":
    main()
