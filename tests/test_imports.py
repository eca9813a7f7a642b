"""The package's imports go one way: no cycle between its modules, lazy imports inside functions
included, and `keras_mixer.training` never imports `keras_mixer.studies`."""

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


def import_graph():
    """{module: the package's modules it imports anywhere in its file}. `from pkg import name`
    counts as importing `pkg.name` when that is a module, else `pkg`."""
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in _imported(node, module, path.endswith("__init__.py")):
                    while name and name not in modules:  # an object: its module
                        name = name.rpartition(".")[0]
                    if name and name != module:
                        targets.add(name)
        graph[module] = targets
    return graph


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


def layout_order():
    """docs/code_layout.md's entries under keras_mixer/, top to bottom: lists of module names
    ("keras_mixer.data" for `data/`), one list per line."""
    with open(os.path.join(ROOT, "docs", "code_layout.md")) as f:
        text = f.read()
    block = text[text.index("\nkeras_mixer/\n") + 1 :].split("\ntrainers/")[0].splitlines()[1:]
    entries = []
    for line in block:
        if not line.startswith("  ") or line.startswith("   "):  # continuation lines are indented further
            continue
        names = line.split("   ")[0].strip()
        entries.append(["keras_mixer." + n.strip().removesuffix(".py").removesuffix("/") for n in names.split(",")])
    return entries


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
