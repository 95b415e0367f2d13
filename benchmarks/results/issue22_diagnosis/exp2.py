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
stats = calibrate.collect_activations(base, cal)
torch.save(stats, "/tmp/i22/act_stats.pt")
act = W.activation(stats, shapes)
print("dense", ppl(base), flush=True)
def heads_plan(scores, keep=2, invert=False):
    p = PruningPlan()
    for i, s in enumerate(shapes):
        h = -scores.heads[i] if invert else scores.heads[i]
        p.layers[i] = {"q_heads": _top_heads_per_group(h, s, keep)}
    return p
def groups_plan(scores, keep=2, invert=False):
    p = PruningPlan()
    for i, s in enumerate(shapes):
        g = -scores.groups[i] if invert else scores.groups[i]
        p.layers[i] = {"kv_heads": sorted(torch.argsort(g, descending=True)[:keep].tolist())}
    return p
for name, plan in [("act heads", heads_plan(act)), ("act heads inv", heads_plan(act, invert=True)),
                   ("act groups", groups_plan(act)), ("act groups inv", groups_plan(act, invert=True))]:
    m = copy.deepcopy(base); apply_plan_(m, plan); print(name, ppl(m), flush=True)
# zero-ablation check of the heads surgery
plan = heads_plan(act)
m = copy.deepcopy(base)
with torch.no_grad():
    for i, layer in enumerate(m.model.language_model.layers):
        keep = set(plan.layers[i]["q_heads"])
        for h in range(9):
            if h not in keep:
                layer.self_attn.o_proj.weight[:, h*64:(h+1)*64] = 0
print("act heads zeroed", ppl(m), flush=True)
