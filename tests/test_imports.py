"""The package's imports go one way: no cycle between its modules, lazy imports inside functions
included, modules started by name (a program by its module's name, the lazy tables of the
packages) and the recipes the training config runs by path counted as imports too;
`keras_mixer.training` never imports `keras_mixer.studies`; the training code's shared modules
import neither TensorFlow nor JAX, and its two wings never import each other; docs/code_layout.md
lists every module, each below what it imports."""

import ast
import os

from runs import ROOT

PACKAGE = os.path.join(ROOT, "keras_mixer")


def _modules():
    """{dotted module name: file path} of every module in the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(node, module, is_package):
    """The dotted names an import statement of `module` names (modules or the objects in them)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: from its package, climbing one package per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module
    return [f"{base}.{alias.name}" for alias in node.names]


# Modules that run others by file path rather than by import: the training config executes the
# recipe files (`load_config`), which import their building blocks.
RUNS_BY_PATH = {"keras_mixer.training.config": "keras_mixer.configs"}


def _named(node, module, modules):
    """The package's modules a string constant names: a dotted module name (a program started by
    name), or in a package's __init__ a name relative to it (its table of lazily imported names)."""
    if not isinstance(node, ast.Constant) or not isinstance(node.value, str):
        return []
    names = [node.value]
    if modules[module].endswith("__init__.py"):
        names.append(f"{module}.{node.value}")
    # "keras_mixer" alone is the logger's name everywhere, not an import.
    return [n for n in names if n in modules and n not in (module, "keras_mixer")]


def import_graph():
    """{module: the package's modules it imports anywhere in its file}. `from pkg import name`
    counts as importing `pkg.name` when that is a module, else `pkg`; a string naming a module
    counts as importing it (`_named`), and so do the files a module runs by path."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        targets = set()
        for node in ast.walk(tree):
            targets.update(_named(node, module, modules))
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in _imported(node, module, path.endswith("__init__.py")):
                    while name and name not in modules:  # an object: its module
                        name = name.rpartition(".")[0]
                    if name and name != module:
                        targets.add(name)
        if module in RUNS_BY_PATH:
            targets.update(m for m in modules if m.startswith(RUNS_BY_PATH[module] + "."))
        graph[module] = targets
    return graph


def external_imports(module):
    """The top-level names of every package `module` imports anywhere in its file (lazily too)."""
    with open(_modules()[module]) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def reachable(graph, module):
    """Every module `module` imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def cycles(graph):
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return groups


def _without_package_inits(graph):
    # Importing `keras_mixer.x` runs `keras_mixer/__init__.py` first; that is Python's order, not
    # a dependency of x on what the package re-exports. Edges *to* a package are kept where a
    # module imports a name the package itself defines.
    return {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}


def test_the_package_has_no_import_cycle():
    graph = _without_package_inits(import_graph())
    assert len(graph) > 40 and graph["keras_mixer.model.mixer"]  # the walk found the package
    assert cycles(graph) == []


def test_training_never_imports_the_studies():
    graph = import_graph()
    offending = {
        module: sorted(t for t in targets if t.startswith("keras_mixer.studies"))
        for module, targets in graph.items()
        if module.startswith("keras_mixer.training")
    }
    assert {m: t for m, t in offending.items() if t} == {}


def test_the_cycle_finder_finds_a_lazy_import_cycle():
    # The checker itself: a cycle closed only by an import inside a function is found.
    source = "def f():\n    from keras_mixer import b\n"
    tree = ast.parse(source)
    names = [
        n
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for n in _imported(node, "keras_mixer.a", False)
    ]
    assert names == ["keras_mixer.b"]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_the_graph_sees_programs_started_by_name_and_recipes_run_by_path():
    graph = import_graph()
    assert "keras_mixer.programs.command_lines" in graph["keras_mixer.programs"]  # `_start("...", ...)`
    assert "keras_mixer.training.loop" in graph["keras_mixer.training"]
    assert "keras_mixer.configs.imagenet1k_b16" in graph["keras_mixer.training.config"]
    with open(_modules()["keras_mixer.training.config"]) as f:
        assert "exec_module" in f.read()  # RUNS_BY_PATH still says what the config does


WINGS = ("keras_mixer.training.tf", "keras_mixer.training.jax")
BACKENDS = {"tensorflow", "tensorflow_datasets", "jax", "jaxlib", "orbax", "flax"}


def _shared_training_modules():
    """The modules directly in keras_mixer/training/ (its __init__, which hands the loop an engine,
    left out)."""
    return sorted(m for m in _modules() if m.count(".") == 2 and m.startswith("keras_mixer.training."))


