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

SCORES_FILE = "scores.json"


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
        return {"version": 1, "method": self.method, "criterion": self.criterion, "tokens": self.tokens,
                "model": self.model, "scores": values}

    @classmethod
    def from_json(cls, data: dict) -> Scores:
        t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
        try:
            s = data["scores"]
            if data["method"] == "layer":
                values = LayerScores(t(s["layers"]), None if s.get("blocks") is None else [t(b) for b in s["blocks"]])
            else:
                values = WidthScores([t(x) for x in s["heads"]], [t(x) for x in s["kv_groups"]],
                                     [t(x) for x in s["mlp_channels"]])
            return cls(data["method"], data["criterion"], data["tokens"], values, data.get("model", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise VlmpruneError(f"not a vlmprune scores file ({type(exc).__name__}: {exc}); use the {SCORES_FILE} "
                                f"that `vlmprune prune` wrote") from None

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json()))

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise VlmpruneError(f"cannot read scores {path}: {exc}") from None
