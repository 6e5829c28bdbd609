"""The package's import graph: no circle, no import after the module's first definition, and
config.py short. Read from the source with ast; nothing of the package is imported."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlx_mamba"
CONFIG_MAX_LINES = 250


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name, path, node):
    """The package's modules that an import statement in module `name` (at `path`) loads."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        if node.level:
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module
        # `from pkg import mod` loads pkg.mod; `from mod import name` loads mod.
        targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                   for alias in node.names]
    return {t for t in targets if t in MODULES and t != name}


def import_graph():
    """{module: {modules it imports}}, from imports at module level and inside functions. The
    root package's __init__, which hands the public API on, is left out as an importer."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = set().union(*[imported(name, path, node) for node in ast.walk(tree)
                                    if isinstance(node, (ast.Import, ast.ImportFrom))])
    del graph[PACKAGE.name]
    return graph


def find_cycle(graph):
    """A list of modules that import each other in a circle, or None."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        state[module] = "done"
        stack.pop()
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "mlx_mamba.config_fields" in graph["mlx_mamba.families.bamba"]  # from ..x import y
    assert "mlx_mamba.families.bamba" in graph["mlx_mamba.families"]  # from . import module
    assert "mlx_mamba.quantize" in graph["mlx_mamba.loader"]  # inside a function


def test_no_import_below_the_first_definition():
    late = []
    for name, path in MODULES.items():
        body = ast.parse(path.read_text(), str(path)).body
        first = next((i for i, node in enumerate(body) if isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))), len(body))
        late += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}" for node in body[first:]
                 if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert not late, "imports after the first def/class: " + ", ".join(late)


def test_config_stays_short():
    lines = len((PACKAGE / "config.py").read_text().splitlines())
    assert lines < CONFIG_MAX_LINES, f"config.py has {lines} lines (at most {CONFIG_MAX_LINES - 1})"
