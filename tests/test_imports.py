"""What imports what: the layering of the package, and what a client or the server loads.

The layers, lowest first: core, monitor, backends, server, integrations, cli.  A module
may import its own layer and those below.  The one exception is `core.factory.connect`,
which imports the backend it builds when it is called (never at import time).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from multiprocessing import managers
from pathlib import Path

import pytest

from shmstore.core.errors import ShmstoreError
from shmstore.server.manager import StoreManager, TableServer

PACKAGE = Path(__file__).resolve().parent.parent / "shmstore"
LAYERS = ["core", "monitor", "backends", "server", "integrations", "cli"]
# Upward imports that are allowed, and why.
ALLOWED_UPWARD = {
    # connect() builds the backend it is asked for: imported at call time only.
    ("shmstore.core.factory", "shmstore.backends.redis"),
    ("shmstore.core.factory", "shmstore.backends.shared"),
}
# Upward imports that are known and scheduled to go (not this module's to fix): the claim
# states live in backends/table.py.  Delete the entry when the import goes.
KNOWN_UPWARD = {("shmstore.core.store", "shmstore.backends.table")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
    return f"{base}.{node.module}" if node.module else base


def _imports(name: str, *, lazy: bool) -> set[str]:
    """The package's modules that ``name`` imports (with ``lazy``: in functions too).

    Imports under ``if TYPE_CHECKING:`` are left out: they never run.
    """
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if top or lazy:
                if isinstance(child, ast.ImportFrom):
                    target = _resolve(child, package)
                    found.update({target} | {f"{target}.{a.name}" for a in child.names})
                elif isinstance(child, ast.Import):
                    found.update(a.name for a in child.names)
            visit(child, top and not isinstance(child, (ast.FunctionDef, ast.Lambda,
                                                        ast.AsyncFunctionDef)))

    visit(ast.parse(path.read_text()), True)
    return (found & set(MODULES)) - {name}


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in LAYERS else None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle (strongly connected set of two or more modules)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = stack[stack.index(v):]
            del stack[stack.index(v):]
            if len(members) > 1:
                found.append(sorted(members))

    for v in graph:
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("lazy", [False, True], ids=["module level", "with function level"])
def test_the_package_has_no_import_cycle(lazy: bool) -> None:
    graph = {name: _imports(name, lazy=lazy) for name in MODULES}
    assert _cycles(graph) == []


def test_backends_never_import_the_server() -> None:
    bad = {(name, target) for name in MODULES if name.startswith("shmstore.backends")
           for target in _imports(name, lazy=True) if target.startswith("shmstore.server")}
    assert bad == set()


def test_imports_go_downward_but_for_connects_call_time_ones() -> None:
    upward = {(name, target) for name in MODULES for target in _imports(name, lazy=True)
              if (a := _layer(name)) is not None and (b := _layer(target)) is not None
              and b > a}
    assert upward <= ALLOWED_UPWARD | KNOWN_UPWARD
    at_import = {(name, target) for name in MODULES for target in _imports(name, lazy=False)}
    assert not ALLOWED_UPWARD & at_import  # connect()'s are made at call time only


def _modules_after(code: str) -> list[str]:
    """The shmstore and multiprocessing modules a fresh interpreter has after ``code``."""
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True, cwd=PACKAGE.parent,
    ).stdout
    return [m for m in json.loads(out.splitlines()[-1])
            if m.startswith(("shmstore", "multiprocessing"))]


def test_a_client_that_connects_imports_no_server_code() -> None:
    imported = _modules_after("from shmstore import connect\n"
                              "connect('unix:///nowhere/s.sock', authkey='00')")
    assert "shmstore.backends.shared" in imported
    assert [m for m in imported if m.startswith("shmstore.server")] == []
    assert "multiprocessing.managers" not in imported


def test_the_server_child_imports_no_client_code() -> None:
    imported = _modules_after("from shmstore.server.process import _CHILD_CODE\n"
                              "import shmstore.server.manager")
    assert "shmstore.server.manager" in imported
    client = {"shmstore.backends.shared", "shmstore.backends.redis", "shmstore.core.store",
              "shmstore.core.codec", "shmstore.core.factory"}
    assert client.isdisjoint(imported)
    assert [m for m in imported if m.startswith(("shmstore.integrations", "shmstore.cli"))] == []


def test_the_store_manager_builds_a_table_server() -> None:
    manager = StoreManager(authkey=b"k" * 32)
    assert isinstance(manager, managers.BaseManager)
    server = manager.get_server()
    try:
        assert isinstance(server, TableServer)
        assert isinstance(server, managers.Server)
        host, port = server.address
        assert host == "127.0.0.1" and port > 0  # the default: a free loopback port
        assert server.authkey == b"k" * 32
        assert set(server.ops) >= {"save", "load", "stats", "register_client"}
    finally:
        server.listener.close()


def test_the_store_manager_does_not_start_or_connect_stdlib_style() -> None:
    manager = StoreManager(authkey=b"k" * 32)
    with pytest.raises(ShmstoreError, match=r"shmstore\.serve"):
        manager.start()
    with pytest.raises(ShmstoreError, match=r"shmstore\.connect"):
        manager.connect()


def test_no_stdlib_registry_is_patched() -> None:
    # The server's listener is its own: multiprocessing's serializer table stays as it is.
    import shmstore.backends.wire  # noqa: F401

    assert set(managers.listener_client) == {"pickle", "xmlrpclib"}


def test_the_server_package_exports_what_it_did() -> None:
    import shmstore.server

    before = {"StoreServer", "TableServer", "read_connection_file", "run_server", "serve"}
    assert before <= set(shmstore.server.__all__)
    for name in shmstore.server.__all__:
        assert getattr(shmstore.server, name) is not None
