"""Compensate what a cut removes: update the weights that stay, in closed form, from calibration data.

A plan says what goes; this module changes the weights that stay so that they reproduce, as well as
a linear map can, what the removed structures did. No parameter is added, so a compensated model
loads exactly as an uncompensated one does. Nothing here cuts: a removed structure's consumer
columns are folded into the kept ones and then zeroed, which is exactly what the cut that follows
(``apply_plan_``) leaves, so the statistics of the next layer are those of the pruned model.

Width (every consumer projection whose inputs lose structures: ``o_proj`` for heads and kv groups,
``down_proj`` / ``fc2`` for MLP channels, fused layouts through ``Adapter.slices``). With ``z`` the
consumer's input over the calibration tokens that count (padding never does), ``G = sum z z^T``,
``K`` the kept and ``R`` the removed inputs:

- ``ls`` (GRAIL, arXiv 2602.23795): ridge least squares of the removed inputs from the kept ones,
  ``B = G_RK (G_KK + lambda I)^-1`` (lambda = ``ridge`` x the mean diagonal of G_KK, solved in
  float64), folded as ``W_K' = W_K + W_R B``. A consumer that has a bias is fitted on centred
  statistics and its bias takes the mean part, ``b' = b + W_R (mu_R - B mu_K)``.
- ``bias`` (FLAP, arXiv 2312.11983): the removed inputs' mean contribution ``W_R mu_R`` goes into
  the consumer's bias (only where the consumer has one: refused before anything changes otherwise).

Layers (ReplaceMe, arXiv 2505.02819): each maximal run of dropped layers ``a..b`` is replaced by one
linear map ``T`` from the MLP output ``y`` of the kept layer ``p = a - 1`` to what that output plus
the run added to the residual, ``t = y + h_(b+1) - h_a``: ridge least squares pulled toward the
identity (an underdetermined fit stays a plain drop), folded into that layer's MLP output projection
as ``W' = T^T W`` (and ``b' = T^T b``). A run at the very start has no layer before it, and a family
that normalises the MLP output before adding it to the residual (Gemma's post-feed-forward norm) has
no linear place to fold into: those runs stay plain drops, and the record says why.

``select`` (compensation-aware choice, OBS / SlimGPT style): the plan says how many kv groups, q heads
per group and MLP channels each layer loses; which ones is chosen greedily on the consumer's Gram
matrix, each step removing the structures whose loss, after the least-squares fold of what stays,
costs least output energy, ``tr(W_J (H^-1)_JJ^-1 W_J^T)`` with ``H = G + lambda I`` (channels
``block`` at a time). The plan is rewritten to name them.

``sequential`` (SparseGPT / SlimGPT style): the layers are visited in order, and the statistics of
layer l are collected on the hidden states that the already cut and compensated layers < l give, so
errors do not compound. Without it every statistic comes from the unpruned model (one-shot). Only
one layer's statistics are held at a time (a Gram matrix is intermediate_size^2 float64).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
from accelerate.utils import send_to_device
from torch import nn
from tqdm.auto import tqdm

from vlmprune.adapters import Adapter, get_adapter
from vlmprune.calibrate import image_token_id, layer_input, layer_output, select_tokens
from vlmprune.dispatch import input_device
from vlmprune.errors import VlmpruneError
from vlmprune.planning.plan import LayerKeep, PruningPlan
from vlmprune.summary import layer_shapes
from vlmprune.vocab import COMPENSATE_LAYERS, COMPENSATE_MODES

log = logging.getLogger(__name__)

MODES = COMPENSATE_MODES
DEFAULT_RIDGE = 1e-3
# where an underdetermined fit (fewer calibration tokens than kept inputs) is pulled instead
UNDERDETERMINED_RIDGE = 1e-1


class _Stop(Exception):
    """Raised by the capture hook once the last decoder layer's inputs are known."""


