"""The import graph of the project: one-way layering and no cycles.

Every import statement of every module (top level and inside functions alike: a lazy import
is still a dependency) is parsed with `ast`, resolved to a project module, and checked
against the layering `sparsify -> world -> runtime -> {patterns, codegen}`. Nothing imports
`bench`, and no two modules reach each other through imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each package may import besides itself (and third-party code).
ALLOWED = {
    "codegen": set(),
    "patterns": set(),
    "runtime": {"patterns", "codegen"},
    "world": {"runtime", "patterns", "codegen"},
    "sparsify": {"world", "runtime", "patterns", "codegen"},
    "bench": {"sparsify", "world", "runtime", "patterns", "codegen"},
    "tests": {"sparsify", "world", "runtime", "patterns", "codegen"},
}
LIBRARY = ("codegen", "patterns", "runtime", "world", "sparsify")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    found = {}
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _imported_names(module: str, path: Path) -> list[tuple[str, int]]:
    """Absolute dotted names imported by the module, with their line numbers."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.append((prefix, node.lineno))
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            names.extend((f"{prefix}.{alias.name}", node.lineno) for alias in node.names)
    return names


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest project module that `name` names (None for third-party code)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _graph() -> tuple[nx.DiGraph, dict[tuple[str, str], int]]:
    modules = _sources()
    graph = nx.DiGraph()
    lines = {}
    for module, path in modules.items():
        graph.add_node(module)
        for name, lineno in _imported_names(module, path):
            target = _resolve(name, modules)
            if target is None or target == module:
                continue
            graph.add_edge(module, target)
            lines.setdefault((module, target), lineno)
    return graph, lines


def test_the_parser_sees_the_project() -> None:
    graph, _ = _graph()
    # Guards against a test that passes because it parsed nothing.
    assert graph.has_edge("runtime.rollout", "patterns.checks")
    assert graph.number_of_edges() > 100


def test_imports_follow_the_layering() -> None:
    graph, lines = _graph()
    bad = []
    for source, target in graph.edges:
        src_pkg, dst_pkg = source.split(".")[0], target.split(".")[0]
        if src_pkg != dst_pkg and dst_pkg not in ALLOWED[src_pkg]:
            path = _sources()[source].relative_to(ROOT)
            bad.append(f"{path}:{lines[(source, target)]} imports {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


@pytest.mark.parametrize("package", LIBRARY)
def test_no_import_cycles(package: str) -> None:
    graph, _ = _graph()
    sub = graph.subgraph(n for n in graph if n.split(".")[0] == package)
    # A package's __init__ re-exports its modules, and modules may import the package's
    # public names from it; that edge pair is not a design cycle, so __init__ is left out.
    sub = sub.subgraph(n for n in sub if n != package)
    cycles = sorted(sorted(c) for c in nx.simple_cycles(sub))
    assert not cycles, f"import cycles in {package}: {cycles}"


def test_bench_is_not_installed() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    include = next(line for line in text.splitlines() if line.startswith("include"))
    assert "bench" not in include, include
