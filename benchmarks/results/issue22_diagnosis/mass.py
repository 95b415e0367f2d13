import torch
S = torch.load("/tmp/i22/scores.pt", weights_only=False)
for name, sc in S.items():
    hm, gm, tot = 0.0, 0.0, 0.0
    within, between = [], []
    for h in sc.heads:
        g = h.reshape(3, 3)
        hm += float(g.min(1).values.sum()); gm += float(g.sum(1).min()); tot += float(h.sum())
        z = h / h.mean()
        within.append(float(z.reshape(3,3).var(1, unbiased=False).mean())); between.append(float(z.reshape(3,3).mean(1).var(unbiased=False)))
    print(f"{name:10s} removed q-head mass: heads-cut {hm/tot:.3f}  groups-cut {gm/tot:.3f}  (of all head mass); within-group var {sum(within)/30:.3f} between-group var {sum(between)/30:.3f}")
