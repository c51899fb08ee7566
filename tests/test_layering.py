"""The package's floors, read from its own imports: no import circle, no import from a lower
floor to a higher one, device choices made in platforms/ only, and files kept to one concept
(450 lines at most). docs/architecture.md draws the floors."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "r1serve"

# Top floor first. A unit is a subpackage of r1serve or a module directly in it ("r1serve"
# is the package's own __init__). An import may go to a lower floor, or within its unit.
FLOORS = [
    {"cli"},
    {"bench", "model_card", "terminal_chat"},
    {"planner"},
    {"r1serve"},
    {"server"},
    {"accounts"},
    {"llm"},
    {"engine"},
    {"executor"},
    {"models"},
    {"platforms"},
    {"layers"},
    {"parallel", "kernels", "tokenizer", "tool_calls"},
    {"config", "sampling_params", "outputs"},
    {"errors"},
]
FLOOR = {unit: i for i, units in enumerate(FLOORS) for unit in units}
MAX_LINES = 450
OWN_TEXT = {".py", ".js", ".css", ".html", ".cpp", ".h"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "r1serve"


def imports_of(path: Path) -> set[str]:
    """The r1serve modules a file imports, wherever the import stands (in a function, under
    TYPE_CHECKING): each is a dependency a reader must follow."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("r1serve")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("r1serve"):
                # `from r1serve.x import y` may name a module y of package x
                found |= {f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names}
    return found


def _is_module(name: str) -> bool:
    path = SRC.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {module_name(p): {m for m in imports_of(p) if m != module_name(p)} for p in SRC.rglob("*.py")}


def test_every_unit_has_a_floor(graph):
    assert {unit_of(m) for m in graph} <= set(FLOOR), "a new package: give it a floor in FLOORS and in docs"


def test_imports_run_down_the_floors(graph):
    upward = sorted(f"{m} -> {dep}" for m, deps in graph.items() for dep in deps
                    if unit_of(dep) != unit_of(m) and FLOOR[unit_of(dep)] <= FLOOR[unit_of(m)])
    assert not upward, "imports that run up a floor (or across one):\n" + "\n".join(upward)


def test_no_import_circles(graph):
    # Tarjan's strongly connected components over module imports; any of two or more is a circle.
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_device_choices_are_the_platforms():
    # A platform says what differs between devices (its fields); code elsewhere asks it, it
    # never branches on which one it is.
    found = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py") if "platforms" not in p.relative_to(SRC).parts
             for i, line in enumerate(p.read_text().splitlines(), 1) if "platform.name ==" in line]
    assert not found, found


def test_files_hold_one_concept():
    long = [f"{p.relative_to(SRC)} ({n} lines)" for p in sorted(SRC.rglob("*"))
            if p.suffix in OWN_TEXT and "vendor" not in p.parts
            and (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"over {MAX_LINES} lines, split by concept: {long}"


def test_the_walk_sees_imports():
    # The walk itself: a function-level import and a relative-free `from package import module`.
    graph = {module_name(p): imports_of(p) for p in [SRC / "executor" / "launch.py", SRC / "engine" / "llm_engine.py"]}
    assert "r1serve.executor.ray_executor" in graph["r1serve.executor.launch"]
    assert "r1serve.executor.launch" in graph["r1serve.engine.llm_engine"]
