import copy, sys, time, math, inspect, importlib, warnings
import torch, transformers
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
PATH = "/root/.cache/vlmprune/demo-0.1.0-9d1658a8c3"
tok = transformers.AutoTokenizer.from_pretrained(PATH)
def docs(mods):
    out = []
    for name in mods:
        try:
            m = importlib.import_module(name)
        except Exception:
            continue
        for _, obj in sorted(vars(m).items()):
            d = getattr(obj, "__doc__", None)
            if isinstance(d, str) and len(d) > 200 and getattr(obj, "__module__", name) == name:
                out.append(inspect.cleandoc(d))
    return "\n\n".join(dict.fromkeys(out))
CAL = ["argparse", "collections", "json", "logging", "pathlib", "subprocess", "threading", "unittest"]
EVAL = ["email.message", "http.client", "tarfile", "zipfile", "decimal", "fractions", "statistics", "textwrap", "difflib", "shutil", "asyncio.tasks", "typing", "dataclasses", "enum", "functools"]
SEQ = 256
def chunks(text, n):
    ids = tok(text)["input_ids"]
    return [torch.tensor(ids[i:i+SEQ]) for i in range(0, len(ids) - SEQ + 1, SEQ)][:n]
def cal_batches(n=32):
    return [{"input_ids": c[None], "attention_mask": torch.ones(1, SEQ, dtype=torch.long), "labels": c[None].clone()} for c in chunks(docs(CAL), n)]
EV = None
@torch.no_grad()
def ppl(model, n=20):
    global EV
    if EV is None:
        EV = chunks(docs(EVAL), 40)
    nll, k = 0.0, 0
    for c in EV[:n]:
        logits = model(input_ids=c[None]).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, c[1:], reduction="sum")); k += SEQ - 1
    return math.exp(nll / k)
