"""What a model is: its family, part sizes and per-layer widths."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from vlmprune.adapters import Adapter, get_adapter
from vlmprune.errors import VlmpruneError
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


def source_record(model: nn.Module) -> dict:
    """What a pruned model's plan records of the model it was cut from, so a teacher can be recognised.

    Depth, every layer's widths, vocabulary and hidden size, and a fingerprint over all of them.
    """
    adapter = get_adapter(model)
    text = adapter.text_config(model)
    arch = {"model_type": adapter.model_type, "text_model_type": adapter.text_model_type,
            "hidden_size": text.hidden_size, "vocab_size": model.get_output_embeddings().weight.shape[0],
            "num_layers": len(adapter.layers(model)), "layers": [asdict(s) for s in layer_shapes(model, adapter)]}
    digest = hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]
    return {**arch, "fingerprint": digest}


def check_teacher(teacher: nn.Module, recorded: dict, teacher_name: str) -> None:
    """Refuse a teacher that is not the model the student's plan says it was cut from."""
    actual = source_record(teacher)
    if actual["fingerprint"] == recorded.get("fingerprint"):
        return
    differences = []
    for key in ("model_type", "text_model_type", "hidden_size", "vocab_size", "num_layers"):
        if key in recorded and recorded[key] != actual[key]:
            differences.append(f"{key} {actual[key]} (the plan records {recorded[key]})")
    if "layers" in recorded and recorded["layers"] != actual["layers"] and actual["num_layers"] == recorded.get("num_layers"):
        bad = [i for i, (a, b) in enumerate(zip(actual["layers"], recorded["layers"])) if a != b]
        differences.append(f"the widths of layer(s) {bad[:5]}")
    raise VlmpruneError(f"the teacher {teacher_name} is not the model this student was pruned from: "
                        f"{'; '.join(differences) or 'its fingerprint differs'}. Pass the unpruned model that "
                        f"`vlmprune prune` read (pruning_plan.json: source_model)")