def test_the_shared_training_modules_import_neither_tensorflow_nor_jax_nor_a_wing():
    graph = import_graph()
    shared = _shared_training_modules()
    assert {"keras_mixer.training.loop", "keras_mixer.training.checkpoint_store"} <= set(shared)
    backends = {m: sorted(external_imports(m) & BACKENDS) for m in shared}
    assert {m: b for m, b in backends.items() if b} == {}
    wings = {m: sorted(t for t in reachable(graph, m) if t.startswith(WINGS)) for m in shared}
    assert {m: w for m, w in wings.items() if w} == {}


def test_each_wing_never_imports_the_other():
    graph = import_graph()
    for wing, other in (WINGS, WINGS[::-1]):
        crossing = {
            m: sorted(t for t in reachable(graph, m) if t.startswith(other)) for m in graph if m.startswith(wing)
        }
        assert {m: c for m, c in crossing.items() if c} == {}


def test_the_import_checks_catch_what_they_are_for():
    # A backend import hidden in a function, and a shared module reaching a wing through another.
    tree = ast.parse("def f():\n    import jax.numpy as jnp\n    from tensorflow import keras\n")
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names & BACKENDS == {"jax", "tensorflow"}
    graph = {"keras_mixer.training.loop": {"keras_mixer.x"}, "keras_mixer.x": {"keras_mixer.training.jax.step"}}
    assert "keras_mixer.training.jax.step" in reachable(graph, "keras_mixer.training.loop")


def _listed_module(path):
    """A path of docs/code_layout.md's keras_mixer/ block -> the module: "model/layers.py" ->
    keras_mixer.model.layers, "model/" -> keras_mixer.model, "__init__.py" -> keras_mixer."""
    parts = path.removesuffix(".py").removesuffix("/").split("/")
    return ".".join(["keras_mixer", *(p for p in parts if p != "__init__")])


def layout_order():
    """docs/code_layout.md's entries under keras_mixer/, top to bottom: lists of module names, one
    list per line."""
    with open(os.path.join(ROOT, "docs", "code_layout.md")) as f:
        text = f.read()
    block = text[text.index("\nkeras_mixer/\n") + 1 :].split("\ntrainers/")[0].splitlines()[1:]
    entries = []
    for line in block:
        if not line.startswith("  ") or line.startswith("   "):  # continuation lines are indented further
            continue
        names = line.split("   ")[0].strip()
        entries.append([_listed_module(n.strip()) for n in names.split(",")])
    return entries


def test_the_code_layout_lists_every_module_once_and_nothing_else():
    listed = [name for names in layout_order() for name in names]
    assert sorted(set(_modules()) - set(listed)) == []  # a module without its line
    assert sorted(set(listed) - set(_modules())) == []  # a line for a module that is gone
    assert len(listed) == len(set(listed))


def test_each_module_in_the_code_layout_imports_only_what_is_listed_above_it():
    graph = _without_package_inits(import_graph())
    entries = layout_order()
    assert len(entries) >= 15, entries
    rank = {name: i for i, names in enumerate(entries) for name in names}

    def entry(module):  # keras_mixer.data.pipeline -> keras_mixer.data's line
        while module and module not in rank:
            module = module.rpartition(".")[0]
        return rank.get(module)

    upward = sorted(
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if entry(module) is not None and entry(target) is not None and entry(target) > entry(module)
    )
    assert upward == []


def test_version_0_2_module_paths_import_the_same_modules_in_a_fresh_process():
    # Every old path (`old_paths.OLD_PATHS`) gives the module at its new path, the same object, with
    # the names the docs of version 0.2 used; neither loads TensorFlow where the module does not.
    import subprocess
    import sys

    from runs import ENV

    script = (
        "import importlib, sys\n"
        "from keras_mixer.old_paths import OLD_PATHS\n"
        "import keras_mixer.layers, keras_mixer.models\n"
        "assert 'tensorflow' not in sys.modules, 'an old path loaded TensorFlow'\n"
        "for old, new in OLD_PATHS.items():\n"
        "    assert importlib.import_module(old) is importlib.import_module(new), old\n"
        "    assert sys.modules[new].__spec__.name == new, new  # the module keeps its own spec\n"
        "from keras_mixer.training.trainer import train\n"
        "from keras_mixer.jax_step import data_parallel\n"
        "from keras_mixer.loader import load_weights\n"
        "from keras_mixer.export import export_saved_model, freeze\n"
        "from keras_mixer.training.step import make_train_steps\n"
        "from keras_mixer.training.inference import load_keras_model\n"
        "import keras_mixer\n"
        "assert keras_mixer.JaxTrainStep.__module__ == 'keras_mixer.training.jax.step'\n"
        "print(len(OLD_PATHS))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**ENV, "KERAS_BACKEND": "jax"}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) >= 35


def test_a_missing_old_path_is_still_an_import_error():
    import importlib

    import pytest

    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("keras_mixer.no_such_module")
