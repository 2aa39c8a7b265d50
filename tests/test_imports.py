"""The import graph of qwenlocal/ and quant/, read from the source: no cycles (imports inside
functions count, since they only hide a cycle), and quant, the format and kernel library, never
imports the application."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("qwenlocal", "quant")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of both packages it imports, anywhere in its source."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package[: len(package) - node.level + 1], *filter(None, [node.module])])
                # `from pkg import module` imports the module; `from module import name`, the module
                found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names)
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each module that is on one, found by depth-first search."""
    found, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            found.append(path[path.index(node) :] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*path, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return found


def test_the_graph_is_read():
    graph = import_graph()
    assert "quant.formats" in graph["quant.linear"]
    assert {"qwenlocal.planning.plan", "qwenlocal.weights.quantize", "quant.linear"} <= graph[
        "qwenlocal.weights.loader"
    ]
    assert {"qwenlocal.planning.memory", "qwenlocal.weights.sources"} <= graph["qwenlocal.planning.plan"]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_a_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_quant_does_not_import_qwenlocal():
    graph = import_graph()
    wrong = {
        m: sorted(d)
        for m, d in graph.items()
        if m.startswith("quant") and any(x.startswith("qwenlocal") for x in d)
    }
    assert wrong == {}
