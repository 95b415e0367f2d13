"""YAML + overrides + flags -> a config, and a config -> YAML."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from vlmprune.config.checks import flag_name
from vlmprune.config.fields import Option, options_of
from vlmprune.errors import VlmpruneError
from vlmprune.readers import parse_yaml, read_yaml_file

RESOLVED_CONFIG = "resolved_config.yaml"


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["evaluation.limit=100", "teacher=/m"]`` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise VlmpruneError(f"overrides are key=value (dotted keys for nested options), got {item!r}")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise VlmpruneError(f"override {item!r} conflicts with another override of {part!r}")
        try:
            node[parts[-1]] = parse_yaml(raw, f"override {item!r}")
        except VlmpruneError as exc:
            if "is not valid YAML" not in str(exc):
                raise  # an alias bomb or a nesting past the limit: refused, not taken as text
            node[parts[-1]] = raw
    return out


def read_yaml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    if not Path(path).exists():
        raise VlmpruneError(f"config file not found: {path}")
    loaded = read_yaml_file(path)
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise VlmpruneError(f"{path} must hold a mapping of option: value")
    return loaded


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = deep_merge(base[key], value)
        else:
            merged[key] = value
    return merged


def check_keys(values: dict, known, where: str) -> None:
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise VlmpruneError(f"unknown option(s) {', '.join(where + k for k in unknown)}; "
                            f"known{' under ' + where.rstrip('.') if where else ''}: {', '.join(sorted(known))}")


def grouped(cls, values: dict[str, Any]) -> dict[str, Any]:
    """Flat keys (``num_samples: 8``, as flags and ``--set`` give them) and group sections
    (``calibration: {num_samples: 8}``) -> the nested form of ``cls``'s fields. A key that names both a group and
    an option of it (``calibration``: the data, or the section) is the section when its value is a mapping.
    Unknown keys, and one option given both ways, are refused with the known ones."""
    known = options_of(cls)
    by_key = {o.key: o for o in known}
    sections = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("group") is not None}
    out: dict[str, Any] = {}
    where: dict[str, str] = {}

    def put(option: Option, value: Any, given_as: str) -> None:
        if option.path in where:
            raise VlmpruneError(f"option {option.key} is given twice (as {where[option.path]} and as {given_as}): "
                                f"give it once")
        where[option.path] = given_as
        if option.group is None:
            out[option.field.name] = value
        else:
            out.setdefault(option.group, {})[option.field.name] = value

    for key, value in values.items():
        if key in sections and (isinstance(value, dict) or dataclasses.is_dataclass(value)):
            if dataclasses.is_dataclass(value):
                value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
            members = {o.field.name: o for o in known if o.group == key}
            check_keys(value, members, f"{key}.")
            for name, item in value.items():
                put(members[name], item, f"{key}.{name}")
        elif key in by_key:
            put(by_key[key], value, key)
        else:
            check_keys({key: value}, [*by_key, *sections], "")
    return out


def build(cls, values: dict[str, Any] | None = None, /, **options):
    """The config ``cls`` of flat keys and/or group sections (``values`` and keyword ``options``), with unknown
    keys named and every value type-checked; the one way a config is made from user input (CLI, YAML, the
    Python verbs' keyword options, the study's cells)."""
    nested = grouped(cls, {**(values or {}), **options})
    try:
        for name, section in list(nested.items()):
            sub = next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("group")
            if sub is not None:
                nested[name] = sub(**section)
        return cls(**nested)
    except TypeError as exc:
        raise VlmpruneError(f"bad option value: {exc}") from None


def add_arguments(parser: argparse.ArgumentParser, cls, overrides: bool = True) -> None:
    """Flags for every option of ``cls`` (its groups' included), plus ``--config`` and ``key=value`` overrides."""
    parser.set_defaults(config_class=cls)
    for option in options_of(cls):
        f, meta = option.field, option.field.metadata
        if not meta.get("cli", True):
            continue
        kwargs: dict[str, Any] = {"help": meta.get("help", ""), "default": argparse.SUPPRESS}
        if f.type in ("bool", bool):  # an option on by default is turned off by --no-FLAG
            kwargs["action"] = argparse.BooleanOptionalAction if f.default is True else "store_true"
        else:
            if meta.get("type"):
                kwargs["type"] = meta["type"]
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if f.default not in (None, dataclasses.MISSING) and not meta.get("positional"):
                kwargs["help"] += f" (default: {f.default})"
        if meta.get("positional"):
            kwargs.pop("default")
            kwargs["nargs"] = "?"
            parser.add_argument(option.key, **kwargs)
        else:
            parser.add_argument(meta.get("flag") or flag_name(option.key), dest=option.key, **kwargs)
    parser.add_argument("--config", dest="config_file", metavar="YAML",
                        help="options from a YAML file (flat keys with _, or sections of the option groups); "
                             "overrides and flags win")
    if overrides:
        parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                            help="override an option, dotted for nested ones (repeatable; also as trailing KEY=VALUE)")


def resolve(cls, args: argparse.Namespace, extra: list[str] | None = None):
    """The config of one command line: YAML, then ``key=value`` overrides, then flags (each layer brought to
    the nested form first, so that a flag beats the same option in a YAML section)."""
    yaml_values = grouped(cls, read_yaml(getattr(args, "config_file", None)))
    overrides = parse_overrides(list(getattr(args, "overrides", None) or []) + list(extra or []))
    keys = {o.key for o in options_of(cls)}
    flags = {k: v for k, v in vars(args).items() if k in keys and v is not None}
    merged = deep_merge(deep_merge(yaml_values, grouped(cls, overrides)), grouped(cls, flags))
    return build(cls, merged)


def as_dict(config) -> dict[str, Any]:
    """A stage config as nested plain values: its own options, then one section per group holding the options
    the stage takes of it (what ``--config`` reads back to the same config)."""
    out: dict[str, Any] = {}
    for option in options_of(type(config)):
        if option.group is None:
            out[option.field.name] = getattr(config, option.field.name)
        else:
            out.setdefault(option.group, {})[option.field.name] = getattr(getattr(config, option.group),
                                                                            option.field.name)
    return out


def flat_dict(config) -> dict[str, Any]:
    """A stage config as ``{flat key: value}``, the keys users write as flags and flat YAML."""
    return {o.key: getattr(getattr(config, o.group) if o.group else config, o.field.name)
            for o in options_of(type(config))}


def to_yaml(config) -> str:
    return yaml.safe_dump(as_dict(config), sort_keys=False)


def load_stage_config(cls, path: str | Path | None = None, values: dict[str, Any] | None = None):
    """A stage config from a YAML file (optional) with ``values`` on top (None = not given)."""
    given = grouped(cls, {k: v for k, v in (values or {}).items() if v is not None})
    return build(cls, deep_merge(grouped(cls, read_yaml(path)), given))
