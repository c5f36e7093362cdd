"""The layers hold, read from the source: every import that runs, at the top or inside a function.

tui/ shows and asks; assistant/ holds the domain; backends/ hides each engine; cli/ (the entry
points) is the one place that wires them. So: assistant/ imports neither tui/ nor cli/; backends/
imports nothing of ours; tui/ never imports backends/ nor the sleep's stages (only the
``assistant.sleep`` package's public names); the sleep imports no model's own package
(assistant/nano/); nothing imports cli/; and no two modules of assistant/ import each other,
however indirectly.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("assistant", "backends", "cli", "tui")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Our modules that ``path`` imports when it runs (imports only for type checkers do not run);
    ``from package import name`` counts as the submodule when ``name`` is one."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in OURS and name in MODULES}


MODULES = {module_name(path): path for package in OURS for path in (ROOT / package).rglob("*.py")}
GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def layer(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.parametrize(("importer", "forbidden"), [
    ("assistant", ("tui", "cli")),
    ("backends", ("assistant", "tui", "cli")),
    ("tui", ("backends", "cli")),
])
def test_a_layer_never_imports_the_ones_it_must_not_know(importer, forbidden):
    crossings = sorted(f"{name} -> {target}" for name, targets in GRAPH.items() if layer(name) == importer
                       for target in targets if layer(target) in forbidden)
    assert crossings == []


def test_the_app_uses_the_sleep_through_its_public_names_only():
    reaching_in = sorted(f"{name} -> {target}" for name, targets in GRAPH.items() if layer(name) == "tui"
                         for target in targets if target.startswith("assistant.sleep."))
    assert reaching_in == []


def test_the_sleep_knows_no_model_in_particular():
    """The night is one recipe for every model: what a model brings of its own (nano's material)
    reaches it through ``assistant.models``, never by the sleep importing that model's package."""
    reaching = sorted(f"{name} -> {target}" for name, targets in GRAPH.items() if name.startswith("assistant.sleep")
                      for target in targets if target.startswith("assistant.nano"))
    assert reaching == []


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the graph's modules (each module with the packages above it, which
    Python runs first), or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle_inside_the_domain():
    domain = {name: {t for t in targets if layer(t) == "assistant" and t != name and not name.startswith(t + ".")}
              for name, targets in GRAPH.items() if layer(name) == "assistant"}
    assert find_cycle(domain) is None


def test_the_cycle_check_finds_a_cycle_and_a_crossing_is_seen():
    """Guards the checks above against passing vacuously."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert "backends.base" in GRAPH["assistant.chat"]
    assert "assistant.sleep" in GRAPH["tui.app"]
