"""The package layout keeps its promises: no import cycles, and imports only go down the layers.

Every import counts, including those inside functions (a lazy import hides a cycle, it does not
remove it); only ``if TYPE_CHECKING:`` blocks are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("nbdcore", "gateway", "nbdgw")
# The gateway's server side: what `nbdgw serve` runs. It never needs the command-line client.
SERVER_SIDE = (
    "gateway.api",
    "gateway.hosts",
    "gateway.security",
    "gateway.server",
    "gateway.config",
    "gateway.errors",
    "gateway.ledger",
    "gateway.observability",
    "gateway.sample",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "v1" in path.relative_to(ROOT).parts:  # generated code
                continue
            found[module_name(path)] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (a ``from P import M`` of a submodule counts as M)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return out


def test_the_checker_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_checker_sees_lazy_imports(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import gateway.server\n"
        "def f():\n    from gateway import config\n"
    )
    found = imports_of("x", source, {"gateway.server", "gateway.config", "gateway"})
    assert found == {"gateway", "gateway.config"}


# The one cycle left, on purpose: a Snapshot is an Image (it subclasses it) and an Image makes
# its Snapshots (Image.snapshot, lazily imported). Splitting them would part one concept.
KNOWN_CYCLES = [["nbdcore.storage", "nbdcore.storage.image", "nbdcore.storage.snapshot"]]


def test_no_import_cycles() -> None:
    assert cycles(graph()) == KNOWN_CYCLES


def test_the_server_never_imports_the_command_line() -> None:
    edges = graph()
    wrong = sorted(
        (name, target)
        for name, targets in edges.items()
        if name.startswith(SERVER_SIDE)
        for target in targets
        if target.startswith("gateway.cli")
    )
    assert wrong == []


def test_nbdcore_stands_alone() -> None:
    edges = graph()
    wrong = sorted(
        (name, target)
        for name, targets in edges.items()
        if name.startswith("nbdcore")
        for target in targets
        if not target.startswith("nbdcore")
    )
    assert wrong == []


def test_the_command_line_talks_through_the_client() -> None:
    """The commands are a thin layer over the client library (nbdgw.AsyncClient): no module
    of gateway.cli builds gRPC stubs or channels of its own, so every command gets the
    client's resume, error decoding, data checks and in-place receiving."""
    wrong = []
    for path in sorted((ROOT / "gateway" / "cli").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.endswith("_pb2_grpc") or name == "grpc" or name.startswith("grpc."):
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert wrong == []
