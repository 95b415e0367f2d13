"""PruningPlan: what to remove from a model, as a value you can save, read and review.

JSON form (also the format a user writes by hand)::

    {"version": 1,
     "drop_layers": [3, 4],
     "layers": {"0": {"q_heads": [0, 1, 4, 5], "kv_heads": [0, 2], "mlp_channels": [0, 1, 7]}}}

Every index refers to the ORIGINAL model (the one the plan is applied to). Lists under
``layers`` name what is KEPT; a layer absent from ``layers``, or a key absent from a layer,
keeps that part whole. Any other field (scores, criterion, ratios) is carried along untouched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmprune.errors import PlanError
from vlmprune.readers import read_json

PLAN_FILE = "pruning_plan.json"
PLAN_VERSION = 1
WIDTH_KEYS = ("q_heads", "kv_heads", "mlp_channels")


@dataclass(frozen=True)
class LayerShape:
    """Widths of one decoder layer: query heads, key/value heads, head dim, MLP channels."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class LayerKeep:
    """What one layer keeps, fully resolved (sorted original indices)."""

    q_heads: tuple[int, ...]
    kv_heads: tuple[int, ...]
    mlp_channels: tuple[int, ...]


@dataclass
class PruningPlan:
    """Layers to drop and, per layer, the heads and MLP channels to keep."""

    drop_layers: list[int] = field(default_factory=list)
    layers: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- JSON in and out -------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any) -> PruningPlan:
        if not isinstance(data, dict):
            raise PlanError(f"a pruning plan must be a JSON object, got {type(data).__name__}")
        version = data.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise PlanError(f"pruning plan version {version!r} is not supported (expected {PLAN_VERSION})")
        drop = data.get("drop_layers", [])
        if not isinstance(drop, list) or not all(_is_index(i) for i in drop):
            raise PlanError(f"'drop_layers' must be a list of non-negative integers, got {drop!r}")
        if len(set(drop)) != len(drop):
            raise PlanError(f"'drop_layers' lists a layer twice: {drop}")
        raw_layers = data.get("layers", {})
        if not isinstance(raw_layers, dict):
            raise PlanError("'layers' must be an object mapping layer index -> {q_heads, kv_heads, mlp_channels}")
        layers: dict[int, dict[str, list[int]]] = {}
        for key, entry in raw_layers.items():
            try:
                idx = int(key)
            except (TypeError, ValueError):
                raise PlanError(f"'layers' key {key!r} is not a layer index") from None
            if idx < 0:
                raise PlanError(f"'layers' key {key!r} is negative")
            if idx in layers:
                first = next(k for k in raw_layers if k != key and _as_index(k) == idx)
                raise PlanError(f"'layers' keys {first!r} and {key!r} both name layer {idx}; give each layer once")
            if not isinstance(entry, dict):
                raise PlanError(f"layers[{key}] must be an object with q_heads / kv_heads / mlp_channels")
            unknown = set(entry) - set(WIDTH_KEYS)
            if unknown:
                raise PlanError(
                    f"layers[{key}] has unknown key(s) {sorted(unknown)}; allowed: {', '.join(WIDTH_KEYS)}"
                )
            clean = {}
            for name, values in entry.items():
                if not isinstance(values, list) or not all(_is_index(v) for v in values):
                    raise PlanError(f"layers[{key}].{name} must be a list of non-negative integers")
                if len(set(values)) != len(values):
                    raise PlanError(f"layers[{key}].{name} lists an index twice: {values}")
                clean[name] = sorted(values)
            layers[idx] = clean
        extra = {k: v for k, v in data.items() if k not in ("version", "drop_layers", "layers")}
        return cls(sorted(drop), layers, extra)

    def to_dict(self) -> dict[str, Any]:
        clash = {"version", "drop_layers", "layers"} & set(self.extra)
        if clash:
            raise PlanError(f"extra plan fields may not reuse the reserved names {sorted(clash)}")
        return {
            "version": PLAN_VERSION,
            "drop_layers": sorted(self.drop_layers),
            "layers": {str(i): dict(self.layers[i]) for i in sorted(self.layers)},
            **self.extra,
        }

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE
        if not path.is_file():
            raise PlanError(f"no pruning plan at {path}")
        data = read_json(path, f"pruning plan {path}", PlanError, unique_keys=True)
        try:
            return cls.from_dict(data)
        except PlanError as exc:
            raise PlanError(f"pruning plan {path}: {exc}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    # ---- meaning -----------------------------------------------------------------------
    @property
    def is_empty(self) -> bool:
        return not self.drop_layers and not self.layers

    def kept_layers(self, num_layers: int) -> list[int]:
        """Original indices of the layers that survive, in order (student j <- teacher kept[j])."""
        dropped = set(self.drop_layers)
        beyond = sorted(i for i in dropped if i >= num_layers)
        if beyond:
            raise PlanError(f"the plan drops layer(s) {beyond} of a model with only {num_layers} layers: "
                            f"it was made for a deeper model")
        return [i for i in range(num_layers) if i not in dropped]

    def resolve(self, shapes: list[LayerShape]) -> dict[int, LayerKeep]:
        """Check the plan against the model's layer shapes; return every width-pruned layer's kept sets.

        Raises PlanError naming the wrong entry when the plan does not fit.
        """
        n = len(shapes)
        for i in self.drop_layers:
            if i >= n:
                raise PlanError(f"drop_layers names layer {i}, but the model has {n} layers (0..{n - 1})")
        if len(self.drop_layers) >= n:
            raise PlanError(f"the plan drops all {n} layers; keep at least one")
        resolved: dict[int, LayerKeep] = {}
        for i, entry in sorted(self.layers.items()):
            if i >= n:
                raise PlanError(f"layers[{i}] does not exist: the model has {n} layers (0..{n - 1})")
            if i in self.drop_layers:
                raise PlanError(f"layer {i} is both dropped and width-pruned; remove it from 'layers'")
            resolved[i] = _resolve_layer(i, entry, shapes[i])
        return resolved


def _as_index(key: Any) -> int | None:
    try:
        return int(key)
    except (TypeError, ValueError):
        return None


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _resolve_layer(i: int, entry: dict[str, list[int]], shape: LayerShape) -> LayerKeep:
    def checked(name: str, limit: int) -> list[int] | None:
        if name not in entry:
            return None
        values = entry[name]
        if not values:
            raise PlanError(f"layers[{i}].{name} keeps nothing; keep at least one (or drop the layer)")
        bad = [v for v in values if v >= limit]
        if bad:
            raise PlanError(f"layers[{i}].{name} has index {bad[0]} out of range: "
                            f"the layer has {limit} (0..{limit - 1})")
        return values

    q = checked("q_heads", shape.num_heads)
    kv = checked("kv_heads", shape.num_kv_heads)
    mlp = checked("mlp_channels", shape.intermediate_size)
    g = shape.group_size
    if kv is None:
        kv = list(range(shape.num_kv_heads))
        if q is None:
            q = list(range(shape.num_heads))
    elif q is None:
        q = [h for k in kv for h in range(k * g, (k + 1) * g)]
    kv_set = set(kv)
    orphans = [h for h in q if h // g not in kv_set]
    if orphans:
        raise PlanError(
            f"layers[{i}].q_heads keeps head {orphans[0]}, which belongs to kv head {orphans[0] // g}, "
            f"but kv_heads drops it (q head h belongs to kv head h // {g})"
        )
    counts = {k: sum(1 for h in q if h // g == k) for k in kv}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise PlanError(
            f"layers[{i}]: every kept kv head must keep the same number (>0) of q heads, got {counts} "
            f"(kv head -> kept q heads); grouped-query attention needs num_attention_heads divisible "
            f"by num_key_value_heads"
        )
    if mlp is None:
        mlp = list(range(shape.intermediate_size))
    return LayerKeep(tuple(q), tuple(kv), tuple(mlp))
