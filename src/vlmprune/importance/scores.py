"""A criterion's scores of one model, and their file (``scores.json``): what ``vlmprune prune`` writes
so that another ratio can be planned later without calibrating again (``--scores``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmprune.errors import VlmpruneError
from vlmprune.importance.layer import LayerScores
from vlmprune.importance.structures import WidthScores
from vlmprune.planning.plan import LayerShape
from vlmprune.readers import read_json

SCORES_FILE = "scores.json"
SCORES_VERSION = 2  # 2: the model record has a sample of the weights (``model.weights``); 1 is read too


@dataclass
class Scores:
    """A criterion's scores of one model: per-layer (``LayerScores``) or per-structure (``WidthScores``)."""

    method: str
    criterion: str
    tokens: str
    values: LayerScores | WidthScores
    model: dict = field(default_factory=dict)  # source_record of the scored model

    def to_json(self) -> dict:
        if isinstance(self.values, LayerScores):
            values = {"layers": self.values.layers.tolist(),
                      "blocks": None if self.values.blocks is None else [b.tolist() for b in self.values.blocks]}
        else:
            v = self.values
            values = {"heads": [t.tolist() for t in v.heads], "kv_groups": [t.tolist() for t in v.groups],
                      "mlp_channels": [t.tolist() for t in v.channels]}
        return {"version": SCORES_VERSION, "method": self.method, "criterion": self.criterion, "tokens": self.tokens,
                "model": self.model, "scores": values}

    @classmethod
    def from_json(cls, data: dict) -> Scores:
        t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
        if not isinstance(data, dict):
            raise VlmpruneError(f"not a vlmprune scores file (a JSON {type(data).__name__}, not an object); use the "
                                f"{SCORES_FILE} that `vlmprune prune` wrote")
        if data.get("version") not in (1, SCORES_VERSION):
            raise VlmpruneError(f"scores file version {data.get('version')!r} is not one this vlmprune reads "
                                f"(1, {SCORES_VERSION}); compute the scores again (prune without --scores)")
        try:
            s = data["scores"]
            if data["method"] == "layer":
                values = LayerScores(t(s["layers"]), None if s.get("blocks") is None else [t(b) for b in s["blocks"]])
            elif data["method"] == "width":
                values = WidthScores([t(x) for x in s["heads"]], [t(x) for x in s["kv_groups"]],
                                     [t(x) for x in s["mlp_channels"]])
            else:
                raise ValueError(f"method {data['method']!r} is neither 'layer' nor 'width'")
            model = data.get("model", {})
            if not isinstance(model, dict) or not all(isinstance(data[k], str) for k in ("criterion", "tokens")):
                raise TypeError("'model' must be an object, 'criterion' and 'tokens' strings")
            weights = model.get("weights")
            if weights is not None and not (isinstance(weights, list) and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in weights)):
                raise TypeError("'model.weights' must be a list of numbers")
            return cls(data["method"], data["criterion"], data["tokens"], values, model)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise VlmpruneError(f"not a vlmprune scores file ({type(exc).__name__}: {exc}); use the {SCORES_FILE} "
                                f"that `vlmprune prune` wrote") from None

    def check(self, shapes: list[LayerShape], where: str) -> None:
        """Refuse scores that do not fit a model of these layer shapes, or that are not all finite numbers."""
        n = len(shapes)
        problems: list[str] = []
        v = self.values
        if isinstance(v, LayerScores):
            tensors = [("layers", v.layers, n)]
            if v.blocks is not None:
                if len(v.blocks) != n - 1:
                    problems.append(f"{len(v.blocks)} block lengths for a model of {n} layers (expected {n - 1})")
                tensors += [(f"blocks[{i}]", b, n - i) for i, b in enumerate(v.blocks[: n - 1])]
        else:
            for name, per_layer in (("heads", v.heads), ("kv_groups", v.groups), ("mlp_channels", v.channels)):
                if len(per_layer) != n:
                    problems.append(f"{name} for {len(per_layer)} layers, but the model has {n}")
            tensors = [(f"{name}[{i}]", per_layer[i], getattr(shape, attr)) for name, per_layer, attr in
                       (("heads", v.heads, "num_heads"), ("kv_groups", v.groups, "num_kv_heads"),
                        ("mlp_channels", v.channels, "intermediate_size"))
                       for i, shape in enumerate(shapes[: len(per_layer)])]
        for name, tensor, expected in tensors:
            if tensor.dim() != 1 or tensor.numel() != expected:
                problems.append(f"{name} has {tensor.numel() if tensor.dim() == 1 else tuple(tensor.shape)} values, "
                                f"the model {expected}")
            elif not bool(torch.isfinite(tensor).all()):
                problems.append(f"{name} holds NaN or infinite values")
        if problems:
            raise VlmpruneError(f"{where} do not fit this model: {'; '.join(problems[:4])}"
                                f"{f' (and {len(problems) - 4} more)' if len(problems) > 4 else ''}. Scores are "
                                f"only valid for the model that `vlmprune prune` scored: compute them again "
                                f"(prune without --scores)")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        return cls.from_json(read_json(path, f"--scores {path}", unique_keys=True))
