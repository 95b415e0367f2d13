"""Run a model over calibration batches and collect the statistics the criteria need.

Each collector is registered by name (``@register_collector``, beside ``register_criterion`` in
``vlmprune.importance.registry``); a criterion names the statistics it needs by that name.

The hooks live here; the criteria (vlmprune.importance) are pure functions of what this
returns. Every statistic is a sum over the selected token positions (``--tokens``), so padding
never contributes.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from vlmprune.adapters import get_adapter
from vlmprune.data import token_masks
from vlmprune.dispatch import input_device, on_placed_weights
from vlmprune.errors import VlmpruneError
from vlmprune.importance.layer import HiddenStateStats, SkipLossStats
from vlmprune.importance.registry import register_collector
from vlmprune.importance.structures import LayerSums, layer_params, reduce_
from vlmprune.importance.width import ActivationSums
from vlmprune.phases import phase
from vlmprune.summary import layer_shapes
from vlmprune.vocab import TOKENS

logger = logging.getLogger(__name__)

TOKEN_CHOICES = TOKENS  # the --tokens vocabulary (vlmprune.vocab)


def image_token_id(model: nn.Module) -> int | None:
    return get_adapter(model).image_token_id(model)


def select_tokens(batch: dict, tokens: str, image_id: int | None) -> torch.Tensor:
    """Bool [B, T] mask of the positions statistics use: all real tokens, text, image, or answer."""
    if tokens not in TOKEN_CHOICES:
        raise VlmpruneError(f"--tokens must be one of {', '.join(TOKEN_CHOICES)}, got {tokens!r}")
    masks = token_masks(batch, -1 if image_id is None else image_id)
    if tokens not in masks:
        raise VlmpruneError("--tokens answer needs labelled samples (assistant answers)")
    return masks[tokens] & masks["all"]


def _device(model: nn.Module) -> torch.device:
    return input_device(model)  # a dispatched model takes its inputs on its first accelerator (or the CPU)


def _model_inputs(batch: dict, device: torch.device, keep_labels: bool = False) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
            if keep_labels or k != "labels"}


def _progress(batches: Iterable[dict], desc: str) -> Iterator[dict]:
    total = len(batches) if hasattr(batches, "__len__") else None
    yield from tqdm(batches, desc=desc, total=total, unit="batch", leave=False)


def _base_model(model: nn.Module) -> nn.Module:
    """The VLM without its LM head: hidden-state statistics need no logits."""
    return get_adapter(model).base_model(model)


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def layer_input(args, kwargs) -> torch.Tensor:
    """The hidden states a decoder layer's forward (pre-)hook receives, positional or keyword."""
    return args[0] if args else kwargs["hidden_states"]


def layer_output(out) -> torch.Tensor:
    """The hidden states a decoder layer returns (a tensor, or the first of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
@register_collector("hidden_states")
def collect_hidden_states(model: nn.Module, batches: Iterable[dict], tokens: str = "all") -> HiddenStateStats:
    """Cosine and angular sums between every pair of residual states h_0..h_L at the selected tokens."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    L = len(layers)
    cos_sum = torch.zeros(L + 1, L + 1, dtype=torch.float64)
    ang_sum = torch.zeros(L + 1, L + 1, dtype=torch.float64)
    count = 0
    image_id = image_token_id(model)
    states: dict[int, torch.Tensor] = {}
    mask_box: list[torch.Tensor] = []

    def keep(index: int, hidden: torch.Tensor) -> None:
        states[index] = nn.functional.normalize(hidden[mask_box[0]].float(), dim=-1)  # [N, D]

    handles = []
    for i, layer in enumerate(layers):
        if i == 0:
            handles.append(layer.register_forward_pre_hook(lambda m, a, k: keep(0, layer_input(a, k)),
                                                           with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: keep(i + 1, layer_output(o))))
    device = _device(model)
    with _hooks(handles):
        for batch in _progress(batches, "hidden states"):
            mask = select_tokens(batch, tokens, image_id).to(device)
            if not mask.any():
                continue
            mask_box[:] = [mask]
            states.clear()
            _base_model(model)(**_model_inputs(batch, device))
            h = torch.stack([states[i] for i in range(L + 1)], dim=1)  # [N, L+1, D]
            gram = torch.einsum("nld,nmd->nlm", h, h).clamp(-1.0, 1.0)  # [N, L+1, L+1]
            cos_sum += gram.sum(0).double().cpu()
            ang_sum += (torch.arccos(gram) / math.pi).sum(0).double().cpu()
            count += h.shape[0]
    if count == 0:
        raise VlmpruneError(f"no calibration tokens selected by --tokens {tokens}")
    return HiddenStateStats(cos_sum, ang_sum, count)


