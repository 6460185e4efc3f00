"""The import graph of src/vlbench, built statically with ``ast`` from every import in a module,
inside functions too (a lazy import still runs, and still closes a cycle):

- no cycles;
- a stage imports the library, never another stage (``vlbench.stages.X`` never imports
  ``vlbench.stages.Y``): what two stages share lives in a library module;
- the commands, ``inference.py`` and ``benchmarks/*.py`` use no stage's internals.

Edges: ``import a.b`` and ``from a import b`` (b a module) -> ``a.b``; ``from a.b import name`` ->
``a.b``; relative imports resolved; importing ``a.b`` also runs ``a/__init__.py``, so it adds an
edge to every package above it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "vlbench"


def _locate(src: Path, name: str) -> Path | None:
    base = src.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").is_file() else None


def imports_of(path: Path, src: Path, module: str | None = None) -> set[str]:
    """The vlbench modules that the file at ``path`` imports anywhere (``module``: its dotted name,
    to resolve relative imports; None for a script outside the package)."""
    is_pkg = path.name == "__init__.py"
    package = (module if is_pkg else module.rpartition(".")[0]) if module else ""
    found: set[str] = set()

    def add(name: str) -> None:
        if name == PACKAGE or name.startswith(PACKAGE + "."):
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if _locate(src, sub) else base)
    return {name for name in found if _locate(src, name)}  # names that are modules, not attributes


def import_graph(src: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    """module -> the modules it imports, for every module of ``package`` under ``src``."""
    graph = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        graph[name] = imports_of(path, src, name) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component that has one."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(_path_within(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path_within(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A cycle through the first module of ``component`` (shortest, by breadth-first search)."""
    start = min(component)
    previous, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("a strongly connected component without a cycle")


def _is_stage(name: str) -> bool:
    return name.startswith(f"{PACKAGE}.stages.")


GRAPH = import_graph(ROOT / "src")


def test_the_graph_sees_the_package():
    assert f"{PACKAGE}.stages.train" in GRAPH and f"{PACKAGE}.models.variants" in GRAPH
    assert f"{PACKAGE}.training" in GRAPH[f"{PACKAGE}.stages.train"]


def test_no_import_cycles():
    found = cycles(GRAPH)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_stages_never_import_each_other():
    bad = [f"{m} imports {d}" for m, deps in GRAPH.items() if _is_stage(m) for d in sorted(deps)
           if _is_stage(d) and d != m]
    assert not bad, "move what stages share into a library module:\n" + "\n".join(bad)


def _users_outside_stages() -> dict[str, set[str]]:
    """Commands and inference.py (by module name) and the benchmarks (by file) -> what they import."""
    users = {m: deps for m, deps in GRAPH.items()
             if m.startswith(f"{PACKAGE}.commands") or m == f"{PACKAGE}.inference"}
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        users[f"benchmarks/{path.name}"] = imports_of(path, ROOT / "src")
    return users


def test_commands_inference_and_benchmarks_use_no_stage_internals():
    users = _users_outside_stages()
    assert f"{PACKAGE}.commands.search" in users and any(u.startswith("benchmarks/") for u in users)
    bad = [f"{u} imports {d}" for u, deps in users.items() for d in sorted(deps)
           if d == f"{PACKAGE}.stages" or _is_stage(d)]
    assert not bad, "\n".join(bad)


@pytest.fixture
def made_up(tmp_path):
    """A package with a cycle hidden in a function, a relative `from . import`, and a stage that
    imports another."""
    files = {
        "__init__.py": "",
        "a.py": "from . import b\n",
        "b.py": "def f():\n    from .c import thing\n",
        "c.py": "import vlbench.a\nthing = 1\n",
        "d.py": "from .a import b\n",
        "stages/__init__.py": "",
        "stages/one.py": "from ..d import b\n",
        "stages/two.py": "from .one import x\nfrom .. import d\n",
    }
    for rel, text in files.items():
        f = tmp_path / PACKAGE / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return tmp_path


def test_the_checks_can_fail(made_up):
    graph = import_graph(made_up)
    assert graph[f"{PACKAGE}.d"] == {PACKAGE, f"{PACKAGE}.a"}  # `from .a import b`: b is a name in a
    assert cycles(graph) == [[f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.c", f"{PACKAGE}.a"]]
    assert f"{PACKAGE}.stages.one" in graph[f"{PACKAGE}.stages.two"]
