"""What a model is: its family, part sizes and per-layer widths."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from vlmprune.adapters import Adapter, get_adapter
from vlmprune.plan import LayerShape
from vlmprune.prune.apply import layer_shapes


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
    return ModelSummary(adapter.model_type, adapter.text_model_type, count_parameters(model, adapter), len(shapes), shapes)
