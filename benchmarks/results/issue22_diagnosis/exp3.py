import sys; sys.path.insert(0, "/tmp/i22")
from common import *
from vlmprune.io import load
from vlmprune import calibrate
from vlmprune.importance import width as W
from vlmprune.prune import apply_plan_
from vlmprune.prune.apply import layer_shapes
from vlmprune.plan import PruningPlan
from vlmprune.planning import _top_heads_per_group
base = load(PATH).eval()
shapes = layer_shapes(base)
cal = cal_batches(16)
stats = torch.load("/tmp/i22/act_stats.pt", weights_only=False)
layers = base.model.language_model.layers
S = {"activation": W.activation(stats, shapes),
     "wanda": W.wanda(stats, [l.self_attn.o_proj.weight for l in layers], [l.mlp.down_proj.weight for l in layers], shapes),
     "taylor": W.taylor(calibrate.collect_taylor(base, cal, "text"), shapes)}
for seed in range(3):
    S[f"random{seed}"] = W.random(shapes, seed)
torch.save(S, "/tmp/i22/scores.pt")
def heads_plan(scores, keep=2):
    return {i: {"q_heads": _top_heads_per_group(scores.heads[i], s, keep)} for i, s in enumerate(shapes)}
def groups_plan(scores, keep=2):
    return {i: {"kv_heads": sorted(torch.argsort(scores.groups[i], descending=True, stable=True)[:keep].tolist())} for i in range(len(shapes))}
def mlp_plan(scores, keep=1248):
    return {i: {"mlp_channels": sorted(torch.argsort(scores.channels[i], descending=True, stable=True)[:keep].tolist())} for i in range(len(shapes))}
print("dense", round(ppl(base), 2), flush=True)
for name, sc in S.items():
    for kind, f in (("heads", heads_plan), ("groups", groups_plan), ("mlp1248", mlp_plan)):
        m = copy.deepcopy(base); apply_plan_(m, PruningPlan(layers=f(sc))); print(name, kind, round(ppl(m), 2), flush=True); del m