def _answer_loss(model: nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    logits = model(**inputs).logits[:, :-1].float()
    target = labels[:, 1:]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


def _labels_for(batch: dict, tokens: str, image_id: int | None) -> torch.Tensor:
    if tokens == "answer":
        mask = select_tokens(batch, "answer", image_id)
        return torch.where(mask, batch["labels"], torch.full_like(batch["labels"], -100))
    if tokens in ("all", "text"):
        mask = select_tokens(batch, "text", image_id)
    else:
        raise VlmpruneError("skip_loss measures next-token loss; image positions have no targets: "
                            "use --tokens answer|text")
    return torch.where(mask, batch["input_ids"], torch.full_like(batch["input_ids"], -100))


@torch.no_grad()
@register_collector("skip_loss")
def collect_skip_losses(model: nn.Module, batches: Iterable[dict], tokens: str = "answer") -> SkipLossStats:
    """Answer (or text) loss of the intact model and with each decoder layer skipped in turn."""
    layers = get_adapter(model).layers(model)
    image_id = image_token_id(model)
    device = _device(model)
    base, skipped, n = 0.0, torch.zeros(len(layers), dtype=torch.float64), 0
    for batch in _progress(batches, "skip-layer losses"):
        labels = _labels_for(batch, tokens, image_id).to(device)
        if not (labels[:, 1:] != -100).any():
            continue
        inputs = _model_inputs(batch, device)
        base += float(_answer_loss(model, inputs, labels))
        for i, layer in enumerate(layers):
            handle = layer.register_forward_hook(lambda m, a, k, o: layer_input(a, k), with_kwargs=True)
            with _hooks([handle]):
                skipped[i] += float(_answer_loss(model, inputs, labels))
        n += 1
    if n == 0:
        raise VlmpruneError(f"no calibration batch has {tokens} tokens to compute a loss on")
    return SkipLossStats(base, skipped, n)


@torch.no_grad()
@register_collector("activations")
def collect_activations(model: nn.Module, batches: Iterable[dict], tokens: str = "all") -> list[ActivationSums]:
    """Sums of |x| and x^2 of every o_proj input feature and every MLP channel, at the selected tokens."""
    adapter = get_adapter(model)
    shapes = layer_shapes(model, adapter)
    stats = [ActivationSums(*(torch.zeros(n, dtype=torch.float64) for n in
                              (s.num_heads * s.head_dim, s.num_heads * s.head_dim,
                               s.intermediate_size, s.intermediate_size)))
             for s in shapes]
    mask_box: list[torch.Tensor] = []
    image_id = image_token_id(model)

    def record(i: int, kind: str, x: torch.Tensor) -> None:
        x = x[mask_box[0]].double()  # [N, F]
        a = stats[i]
        getattr(a, f"{kind}_abs").add_(x.abs().sum(0).cpu())
        getattr(a, f"{kind}_sq").add_((x * x).sum(0).cpu())
        if kind == "down":
            a.tokens += x.shape[0]

    handles = []
    for i, layer in enumerate(adapter.layers(model)):
        # the column-owned projections (o, down): their inputs are the heads' and channels' outputs
        for slc in adapter.slices(layer, shapes[i]):
            if slc.dim == 1:
                kind = "o" if slc.unit == "q" else "down"
                handles.append(slc.module.register_forward_pre_hook(lambda m, a, i=i, k=kind: record(i, k, a[0])))
    device = _device(model)
    with _hooks(handles):
        for batch in _progress(batches, "activations"):
            mask = select_tokens(batch, tokens, image_id).to(device)
            if not mask.any():
                continue
            mask_box[:] = [mask]
            _base_model(model)(**_model_inputs(batch, device))
    if not any(a.tokens for a in stats):
        raise VlmpruneError(f"no calibration tokens selected by --tokens {tokens}")
    return stats


def effective_batches(masses: list[float]) -> float:
    """How many calibration batches the scores rest on: (sum m)^2 / sum m^2 over the batches'
    score masses m (the inverse Simpson index): all of them when every batch contributes alike,
    ~1 when one batch dominates."""
    return sum(masses) ** 2 / max(sum(m * m for m in masses), 1e-30)


@register_collector("taylor")
def collect_taylor(model: nn.Module, batches: Iterable[dict], tokens: str = "text") -> list[LayerSums]:
    """Per-structure sums of |W * dL/dW| (L: cross-entropy on the selected tokens), per batch.

    Each gradient is reduced to per-structure sums the moment it is accumulated and then freed,
    so no full copy of the gradients is ever held; only the prunable weights require grad.

    On a model that already answers its calibration data almost perfectly, the answer loss is
    near zero on most samples and the few wrong answers carry nearly all of the gradient: the
    scores then depend on which samples were drawn. A warning says so when the scores rest on
    fewer than half of the batches (effective number: (sum m)^2 / sum m^2 over batch masses m).
    """
    adapter = get_adapter(model)
    shapes = layer_shapes(model, adapter)
    sums = [LayerSums.zeros(s) for s in shapes]
    roles = {}
    for i, layer in enumerate(adapter.layers(model)):
        roles.update(layer_params(layer, adapter, i, shapes[i]))
    previous = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    image_id = image_token_id(model)
    device = _device(model)

    batch_mass: list[float] = []  # sum of |W * g| over every prunable weight, per batch

    # Offloaded weights (--device-map with CPU/disk offload) are put in place anew for every forward:
    # their roles are known by (module, name), and each placed weight gets the same hook.
    placed_roles = {}
    for layer in adapter.layers(model):
        for module in layer.modules():
            for name, param in module.named_parameters(recurse=False):
                if param in roles:
                    placed_roles[(id(module), name)] = roles[param]

    def on_placed(module: nn.Module, name: str, param: nn.Parameter) -> None:
        role = placed_roles.get((id(module), name))
        if role is not None and param.requires_grad:
            param.register_post_accumulate_grad_hook(lambda p, role=role: on_grad(p, role))

    def on_grad(param: torch.Tensor, role=None) -> None:
        role = role or roles[param]
        with torch.no_grad():
            # |W * g| in the gradient's own storage: it is dropped right after (no temporary per weight)
            values = param.grad.mul_(param.detach()).abs_()
            reduce_(sums[role.layer], role, values)
            batch_mass[-1] += float(values.sum())
        param.grad = None

    handles = []
    stack = contextlib.ExitStack()
    try:
        for p in model.parameters():
            p.requires_grad_(p in roles)
        handles = [p.register_post_accumulate_grad_hook(on_grad) for p in roles if p.device.type != "meta"]
        model.eval()  # no dropout: scores must not depend on chance
        used = 0
        stack.enter_context(on_placed_weights([m for layer in adapter.layers(model) for m in layer.modules()],
                                              on_placed))
        for batch in _progress(batches, "taylor (grad)"):
            labels = _labels_for(batch, tokens, image_id).to(device)
            if not (labels[:, 1:] != -100).any():
                continue
            loss = _answer_loss(model, _model_inputs(batch, device), labels)
            batch_mass.append(0.0)
            loss.backward()
            used += 1
        if used == 0:
            raise VlmpruneError(f"no calibration batch has {tokens} tokens to compute a loss on")
        effective = effective_batches(batch_mass)
        if used >= 4 and effective < used / 2:
            logger.warning("the Taylor scores rest on about %.1f of %d calibration batches: the %s loss is near "
                           "zero on most samples, so a few samples decide the plan; use --tokens text",
                           effective, used, tokens)
    finally:
        stack.close()
        for h in handles:
            h.remove()
        for p, flag in previous.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was_training)
    return sums


class Batches:
    """Re-iterable calibration batches: samples collated on the fly (images opened per batch)."""

    def __init__(self, samples, collator, batch_size: int = 1):
        if batch_size < 1:
            raise VlmpruneError(f"--batch-size must be >= 1, got {batch_size}")
        self.samples, self.collator, self.batch_size = samples, collator, batch_size

    def __len__(self) -> int:
        return (len(self.samples) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for start in range(0, len(self.samples), self.batch_size):
            with phase("data"):  # collating (tokenizing, opening images) is data work, not calibration
                batch = self.collator(self.samples[start : start + self.batch_size])
            yield batch


def calibration_batches(processor, data, image_folder=None, num_samples: int | None = 128, seed: int = 0,
                        batch_size: int = 1, max_length: int | None = None, split: str = "train") -> Batches:
    """Read a LLaVA-format file or HF dataset, draw a seeded sample, and collate lazily."""
    from vlmprune.data import Collator, read_samples, select

    samples = select(read_samples(data, image_folder, split=split), num_samples=num_samples, seed=seed)
    return Batches(samples, Collator(processor, max_length=max_length), batch_size)
