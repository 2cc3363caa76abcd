"""No import cycle in launcher/ or workers/: following a topology goes one way
(topology -> resolve -> rules / validation -> plan -> export, backends), and a module never needs
one that needs it back, not even through an import inside a function.

The graph is read from the source (ast), so it sees every import statement: module level,
function level and under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("launcher", "workers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports (a package's own __init__ is not an edge: it imports nothing)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import mod` imports the module pkg.mod; `from mod import attr` imports mod.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not (ROOT / target.replace(".", "/") / "__init__.py").exists():
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read() -> None:
    edges = graph()
    assert "launcher.resolve" in edges["launcher.plan"]
    assert "launcher.resolve" in edges["launcher.rules"]
    assert "launcher.service_users" in edges["launcher.services"]
    # A function-level import is an edge too.
    assert "workers.kv_router.router" in edges["launcher.engine_flags"]


def test_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_the_chain_goes_one_way() -> None:
    """Nothing before the plan imports it; workers never import the launcher."""
    edges = graph()
    for early in ("launcher.topology", "launcher.resolve", "launcher.rules", "launcher.validation",
                  "launcher.engine_flags"):
        assert "launcher.plan" not in edges[early], early
        assert "launcher.export.kubernetes" not in edges[early], early
    assert "launcher.rules" not in edges["launcher.resolve"]
    for name, deps in edges.items():
        if name.startswith("workers."):
            assert not any(d.startswith("launcher") for d in deps), name


def test_a_cycle_is_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
