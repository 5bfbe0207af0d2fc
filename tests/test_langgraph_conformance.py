"""LangGraph's own conformance suite (langgraph-checkpoint-conformance) at the FULL level.

Every capability, the extended ``delete_for_runs``, ``copy_thread`` and ``prune``
included, must be detected and pass, over an in-process store, over a server and over
Redis: CI fails the day one regresses.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

pytest.importorskip("langgraph.checkpoint.conformance",
                    reason="needs the [test] extra (langgraph-checkpoint-conformance)")

from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.capabilities import ALL_CAPABILITIES
from langgraph.checkpoint.memory import InMemorySaver

import shmstore
from shmstore import BaseStore
from shmstore.integrations.langgraph import ShmstoreSaver

EVERY_CAPABILITY = sorted(c.value for c in ALL_CAPABILITIES)


def conformance(make_store: Callable[[], BaseStore]) -> dict[str, object]:
    stores: list[BaseStore] = []

    @checkpointer_test(name="ShmstoreSaver")
    async def factory() -> AsyncIterator[ShmstoreSaver]:
        store = make_store()  # a fresh store per capability suite, as the suite expects
        stores.append(store)
        with ShmstoreSaver(store) as saver:
            yield saver
        store.close()

    try:
        report = asyncio.run(validate(factory))
    finally:  # a suite that stops early leaves its generator unfinished
        for store in stores:
            store.close()
    assert len(stores) == len(EVERY_CAPABILITY)
    return report.to_dict()


def assert_full(report: dict[str, object]) -> None:
    results = report["results"]
    assert isinstance(results, dict)
    failures = {name: r["failures"] for name, r in results.items() if r["failures"]}
    assert failures == {}
    assert sorted(name for name, r in results.items() if r["detected"]) == EVERY_CAPABILITY
    assert all(r["passed"] is True and r["tests_passed"] > 0 for r in results.values())
    assert report["conformance_level"] == "FULL"


def test_full_conformance_over_an_in_process_store() -> None:
    assert_full(conformance(shmstore.MemoryStore))


def test_full_conformance_over_a_shared_server(server: shmstore.StoreServer) -> None:
    def fresh() -> BaseStore:
        store = server.connect(timeout=10.0)
        for name in store.executions():
            store.clear(name)
        return store

    assert_full(conformance(fresh))
    with server.connect() as store:
        assert store.stats().ops["find"] > 0  # it really ran against the server


def test_full_conformance_over_redis(redis_server) -> None:  # type: ignore[no-untyped-def]
    def fresh() -> BaseStore:
        redis_server.flush()
        return shmstore.RedisStore(redis_server.url, timeout=10.0)

    assert_full(conformance(fresh))


def test_the_suite_tells_the_levels_apart() -> None:
    # The reference saver implements none of the extended capabilities: not FULL there
    # would mean the suite cannot see what we claim.
    @checkpointer_test(name="InMemorySaver")
    async def reference() -> AsyncIterator[InMemorySaver]:
        yield InMemorySaver()

    report = asyncio.run(validate(reference)).to_dict()
    results = report["results"]
    assert isinstance(results, dict)
    assert sorted(n for n, r in results.items() if not r["detected"]) == [
        "copy_thread", "delete_for_runs", "prune"]
