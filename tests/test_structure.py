"""The house by concern (docs/architecture.md): the root holds the method's files and the entry points, the
rest stands in packages layered as a tower. Each module imports only its own layer and the layers below,
nothing imports the training script, no module imports one that imports it back, and only model.py
decides what a parameter is from its name. Read from the source (runtime.sources, ast), so that an
import inside a function counts too."""

import ast
import os
import re

from conftest import ROOT
from runtime import sources

# Bottom first; a module's layer is its first dotted name (its package, or the root file itself).
LAYERS = [
    ("config",),  # the config files: plain assignments, which import nothing
    ("runtime",),  # the process: ranks, device, signals, exit codes, errors, progress, files, sharding
    ("data",),  # token files, tokenizer, vocabularies, batches
    ("model",),  # GPT-2 and what each of its parameters is
    ("optimizers",),  # the optimizers and their registry, the kernels' self-check
    ("training",),  # the config and what it builds, the Trainer, checkpoints, resume, out_dir
    ("lwlr", "multipliers"),  # the method, and where a run's multipliers come from
    ("train", "eval", "sample", "export", "launch"),  # the entry points
    ("bench",),  # benchmarks, sweeps, the GPU check
]
LAYER_OF = {name: index for index, names in enumerate(LAYERS) for name in names}
ROOT_FILES = {"train.py", "model.py", "lwlr.py", "multipliers.py", "eval.py", "sample.py", "export.py", "launch.py"}


def project_modules() -> list[str]:
    """Every module of the project outside tests/."""
    return [name for name in sources.modules() if name.split(".")[0] != "tests"]


def import_graph() -> dict[str, set[str]]:
    return {name: sources.project_imports(name) for name in project_modules()}


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


def test_the_root_holds_the_method_and_the_entry_points_alone():
    assert {name for name in os.listdir(ROOT) if name.endswith(".py")} == ROOT_FILES


def test_every_module_stands_in_a_layer_and_imports_only_its_own_and_those_below():
    graph = import_graph()
    assert {"train", "training.build", "training.checkpoint", "multipliers", "data.vocab", "bench.overfit"} <= set(
        graph
    )
    unplaced = sorted(name for name in graph if name.split(".")[0] not in LAYER_OF)
    assert unplaced == []
    upward = sorted(
        f"{name} -> {target}"
        for name, imports in graph.items()
        for target in imports
        if LAYER_OF[target.split(".")[0]] > LAYER_OF[name.split(".")[0]]
    )
    assert upward == []


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_nothing_imports_the_training_script_and_bench_builds_on_the_trainer():
    graph = import_graph()
    assert sorted(name for name, imports in graph.items() if "train" in imports) == []
    assert "training.trainer" in graph["bench.common"] and "training.build" in graph["training.checkpoint"]


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_file_adds_to_the_import_path():
    def adds_to_the_path(node) -> bool:  # sys.path.insert(...), sys.path.append(...)
        return (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("insert", "append", "extend")
            and ast.unparse(node.func.value) == "sys.path"
        )

    offenders = sorted(
        path for path in sources.modules().values() if any(map(adds_to_the_path, ast.walk(ast.parse(read(path)))))
    )
    assert offenders == []


def test_every_import_is_absolute():
    """The import graph above reads absolute imports alone: a relative one would slip past its rules."""
    offenders = sorted(
        path
        for path in sources.modules().values()
        if any(isinstance(node, ast.ImportFrom) and node.level > 0 for node in ast.walk(ast.parse(read(path))))
    )
    assert offenders == []


# The attribute names of GPT's modules, which make its parameter names (model.LAYER_ROLES, lm_head).
PARAMETER_NAME_PART = re.compile(r"\b(wte|wpe|q_proj|k_proj|v_proj|o_proj|c_fc|c_proj|ln_[12f]|lm_head)\b")
# model.py decides what a name is; hf.py writes GPT-2's own names, of its Hugging Face layout.
NAME_OWNERS = {"model", "training.hf"}


def string_constants(path: str) -> list[str]:
    """The string constants of a file, docstrings aside (f-strings' literal parts included)."""
    tree = ast.parse(read(path), path)
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_only_model_py_reads_a_parameter_name():
    """Every other module asks model.param_role (or walks the model's modules): none spells a part of a
    parameter's name in a string to match it or build it."""
    matching = {
        name: found
        for name in project_modules()
        if name not in NAME_OWNERS
        and (found := sorted({s for s in string_constants(sources.modules()[name]) if PARAMETER_NAME_PART.search(s)}))
    }
    assert matching == {}


def read(path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_the_readme_is_a_guide_of_at_most_250_lines_whose_links_resolve():
    """The README is the user's guide; studies, results and runbooks are docs/ pages, which it links."""
    readme = read("README.md")
    assert len(readme.splitlines()) <= 250
    pages = ["README.md"] + [os.path.join("docs", name) for name in sorted(os.listdir(os.path.join(ROOT, "docs")))]
    broken = [
        f"{page}: {target}"
        for page in pages
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", read(page))
        if not target.startswith(("http://", "https://"))
        and not os.path.exists(os.path.join(ROOT, os.path.dirname(page), target))
    ]
    assert broken == []
    assert {"architecture.md", "operations.md", "distributed.md"} <= set(os.listdir(os.path.join(ROOT, "docs")))
