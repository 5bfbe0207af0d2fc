"""Several real processes against one real server (spawn, so nothing is inherited by luck)."""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading

import pytest

import shmstore
from shmstore import Checkpoint, SharedStore

from .helpers import SPAWN, reaped, run_all, wait_until

WRITERS = 4
SAVES = 500


def _writer(store: SharedStore, index: int) -> None:
    for i in range(SAVES):
        store.save(Checkpoint(execution_id="shared", node_name=f"w{index}", state=[index, i]))
        store.save(Checkpoint(execution_id=f"own-{index}", state=i))
    store.close()


def test_concurrent_writers_lose_nothing_and_versions_are_unique(
    server: shmstore.StoreServer,
) -> None:
    store = server.connect()
    codes = run_all(_writer, [(store, i) for i in range(WRITERS)], timeout=120)
    assert codes == [0] * WRITERS
    shared = store.list("shared")
    assert [c.version for c in shared] == list(range(1, WRITERS * SAVES + 1))
    assert sorted(tuple(c.state) for c in shared) == sorted(
        (w, i) for w in range(WRITERS) for i in range(SAVES)
    )
    for w in range(WRITERS):
        mine = [c.state for c in shared if c.state[0] == w]
        assert [s[1] for s in mine] == list(range(SAVES))  # each writer's order is kept
        own = store.list(f"own-{w}")
        assert [(c.version, c.state) for c in own] == [(i + 1, i) for i in range(SAVES)]
    assert store.stats().checkpoints == WRITERS * SAVES * 2
    store.close()


def _waiter(store: SharedStore, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    got = store.wait("handoff", after_version=0, timeout=60)
    out.put((got.state, got.version))


def test_wait_wakes_across_processes(server: shmstore.StoreServer) -> None:
    store = server.connect()
    waits_before = store.stats().ops.get("wait", 0)
    out = SPAWN.Queue()
    proc = SPAWN.Process(target=_waiter, args=(store, out))
    with reaped(proc, timeout=60):
        # The handshake: the server counts a wait under the lock it registers the waiter
        # with, so once the count moves the child is blocked in it.
        assert wait_until(lambda: store.stats().ops.get("wait", 0) > waits_before, 60)
        assert out.empty() and proc.is_alive()  # blocked in wait: nothing to wake it yet
        store.save(Checkpoint(execution_id="handoff", state="go"))
        state, version = out.get(timeout=60)
    assert (state, version) == ("go", 1)
    assert proc.exitcode == 0
    store.close()


def _child_saves(store: SharedStore, tag: str) -> None:
    store.save(Checkpoint(execution_id="children", state=tag))


@pytest.mark.skipif(sys.platform != "linux", reason="fork is tested on Linux")
def test_a_store_works_after_fork_and_the_parent_keeps_its_connection(
    server: shmstore.StoreServer,
) -> None:
    store = server.connect()
    store.save(Checkpoint(execution_id="children", state="parent-before"))
    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=_child_saves, args=(store, f"fork-{i}")) for i in range(3)]
    with reaped(*procs, timeout=60):
        pass
    assert [p.exitcode for p in procs] == [0, 0, 0]
    store.save(Checkpoint(execution_id="children", state="parent-after"))
    states = [c.state for c in store.list("children")]
    assert states[0] == "parent-before" and states[-1] == "parent-after"
    assert sorted(states[1:-1]) == ["fork-0", "fork-1", "fork-2"]
    store.close()


def test_a_store_passed_to_spawned_children(server: shmstore.StoreServer) -> None:
    store = server.connect()
    assert run_all(_child_saves, [(store, f"spawn-{i}") for i in range(3)]) == [0, 0, 0]
    assert sorted(c.state for c in store.list("children")) == ["spawn-0", "spawn-1", "spawn-2"]
    store.close()


def _connect_from_environment(tag: str) -> None:
    with shmstore.connect() as store:
        store.save(Checkpoint(execution_id="env", state=tag))


def test_children_connect_with_no_arguments_through_the_exported_environment() -> None:
    with shmstore.serve() as srv:
        assert os.environ["SHMSTORE_URL"] == srv.url
        assert bytes.fromhex(os.environ["SHMSTORE_AUTHKEY"]) == srv.authkey
        assert run_all(_connect_from_environment, [("a",), ("b",)]) == [0, 0]
        with srv.connect() as store:
            assert sorted(c.state for c in store.list("env")) == ["a", "b"]
    assert "SHMSTORE_URL" not in os.environ
    assert "SHMSTORE_AUTHKEY" not in os.environ


def test_many_threads_share_one_store(server: shmstore.StoreServer) -> None:
    store = server.connect()
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(50):
                saved = store.save(Checkpoint(execution_id=f"t{n}", state=i))
                assert store.load(saved.id).state == i
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert store.stats().checkpoints == 400
    store.close()
