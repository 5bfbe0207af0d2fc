"""One list of operations: derived from the `Backend` protocol, served, implemented.

The op names are the protocols' method names (`TABLE_OPS`, `BACKEND_OPS`); the server
dispatches exactly those, the table counts exactly the table's, and every backend has
each one with the protocol's parameters.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from shmstore import BaseStore
from shmstore.backends import table
from shmstore.backends.table import CheckpointTable
from shmstore.core.backend import ANSWERS_RECORDS, BACKEND_OPS, TABLE_OPS, Backend, TableOps
from shmstore.core.config import parse_url
from shmstore.server.manager import TableServer
from tests.aio_adapter import SyncOverAsync


def _methods(protocol: type) -> list[str]:
    return [name for name in vars(protocol) if not name.startswith("_")]


def test_the_op_lists_are_the_protocols_methods() -> None:
    assert list(TABLE_OPS) == _methods(TableOps)
    assert list(BACKEND_OPS) == _methods(TableOps) + _methods(Backend)
    assert {"memory_history", "register_client"} <= set(BACKEND_OPS) - set(TABLE_OPS)
    assert table.TABLE_OPS is TABLE_OPS  # the table's list is the derived one


def test_the_ops_whose_answers_hold_records_are_read_from_their_annotations() -> None:
    # A data-plane client reads descriptors (recvmsg) only on these answers: one left
    # out would lose the memory segments of its records.
    assert ANSWERS_RECORDS == {"load", "load_many", "list", "latest", "wait", "claim",
                               "complete", "find"}
    assert ANSWERS_RECORDS <= set(BACKEND_OPS)


def test_the_server_dispatches_exactly_the_backend_ops(tmp_path: Path) -> None:
    server = TableServer(parse_url(f"unix://{tmp_path}/s.sock"), b"k" * 32, CheckpointTable())
    try:
        assert set(server.ops) == set(BACKEND_OPS)
        assert all(callable(function) for function in server.ops.values())
    finally:
        server.listener.close()


def test_the_table_counts_exactly_the_table_ops() -> None:
    assert list(CheckpointTable().stats()["ops"]) == list(TABLE_OPS)


def _parameters(function: Callable[..., object]) -> list[str]:
    return [p for p in inspect.signature(function).parameters if p != "self"]


def test_every_backend_has_every_op_with_the_protocols_parameters(store: BaseStore) -> None:
    if isinstance(store, SyncOverAsync):
        pytest.skip("sync backends only: an async one has one path for every op, "
                    "call(op, *args); the next test and the contract drive it")
    backend = store._backend
    for op in BACKEND_OPS:
        assert _parameters(getattr(type(backend), op)) == _parameters(getattr(Backend, op)), op


def test_every_backend_answers_the_owners_ops(store: BaseStore) -> None:
    store._backend.register_client(os.getpid(), "test")
    assert isinstance(store._backend.memory_history(None), list)
    assert isinstance(store._backend.limits(), dict)
