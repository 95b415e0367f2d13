"""The one way vlmprune reads a JSON or YAML file it did not write in this process: bounded, and every
failure a :class:`~vlmprune.errors.VlmpruneError` that names the file.

``json`` and ``yaml`` alone end in internal errors on hostile or broken input: JSON nested
100,000 deep raises ``RecursionError``, a 5,000-digit integer ``ValueError`` (Python's limit on
int parsing), and a YAML "billion laughs" (anchors whose aliases nest) loads as a small graph of
shared references that every later walk (``asdict``, ``yaml.dump``, ``json.dumps``) expands to
billions of nodes. Here nesting is bounded (:data:`MAX_DEPTH`), and a YAML document whose aliases
expand to more than :data:`MAX_YAML_NODES` nodes, or refer to themselves, is refused before it is
built. Imports nothing heavy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from vlmprune.errors import VlmpruneError

MAX_DEPTH = 100  # containers inside containers; vlmprune's own files nest fewer than 10
MAX_YAML_NODES = 100_000  # nodes of a YAML document with its aliases expanded; configs have a few hundred


def parse_json(text: str | bytes, what: str, error: type[VlmpruneError] = VlmpruneError,
               unique_keys: bool = False) -> Any:
    """``json.loads(text)``, refused with ``error`` naming ``what`` (e.g. "task file t.json") when it is
    not JSON, nests deeper than :data:`MAX_DEPTH` or holds a number Python will not parse; with
    ``unique_keys``, also when an object names a key twice (``json`` keeps the last one silently)."""

    def unique(pairs: list[tuple[str, Any]]) -> dict:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            twice = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise error(f"{what} names the key {twice!r} twice in one object; give each key once")
        return out

    try:
        value = json.loads(text, object_pairs_hook=unique if unique_keys else None)
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}); "
                    f"fix or replace the file") from None
    except RecursionError:
        raise _too_deep(what, error) from None
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except ValueError as exc:  # int parsing limit: "Exceeds the limit (4300 digits) for integer string conversion"
        raise _unreadable_number(what, exc, error) from None
    check_depth(value, what, error)
    return value


def _read_text(path: Path, what: str, kind: str, error: type[VlmpruneError]) -> str:
    """The UTF-8 text of a ``kind`` (JSON, YAML) file; a missing file, a folder or unreadable bytes refused."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what}: file not found ({path})") from None
    except IsADirectoryError:
        raise error(f"{what} is a directory, not a {kind} file") from None
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not valid {kind}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it "
                    f"as UTF-8") from None
    except OSError as exc:
        raise error(f"cannot read {what}: {exc.strerror or exc}") from None


def read_json(path: str | Path, what: str | None = None, error: type[VlmpruneError] = VlmpruneError,
              unique_keys: bool = False) -> Any:
    """The JSON value of the file ``path`` (see :func:`parse_json`); a missing file, a folder, unreadable
    bytes are refused with ``error`` too."""
    what = what or str(path)
    text = _read_text(Path(path), what, "JSON", error)
    return parse_json(text, what, error, unique_keys)


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that measures the composed document before building it."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_yaml_graph(node, self._what, self._error)
        return node


def parse_yaml(text: str, what: str, error: type[VlmpruneError] = VlmpruneError) -> Any:
    """``yaml.safe_load(text)``, refused with ``error`` naming ``what`` when it is not YAML, nests deeper
    than :data:`MAX_DEPTH`, or its aliases expand past :data:`MAX_YAML_NODES` nodes or refer to themselves."""
    loader = _BoundedLoader(text)
    loader._what, loader._error = what, error
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise error(f"{what} is not valid YAML: {exc}") from None
    except RecursionError:
        raise _too_deep(what, error) from None
    except ValueError as exc:  # an integer past Python's parsing limit
        raise _unreadable_number(what, exc, error) from None
    finally:
        loader.dispose()


def read_yaml_file(path: str | Path, what: str | None = None, error: type[VlmpruneError] = VlmpruneError) -> Any:
    """The YAML value of the file ``path`` (see :func:`parse_yaml`)."""
    what = what or str(path)
    text = _read_text(Path(path), what, "YAML", error)
    return parse_yaml(text, what, error)


def check_depth(value: Any, what: str, error: type[VlmpruneError] = VlmpruneError) -> None:
    """Refuse lists and dicts nested deeper than :data:`MAX_DEPTH` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > MAX_DEPTH:
            raise _too_deep(what, error)
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _check_yaml_graph(root: yaml.Node, what: str, error: type[VlmpruneError]) -> None:
    """The size of the document with every alias expanded (memoized per node, so cheap), its depth, and
    no alias inside the node it refers to."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            open_.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if size[key] > MAX_YAML_NODES:
                raise error(f"{what} expands to more than {MAX_YAML_NODES:,} values through its anchors and aliases "
                            f"(&name / *name); write the values out, or use fewer aliases")
            if depth[key] > MAX_DEPTH:
                raise _too_deep(what, error)
            continue
        if key in size:
            continue
        if key in open_:
            raise error(f"{what} has an alias inside the value it refers to (a recursive &anchor / *alias); "
                        f"write the value out")
        if len(open_) > MAX_DEPTH:
            raise _too_deep(what, error)
        open_.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in size)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _too_deep(what: str, error: type[VlmpruneError]) -> VlmpruneError:
    return error(f"{what} nests lists or objects more than {MAX_DEPTH} levels deep; vlmprune's files nest a few "
                 f"levels: check that it is the file you meant")


def _unreadable_number(what: str, exc: ValueError, error: type[VlmpruneError]) -> VlmpruneError:
    if "integer string conversion" in str(exc):
        return error(f"{what} holds an integer of more than {sys.get_int_max_str_digits()} digits, which Python "
                     f"refuses to parse; no vlmprune value is that long: check that it is the file you meant")
    return error(f"{what} holds a value vlmprune cannot read ({str(exc).splitlines()[0] if str(exc) else exc!r})")
