"""The project's own modules and what each imports, read from their source with ast, so that an import
inside a function counts too. The kernels' self-check hashes the files an optimizer's code comes from
(its cache key), the GPU kit lists the packages a bare image must provide for the files it runs, and the
tests hold the import graph to its layers (docs/architecture.md).
"""

import ast
import functools
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIPPED_FOLDERS = ("__pycache__",)  # and every hidden folder (.git, .whl)


def modules() -> dict[str, str]:
    """Dotted name -> path (relative to ROOT) of every Python file of the project: `training.build`,
    `bench.overfit`, `tests.test_lwlr`; a package by its `__init__.py`."""
    return _modules(ROOT)


def module_of(path: str) -> str:
    """The dotted name of a project file (a path relative to ROOT)."""
    return next(name for name, file in modules().items() if file == os.path.normpath(path))


@functools.cache
def _modules(root: str) -> dict[str, str]:
    found = {}
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d not in SKIPPED_FOLDERS)
        for name in sorted(files):
            if name.endswith(".py"):
                relative = os.path.relpath(os.path.join(folder, name), root)
                found[relative[:-3].replace(os.sep, ".").removesuffix(".__init__")] = relative
    return found


def imported_names(path: str) -> list[tuple[str, bool]]:
    """(name, whether it names a module) for every absolute import in the file: `import a.b` gives a.b;
    `from a import b` gives a and a.b (which may be a module, or a name in a)."""
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read(), path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, True) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [(node.module, True)] + [(f"{node.module}.{alias.name}", False) for alias in node.names]
    return names


def resolve(name: str, importer: str) -> str | None:
    """The project module an imported name refers to: the deepest part of it that is one, looked up from
    the root and from the importer's own folder (tests/ and bench/ scripts import their neighbours)."""
    folder = os.path.dirname(importer).replace(os.sep, ".")
    for prefix in ("", f"{folder}.") if folder else ("",):
        candidate = prefix + name
        while len(candidate) > len(prefix):
            if candidate in modules():
                return candidate
            candidate = candidate.rpartition(".")[0]
    return None


def project_imports(module: str) -> set[str]:
    """The project modules a module imports, anywhere in it (a package's __init__ where it is named)."""
    path = modules()[module]
    return {target for name, _ in imported_names(path) if (target := resolve(name, path)) not in (None, module)}


def third_party_imports(module: str) -> set[str]:
    """The top-level packages outside the project and the standard library that a module imports."""
    path = modules()[module]
    return {
        name.split(".")[0]
        for name, names_module in imported_names(path)
        if names_module and resolve(name, path) is None and name.split(".")[0] not in _STDLIB
    }


def dependencies(module: str) -> list[str]:
    """The module and every project module it imports, at any depth, in a fixed order."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(project_imports(name))
    return sorted(seen)


_STDLIB = frozenset(__import__("sys").stdlib_module_names)
