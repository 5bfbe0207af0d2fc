"""What a client or the server loads, and the server's managers lineage.

The static layering of the package (no upward import, no cycle) is
`tests/test_layering.py`'s, checked against docs/DESIGN.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from multiprocessing import managers
from pathlib import Path

import pytest

from shmstore.core.errors import ShmstoreError
from shmstore.server.manager import StoreManager, TableServer

PACKAGE = Path(__file__).resolve().parent.parent / "shmstore"


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