@dataclass
class _Batch:
    """One calibration batch, as the decoder layers see it."""

    mask: torch.Tensor  # [B, T] bool: the positions that count
    hidden: torch.Tensor  # [B, T, D]: the residual stream entering the current layer
    calls: list[tuple[tuple, dict]] = field(default_factory=list)  # per layer: its other args and kwargs


def _layer_device(layer: nn.Module, fallback: torch.device) -> torch.device:
    for p in layer.parameters():
        if p.device.type != "meta":
            return p.device
    return fallback


@torch.no_grad()
def _capture(model: nn.Module, adapter: Adapter, batches, tokens: str) -> list[_Batch]:
    """Run the model once per batch up to its last decoder layer, keeping the states entering layer 0
    and every layer's other call arguments (masks, rotary tables, per-layer-type masks). The decoder
    layers pass their input through meanwhile (only their arguments are wanted: the layer-by-layer
    runs compute them), so the capture costs the embeddings (and a VLM's vision tower), not a forward."""
    layers = adapter.layers(model)
    image_id = image_token_id(model)
    device = input_device(model)
    out: list[_Batch] = []
    current: list[_Batch] = []

    def hook(index: int):
        def record(module, args, kwargs):
            hidden = layer_input(args, kwargs)
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            for key in ("past_key_values", "past_key_value"):
                if key in rest:
                    rest[key] = None
            batch = current[0]
            if index == 0:
                batch.hidden = hidden.detach()
            batch.calls.append((tuple(args[1:]), rest))
            if index == len(layers) - 1:
                raise _Stop
            target = _layer_device(module, hidden.device)  # a model spread over devices without hooks
            return send_to_device(args, target), send_to_device(kwargs, target)
        return record

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    forwards = [layer.__dict__.get("forward") for layer in layers]  # an accelerate hook's wrapper, or None
    for layer in layers:
        layer.forward = lambda *args, **kwargs: layer_input(args, kwargs)
    base = adapter.base_model(model)
    try:
        for batch in tqdm(batches, desc="compensation: inputs", unit="batch", leave=False):
            mask = select_tokens(batch, tokens, image_id)
            if not mask.any():
                continue
            current[:] = [_Batch(mask.to(device), torch.empty(0))]
            inputs = send_to_device({k: v for k, v in batch.items() if k != "labels"}, device)
            try:
                base(**inputs, use_cache=False)
            except _Stop:
                pass
            out.append(current[0])
    finally:
        for h in handles:
            h.remove()
        for layer, forward in zip(layers, forwards):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward
    if not out:
        raise VlmpruneError(f"compensation found no calibration tokens selected by --tokens {tokens}")
    return out


def _run_layer(layer: nn.Module, index: int, batches: list[_Batch], fallback: torch.device) -> list[torch.Tensor]:
    device = _layer_device(layer, fallback)
    outs = []
    for b in batches:
        args, kwargs = b.calls[index]
        args, kwargs = send_to_device(args, device), send_to_device(kwargs, device)
        outs.append(layer_output(layer(b.hidden.to(device), *args, **kwargs)))
    return outs


class _Gram:
    """Sums of z z^T, z and the token count of one projection's input at the positions that count."""

    def __init__(self, module: nn.Linear, masks: list[torch.Tensor]):
        n = module.in_features
        self.gram = torch.zeros(n, n, dtype=torch.float64)
        self.sum = torch.zeros(n, dtype=torch.float64)
        self.count = 0
        self.masks, self.batch = masks, 0
        self.module = module
        self.handle = module.register_forward_pre_hook(self._add)

    def _add(self, module, args) -> None:
        x = args[0]
        mask = self.masks[self.batch].to(x.device)
        z = x[mask].float()  # [N, F]
        self.gram += (z.T @ z).double().cpu()
        self.sum += z.sum(0).double().cpu()
        self.count += z.shape[0]

    def close(self) -> None:
        self.handle.remove()


