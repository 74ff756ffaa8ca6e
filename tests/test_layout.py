"""The layout of the packages (docs/architecture.md): no import circle among their modules, few files directly in
`renderer/` (the rest in sub-packages named for what they are), no long source file, and the method on its own.

The graph is read from the sources with `ast`: every import, at a module's top or inside a function, is an arrow,
so a circle cannot hide behind a late import. Imports under `if TYPE_CHECKING:` are not: they never run."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("freescale_core", "renderer", "cluster")
MOST_FLAT_FILES = 10
MOST_LINES = 400


def modules(root: Path) -> dict[str, Path]:
    """Every module of the packages under `root`, by dotted name (a package by its own name)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def runs(node: ast.AST) -> list[ast.AST]:
    """The statements under `node` that can run: the body of an `if TYPE_CHECKING:` is left out."""
    kept = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING":
            kept += child.orelse
        else:
            kept.append(child)
    return kept


def imported(module: str, path: Path, known: dict[str, Path]) -> dict[str, int]:
    """The modules of `known` that `module` imports, each with the line of its first import."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: list[tuple[str, int]] = []
    todo: list[ast.AST] = [ast.parse(path.read_text(), filename=str(path))]
    while todo:
        node = todo.pop()
        todo += runs(node)
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + [base] if base else parent)
            names += [(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base, node.lineno) for alias in node.names]
    found: dict[str, int] = {}
    for name, line in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found[name] = min(line, found.get(name, line))
    return found


def import_graph(root: Path = ROOT) -> dict[str, dict[str, int]]:
    known = modules(root)
    return {module: imported(module, path, known) for module, path in known.items()}


def find_circle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import circle as its modules in order (the first again at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the path being walked, "done" once every arrow out is followed
    path: list[str] = []

    def walk(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (circle := walk(target)):
                return circle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (circle := walk(module)):
            return circle
    return None


def describe(circle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(circle, circle[1:])) + f" -> {circle[-1]}"


def test_no_module_imports_itself_round_a_circle():
    graph = import_graph()
    circle = find_circle(graph)
    assert circle is None, f"import circle: {describe(circle, graph)}"


def test_the_circle_check_sees_a_circle_through_a_late_import(tmp_path):
    (tmp_path / "renderer" / "plan").mkdir(parents=True)
    (tmp_path / "renderer" / "__init__.py").write_text("")
    (tmp_path / "renderer" / "plan" / "__init__.py").write_text("")
    (tmp_path / "renderer" / "plan" / "a.py").write_text("from renderer.engine import run\n")
    (tmp_path / "renderer" / "engine.py").write_text("def run():\n    from .plan import a\n")
    (tmp_path / "renderer" / "typed.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from renderer.engine import run\n")
    graph = import_graph(tmp_path)
    assert graph["renderer.typed"] == {}
    assert find_circle(graph) == ["renderer.engine", "renderer.plan.a", "renderer.engine"]
    assert describe(find_circle(graph), graph) == "renderer.engine (line 2) -> renderer.plan.a (line 1) -> renderer.engine"


def test_few_files_lie_directly_in_the_renderer():
    flat = sorted(path.name for path in (ROOT / "renderer").glob("*.py"))
    assert len(flat) <= MOST_FLAT_FILES, flat


def test_no_source_file_is_long():
    long = {str(path.relative_to(ROOT)): lines for path in modules(ROOT).values()
            if (lines := len(path.read_text().splitlines())) > MOST_LINES}
    assert not long


def test_the_method_imports_neither_the_renderer_nor_the_cluster():
    graph = import_graph()
    outside = {(module, target) for module, targets in graph.items() if module.split(".")[0] == "freescale_core"
               for target in targets if target.split(".")[0] != "freescale_core"}
    assert not outside
