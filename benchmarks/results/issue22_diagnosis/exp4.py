"""Oracle: exact calibration loss of every legal 3-head cut of single layers (27 one-per-group, 3 groups)."""
import sys, itertools; sys.path.insert(0, "/tmp/i22")
from common import *
from vlmprune.io import load
from vlmprune.planning import _top_heads_per_group
from vlmprune.prune.apply import layer_shapes
base = load(PATH).eval()
shapes = layer_shapes(base)
S = torch.load("/tmp/i22/scores.pt", weights_only=False)
seqs = [b["input_ids"] for b in cal_batches(20)[16:20]]  # not the scoring batches
o_projs = [l.self_attn.o_proj for l in base.model.language_model.layers]
@torch.no_grad()
def loss(layer, heads):
    w = o_projs[layer].weight
    saved = w[:, :].clone()
    for h in heads:
        w[:, h*64:(h+1)*64] = 0
    tot = 0.0
    for ids in seqs:
        logits = base(input_ids=ids).logits[0, :-1].float()
        tot += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))
    w.copy_(saved)
    return tot / len(seqs)
dense = loss(0, [])
print("dense loss", round(dense, 4), flush=True)
for layer in [int(x) for x in sys.argv[1].split(",")]:
    per_group = {tuple(range(3*k, 3*k+3)): loss(layer, range(3*k, 3*k+3)) - dense for k in range(3)}
    one_per = {c: loss(layer, c) - dense for c in itertools.product(range(0,3), range(3,6), range(6,9))}
    single = [round(loss(layer, [h]) - dense, 4) for h in range(9)]
    ranked = sorted(one_per, key=one_per.get)
    line = {"layer": layer, "single": single,
            "groups": {str(k[0]//3): round(v, 4) for k, v in per_group.items()},
            "heads best": (ranked[0], round(one_per[ranked[0]], 4)), "heads median": round(one_per[ranked[13]], 4),
            "heads worst": round(one_per[ranked[-1]], 4)}
    for name in ("taylor", "activation", "wanda", "random0"):
        kept = _top_heads_per_group(S[name].heads[layer], shapes[layer], 2)
        cut = tuple(h for h in range(9) if h not in kept)
        g = int(torch.argmin(S[name].groups[layer]))
        line[name] = {"heads cut": cut, "rank of 27": ranked.index(cut) + 1, "dloss": round(one_per[cut], 4),
                      "group cut": g, "group dloss": round(per_group[tuple(range(3*g, 3*g+3))], 4)}
    print(line, flush=True)
