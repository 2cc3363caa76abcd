"""Load YAML while remembering where every value came from, so errors can name file:line.

PyYAML's composer already records a mark for each node; we walk the node tree once and keep a
map from the value's path (the same tuple pydantic reports as `loc`) to its line and column.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PathKey = tuple[str | int, ...]


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
        return f"{self.file}:{pos.line}:{pos.column}" if pos else str(self.file)


class YamlLoadError(Exception):
    """Syntax errors keep PyYAML's mark, reworded as file:line:col."""


def load_yaml(file: Path) -> LoadedYaml:
    try:
        text = file.read_text()
    except OSError as exc:
        raise YamlLoadError(f"{file}: cannot read: {exc.strerror}") from exc
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else str(file)
        raise YamlLoadError(f"{where}: invalid YAML: {exc.problem}") from exc
    loaded = LoadedYaml(file=file, data=None)
    if root is None:
        loaded.data = {}
        return loaded
    constructor = yaml.SafeLoader(text)
    loaded.data = _convert(root, (), loaded.positions, constructor)
    return loaded


def _convert(node: yaml.Node, path: PathKey, positions: dict[PathKey, Position], ctor: Any) -> Any:
    positions[path] = Position(node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = ctor.construct_object(key_node, deep=True)
            out[key] = _convert(value_node, (*path, key), positions, ctor)
            # Point at the key itself: that is the line a person edits.
            positions[(*path, key)] = Position(key_node.start_mark.line + 1, key_node.start_mark.column + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), positions, ctor) for i, item in enumerate(node.value)]
    return ctor.construct_object(node, deep=True)
