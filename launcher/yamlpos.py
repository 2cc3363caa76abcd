"""Load YAML while remembering where every value came from, so errors can name file:line.

PyYAML's composer already records a mark for each node; we walk the node tree once and keep a
map from the value's path (the same tuple pydantic reports as `loc`) to its line and column.

The loader is also the first line of defence against hostile or broken files, because everything
after it trusts its output: it refuses, each with file:line:col, bytes that are not UTF-8, control
characters, YAML tags (`!foo`, `!!python/...`), merge keys, duplicate keys (PyYAML keeps the last one
silently) and keys that are lists or mappings; and it bounds the work: the file's size, the nesting
depth, and the number of values aliases expand to (a few hundred bytes of nested aliases — the
"billion laughs" — would otherwise expand to gigabytes in `_convert`), and it refuses an alias that
contains itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PathKey = tuple[str | int, ...]

MAX_BYTES = 1 << 20  # a topology is a few KB; a MiB is not a topology
MAX_DEPTH = 32  # a topology nests ~5 deep
MAX_VALUES = 5_000  # values after alias expansion; a topology has a few hundred at most

# C0 controls except tab, newline, carriage return; DEL; C1 controls; and the BOM anywhere but the start.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")


@dataclass(frozen=True)
class Position:
    line: int  # 1-based, as editors show it
    column: int


@dataclass
class LoadedYaml:
    file: Path
    data: Any
    positions: dict[PathKey, Position] = field(default_factory=dict)

    def position_of(self, path: PathKey) -> Position | None:
        """The closest known position: the path itself, else its nearest ancestor."""
        for end in range(len(path), -1, -1):
            pos = self.positions.get(tuple(path[:end]))
            if pos is not None:
                return pos
        return None

    def where(self, path: PathKey) -> str:
        pos = self.position_of(path)
        return f"{self.file}:{pos.line}:{pos.column}" if pos else f"{self.file}:1:1"


class YamlLoadError(Exception):
    """Anything wrong with the file as YAML, already worded `file:line:col: message`."""


def _at(file: Path, mark: Any, message: str) -> YamlLoadError:
    where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else f"{file}:1:1"
    return YamlLoadError(f"{where}: {message}")


def _line_col(text: str, index: int) -> tuple[int, int]:
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


def decode(file: Path, raw: bytes) -> str:
    """UTF-8 only (YAML 1.2 allows UTF-16/32 too, but nobody writes a topology in them)."""
    if len(raw) > MAX_BYTES:
        raise YamlLoadError(f"{file}:1:1: the file is {len(raw)} bytes; a topology is at most {MAX_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        good = raw[:exc.start].decode("utf-8")
        line, col = _line_col(good, len(good))
        raise YamlLoadError(f"{file}:{line}:{col}: byte 0x{raw[exc.start]:02x} is not UTF-8: "
                            "save the file as UTF-8") from None
    text = text.removeprefix("\ufeff")
    bad = _CONTROL.search(text)
    if bad:
        line, col = _line_col(text, bad.start())
        raise YamlLoadError(f"{file}:{line}:{col}: control character U+{ord(bad.group()):04X} is not allowed "
                            "in a topology: delete it (a tab or newline is fine)")
    return text


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses explicit tags and bounds nesting while composing."""

    def __init__(self, stream: str, file: Path) -> None:
        super().__init__(stream)
        self.file = file
        self.depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        tag = getattr(event, "tag", None)
        if tag is not None and not isinstance(event, yaml.AliasEvent):
            raise _at(self.file, event.start_mark, f"YAML tag '{tag}' is not allowed in a topology: "
                                                   "write the plain value")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise _at(self.file, event.start_mark, f"values nest more than {MAX_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_yaml(file: Path) -> LoadedYaml:
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise YamlLoadError(f"{file}: cannot read: {exc.strerror}") from exc
    text = decode(file, raw)
    loader = _Loader(text, file)
    try:
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        raise _at(file, exc.problem_mark, f"invalid YAML: {exc.problem}") from None
    except yaml.YAMLError as exc:  # ReaderError and friends carry no mark
        raise YamlLoadError(f"{file}:1:1: invalid YAML: {exc}") from None
    loaded = LoadedYaml(file=file, data=None)
    if root is None:
        loaded.data = {}
        return loaded
    loaded.data = _Converter(file, loaded.positions).convert(root, ())
    return loaded


class _Converter:
    """Node tree -> Python values and positions, counting every value it makes (aliases included)."""

    def __init__(self, file: Path, positions: dict[PathKey, Position]) -> None:
        self.file = file
        self.positions = positions
        self.ctor = yaml.SafeLoader("")
        self.values = 0
        self.stack: list[int] = []  # ids of the collection nodes being converted: an alias cycle

    def _pos(self, node: yaml.Node) -> Position:
        return Position(node.start_mark.line + 1, node.start_mark.column + 1)

    def convert(self, node: yaml.Node, path: PathKey) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            raise _at(self.file, node.start_mark, f"aliases expand to more than {MAX_VALUES} values "
                                                  "(an alias bomb?): write the values out")
        if len(self.stack) > MAX_DEPTH:
            raise _at(self.file, node.start_mark, f"values nest more than {MAX_DEPTH} levels deep")
        self.positions[path] = self._pos(node)
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node)
        if id(node) in self.stack:
            raise _at(self.file, node.start_mark, "this alias contains itself (a recursive anchor)")
        self.stack.append(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            return [self.convert(item, (*path, i)) for i, item in enumerate(node.value)]
        finally:
            self.stack.pop()

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        if node.tag == "tag:yaml.org,2002:merge":
            raise _at(self.file, node.start_mark, "merge keys (<<) are not supported: write the keys out")
        try:
            return self.ctor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise _at(self.file, node.start_mark, f"cannot read this value: {exc}") from None
        except (ValueError, OverflowError):  # Python refuses ints of more than 4300 digits
            raise _at(self.file, node.start_mark, "cannot read this value: the number is too long") from None

    def _mapping(self, node: yaml.MappingNode, path: PathKey) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        first_line: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise _at(self.file, key_node.start_mark, "a key must be a plain value, not a list or mapping")
            key = self._scalar(key_node)
            try:
                seen = first_line.get(key)
            except TypeError:  # unhashable: cannot happen for a scalar, but never crash on it
                raise _at(self.file, key_node.start_mark, "a key must be a plain value") from None
            if seen is not None:
                raise _at(self.file, key_node.start_mark,
                          f"duplicate key '{key}' (first given on line {seen}): give each key once")
            first_line[key] = key_node.start_mark.line + 1
            out[key] = self.convert(value_node, (*path, key))
            # Point at the key itself: that is the line a person edits.
            self.positions[(*path, key)] = self._pos(key_node)
        return out
