"""The house's structural rules, checked on the package's own source (with `ast`, nothing run).

Layers (imports only run downward): the base modules at the package root (errors, io, progress,
registry ...) < llm, data < eval < compress < finetune < recipes < cli. `qingzhou/__init__.py` is
the public facade and may name anything (lazily), as may `__main__`. No import circles between modules.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qingzhou"
LAYERS = {"llm": 1, "data": 1, "eval": 2, "compress": 3, "finetune": 4, "recipes": 5, "cli": 6}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the qingzhou modules it imports (anywhere in the file, function-local included)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    node_mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    node_mod = node.module or ""
                names = [node_mod] + [f"{node_mod}.{a.name}" for a in node.names]
            else:
                continue
            for n in names:
                if n.startswith("qingzhou"):
                    target = _resolve(n, mods)
                    if target and target != mod:
                        targets.add(target)
        graph[mod] = targets
    return graph


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return 99  # the facade (qingzhou/__init__.py) and `python -m qingzhou`
    return LAYERS.get(parts[1], 0)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_imports_only_run_downward():
    upward = [f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
              if layer(b) > layer(a) and b != "qingzhou"]
    assert upward == []


def test_the_checker_sees_a_circle_and_an_upward_import():
    """The two rules above would fail on a graph that breaks them (the checker is not vacuous)."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "qingzhou.llm.loading" in graph and "qingzhou.errors" in graph["qingzhou.llm.loading"]
    assert layer("qingzhou.compress.quantize.api") > layer("qingzhou.llm.loading") > layer("qingzhou.errors")


@pytest.mark.parametrize("module", ["qingzhou.compress.quantize.registry", "qingzhou.compress.prune.registry",
                                    "qingzhou.recipes.registry", "qingzhou.finetune.methods",
                                    "qingzhou.finetune.optimizers", "qingzhou.llm.aliases"])
def test_every_registry_is_the_one_generic_registry(module):
    assert "qingzhou.registry" in import_graph()[module]
