"""The run record: ``run.json`` beside a model, saying how it was made.

``pruning_plan.json`` says what is removed (:class:`~vlmprune.planning.plan.PruningPlan`); ``run.json``
says how the model came to be, one typed section per stage::

    {"version": 1,
     "prune": {"method": "width", "criterion": "taylor", "ratio_target": 0.2, "achieved": {...}, ...},
     "recovery": [{"losses": {"sft": 1.0}, "steps": 12, ...}],
     "quantization": {"scheme": "int8", ...}}

``vlmprune prune`` writes ``prune``, each ``vlmprune recover`` appends to ``recovery``, ``vlmprune
quantize`` writes ``quantization``; every stage carries the sections of its input along. Scores are
in ``scores.json`` only, options in ``resolved_config.yaml``.

Run directories written before ``run.json`` existed kept these facts as free keys of
``pruning_plan.json``; :meth:`RunRecord.load` reads them from there.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vlmprune.errors import VlmpruneError
from vlmprune.planning.plan import PLAN_FILE, PLAN_VERSION
from vlmprune.readers import read_json

RUN_FILE = "run.json"
RUN_VERSION = 1


class RecordError(VlmpruneError):
    """A run record is malformed or of a version this vlmprune does not read."""


@dataclass
class PruneRecord:
    """What ``vlmprune prune`` did: how it scored, what it achieved, from what, and what it cost."""

    # scoring
    method: str | None = None
    criterion: str | None = None
    tokens: str | None = None
    layer_criterion: str | None = None  # --method auto: the layer criterion beside the width one
    ratio_target: float | None = None
    protected_layers: list[int] | None = None
    attention: str | None = None
    mlp_multiple: int | None = None
    layer_range: str | None = None
    global_ranking: bool | None = None
    # result
    achieved: dict | None = None  # params_removed, ratio, ratio_language_model
    proxy_kl: float | None = None  # --method auto: the chosen candidate's held-out KL
    stock_note: str | None = None
    rank: int | None = None  # --top-k: this candidate's rank (the output itself is rank 1)
    search: str | None = None  # --method auto: the file beside the model with every candidate (search.json)
    # inputs
    source_model: str | None = None
    calibration: str | None = None
    num_samples: int | None = None
    seed: int | None = None
    source: dict | None = None  # the input model's record (vlmprune.summary.source_record)
    # loading
    loads_with: str | None = None  # "from_pretrained" or "vlmprune.load"
    loads_with_reason: str | None = None
    # measurements
    parameters: dict | None = None  # {"before": {...}, "after": {...}}
    cost: dict | None = None  # wall time and peak memory per phase (vlmprune.phases)
    compensation: dict | None = None  # --compensate: the fit's record
    target: dict | None = None  # --target: the requirement, the footprint, the prediction and measurement

    # the keys of the old free-form record in pruning_plan.json that differ from the field names
    _LEGACY_NAMES = {"global": "global_ranking"}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneRecord:
        return cls(**_known(cls, data, "prune"))

    @classmethod
    def from_notes(cls, notes: dict[str, Any]) -> PruneRecord:
        """From the planner's notes on a plan (``plan.extra``, the keys of the old record); a note whose
        value is not of its field's type (a hand-written plan's ``"method": 5``) is left out."""
        renamed = {cls._LEGACY_NAMES.get(k, k): v for k, v in notes.items()}
        kinds = {f.name: str(f.type).split("[")[0].split(" ")[0] for f in fields(cls)}
        return cls(**{k: v for k, v in renamed.items() if k in kinds and _fits(v, kinds[k])})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class RecoveryRecord:
    """One ``vlmprune recover`` run: losses, what trained, on how much data, and where it ended."""

    losses: dict | None = None
    train: str | None = None
    fraction: float | None = None
    num_samples: int | None = None
    steps: int | None = None
    final_loss: float | None = None
    teacher: str | None = None
    hidden_layers: str | None = None
    teacher_placement: str | None = None
    teacher_bytes_per_process: list[int] | None = None
    teacher_host_bytes: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecoveryRecord:
        return cls(**_known(cls, data, "recovery"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QuantizationRecord:
    """What ``vlmprune quantize`` did: the scheme, its backend, and the bytes before and after."""

    scheme: str | None = None
    description: str | None = None
    backend: str | None = None
    backend_version: str | None = None
    quantized_modules: int | None = None
    kept: list[str] | None = None
    language_model_bytes: dict | None = None
    model_bytes: dict | None = None
    source: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizationRecord:
        return cls(**_known(cls, data, "quantization"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RunRecord:
    """The sections of ``run.json``; :meth:`load` reads it (or an old directory's plan) from a model folder."""

    prune: PruneRecord | None = None
    recovery: list[RecoveryRecord] = field(default_factory=list)
    quantization: QuantizationRecord | None = None
    version: int = RUN_VERSION

    @classmethod
    def from_dict(cls, data: Any) -> RunRecord:
        if not isinstance(data, dict):
            raise RecordError(f"a run record must be a JSON object, got {type(data).__name__}")
        version = data.get("version")
        if version != RUN_VERSION:
            raise RecordError(f"run record version {version!r} is not supported: this vlmprune reads version "
                              f"{RUN_VERSION} (a newer vlmprune wrote it? upgrade vlmprune)")
        recovery = data.get("recovery") or []
        if not isinstance(recovery, list):
            raise RecordError(f"'recovery' must be a list of records, got {type(recovery).__name__}")
        return cls(prune=PruneRecord.from_dict(data["prune"]) if data.get("prune") is not None else None,
                   recovery=[RecoveryRecord.from_dict(r) for r in recovery],
                   quantization=(QuantizationRecord.from_dict(data["quantization"])
                                 if data.get("quantization") is not None else None))

    @classmethod
    def from_plan_dict(cls, data: dict[str, Any]) -> RunRecord:
        """The record of a directory written before ``run.json``: the free keys of its ``pruning_plan.json``."""
        version = data.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise RecordError(f"pruning plan version {version!r} is not supported (expected {PLAN_VERSION}); "
                              f"its run record cannot be read")
        notes = {k: v for k, v in data.items() if k not in ("version", "drop_layers", "layers")}
        recovery = notes.pop("recovery", None) or []
        quantization = notes.pop("quantization", None)
        return cls(prune=PruneRecord.from_notes(notes) if notes else None,
                   recovery=[RecoveryRecord(**_lenient(RecoveryRecord, r)) for r in recovery],
                   quantization=(QuantizationRecord(**_lenient(QuantizationRecord, quantization))
                                 if quantization is not None else None))

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version,
                "prune": self.prune.to_dict() if self.prune is not None else None,
                "recovery": [r.to_dict() for r in self.recovery],
                "quantization": self.quantization.to_dict() if self.quantization is not None else None}

    @classmethod
    def load(cls, directory: str | Path, missing_ok: bool = False) -> RunRecord:
        """The record of the model in ``directory``: its ``run.json``, else the record an old
        ``pruning_plan.json`` carries; an empty record when there is neither and ``missing_ok``."""
        directory = Path(directory)
        for name, parse in ((RUN_FILE, cls.from_dict), (PLAN_FILE, cls.from_plan_dict)):
            path = directory / name
            if path.is_file():
                data = read_json(path, str(path), RecordError)
                if name == PLAN_FILE and not isinstance(data, dict):
                    raise RecordError(f"{path} must hold a JSON object")
                try:
                    return parse(data)
                except RecordError as exc:
                    raise RecordError(f"{path}: {exc}") from None
        if missing_ok:
            return cls()
        raise RecordError(f"no run record in {directory} (neither {RUN_FILE} nor {PLAN_FILE})")

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / RUN_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path


_KINDS = {"str": (str,), "float": (int, float), "int": (int,), "bool": (bool,), "list": (list,), "dict": (dict,)}


def _fits(value: Any, kind: str) -> bool:
    """Whether a note's value is of a field's type (``kind``: the annotation's first word; bool is no number)."""
    if value is None:
        return True
    if isinstance(value, bool) and kind != "bool":
        return False
    return isinstance(value, _KINDS.get(kind, (object,)))


def _known(cls, data: Any, section: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise RecordError(f"the {section!r} section must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecordError(f"the {section!r} section has unknown key(s) {unknown}")
    return dict(data)


def _lenient(cls, data: dict[str, Any]) -> dict[str, Any]:
    """The keys of an old record that ``cls`` knows (old runs wrote a few more, or fewer)."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in data.items() if k in names}
