"""The criterion registry: a criterion is one decorated function, found by name.

    @vlmprune.register_criterion("my_norm", method="width", stats=None)
    def my_norm(stats, ctx):            # ctx: ScoringContext (model, adapter, shapes, ...)
        return WidthScores(...)         # width; a 1-D tensor of per-layer scores for method="layer"

``stats`` names the statistics a criterion needs: the name of a collector, which gathers them from
the calibration batches; None means no data. A collector is one decorated function too:

    @vlmprune.register_collector("my_stats")
    def collect_my_stats(model, batches, tokens):   # tokens: the positions to use (--tokens)
        return ...                                  # whatever the criteria of stats="my_stats" read

The built-in collectors (``hidden_states``, ``skip_loss``, ``activations``, ``taylor``) are in
``vlmprune.calibrate``. The registry itself imports nothing heavy, so the CLI can list names cheaply;
the built-ins register when ``vlmprune.importance.builtin`` and ``vlmprune.calibrate`` are imported
(``get_criterion`` and ``get_collector`` do it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vlmprune.errors import VlmpruneError

METHODS = ("layer", "width")
DEFAULT_CRITERION = {"layer": "block_influence", "width": "taylor"}


@dataclass(frozen=True)
class Criterion:
    name: str
    method: str  # "layer" or "width"
    stats: str | None  # collector name, or None when no data is needed
    fn: Callable[[Any, Any], Any]
    default_tokens: str = "all"
    doc: str = ""

    def __call__(self, stats, ctx):
        return self.fn(stats, ctx)


_REGISTRY: dict[str, Criterion] = {}


def register_criterion(name: str, method: str, stats: str | None = None, default_tokens: str = "all"):
    """Register ``fn(stats, ctx)`` as criterion ``name`` of ``method``; returns ``fn`` unchanged."""
    if method not in METHODS:
        raise VlmpruneError(f"a criterion's method is 'layer' or 'width', got {method!r}")

    def register(fn):
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _REGISTRY[name] = Criterion(name, method, stats, fn, default_tokens, doc)
        return fn

    return register


def _builtins() -> None:
    import vlmprune.importance.builtin  # noqa: F401 - registers the built-in criteria


def criteria(method: str | None = None) -> list[Criterion]:
    """Registered criteria (of one method), built-ins first in their documented order."""
    _builtins()
    return [c for c in _REGISTRY.values() if method in (None, c.method)]


def get_criterion(method: str, name: str | None = None) -> Criterion:
    """The criterion ``name`` of ``method`` (its default when None), with a message listing the choices."""
    if method not in METHODS:
        raise VlmpruneError(f"--method must be 'layer' or 'width', got {method!r}")
    _builtins()
    name = name or DEFAULT_CRITERION[method]
    found = _REGISTRY.get(name)
    if found is None or found.method != method:
        choices = ", ".join(c.name for c in criteria(method))
        raise VlmpruneError(f"unknown {method} criterion {name!r}; choose one of {choices}")
    return found


# --------------------------------------------------------------------------- statistics collectors

_COLLECTORS: dict[str, Callable[..., Any]] = {}


def register_collector(name: str):
    """Register ``fn(model, batches, tokens) -> statistics`` as collector ``name``; returns ``fn`` unchanged."""

    def register(fn):
        _COLLECTORS[name] = fn
        return fn

    return register


def collectors() -> dict[str, Callable[..., Any]]:
    """Registered collectors by name, built-ins first."""
    import vlmprune.calibrate  # noqa: F401 - registers the built-in collectors

    return dict(_COLLECTORS)


def get_collector(name: str) -> Callable[..., Any]:
    """The collector ``name``, with a message listing the choices."""
    found = collectors().get(name)
    if found is None:
        raise VlmpruneError(f"no statistics collector {name!r} is registered; registered: {', '.join(_COLLECTORS)}")
    return found
