"""The package's structure: no import cycle among rlhf's modules (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import rlhf

ROOT = Path(rlhf.__file__).parent


def module_files() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every rlhf module that ``name`` imports anywhere in its file, with the packages that importing it runs."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    with_parents = set()
    for m in found:
        parts = m.split(".")
        with_parents |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    return {m for m in with_parents if m in modules and m != name and not name.startswith(m + ".")}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if not state.get(v) and (cycle := visit(v)):
                return cycle
        stack.pop()
        state[u] = 2
        return None

    for node in sorted(graph):
        if not state.get(node) and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_rlhf_has_no_import_cycle():
    modules = module_files()
    graph = {name: imported(name, path, modules) for name, path in modules.items()}
    assert "rlhf.rl.types" in graph["rlhf.safety.constitution"]  # the reader sees the edges the test relies on
    assert not any(m.startswith("rlhf.stages") for m in graph["rlhf.safety.rewards"])
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_leaf_types_import_nothing_of_ours():
    modules = module_files()
    assert imported("rlhf.rl.types", modules["rlhf.rl.types"], modules) == set()
    assert imported("rlhf.rl", modules["rlhf.rl"], modules) == set()
