"""The project's imports form a tower: no module imports one that imports it back, at any depth of the
code (an import inside a function counts), and no module imports the training script, which sits on top.
Read from the source with ast, so a cycle dodged by a function-level import is caught too."""

import ast
import os

from conftest import ROOT


def project_modules() -> dict[str, str]:
    """Dotted name -> path of every module of the project outside tests/ and bench/ (the top ones)."""
    modules = {}
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in ("tests", "bench", ".git") and not d.startswith(".")]
        for name in files:
            if name.endswith(".py"):
                relative = os.path.relpath(os.path.join(folder, name), ROOT)[:-3]
                dotted = relative.replace(os.sep, ".").removesuffix(".__init__")
                modules[dotted] = os.path.join(folder, name)
    return modules


def imported_modules(path: str, modules) -> set[str]:
    """The project's modules that the file imports, anywhere in it."""
    found = set()
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            candidates = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in candidates:
            while name and name not in modules:  # `import a.b.c`: the deepest part that is a module of ours
                name = name.rpartition(".")[0]
            if name and not (name == "data" and node.module != "data"):  # the package itself, only when named
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(path, modules) - {name} for name, path in modules.items()}


def find_cycle(graph) -> list[str] | None:
    state: dict[str, str] = {}  # "active" on the current path, "done" once explored

    def visit(node, path):
        state[node] = "active"
        for neighbour in sorted(graph.get(node, ())):
            if state.get(neighbour) == "active":
                return path[path.index(neighbour) :] + [neighbour]
            if neighbour not in state:
                cycle = visit(neighbour, path + [neighbour])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"train", "build", "checkpoint", "multipliers", "data.vocab"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_nothing_imports_the_training_script():
    graph = import_graph()
    assert sorted(name for name, imports in graph.items() if "train" in imports) == []
    assert "build" in graph["checkpoint"] and "build" in graph["multipliers"] and "build" in graph["sample"]


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
