"""Fixtures shared by the whole suite.

``store`` is the contract fixture: one parametrized fixture, every backend, the same
tests.  Every test also checks that it left no child process behind.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from typing import cast

import pytest

import shmstore
from shmstore import BaseStore, Limits
from shmstore.core.limits import DEFAULT_MAX_CHECKPOINT_BYTES

from .helpers import SESSION_PIDS, children, wait_until
from .redis_server import RedisServer

# "shared" is the server over its socket only; "shared-plane" the same server with the
# data plane taking every state (threshold 1 byte), so that each contract test runs its
# states through sealed memory segments too.
# "aio-*" are the async stores (shmstore.aio) of the same backends, run through
# `tests.aio_adapter.SyncOverAsync`: the same contract tests, unchanged.
SYNC_BACKENDS = ["memory", "shared", "shared-plane", "redis"]
ASYNC_BACKENDS = ["aio-memory", "aio-shared", "aio-shared-plane", "aio-redis"]
BACKENDS = SYNC_BACKENDS + ASYNC_BACKENDS
#: A client of the data plane for every state, however small.
PLANE_EVERYTHING = {"data_plane": True, "data_plane_threshold": 1}
SOCKET_ONLY = {"data_plane": False}



@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    before = {p.pid for p in children()}
    yield

    def leftovers() -> set[int]:
        return {p.pid for p in children()} - before - SESSION_PIDS

    assert wait_until(lambda: not leftovers(), 5.0), f"test left processes behind: {leftovers()}"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("SHMSTORE_URL", "SHMSTORE_AUTHKEY", "SHMSTORE_CONNECTION_FILE"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="session")
def shared_server() -> Iterator[shmstore.StoreServer]:
    """One server for the contract tests; each test starts from an empty store.

    Its ``max_checkpoint_bytes`` is the socket path's default (64 MiB) for both kinds of
    client, so that the limit tests build 64 MiB states, not 4 GiB ones (the data plane's
    default has tests of its own).
    """
    server = shmstore.serve(export=False,
                            limits={"max_checkpoint_bytes": DEFAULT_MAX_CHECKPOINT_BYTES})
    SESSION_PIDS.add(server.pid)
    yield server
    server.shutdown()
    assert not server.running


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the Redis tests (skips with how-to-enable if there is none)."""
    server = RedisServer().start()
    SESSION_PIDS.add(server.pid)
    yield server
    try:
        # Every test closes the connections it opened.  A store or client left open in a
        # reference cycle would close only when the cyclic collector ran, in no set order
        # (a socket finalized unclosed warns, and the warning fails the run at its end).
        with server.client() as client:
            mine = client.client_id()
            left = [c for c in client.client_list() if int(c["id"]) != mine]
        assert not left, f"Redis connections the tests left open: {left}"
    finally:
        server.stop()


@pytest.fixture
def redis_limited_store(redis_server: RedisServer) -> Callable[[Limits], BaseStore]:
    """Stores with given `Limits` on the session's redis-server, each on an empty Redis."""

    def make(limits: Limits) -> BaseStore:
        redis_server.flush()
        return shmstore.RedisStore(redis_server.url, limits=limits, timeout=10.0)

    return make


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest) -> Iterator[BaseStore]:
    """Every backend, empty, behind the same contract."""
    if request.param.startswith("aio-"):
        s: BaseStore = async_store(request)
    elif request.param == "memory":
        s = shmstore.MemoryStore()
    elif request.param == "redis":
        server_ = request.getfixturevalue("redis_server")
        server_.flush()
        s = shmstore.RedisStore(server_.url, timeout=10.0)
    else:
        server = request.getfixturevalue("shared_server")
        plane = PLANE_EVERYTHING if request.param == "shared-plane" else SOCKET_ONLY
        s = server.connect(timeout=10.0, **plane)
        for name in s.executions():
            s.clear(name)
    with s:
        yield s


def async_store(request: pytest.FixtureRequest, limits: Limits | None = None,
                server: shmstore.StoreServer | None = None, flush: bool = True) -> BaseStore:
    """An ``aio-*`` param's async store, empty, behind the sync interface (the session's
    server unless ``server`` is given; ``limits`` for an in-process one; on Redis,
    ``flush=False`` keeps what is there, e.g. limits a sync store wrote)."""
    from shmstore.aio import AsyncMemoryStore, AsyncRedisStore, AsyncSharedStore

    from .aio_adapter import SyncOverAsync

    kind = request.param[len("aio-"):]
    if kind == "redis":
        redis_ = request.getfixturevalue("redis_server")
        if flush:
            redis_.flush()

        async def on_redis() -> AsyncRedisStore:
            return AsyncRedisStore(redis_.url, timeout=10.0)

        return cast(BaseStore, SyncOverAsync(on_redis))
    if kind == "memory":
        async def memory() -> AsyncMemoryStore:
            return AsyncMemoryStore(limits=limits)

        return cast(BaseStore, SyncOverAsync(memory))
    srv = server or request.getfixturevalue("shared_server")
    plane = PLANE_EVERYTHING if kind == "shared-plane" else SOCKET_ONLY

    async def shared() -> AsyncSharedStore:
        store = AsyncSharedStore(srv.url, authkey=srv.authkey, timeout=10.0, **plane)
        for name in await store.executions():
            await store.clear(name)
        return store

    return cast(BaseStore, SyncOverAsync(shared))


@pytest.fixture
def server() -> Iterator[shmstore.StoreServer]:
    """A server of its own for tests that hurt it."""
    srv = shmstore.serve(export=False)
    yield srv
    srv.shutdown()


def pytest_configure(config: pytest.Config) -> None:
    # A shell without job control starts background jobs with SIGINT ignored, and an
    # ignored signal stays ignored across exec: Python would then install no
    # KeyboardInterrupt handler here or in any child, and the Ctrl-C tests would hang.
    # A handled signal is reset to the default on exec, so children get Python's own.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_report_header() -> str:
    return f"shmstore backends under contract: {', '.join(BACKENDS)} (pid {os.getpid()})"
