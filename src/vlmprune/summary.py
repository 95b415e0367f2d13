"""What a model is: its family, part sizes and per-layer widths."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from vlmprune.adapters import Adapter, config_value, get_adapter
from vlmprune.errors import VlmpruneError
from vlmprune.planning.plan import LayerShape


def layer_shapes(model: nn.Module, adapter: Adapter | None = None) -> list[LayerShape]:
    """Widths of every decoder layer, read from the modules' weights (the truth)."""
    adapter = adapter or get_adapter(model)
    lay = adapter.layout
    shapes: list[LayerShape | None] = []
    heads = None  # (q, kv, head_dim) of the first layer with prunable heads
    for layer in adapter.layers(model):
        mlp = adapter.mlp(layer)
        channels = getattr(mlp, lay.down).in_features
        if not adapter.has_heads(layer):
            shapes.append(channels)  # filled in below: its head widths are borrowed
            continue
        attn = adapter.attention(layer)
        head_dim = attn.head_dim
        n_q = getattr(attn, lay.o).in_features // head_dim
        if lay.qkv:
            n_kv = (getattr(attn, lay.qkv).out_features - n_q * head_dim) // (2 * head_dim)
        else:
            n_kv = getattr(attn, lay.k).out_features // head_dim
        heads = heads or (n_q, n_kv, head_dim)
        shapes.append(LayerShape(n_q, n_kv, head_dim, channels))
    if heads is None:  # no layer with heads: the config's widths
        config = adapter.text_config(model)
        heads = tuple(config_value(config, k) for k in ("num_attention_heads", "num_key_value_heads", "head_dim"))
    # A layer without prunable heads (hybrid linear attention) reports the head widths of the first
    # layer with heads, so that uniform cuts of the attention layers stay uniform (and stock-loadable).
    return [s if isinstance(s, LayerShape) else LayerShape(*heads, s) for s in shapes]


def _unique(module: nn.Module) -> dict[int, nn.Parameter]:
    return {id(p): p for p in module.parameters()}


def _numel(p) -> int:
    """Logical number of weights: a bitsandbytes 4-bit parameter holds two per packed byte and
    keeps its real shape in its quant_state."""
    state = getattr(p, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else p.numel()


def count_parameters(model: nn.Module, adapter: Adapter | None = None) -> dict[str, int]:
    """Parameters of the vision tower, projector, language model (with embeddings and head), total.

    Tied weights count once; a projector nested in the vision module (Qwen's merger) counts as
    projector only.
    """
    adapter = adapter or get_adapter(model)
    everything = _unique(model)
    projector = _unique(adapter.projector(model))
    vision = {k: p for k, p in _unique(adapter.vision(model)).items() if k not in projector}
    lm = {k: p for k, p in everything.items() if k not in projector and k not in vision}
    n = lambda d: sum(_numel(p) for p in d.values())  # noqa: E731
    return {"vision": n(vision), "projector": n(projector), "language_model": n(lm), "total": n(everything)}


@dataclass
class ModelSummary:
    model_type: str
    text_model_type: str
    parameters: dict[str, int]
    num_layers: int
    layers: list[LayerShape]

    @property
    def uniform(self) -> bool:
        return len(set(self.layers)) <= 1

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type,
            "text_model_type": self.text_model_type,
            "parameters": self.parameters,
            "num_layers": self.num_layers,
            "layers": [asdict(s) for s in self.layers],
        }


def summarize(model: nn.Module) -> ModelSummary:
    adapter = get_adapter(model)
    shapes = layer_shapes(model, adapter)
    return ModelSummary(adapter.model_type, adapter.text_model_type, count_parameters(model, adapter), len(shapes),
                        shapes)


def source_record(model: nn.Module) -> dict:
    """What a pruned model's plan records of the model it was cut from, so a teacher can be recognised.

    Depth, every layer's widths, vocabulary and hidden size, and a fingerprint over all of them (the
    architecture); ``weights``: a few values of the embedding and the first and last decoder layers'
    weights (:func:`weights_sample`), which tell apart two models of the same architecture.
    """
    adapter = get_adapter(model)
    text = adapter.text_config(model)
    arch = {"model_type": adapter.model_type, "text_model_type": adapter.text_model_type,
            "hidden_size": text.hidden_size, "vocab_size": model.get_output_embeddings().weight.shape[0],
            "num_layers": len(adapter.layers(model)), "layers": [asdict(s) for s in layer_shapes(model, adapter)]}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
    return {**arch, "fingerprint": digest, "weights": weights_sample(model, adapter)}


WEIGHT_SAMPLES = 8  # values per sampled tensor
WEIGHTS_RTOL = 1e-2  # bf16 / fp16 copies of one model agree to ~0.4%; other weights differ by ~100%


def weights_sample(model: nn.Module, adapter: Adapter | None = None) -> list[float] | None:
    """:data:`WEIGHT_SAMPLES` evenly spaced values of the input embedding and of the first parameter of the
    first and last decoder layers: a cheap fingerprint of the weights that survives a change of dtype
    (compare with :func:`same_weights`). None when a weight is not in memory (offloaded with --device-map)."""
    adapter = adapter or get_adapter(model)
    layers = adapter.layers(model)
    tensors = [model.get_input_embeddings().weight]
    tensors += [next(iter(layers[i].parameters()), None) for i in (0, len(layers) - 1)]
    values: list[float] = []
    for t in tensors:
        if t is None or t.device.type == "meta" or t.numel() == 0:
            return None
        flat = t.detach().reshape(-1)
        n = flat.numel()
        idx = torch.tensor([k * (n - 1) // (WEIGHT_SAMPLES - 1) for k in range(WEIGHT_SAMPLES)], device=flat.device)
        values += [float(f"{v:.6g}") for v in flat[idx].to(torch.float64).tolist()]
    return values


def same_weights(a: list[float] | None, b: list[float] | None) -> bool | None:
    """Whether two :func:`weights_sample` are of one model (None: one of them is unknown)."""
    if a is None or b is None:
        return None
    if len(a) != len(b):
        return False
    scale = max((abs(v) for v in a + b), default=0.0)
    return all(abs(x - y) <= WEIGHTS_RTOL * max(abs(x), abs(y)) + 1e-3 * scale for x, y in zip(a, b))


def differences(actual: dict, recorded: dict, whose: str) -> list[str]:
    """How the model ``actual`` (a :func:`source_record`) differs from a ``recorded`` one, as phrases."""
    out = []
    for key in ("model_type", "text_model_type", "hidden_size", "vocab_size", "num_layers"):
        if key in recorded and recorded[key] != actual[key]:
            out.append(f"{key} {actual[key]} ({whose} says {recorded[key]})")
    same_depth = actual["num_layers"] == recorded.get("num_layers")
    if isinstance(recorded.get("layers"), list) and recorded["layers"] != actual["layers"] and same_depth:
        bad = [i for i, (a, b) in enumerate(zip(actual["layers"], recorded["layers"])) if a != b]
        out.append(f"the widths of layer(s) {bad[:5]}")
    return out


def check_teacher(teacher: nn.Module, recorded: dict, teacher_name: str) -> None:
    """Refuse a teacher that is not the model the student's run record says it was cut from."""
    actual = source_record(teacher)
    if actual["fingerprint"] == recorded.get("fingerprint"):
        return
    differences_ = differences(actual, recorded, "the student's record")
    raise VlmpruneError(f"the teacher {teacher_name} is not the model this student was pruned from: "
                        f"{'; '.join(differences_) or 'its fingerprint differs'}. Pass the unpruned model that "
                        f"`vlmprune prune` read (run.json: prune.source_model)")
