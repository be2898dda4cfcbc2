"""The package's import graph, read with `ast` (every import, also those inside functions): no cycles, and the
core never imports an app."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llava_manager"
CORE = {
    "attach",
    "checkpoint_replay",
    "config",
    "features",
    "forward_state",
    "injection",
    "managers",
    "modeling",
    "packing",
    "patch",
    "version",
    "vision",
}
APPS = {"chat", "cli", "commands", "demo", "eval", "inspect_weights", "train"}
GROUND_FLOOR = {"errors", "chat_format", "version"}  # import nothing of the package
LIBRARY = {"checkpoint", "processor"}  # above the core, below the apps


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("llava_manager", *path.relative_to(PACKAGE).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}; `from . import name` counts as importing the submodule `name`
    when there is one, else the package itself."""
    modules = _modules()
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                submodules = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules]
                targets = submodules if len(submodules) == len(node.names) else [source, *submodules]
            else:
                continue
            graph[name].update(target for target in targets if target in modules and target != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_reader_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "llava_manager.attach" in graph["llava_manager.patch"]  # lazy and top-level imports both count
    assert "llava_manager.patch" in graph["llava_manager.checkpoint.original"]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_core_imports_no_app():
    graph = import_graph()
    for module in CORE:
        apps = {t for t in graph[f"llava_manager.{module}"] if t.split(".")[1] in APPS}
        assert not apps, (module, apps)


def test_the_ground_floor_imports_nothing_and_the_library_no_app():
    graph = import_graph()
    for module in GROUND_FLOOR:
        assert graph[f"llava_manager.{module}"] == set(), module
    for name, imported in graph.items():
        if name.split(".")[1:2] and name.split(".")[1] in LIBRARY:
            apps = {t for t in imported if t.split(".")[1] in APPS}
            assert not apps, (name, apps)
