"""The import rules between layers, read from the source with ast: what each layer may import."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).parent.parent / "daemon"

# What the engine must never reach, even through a syncpro module it imports.
ENGINE_FORBIDDEN = (
    "syncpro.daemon",
    "syncpro.control",
    "watchdog",
    "socket",
    "socketserver",
    "pymysql",
    "yaml",
)

Graph = dict[str, set[str]]


def _modules(root: Path, package: str) -> dict[str, Path]:
    """Given a folder holding a package, return every module's dotted name and its file."""
    found: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imported(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> Iterator[str]:
    """Yield the dotted names a module's source imports, anywhere in it (a deferred import in a
    function counts: it runs as soon as the function does)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            for alias in node.names:
                # `from syncpro.engine import layout` imports a module, not a name.
                full = f"{base}.{alias.name}"
                yield full if full in known else base


def import_graph(root: Path, package: str = "syncpro") -> Graph:
    """Given a folder holding a package, return module -> every name its source imports
    (syncpro modules by their full name, others as written)."""
    files = _modules(root, package)
    known = set(files)
    graph: Graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"
        graph[module] = set(_imported(tree, module, is_package, known))
    return graph


def _with_parents(name: str, graph: Graph) -> list[str]:
    # Importing a.b.c runs a/__init__ and a/b/__init__ first.
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in graph]


def reachable(graph: Graph, start: str) -> dict[str, list[str]]:
    """Given the graph and a module, return every name it imports directly or through syncpro
    modules, each with the chain of imports that reaches it."""
    chains: dict[str, list[str]] = {start: [start]}
    todo = [start]
    while todo:
        module = todo.pop()
        for name in sorted(graph.get(module, ())):
            for step in [*_with_parents(name, graph), name]:
                if step not in chains:
                    chains[step] = [*chains[module], step]
                    if step in graph:
                        todo.append(step)
    return chains


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(graph: Graph, layer: str, forbidden: tuple[str, ...]) -> list[str]:
    """Given the graph, return the chain 'a -> b -> c' to each forbidden name a module of
    `layer` reaches."""
    found = []
    for module in sorted(m for m in graph if _within(m, layer)):
        for name, chain in sorted(reachable(graph, module).items()):
            if any(_within(name, f) for f in forbidden):
                found.append(" -> ".join(chain))
    return found


def cycles(graph: Graph) -> list[list[str]]:
    """Given the graph, return the import cycles among its modules (one per strongly connected
    group of more than one module, or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for name in sorted(graph[module]):
            if name not in graph:
                continue
            if name not in index:
                visit(name)
                low[module] = min(low[module], low[name])
            elif name in on_stack:
                low[module] = min(low[module], index[name])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1 or module in graph[module]:
                found.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph(PACKAGE_ROOT)


def test_the_graph_sees_the_engine_and_its_imports(graph: Graph) -> None:
    # Guards the test itself: an empty or misread graph would let every rule pass.
    assert "syncpro.engine.sync" in graph
    assert "syncpro.engine.layout" in graph["syncpro.daemon.routing"]
    assert "syncpro.config.model" in reachable(graph, "syncpro.engine.sync")


def test_the_engine_reaches_no_daemon_control_watcher_socket_database_or_yaml(
    graph: Graph,
) -> None:
    assert violations(graph, "syncpro.engine", ENGINE_FORBIDDEN) == []


def test_the_control_plane_never_imports_the_daemon(graph: Graph) -> None:
    assert violations(graph, "syncpro.control", ("syncpro.daemon",)) == []


def test_the_inventory_never_imports_the_config(graph: Graph) -> None:
    assert violations(graph, "syncpro.inventory", ("syncpro.config",)) == []


def test_the_config_and_the_inventory_reach_no_engine_control_or_daemon(graph: Graph) -> None:
    # Both are read by every other layer; an import back up would tie the layers in a knot.
    upper = ("syncpro.engine", "syncpro.control", "syncpro.daemon", "syncpro.cli")
    assert violations(graph, "syncpro.config", upper) == []
    assert violations(graph, "syncpro.inventory", upper) == []


def test_nothing_imports_the_cli_but_the_main_module(graph: Graph) -> None:
    importers = sorted(m for m, names in graph.items() if "syncpro.cli" in names)
    assert importers == ["syncpro.__main__"]


def test_the_testing_harness_stays_outside_the_daemon(graph: Graph) -> None:
    # syncpro.testing drives the daemon from outside, as an operator does: the daemon never
    # loads it, and it sees nothing of the daemon but its command line, log and sockets.
    assert "syncpro.testing.driver" in graph
    importers = [
        m
        for m, names in sorted(graph.items())
        if not _within(m, "syncpro.testing") and any(_within(n, "syncpro.testing") for n in names)
    ]
    assert importers == []
    # The package's own __init__ runs first whatever is imported: it is no way in.
    others = tuple(m for m in graph if m != "syncpro" and not _within(m, "syncpro.testing"))
    assert violations(graph, "syncpro.testing", others) == []


def test_there_are_no_import_cycles_among_syncpro_modules(graph: Graph) -> None:
    assert cycles(graph) == []


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def test_a_forbidden_import_two_modules_away_is_reported_with_its_chain(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "syncpro/__init__.py": "",
            "syncpro/engine/__init__.py": "",
            "syncpro/engine/sync.py": "from . import layout\n",
            "syncpro/engine/layout.py": "def f():\n    from syncpro.config import load\n",
            "syncpro/config/__init__.py": "",
            "syncpro/config/load.py": "import yaml\n",
        },
    )

    found = violations(import_graph(root), "syncpro.engine", ENGINE_FORBIDDEN)

    assert found == [
        "syncpro.engine.layout -> syncpro.config.load -> yaml",
        "syncpro.engine.sync -> syncpro.engine.layout -> syncpro.config.load -> yaml",
    ]


def test_a_cycle_through_a_deferred_import_is_reported(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "syncpro/__init__.py": "",
            "syncpro/a.py": "from syncpro.b import x\n",
            "syncpro/b.py": "x = 1\ndef f():\n    from syncpro import a\n",
            "syncpro/c.py": "import syncpro.a\n",
        },
    )

    assert cycles(import_graph(root)) == [["syncpro.a", "syncpro.b"]]