def _removed_columns(adapter: Adapter, layer: nn.Module, shape,
                     keep: LayerKeep) -> list[tuple[nn.Linear, torch.Tensor]]:
    """The consumer projections of a layer whose input columns lose structures: (module, removed mask)."""
    kept = {"q": keep.q_heads, "kv": keep.kv_heads, "mlp": keep.mlp_channels}
    out: dict[int, tuple[nn.Linear, torch.Tensor]] = {}
    for slc in adapter.slices(layer, shape):
        if slc.dim != 1:
            continue
        gone = (slc.owner >= 0) & ~torch.isin(slc.owner, torch.as_tensor(kept[slc.unit], dtype=torch.long))
        if gone.any():
            module, mask = out.setdefault(id(slc.module), (slc.module, torch.zeros_like(gone)))
            mask |= gone
    return list(out.values())


def _solve(gkk: torch.Tensor, gkr: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
    """B^T = (G_KK + lambda I)^-1 G_KR in float64, lambda = ridge x mean diagonal (raised until it factors)."""
    scale = float(gkk.diagonal().mean())
    if not math.isfinite(scale) or scale <= 0:
        return torch.zeros_like(gkr), ridge  # the kept inputs never fire: nothing to fit from
    eye = torch.eye(gkk.shape[0], dtype=gkk.dtype)
    while True:
        factor, info = torch.linalg.cholesky_ex(gkk + ridge * scale * eye)
        if int(info) == 0:
            return torch.cholesky_solve(gkr, factor), ridge
        ridge *= 10


def ridge_fold(weight: torch.Tensor, gram: torch.Tensor, removed: torch.Tensor,
               ridge: float = DEFAULT_RIDGE) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The least-squares fold of a consumer's removed input columns into its kept ones (float64).

    ``weight`` [out, F], ``gram`` [F, F] (sum of z z^T, or centred sums), ``removed`` [F] bool.
    Returns (new weight with the removed columns zeroed, B [|R|, |K|] = G_RK (G_KK + lambda I)^-1,
    the relative ridge used); lambda = ridge x the mean diagonal of G_KK.
    """
    R, K = removed, ~removed
    W = weight.double()
    Bt, used = _solve(gram[K][:, K], gram[K][:, R], ridge)  # [|K|, |R|]
    new = W.clone()
    new[:, K] += W[:, R] @ Bt.T
    new[:, R] = 0
    return new, Bt.T, used


def _residual_energy(WR: torch.Tensor, C: torch.Tensor, R: torch.Tensor, B: torch.Tensor | None) -> float:
    """sum over tokens of ||W_R (z_R - B z_K)||^2 from the (centred) sums C (B None: ||W_R z_R||^2)."""
    K = ~R
    M = C[R][:, R]
    if B is not None:  # covariance of the fit's residual z_R - B z_K
        M = M - B @ C[K][:, R] - C[R][:, K] @ B.T + B @ C[K][:, K] @ B.T
    return float(torch.einsum("or,rs,os->", WR, M, WR))


@torch.no_grad()
def _compensate_width(module: nn.Linear, removed: torch.Tensor, stats: _Gram, mode: str, ridge: float,
                      where: str) -> dict:
    """Fold the removed inputs of one consumer into its kept ones (or its bias) and zero them."""
    R, K = removed, ~removed
    n = stats.count
    W = module.weight.detach().double().cpu()
    WR = W[:, R]
    G, mu = stats.gram, stats.sum / max(n, 1)
    if not (torch.isfinite(G).all() and torch.isfinite(mu).all()):
        raise VlmpruneError(f"{where}: calibration statistics are not finite (inf/NaN activations); nothing was "
                            f"written. Load in float32 (--dtype float32) or check the calibration data")
    energy = float(torch.einsum("of,fg,og->", W, G, W)) or 1.0
    before = _residual_energy(WR, G, R, None) / energy
    record = {"removed": int(R.sum()), "kept": int(K.sum()), "tokens": n, "error_before": before}
    if n == 0:
        log.warning("%s: no calibration token reached it; its cut stays uncompensated", where)
        record.update(error_after=before, skipped="no calibration tokens")
        _zero_columns_(module, R)
        return record
    centred = module.bias is not None  # a bias takes the mean part; the fit is on centred sums
    C = G - n * torch.outer(mu, mu) if centred else G
    if mode == "bias":
        module.bias.add_((WR @ mu[R]).to(module.bias))
        _zero_columns_(module, R)
        record.update(error_after=_residual_energy(WR, G - n * torch.outer(mu, mu), R, None) / energy)
        return record
    if n < int(K.sum()) and ridge < UNDERDETERMINED_RIDGE:
        log.warning("%s: %d calibration tokens for %d kept inputs: the fit is underdetermined; ridge raised from %g "
                    "to %g x the mean diagonal (more --num-samples gives a sharper fit)", where, n, int(K.sum()),
                    ridge, UNDERDETERMINED_RIDGE)
        ridge = UNDERDETERMINED_RIDGE
    new, B, used = ridge_fold(W, C, R, ridge)
    if used > ridge:
        log.warning("%s: the Gram matrix of its %d kept inputs over %d calibration tokens is singular at ridge %g; "
                    "solved at ridge %g x the mean diagonal", where, int(K.sum()), n, ridge, used)
    module.weight.copy_(new.to(module.weight))
    if centred:
        module.bias.add_((WR @ (mu[R] - B @ mu[K])).to(module.bias))
    record.update(error_after=_residual_energy(WR, C, R, B) / energy, ridge=used)
    return record


def _obs_select(W: torch.Tensor, C: torch.Tensor, units: list[torch.Tensor], count: int, ridge: float,
                groups: list[int] | None = None, per_group: int = 0, block: int = 1) -> list[int]:
    """Greedy OBS choice of ``count`` units (column sets) to remove from a consumer: at each step the units
    whose removal, with the least-squares fold of what stays, loses least output energy (float64).

    ``groups``/``per_group``: unit u belongs to group groups[u], of which at most per_group may go.
    ``block``: units removed per step (single columns: scored independently, then folded together)."""
    W = W.double().clone()
    scale = float(C.diagonal().mean()) or 1.0
    Hinv = torch.linalg.inv(C + ridge * scale * torch.eye(C.shape[0], dtype=C.dtype))
    gone: list[int] = []
    taken: dict[int, int] = {}
    single = groups is None and all(len(cols) == 1 for cols in units)
    flat = torch.cat(units) if single else None
    while len(gone) < count:
        costs = []
        if single:  # the block: greedy within a pool of the cheapest, the pool's statistics updated exactly
            k = min(block, count - len(gone))
            values = (W[:, flat] ** 2).sum(0) / Hinv.diagonal()[flat]
            values[torch.as_tensor(gone, dtype=torch.long)] = math.inf
            pool = torch.argsort(values)[: 2 * k]
            Wp, Hp = W[:, flat[pool]].clone(), Hinv[flat[pool]][:, flat[pool]].clone()
            out = torch.zeros(len(pool), dtype=torch.bool)
            for _ in range(k):
                cost = ((Wp**2).sum(0) / Hp.diagonal()).masked_fill(out, math.inf)
                j = int(torch.argmin(cost))
                out[j] = True
                Wp -= torch.outer(Wp[:, j], Hp[j]) / Hp[j, j]
                Hp -= torch.outer(Hp[:, j], Hp[j]) / Hp[j, j]
            costs = [(0.0, int(pool[j])) for j in torch.nonzero(out).flatten().tolist()]
        else:
            for u, cols in enumerate(units):
                if u in gone or (groups is not None and taken.get(groups[u], 0) >= per_group):
                    continue
                WJ = W[:, cols]
                costs.append((float((WJ @ torch.linalg.inv(Hinv[cols][:, cols]) * WJ).sum()), u))
            costs.sort()
        step = [u for _, u in costs[: min(block, count - len(gone))]]
        cols = torch.cat([units[u] for u in step])
        inv = torch.linalg.inv(Hinv[cols][:, cols])
        W -= W[:, cols] @ inv @ Hinv[cols]
        Hinv -= Hinv[:, cols] @ inv @ Hinv[cols]
        for u in step:
            gone.append(u)
            if groups is not None:
                taken[groups[u]] = taken.get(groups[u], 0) + 1
    return gone


def _select_keep(adapter: Adapter, layer: nn.Module, shape, keep: LayerKeep, grams: dict, ridge: float) -> LayerKeep:
    """The same numbers of kv groups / heads per group / MLP channels as ``keep``, chosen by what their
    removal costs after the least-squares fold (``_obs_select`` on each consumer's statistics)."""
    q, kv, mlp = list(keep.q_heads), list(keep.kv_heads), list(keep.mlp_channels)
    for slc in adapter.slices(layer, shape):
        if slc.dim != 1 or id(slc.module) not in grams:
            continue
        module, stats = slc.module, grams[id(slc.module)]
        n = stats.count
        if n == 0:
            continue
        mu = stats.sum / n
        C = stats.gram - n * torch.outer(mu, mu) if module.bias is not None else stats.gram
        W = module.weight.detach().double().cpu()
        cols = torch.nonzero(slc.owner >= 0).flatten()
        owner = slc.owner[cols]
        if slc.unit == "mlp" and len(mlp) < shape.intermediate_size:
            units = [cols[owner == c] for c in range(shape.intermediate_size)]
            count = shape.intermediate_size - len(mlp)
            gone = set(_obs_select(W, C, units, count, ridge, block=max(1, math.ceil(count / 16))))
            mlp = [c for c in range(shape.intermediate_size) if c not in gone]
        elif slc.unit == "q" and len(kv) < shape.num_kv_heads and len(q) == len(kv) * shape.group_size:
            g = shape.group_size
            units = [cols[(owner // g) == k] for k in range(shape.num_kv_heads)]
            gone = set(_obs_select(W, C, units, shape.num_kv_heads - len(kv), ridge))
            kv = [k for k in range(shape.num_kv_heads) if k not in gone]
            q = [h for h in range(shape.num_heads) if h // g in kv]
        elif slc.unit == "q" and len(kv) == shape.num_kv_heads and len(q) < shape.num_heads:
            g = shape.group_size
            per = shape.group_size - len(q) // shape.num_kv_heads
            units = [cols[owner == h] for h in range(shape.num_heads)]
            gone = set(_obs_select(W, C, units, shape.num_heads - len(q), ridge,
                                   groups=[h // g for h in range(shape.num_heads)], per_group=per))
            q = [h for h in range(shape.num_heads) if h not in gone]
    return LayerKeep(tuple(q), tuple(kv), tuple(mlp))


def _zero_columns_(module: nn.Linear, columns: torch.Tensor) -> None:
    module.weight[:, columns.to(module.weight.device)] = 0


def _mlp_output(adapter: Adapter, layer: nn.Module) -> nn.Linear:
    return getattr(adapter.mlp(layer), adapter.layout.down)


def fold_obstacle(adapter: Adapter, layer: nn.Module) -> str | None:
    """Why a linear map cannot be folded into this layer's MLP output projection, or None."""
    norm = getattr(layer, "post_feedforward_layernorm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        return (f"{adapter.text_model_type} normalises the MLP output (post_feedforward_layernorm) before the residual "
                f"add, so no linear map folds into its down projection")
    return None


def _runs(drop: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in sorted(drop):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


@torch.no_grad()
def _fit_map(y: list[torch.Tensor], target: list[torch.Tensor], masks: list[torch.Tensor], ridge: float):
    """T minimising sum ||y T - t||^2 + lambda ||T - I||^2 over the positions that count (float64)."""
    d = y[0].shape[-1]
    yy = torch.zeros(d, d, dtype=torch.float64)
    yt = torch.zeros(d, d, dtype=torch.float64)
    tt = base = 0.0
    n = 0
    for a, t, m in zip(y, target, masks):
        a, t = a[m.to(a.device)].double().cpu(), t[m.to(t.device)].double().cpu()
        yy += a.T @ a
        yt += a.T @ t
        tt += float((t * t).sum())
        base += float(((a - t) ** 2).sum())
        n += a.shape[0]
    if not (torch.isfinite(yy).all() and torch.isfinite(yt).all()):
        raise VlmpruneError("layer compensation: calibration hidden states are not finite (inf/NaN); nothing was "
                            "written. Load in float32 (--dtype float32) or check the calibration data")
    if n < d and ridge < UNDERDETERMINED_RIDGE:
        log.warning("layer compensation: %d calibration tokens for a %d-wide map: the fit is underdetermined; ridge "
                    "raised from %g to %g x the mean diagonal", n, d, ridge, UNDERDETERMINED_RIDGE)
        ridge = UNDERDETERMINED_RIDGE
    scale = float(yy.diagonal().mean()) or 1.0
    eye = torch.eye(d, dtype=torch.float64)
    T = torch.linalg.solve(yy + ridge * scale * eye, yt + ridge * scale * eye)
    after = float(torch.einsum("ij,ik,kj->", T, yy, T) - 2 * (T * yt).sum()) + tt
    return T, {"tokens": n, "error_before": base / (tt or 1.0), "error_after": max(after, 0.0) / (tt or 1.0)}


def check_mode(model: nn.Module, plan: PruningPlan, mode: str) -> None:
    """Refuse, before any weight changes, a compensation the model's consumers cannot carry."""
    if mode not in MODES:
        raise VlmpruneError(f"--compensate must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "bias":
        return
    if plan.drop_layers:
        raise VlmpruneError("--compensate bias is FLAP's width compensation (a mean into the consumer's bias); "
                            "dropped layers are compensated by --compensate ls")
    adapter = get_adapter(model)
    shapes = layer_shapes(model, adapter)
    layers = adapter.layers(model)
    for i, keep in plan.resolve(shapes).items():
        for module, _ in _removed_columns(adapter, layers[i], shapes[i], keep):
            if module.bias is None:
                raise VlmpruneError(
                    f"--compensate bias needs a bias on the consumer projections; {adapter.text_model_type}'s "
                    f"{type(module).__name__} in layer {i} has none (the stock class would not load one): use "
                    f"--compensate ls, which adds no parameter")


@torch.no_grad()
def compensate_(model: nn.Module, plan: PruningPlan, batches, mode: str = "ls", sequential: bool = True,
                ridge: float = DEFAULT_RIDGE, tokens: str = "all", select: bool = False,
                layers_fit: str = "map") -> dict:
    """Update ``model``'s kept weights in place so that ``plan``'s cut loses as little as a linear fit allows.

    Returns the record of what was compensated, with the relative reconstruction error of every
    consumer (and dropped run) before and after. ``apply_plan_`` cuts afterwards as usual.
    With ``select``, each layer removes as many structures of each kind as ``plan`` says, but the ones
    whose loss the fit makes up best (``_obs_select``), and ``plan`` is changed in place to name them.
    """
    check_mode(model, plan, mode)
    if mode == "none":
        return {"mode": "none"}
    if not isinstance(ridge, (int, float)) or isinstance(ridge, bool) or not math.isfinite(ridge) or ridge <= 0:
        raise VlmpruneError(f"--compensate-ridge must be a number > 0, got {ridge!r}")
    if layers_fit not in COMPENSATE_LAYERS:
        raise VlmpruneError(f"--compensate-layers must be one of {', '.join(COMPENSATE_LAYERS)}, got {layers_fit!r}")
    adapter = get_adapter(model)
    shapes = layer_shapes(model, adapter)
    resolved = plan.resolve(shapes)
    layers = adapter.layers(model)
    fallback = input_device(model)
    was_training = model.training
    model.eval()
    try:
        data = _capture(model, adapter, batches, tokens)
        masks = [b.mask for b in data]
        runs = {run[0]: run for run in _runs(plan.drop_layers)}
        dropped = set(plan.drop_layers)
        record: dict = {"mode": mode, "sequential": sequential, "ridge": ridge, "tokens": tokens,
                        "layers_fit": layers_fit,
                        "calibration_tokens": int(sum(int(m.sum()) for m in masks)), "layers": {}, "dropped_runs": []}
        if select:
            record["select"], record["selected"] = True, []  # the layers whose removed structures it changed
        mlp_out: list[torch.Tensor] | None = None  # the MLP output of the last kept layer, when a run follows it
        previous = None
        for i in tqdm(range(len(layers)), desc="compensation", unit="layer", leave=False):
            layer = layers[i]
            if i in dropped:
                if i in runs:
                    record["dropped_runs"].append(_replace_run(adapter, layers, runs[i], previous, data, masks,
                                                               mlp_out, ridge, fallback, layers_fit))
                continue
            consumers = _removed_columns(adapter, layer, shapes[i], resolved[i]) if i in resolved else []
            keep_y = (i + 1) in dropped
            captured: list[torch.Tensor] = []
            y_hook = None
            if keep_y:
                y_hook = adapter.mlp(layer).register_forward_hook(
                    lambda m, a, o, out=captured: out.append(layer_output(o).detach()))
            if consumers:
                grams = [_Gram(module, masks) for module, _ in consumers]
                try:
                    outs = []
                    for k, b in enumerate(data):
                        for g in grams:
                            g.batch = k
                        outs.extend(_run_layer(layer, i, [b], fallback))
                finally:
                    for g in grams:
                        g.close()
                entry = {}
                if select:
                    chosen = _select_keep(adapter, layer, shapes[i], resolved[i],
                                          {id(module): g for (module, _), g in zip(consumers, grams)}, ridge)
                    if chosen != resolved[i]:
                        record["selected"].append(i)
                        resolved[i] = chosen
                        old = plan.layers.get(i, {})
                        plan.layers[i] = {k: list(getattr(chosen, k)) for k in old}
                        consumers = _removed_columns(adapter, layer, shapes[i], chosen)
                        grams = [{id(g.module): g for g in grams}[id(module)] for module, _ in consumers]
                for (module, removed), stats in zip(consumers, grams):
                    name = _projection_name(layer, module)
                    entry[name] = _compensate_width(module, removed, stats, mode, ridge, f"layer {i} {name}")
                    del stats.gram
                record["layers"][str(i)] = entry
                if sequential:  # the next layer sees what the cut, compensated layer gives
                    captured.clear()
                    outs = _run_layer(layer, i, data, fallback)
            else:
                outs = _run_layer(layer, i, data, fallback)
            if y_hook is not None:
                y_hook.remove()
            mlp_out = captured if keep_y else None
            for b, h in zip(data, outs):
                b.hidden = h
            previous = i
        return record
    finally:
        model.train(was_training)


def _projection_name(layer: nn.Module, module: nn.Module) -> str:
    for name, m in layer.named_modules():
        if m is module:
            return name
    return type(module).__name__


@torch.no_grad()
def _replace_run(adapter: Adapter, layers, run: list[int], previous: int | None, data: list[_Batch], masks, y,
                 ridge: float, fallback: torch.device, layers_fit: str = "map") -> dict:
    """Stand in for a run of dropped layers (``layers_fit``: a linear map folded into the preceding MLP
    output, the later layers' residual writes scaled, or both); advance the states past it."""
    entry: dict = {"layers": run}
    start = [b.hidden for b in data]
    states = start
    for j in run:  # what the run adds to the residual (the dropped layers, as they are)
        for b, h in zip(data, states):
            b.hidden = h
        states = _run_layer(layers[j], j, data, fallback)
    end = states
    for b, h in zip(data, start):
        b.hidden = h  # the run is gone: the states pass through (the map, below, changes them)
    if "map" in layers_fit:
        entry["into"] = previous
        reason = ("the run starts at the first layer: no layer before it to fold a map into" if previous is None
                  else fold_obstacle(adapter, layers[previous]))
        if reason is not None:
            log.warning("dropped layers %s get no linear map: %s", run, reason)
            entry["skipped"] = reason
        else:
            targets = [yy + (e - s).to(yy.device) for yy, s, e in zip(y, start, end)]
            T, errors = _fit_map(y, targets, masks, ridge)
            down = _mlp_output(adapter, layers[previous])
            Tw = T.to(down.weight.device)
            down.weight.copy_((Tw.T @ down.weight.double()).to(down.weight.dtype))
            if down.bias is not None:
                down.bias.copy_((Tw.T @ down.bias.double()).to(down.bias.dtype))
            for b, s, yy in zip(data, start, y):  # h_(b+1) ~ h_a - y + y T
                delta = (yy.double() @ T.to(yy.device) - yy.double()).to(s.dtype)
                b.hidden = s + delta.to(s.device)
            entry.update(errors)
    if "scale" in layers_fit:
        entry.update(_scale_later_writes_(adapter, layers, run[-1] + 1, data, end, masks))
    return entry


def _residual_writers(adapter: Adapter, layer: nn.Module) -> list[nn.Linear] | None:
    """The projections whose outputs a layer adds to the residual stream as they are (attention output,
    MLP output), or None where a norm stands between them and the residual (then no scale folds)."""
    if fold_obstacle(adapter, layer) is not None:
        return None
    out = []
    for part, name in ((adapter.attention(layer), adapter.layout.o), (adapter.mlp(layer), adapter.layout.down)):
        module = getattr(part, name, None)
        if not isinstance(module, nn.Linear):
            return None
        out.append(module)
    return out


@torch.no_grad()
def _scale_later_writes_(adapter: Adapter, layers, first: int, data: list[_Batch], end, masks) -> dict:
    """Prune&Comp-style magnitude compensation (arXiv 2507.18212): the dropped run made the residual
    ``s`` times longer (median over the tokens that count of ||h_end|| / ||h_now||); every later layer's
    residual writes are divided by ``s``, which, since every later consumer of the residual is
    normalised (RMSNorm / LayerNorm are scale-free), is the residual scaled by ``s`` where the run ends."""
    ratios = []
    for b, e, m in zip(data, end, masks):
        h, e = b.hidden[m.to(b.hidden.device)].double(), e[m.to(e.device)].double().to(b.hidden.device)
        ratios.append((e.norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-12)).cpu())
    ratios = torch.cat(ratios)
    ratios = ratios[torch.isfinite(ratios)]
    if ratios.numel() == 0:
        return {"scale_skipped": "no finite norm ratio on the calibration tokens"}
    s = float(ratios.median())
    writers = [_residual_writers(adapter, layers[j]) for j in range(first, len(layers))]
    if any(w is None for w in writers):
        reason = (f"{adapter.text_model_type} normalises a layer's output before the residual add: no scale "
                  f"folds into the writes")
        log.warning("the residual after dropped layers ending at %d is not rescaled: %s", first - 1, reason)
        return {"scale": s, "scale_skipped": reason}
    for modules in writers:  # dropped ones included: a later run's target is measured on the scaled stream
        for module in modules:
            module.weight.div_(s)
            if module.bias is not None:
                module.bias.div_(s)
    return {"scale": s}
