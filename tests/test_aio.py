"""What only an async store has: cancellation, its pool under many tasks, a loop that is
never blocked, timeouts and errors over a real server.  (The contract itself runs over
the async stores through the contract suite's ``aio-*`` params.)"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psutil
import pytest

import shmstore
import shmstore.aio
from shmstore import Checkpoint
from shmstore.aio import AsyncMemoryStore, AsyncSharedStore, AsyncStore
from shmstore.core.errors import (
    AccessDenied,
    CheckpointNotFound,
    ConfigError,
    StoreTimeout,
    StoreUnavailable,
    VersionConflict,
)

from .helpers import SESSION_PIDS, wait_until

pytestmark = pytest.mark.timeout(60)

KINDS = ["memory", "shared", "shared-plane", "tcp"]


@pytest.fixture(scope="module")
def tcp_server() -> Iterator[shmstore.StoreServer]:
    with shmstore.serve("tcp://127.0.0.1:0", export=False) as srv:
        SESSION_PIDS.add(srv.pid)
        yield srv


def run(test: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    return asyncio.run(test(*args))


async def opened(kind: str, request: pytest.FixtureRequest, **options: Any) -> AsyncStore:
    """An empty async store of ``kind``, opened in the running loop."""
    if kind == "memory":
        return AsyncMemoryStore()
    srv = request.getfixturevalue("tcp_server" if kind == "tcp" else "shared_server")
    plane = {"data_plane": True, "data_plane_threshold": 1} if kind == "shared-plane" \
        else {"data_plane": False}
    store = await shmstore.aio.connect(srv.url, authkey=srv.authkey, timeout=10.0,
                                       **plane, **options)
    for name in await store.executions():
        await store.clear(name)
    return store


async def ops(store: AsyncStore) -> dict[str, int]:
    return (await store.stats()).ops


def cp(execution: str = "run", state: object = None) -> Checkpoint:
    return Checkpoint(execution_id=execution, state=state)


@pytest.fixture
def kind_store(request: pytest.FixtureRequest) -> Callable[..., Awaitable[AsyncStore]]:
    return lambda kind, **options: opened(kind, request, **options)


# -- cancellation ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["shared", "shared-plane", "tcp"])
def test_a_wait_cancelled_mid_flight_discards_its_connection_and_the_next_is_in_step(
        kind: str, kind_store: Callable[..., Awaitable[AsyncStore]]) -> None:
    async def main() -> None:
        store = await kind_store(kind)
        assert isinstance(store, AsyncSharedStore)
        async with store:
            before = (await ops(store))["wait"]
            waiting = asyncio.create_task(store.wait("idle", timeout=30))
            while (await ops(store))["wait"] == before:  # the request is in the server
                await asyncio.sleep(0.01)
            # the wait has a connection of its own (the pipelined ones serve the rest)
            busy = [c for c in store._conns if c not in store._idle + store._shared]
            assert len(busy) == 1
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert busy[0].closed and busy[0] not in store._idle
            # The wait's answer, if the server ever sends one, has nowhere to land: every
            # later call reads its own answer.
            saved = await store.save(cp("idle", {"n": 1}))
            assert (await store.load(saved.id)).state == {"n": 1}
            assert [c.version for c in await store.list("idle")] == [1]

    run(main)


def _stopped(pid: int) -> bool:
    return bool(psutil.Process(pid).status() == psutil.STATUS_STOPPED)


@pytest.mark.parametrize("plane", [False, True])
def test_calls_cancelled_in_flight_leave_their_pipelined_connection_in_step(
        server: shmstore.StoreServer, plane: bool) -> None:
    """Twenty loads in flight on one connection (the server stopped, so none is
    answered yet); ten are cancelled.  Their answers are dropped when they come (and,
    on the data plane, their segments' descriptors closed): the other ten get their
    own states, on the same connection, and so do later calls."""
    big = b"s" * (64 * 1024)

    async def main() -> None:
        async with AsyncSharedStore(server.url, authkey=server.authkey, timeout=30,
                                    data_plane=plane, data_plane_threshold=4096) as store:
            ids = [(await store.save(cp("piped", {"i": i, "blob": big}))).id
                   for i in range(20)]
            (conn,) = store._shared
            fds_before = len(os.listdir("/proc/self/fd"))
            os.kill(server.pid, signal.SIGSTOP)
            try:
                assert wait_until(lambda: _stopped(server.pid), 10)
                loads = [asyncio.create_task(store.load(i)) for i in ids]
                while conn.in_flight < 20:  # each task writes its request at its start
                    await asyncio.sleep(0)
                for task in loads[::2]:
                    task.cancel()
            finally:
                os.kill(server.pid, signal.SIGCONT)
            got = await asyncio.gather(*loads, return_exceptions=True)
            assert all(isinstance(g, asyncio.CancelledError) for g in got[::2])
            assert [g.state["i"] for g in got[1::2]] == list(range(1, 20, 2))  # type: ignore[union-attr]
            del got
            # One more call on the same connection: answers come in order, so once it
            # has its own, the cancelled calls' answers have all come (and were dropped).
            assert (await store.load(ids[4])).state == {"i": 4, "blob": big}
            assert conn.in_flight == 0
            assert store._shared == [conn] and not conn.closed and store.connections == 1
            # (the loop lets go of the future that woke this task, and of the mapping
            # its answer held, once the task yields)
            await asyncio.sleep(0)
            assert len(os.listdir("/proc/self/fd")) == fds_before

    run(main)


def test_pipelined_saves_and_loads_with_and_without_segments_each_get_their_own(
        server: shmstore.StoreServer) -> None:
    """Small states (bytes on the socket) and large ones (segments riding on their
    request's first bytes) pipelined on one connection, queued while the server is
    stopped so that it reads them glued together: every save lands whole, and every
    load comes back with its own state."""
    async def main() -> None:
        async with AsyncSharedStore(server.url, authkey=server.authkey, timeout=30,
                                    data_plane_threshold=8192) as store:
            await store.executions()
            states = [{"i": i, "blob": bytes([i]) * (100 if i % 2 else 20_000)}
                      for i in range(30)]
            os.kill(server.pid, signal.SIGSTOP)
            try:
                assert wait_until(lambda: _stopped(server.pid), 10)
                saving = [asyncio.create_task(store.save(cp(f"mix-{i % 3}", state)))
                          for i, state in enumerate(states)]
                while store._shared[0].in_flight < 30:
                    await asyncio.sleep(0)
            finally:
                os.kill(server.pid, signal.SIGCONT)
            saved = await asyncio.gather(*saving)
            assert store.connections == 1
            loaded = await asyncio.gather(*[store.load(c.id) for c in saved])
            assert [c.state for c in loaded] == states
            assert sorted(c.version for c in saved if c.execution_id == "mix-0") == \
                list(range(1, 11))
            for k in range(3):
                await store.clear(f"mix-{k}")

    run(main)


@pytest.mark.parametrize("kind", ["shared", "tcp"])
def test_large_requests_and_answers_pipelined_with_small_ones_arrive_whole(
        kind: str, kind_store: Callable[..., Awaitable[AsyncStore]]) -> None:
    """Multi-MiB states on the socket (no data plane): their requests outgrow the
    socket's buffer and wait their turn to be written, their answers outgrow the read
    buffer; small calls between them, on the same connection, still get their own."""
    async def main() -> None:
        store = await kind_store(kind)
        assert isinstance(store, AsyncSharedStore)
        async with store:
            big = [bytes([i]) * (3 * 1024 * 1024 + i) for i in range(4)]
            calls: list[Awaitable[Any]] = []
            for i, blob in enumerate(big):
                calls.append(store.save(cp("big", blob)))
                calls.append(store.save(cp("small", i)))
            saved = await asyncio.gather(*calls)
            assert store.connections == 1
            loaded = await asyncio.gather(*[store.load(c.id) for c in saved])
            assert [c.state for c in loaded] == [x for i, b in enumerate(big) for x in (b, i)]
            await store.clear("big")
            await store.clear("small")

    run(main)


def test_a_timed_out_call_retires_its_connection_which_closes_once_drained(
        server: shmstore.StoreServer) -> None:
    """A call times out (the server stopped): its connection takes no new calls, the
    calls already on it still get their answers, and it closes when the last has."""
    async def main() -> None:
        async with AsyncSharedStore(server.url, authkey=server.authkey, timeout=0.3) as store:
            saved = await store.save(cp("t", 1))
            (old,) = store._shared
            os.kill(server.pid, signal.SIGSTOP)
            try:
                assert wait_until(lambda: _stopped(server.pid), 10)
                short = asyncio.create_task(store.load(saved.id))
                await asyncio.sleep(0)  # its request is written
                store.timeout = 30.0  # the next calls may take longer
                long = asyncio.create_task(store.load(saved.id))
                with pytest.raises(StoreTimeout):
                    await short
                assert old.retired and not old.closed and old.in_flight == 2
                later = asyncio.create_task(store.latest("t"))  # opens a new connection
                await asyncio.sleep(0)
            finally:
                os.kill(server.pid, signal.SIGCONT)
            # the timed-out call's answer came before long's (answers are in order) and
            # was dropped: with long's delivered no call waits on it, and it closed
            assert (await long).state == 1
            assert old.closed and old not in store._shared
            assert (await later).state == 1  # type: ignore[union-attr]
            assert store.connections == 1

    run(main)


def test_requests_made_while_calls_are_in_flight_go_out_in_one_write(
        kind_store: Callable[..., Awaitable[AsyncStore]]) -> None:
    """An idle connection writes a request at once; on one with calls in flight, the
    requests of a turn of the loop wait for its end and go together (the server is
    busy meanwhile), and every one still gets its own answer."""
    async def main() -> None:
        store = await kind_store("shared")
        assert isinstance(store, AsyncSharedStore)
        async with store:
            await store.executions()
            (conn,) = store._shared
            first = asyncio.ensure_future(store.save(cp("cork", 0)))
            await asyncio.sleep(0)  # its task ran: written at once, nothing held
            assert conn.in_flight == 1 and conn._cork is None
            rest = [asyncio.ensure_future(store.save(cp("cork", i))) for i in range(1, 6)]
            await asyncio.sleep(0)  # their tasks ran in this turn: held, not yet written
            assert conn._cork is not None and conn.in_flight == 6
            saved = await asyncio.gather(first, *rest)
            assert conn._cork is None
            assert sorted(c.version for c in saved) == [1, 2, 3, 4, 5, 6]
            assert [c.state for c in await store.list("cork")] == [0, 1, 2, 3, 4, 5]
            await store.clear("cork")

    run(main)


def test_a_cancelled_memory_wait_leaves_the_store_working(
        kind_store: Callable[..., Awaitable[AsyncStore]]) -> None:
    async def main() -> None:
        async with await kind_store("memory") as store:
            waiting = asyncio.create_task(store.wait("idle", timeout=30))
            await asyncio.sleep(0)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await store.save(cp("idle", 1))
            assert (await store.wait("idle", timeout=5)).state == 1

    run(main)


# -- the pool --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["shared", "shared-plane"])
def test_100_tasks_share_a_bounded_pool_and_each_gets_its_own_answer(
        kind: str, kind_store: Callable[..., Awaitable[AsyncStore]]) -> None:
    async def one(store: AsyncStore, i: int) -> tuple[int, Any]:
        saved = await store.save(cp(f"task-{i % 10}", {"i": i, "blob": bytes([i]) * 500}))
        return i, (await store.load(saved.id)).state

    async def main() -> None:
        store = await kind_store(kind, max_connections=4)
        assert isinstance(store, AsyncSharedStore)
        async with store:
            most = 0

            async def watch() -> None:
                nonlocal most
                while True:
                    most = max(most, store.connections)
                    await asyncio.sleep(0)

            watcher = asyncio.create_task(watch())
            got = await asyncio.gather(*[one(store, i) for i in range(100)])
            watcher.cancel()
            assert all(state == {"i": i, "blob": bytes([i]) * 500} for i, state in got)
            assert 1 <= most <= 4 and store.connections <= 4
            assert sum([len(await store.list(f"task-{k}")) for k in range(10)]) == 100

    run(main)


# -- the loop goes on ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_wait_never_blocks_the_loop_other_tasks_progress_and_wake_it(
        kind: str, kind_store: Callable[..., Awaitable[AsyncStore]]) -> None:
    async def main() -> None:
        async with await kind_store(kind) as store:
            waiting = asyncio.create_task(store.wait("stage", after_version=0, timeout=30))
            done = 0
            for i in range(20):  # another task's calls go through while it waits
                await store.save(cp("other", i))
                done += 1
            assert not waiting.done() and done == 20
            await store.save(cp("stage", "go"))
            assert (await waiting).state == "go"

    run(main)


def test_a_plain_compute_runs_off_the_loop_and_a_coroutine_compute_is_awaited(
        kind_store: Callable[..., Awaitable[AsyncStore]]) -> None:
    async def main() -> None:
        async with await kind_store("shared") as store:
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.001)

            ticker = asyncio.create_task(tick())
            started = ticks
            release = threading.Event()
            computing = asyncio.create_task(store.load_or_compute(
                "lc", "slow", lambda: release.wait(30) and "sync"))
            while ticks < started + 5:  # the loop runs while compute blocks its thread
                await asyncio.sleep(0.001)
            release.set()
            assert (await computing).state == "sync"

            async def compute() -> str:
                await asyncio.sleep(0)
                return "async"

            assert (await store.load_or_compute("lc", "fast", compute)).state == "async"
            assert (await store.load_or_compute("lc", "fast", compute)).version == 2
            ticker.cancel()

    run(main)


# -- timeouts and errors ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_errors_are_the_sync_stores(kind: str,
                                    kind_store: Callable[..., Awaitable[AsyncStore]]) -> None:
    async def main() -> None:
        async with await kind_store(kind) as store:
            before = await ops(store)
            with pytest.raises(ConfigError):
                await store.load("")
            with pytest.raises(ConfigError):
                await store.list("run", limit=-1)
            with pytest.raises(ConfigError):
                await store.wait("run", timeout=float("nan"))
            with pytest.raises(ConfigError):
                await store.save("not a checkpoint")  # type: ignore[arg-type]
            after = await ops(store)
            assert {k: after[k] - before[k] for k in after if k != "stats"} == \
                dict.fromkeys((k for k in after if k != "stats"), 0)
            with pytest.raises(CheckpointNotFound):
                await store.load("nope")
            await store.save(cp())
            with pytest.raises(VersionConflict):
                await store.save(cp(), expected_version=0)
            with pytest.raises(StoreTimeout):
                await store.wait("run", after_version=1, timeout=0.2)
        with pytest.raises(StoreUnavailable):
            await store.latest("run")

    run(main)


def test_a_stopped_server_is_a_timeout_and_a_wrong_key_or_no_server_are_named(
        server: shmstore.StoreServer, tmp_path: Any) -> None:
    async def main() -> None:
        async with AsyncSharedStore(server.url, authkey=server.authkey, timeout=0.5) as store:
            await store.save(cp())
            os.kill(server.pid, signal.SIGSTOP)  # delivered asynchronously: until it is
            assert wait_until(lambda: psutil.Process(server.pid).status()
                              == psutil.STATUS_STOPPED, 10)
            try:
                with pytest.raises(StoreTimeout):
                    await store.latest("run")
            finally:
                os.kill(server.pid, signal.SIGCONT)
            assert (await store.latest("run")) is not None
        async with AsyncSharedStore(server.url, authkey=b"w" * 32, timeout=5) as wrong:
            with pytest.raises(AccessDenied):
                await wrong.executions()
        async with AsyncSharedStore(f"unix://{tmp_path}/none.sock", authkey=b"k",
                                    timeout=5) as nowhere:
            with pytest.raises(StoreUnavailable):
                await nowhere.executions()

    run(main)


def test_closing_under_a_call_fails_that_call_clearly(
        kind_store: Callable[..., Awaitable[AsyncStore]]) -> None:
    async def main() -> None:
        store = await kind_store("shared")
        before = (await ops(store))["wait"]
        waiting = asyncio.create_task(store.wait("idle", timeout=30))
        while (await ops(store))["wait"] == before:
            await asyncio.sleep(0.01)
        await store.aclose()
        with pytest.raises(StoreUnavailable, match="closed"):
            await waiting

    run(main)


def test_connect_switches_backend_by_url(shared_server: shmstore.StoreServer) -> None:
    async def main() -> None:
        async with await shmstore.aio.connect("memory://") as memory:
            assert isinstance(memory, AsyncMemoryStore)
        async with await shmstore.aio.connect(shared_server.url,
                                              authkey=shared_server.authkey) as shared:
            assert isinstance(shared, AsyncSharedStore)
        with pytest.raises(ConfigError):
            await shmstore.aio.connect("http://nowhere")
        with pytest.raises(ConfigError):
            await shmstore.aio.connect(shared_server.url)  # no key anywhere

    run(main)


def test_sync_and_async_memory_stores_share_one_table() -> None:
    sync = shmstore.MemoryStore()

    async def main() -> None:
        async with AsyncMemoryStore(sync) as store:
            await store.save(cp("both", 1))
        assert sync.latest("both").state == 1  # type: ignore[union-attr]
        sync.close()
        with pytest.raises(ConfigError):
            AsyncMemoryStore(sync)

    run(main)
