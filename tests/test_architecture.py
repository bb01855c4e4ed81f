"""The house rules of sentiment_ray's layout (sentiment_ray/__init__.py): no import circle between modules, and
packages that import only the layers below them. Read from the source (every import, lazy ones included), so a
circle that Python would tolerate at run time, because one side imports inside a function, still fails here."""

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "sentiment_ray"
# The layers, lowest first; modules of one layer may import from lower layers only, not from a sibling.
LAYERS = [{"io"}, {"model"}, {"ops"}, {"export"}, {"training", "scoring"}, {"evaluation"}, {"demo", "predict"},
          {"cli"}]
# config.py is open to every layer, and itself imports only these.
CONFIG_MAY_IMPORT = {"sentiment_ray.model.names", "sentiment_ray.model.prompt", "sentiment_ray.model.hub_id"}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The sentiment_ray modules a file imports: `from pkg import module` names the module, not the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return {name for name in found if name in modules and name != "sentiment_ray"}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return circles


def test_no_module_imports_itself_back_through_others():
    assert _circles(_graph()) == []


def test_the_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_layer_imports_only_the_layers_below_it():
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    graph = _graph()
    assert set(rank) | {"config", "__init__"} >= {_layer(m) for m in graph if m != "sentiment_ray"}
    upward = []
    for module, imported in sorted(graph.items()):
        if _layer(module) == "config":
            upward += [f"{module} -> {other}" for other in sorted(imported - CONFIG_MAY_IMPORT)]
            continue
        for other in sorted(imported):
            mine, theirs = _layer(module), _layer(other)
            if theirs in ("config", mine):
                continue
            if rank[theirs] >= rank[mine]:
                upward.append(f"{module} -> {other}")
    assert upward == []


def test_every_package_maps_its_files_in_its_docstring():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        files = {p.name for p in init.parent.glob("*.py") if p.name != "__init__.py"}
        files |= {f"{p.name}/" for p in init.parent.iterdir() if p.is_dir() and p.name != "__pycache__"}
        if init.parent == PACKAGE:
            files = {name for name in files if name.endswith("/") or name in ("config.py", "cli.py", "predict.py")}
        missing = sorted(name for name in files if name not in doc)
        assert missing == [], f"{init.relative_to(REPO_ROOT)} does not name {missing}"
