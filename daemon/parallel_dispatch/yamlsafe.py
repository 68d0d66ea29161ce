"""Safe YAML loading that remembers where every value came from.

PyYAML's safe loader already refuses arbitrary objects, but it forgets
positions and happily expands alias bombs.  We compose the node graph (aliases
stay shared there), then build plain Python data ourselves: that lets us record
`line:column` for every key and value, reject duplicate keys and foreign tags,
and stop expansion after a fixed node budget instead of running out of memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

try:  # libyaml is ~10x faster on large files; fall back to pure Python.
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

from .errors import Diagnostic, TaskFileError

MAX_FILE_BYTES = 32 * 1024 * 1024
"""Task files beyond this are refused before reading (a 50,000-task file is ~6 MB)."""

MAX_NODES = 5_000_000
"""Total value budget, a backstop against absurdly large documents."""

MAX_ALIAS_NODES = 100_000
"""Values reached a second time through aliases: shared prompts need a few, while a
"billion laughs" document needs billions and hits this within a fraction of a second."""

Path_ = tuple[str | int, ...]

_SAFE_SCALAR_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:timestamp",
}


@dataclass
class Positions:
    """1-based (line, column) of values and of mapping keys, by data path."""

    values: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path_, tuple[int, int]] = field(default_factory=dict)

    def of(self, path: Path_, key: bool = False) -> tuple[int, int] | None:
        """Position of `path` (its key if `key`), else of its deepest known ancestor."""
        p = tuple(path)
        first, second = (self.keys, self.values) if key else (self.values, self.keys)
        while p:
            if p in first:
                return first[p]
            if p in second:
                return second[p]
            p = p[:-1]
        return self.values.get((), None)


@dataclass
class Document:
    data: Any
    positions: Positions
    file: str


class _Builder:
    def __init__(self, file: str) -> None:
        self.file = file
        self.positions = Positions()
        self.nodes = 0
        self.visited: set[int] = set()
        self.alias_nodes = 0
        self.errors: list[Diagnostic] = []
        self._constructor = yaml.SafeLoader("")

    def _pos(self, node: yaml.Node) -> tuple[int, int]:
        return node.start_mark.line + 1, node.start_mark.column + 1

    def _error(self, node: yaml.Node, message: str) -> None:
        line, col = self._pos(node)
        self.errors.append(Diagnostic(self.file, line, col, message))

    def build(self, node: yaml.Node, path: Path_) -> Any:
        self.nodes += 1
        if id(node) in self.visited:
            self.alias_nodes += 1
        else:
            self.visited.add(id(node))
        if self.nodes > MAX_NODES or self.alias_nodes > MAX_ALIAS_NODES:
            line, col = self._pos(node)
            raise TaskFileError([Diagnostic(
                self.file, line, col,
                f"document expands to more than {MAX_NODES:,} values, or more than "
                f"{MAX_ALIAS_NODES:,} through aliases (an alias bomb?); "
                "remove the deeply nested anchors/aliases",
            )])
        self.positions.values[path] = self._pos(node)
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node)
        if isinstance(node, yaml.SequenceNode):
            if node.tag not in ("tag:yaml.org,2002:seq",):
                self._error(node, f"unsupported YAML tag {node.tag!r}; use plain lists")
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        self._error(node, "unsupported YAML node")  # pragma: no cover
        return None

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        tag = node.tag
        if tag == "tag:yaml.org,2002:str":
            return node.value
        if tag not in _SAFE_SCALAR_TAGS:
            self._error(node, f"unsupported YAML tag {tag!r}; only plain data is allowed")
            return node.value
        return self._constructor.construct_object(node, deep=True)

    def _mapping(self, node: yaml.MappingNode, path: Path_) -> dict[str, Any]:
        if node.tag != "tag:yaml.org,2002:map":
            self._error(node, f"unsupported YAML tag {node.tag!r}; use plain mappings")
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self._error(key_node, "YAML merge keys ('<<') are not supported; repeat the keys")
                continue
            key = self.build(key_node, (*path, "<key>"))
            if not isinstance(key, str):
                key = str(key)
            if key in out:
                self._error(key_node, f"duplicate key {key!r}")
            self.positions.keys[(*path, key)] = self._pos(key_node)
            out[key] = self.build(value_node, (*path, key))
        self.positions.values.pop((*path, "<key>"), None)
        return out


def _whole_file(file: str, message: str) -> TaskFileError:
    return TaskFileError([Diagnostic(file, None, None, message)])


def load_yaml(path: Path, display: str | None = None) -> Document:
    """Load one YAML document from `path`, refusing anything unsafe or oversized."""
    file = display or str(path)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise _whole_file(file, "file not found") from None
    except OSError as exc:
        raise _whole_file(file, f"cannot read: {exc.strerror}") from None
    if size > MAX_FILE_BYTES:
        raise TaskFileError([Diagnostic(
            file, None, None,
            f"file is {size / 2**20:.0f} MiB; task files are limited to "
            f"{MAX_FILE_BYTES // 2**20} MiB — split it into several files",
        )])
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise _whole_file(file, f"cannot read: {exc.strerror}") from None
    return parse_yaml(text, file)


def parse_yaml(text: bytes | str, file: str) -> Document:
    """Parse YAML text into data plus positions; raise TaskFileError on any problem."""
    try:
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        col = mark.column + 1 if mark else None
        problem = exc.problem or str(exc)
        if exc.context:
            problem = f"{exc.context}, {problem}"
        raise TaskFileError([Diagnostic(file, line, col, f"invalid YAML: {problem}")]) from None
    except yaml.YAMLError as exc:
        raise _whole_file(file, f"invalid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise _whole_file(file, f"not UTF-8 text: {exc.reason}") from None
    if root is None:
        raise TaskFileError([Diagnostic(file, 1, 1, "file is empty; it needs a 'tasks:' list")])
    builder = _Builder(file)
    data = builder.build(root, ())
    if builder.errors:
        raise TaskFileError(builder.errors)
    return Document(data, builder.positions, file)
