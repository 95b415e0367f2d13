"""Wanda/activation with the first position of every sequence (attention sink) left out of the statistics."""
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
layers = base.model.language_model.layers
full = torch.load("/tmp/i22/act_stats.pt", weights_only=False)
orig = calibrate.select_tokens
def no_first(batch, tokens, image_id):
    m = orig(batch, tokens, image_id).clone(); m[:, 0] = False; return m
calibrate.select_tokens = no_first
stats = calibrate.collect_activations(base, cal)
calibrate.select_tokens = orig
for i in (0, 2, 10, 20, 29):
    f, s = full[i], stats[i]
    print(f"layer {i}: share of sum x^2 from position 0: o {float(1 - s.o_sq.sum()/f.o_sq.sum()):.3f} down {float(1 - s.down_sq.sum()/f.down_sq.sum()):.3f}; "
          f"max per-feature share o {float((1 - s.o_sq/f.o_sq).max()):.3f} down {float((1 - s.down_sq/f.down_sq).max()):.3f}; "
          f"sum|x| share o {float(1 - s.o_abs.sum()/f.o_abs.sum()):.3f}", flush=True)
wn = W.wanda(stats, [l.self_attn.o_proj.weight for l in layers], [l.mlp.down_proj.weight for l in layers], shapes)
def heads_plan(scores, keep=2):
    return {i: {"q_heads": _top_heads_per_group(scores.heads[i], s, keep)} for i, s in enumerate(shapes)}
def groups_plan(scores, keep=2):
    return {i: {"kv_heads": sorted(torch.argsort(scores.groups[i], descending=True, stable=True)[:keep].tolist())} for i in range(len(shapes))}
def mlp_plan(scores, keep=1248):
    return {i: {"mlp_channels": sorted(torch.argsort(scores.channels[i], descending=True, stable=True)[:keep].tolist())} for i in range(len(shapes))}
for kind, f in (("heads", heads_plan), ("groups", groups_plan), ("mlp1248", mlp_plan)):
    m = copy.deepcopy(base); apply_plan_(m, PruningPlan(layers=f(wn))); print("wanda-nofirst", kind, round(ppl(m), 2), flush=True); del m
