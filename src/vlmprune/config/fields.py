"""How an option is declared: ``opt`` / ``group`` fields on a frozen dataclass, and the type check
every stage config runs on its values."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from vlmprune.errors import VlmpruneError


def opt(default: Any = None, help: str = "", *, flag: str | None = None, choices=None, type=None,
        positional: bool = False, cli: bool = True, default_factory=None, key: str | None = None):
    """A config field with what its command-line flag needs. ``key`` is the option's name in a flat YAML,
    ``--set`` and its flag where it differs from the field's (a group's ``path`` is ``calibration``)."""
    meta = {"help": help, "flag": flag, "choices": choices, "type": type, "positional": positional, "cli": cli,
            "key": key}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def group(cls, *, only: tuple[str, ...] | None = None):
    """A field holding an option group (:class:`LoadOptions`, ...). Its options are flags and flat YAML keys
    of the command as if they were its own, or a YAML section of the group's name; ``only`` names the ones this
    command acts on (the others are unknown options here)."""
    return field(default_factory=cls, metadata={"group": cls, "only": only})


@dataclass(frozen=True)
class Option:
    """One option of a stage as users write it: its flat key, where it lives, and its field."""

    key: str
    group: str | None  # the stage's field holding the group, or None for the stage's own fields
    field: dataclasses.Field

    @property
    def path(self) -> str:
        return f"{self.group}.{self.field.name}" if self.group else self.field.name


def options_of(cls) -> list[Option]:
    """Every option of a stage config, its groups' included (in field order)."""
    out = []
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("group")
        if sub is None:
            out.append(Option(f.metadata.get("key") or f.name, None, f))
            continue
        only = f.metadata.get("only")
        out += [Option(g.metadata.get("key") or g.name, f.name, g) for g in dataclasses.fields(sub)
                if only is None or g.name in only]
    return out


_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
               "dict": "a mapping", "list": "a list", "None": "null"}


def _is(value: Any, name: str) -> bool:
    if name == "None":
        return value is None
    if name == "bool":
        return isinstance(value, bool)
    if name in ("int", "float") and isinstance(value, bool):
        return False
    if name == "float":
        return isinstance(value, (int, float))
    return isinstance(value, {"str": str, "int": int, "dict": dict, "list": (list, tuple)}.get(name, object))


def check_types(config) -> None:
    """Every value of ``config`` of its field's declared type, so that ``overwrite: "false"`` (a string) is
    refused instead of counting as true (YAML, ``--set`` and Python callers all pass here)."""
    for f in dataclasses.fields(config):
        if f.metadata.get("group") is not None:
            continue
        value = getattr(config, f.name)
        names = [t.strip() for t in str(f.type).split("|")]
        if any(_is(value, n) for n in names):
            continue
        key = f.metadata.get("key") or f.name
        wanted = " or ".join(_TYPE_WORDS.get(n, n) for n in names)
        hint = ""
        if "bool" in names and isinstance(value, str):
            hint = f" (in YAML write {key}: {value.strip().lower()} without quotes; a quoted word is a string)"
        raise VlmpruneError(f"option {key} must be {wanted}, got {value!r} ({type(value).__name__}){hint}")


def checked(cls):
    """``@dataclass(frozen=True)`` for a config or group whose values are type-checked (:func:`check_types`)
    before its own ``__post_init__`` checks run."""
    own = cls.__dict__.get("__post_init__")

    def __post_init__(self):
        check_types(self)
        if own is not None:
            own(self)

    cls.__post_init__ = __post_init__
    return dataclass(frozen=True)(cls)
