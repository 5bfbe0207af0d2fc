"""The rules in Lua and in Python agree: the same inputs, the same outcomes.

`MemoryStore` keeps the rules of shmstore/core/rules.py (its `CheckpointTable` calls
them); `RedisStore` keeps the atomic ones (retention, admission, eviction, versions) as
Lua twins in shmstore/backends/lua/.  Hypothesis drives both with the same saves under the
same `Limits` and the same queries, and after every step compares what each answered
(versions, or the refusal with its figures and message) and what each holds.  A twin
that drifts from the Python rule fails here, on the input that shows it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shmstore
from shmstore import BaseStore, Checkpoint, Limits, ShmstoreError
from shmstore.backends.table import CheckpointTable
from shmstore.core.codec import DEFAULT_CODEC, EMPTY_MAP
from shmstore.core.record import Record
from shmstore.core.store import OneOf
from tests.redis_server import RedisServer

IDS = ["a", "b", "c", "d", "e", "f"]
EXECUTIONS = ["x", "y", "z"]
SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

Pair = Callable[[Limits], tuple[BaseStore, BaseStore]]


@pytest.fixture
def pair(redis_server: RedisServer) -> Iterator[Pair]:
    """``pair(limits)``: an empty MemoryStore and an empty RedisStore with those limits."""
    opened: list[BaseStore] = []

    def make(limits: Limits) -> tuple[BaseStore, BaseStore]:
        for store in opened:
            store.close()
        opened.clear()
        redis_server.flush()
        stores = (shmstore.MemoryStore(limits=limits),
                  shmstore.RedisStore(redis_server.url, limits=limits, timeout=10.0))
        opened.extend(stores)
        return stores

    yield make
    for store in opened:
        store.close()


def held(store: BaseStore) -> tuple[Any, ...]:
    """Everything the store holds, and its counters of what the limits did."""
    stats = store.stats()
    records = [(c.execution_id, c.version, c.id, c.node_name, c.parent_id, c.state,
                c.metadata) for name in store.executions() for c in store.list(name)]
    return (records, stats.checkpoints, stats.payload_bytes, stats.evictions,
            stats.rejections, stats.pruned)


def outcome(call: Callable[..., Any], *args: Any) -> Any:
    """What ``call(*args)`` answered: its value, or its error with every figure and the
    message."""
    try:
        return ("ok", call(*args))
    except ShmstoreError as exc:
        figures = {k: v for k, v in vars(exc).items() if not k.startswith("_")}
        return ("error", type(exc).__name__, str(exc), figures)


def versions(saved: list[Checkpoint | None]) -> list[int | None]:
    return [None if c is None else c.version for c in saved]


# -- saves under limits: retention, admission, eviction ------------------------------------

limits_st = st.builds(
    Limits,
    max_per_execution=st.sampled_from([None, 1, 2, 3]),
    max_checkpoints=st.sampled_from([None, 2, 3, 5]),
    max_bytes=st.sampled_from([None, 12, 30, 60]),
    on_full=st.sampled_from(["reject", "evict"]),
)
# (id, execution, state size): small states, so that byte limits bite; ids repeat, so
# that re-saves move records between executions and within a batch.
record_st = st.tuples(st.sampled_from(IDS), st.sampled_from(EXECUTIONS), st.integers(0, 14))
step_st = st.tuples(st.sampled_from(["save", "save_many", "save_new", "clear", "delete"]),
                    st.lists(record_st, min_size=1, max_size=5))


def checkpoint(cid: str, execution: str, size: int) -> Checkpoint:
    return Checkpoint(execution_id=execution, id=cid, node_name="n", state=b"s" * size)


def run(store: BaseStore, kind: str, batch: list[tuple[str, str, int]]) -> Any:
    cps = [checkpoint(*fields) for fields in batch]
    if kind == "save":
        return store.save(cps[0]).version
    if kind == "save_many":
        return versions(list(store.save_many(cps)))
    if kind == "save_new":
        return versions(store.save_new(cps))
    if kind == "clear":
        return store.clear(cps[0].execution_id)
    return store.delete(cps[0].id)


@SETTINGS
@given(limits=limits_st, steps=st.lists(step_st, min_size=1, max_size=12))
def test_saves_under_limits_agree(pair: Pair, limits: Limits,
                                  steps: list[tuple[str, list[tuple[str, str, int]]]]) -> None:
    memory, redis = pair(limits)
    for kind, batch in steps:
        assert outcome(run, redis, kind, batch) == outcome(run, memory, kind, batch), \
            (kind, batch)
        assert held(redis) == held(memory), (kind, batch)


@SETTINGS
@given(expected=st.integers(0, 3), start=st.integers(0, 2))
def test_expected_version_agrees(pair: Pair, expected: int, start: int) -> None:
    memory, redis = pair(Limits())
    for store in (memory, redis):
        for i in range(start):
            store.save(checkpoint(f"c{i}", "x", 1))
    new = checkpoint("new", "x", 1)
    assert outcome(lambda: redis.save(new, expected_version=expected).version) == \
        outcome(lambda: memory.save(new, expected_version=expected).version)


def test_a_checkpoint_over_max_checkpoint_bytes_is_refused_by_lua_as_by_python(
        redis_server: RedisServer) -> None:
    # The client refuses it first (nothing sent); a client that asked for the limit before
    # another lowered it sends it, and the script refuses it as the table does.
    redis_server.flush()
    with shmstore.RedisStore(redis_server.url, limits=Limits(), timeout=10.0) as early:
        early.save(checkpoint("warm", "x", 1))  # has asked for the limit now
        with shmstore.RedisStore(redis_server.url, limits=Limits(max_checkpoint_bytes=8),
                                 timeout=10.0):
            pass
        big = checkpoint("big", "x", 20)
        from_lua = outcome(lambda: early.save(big))
    table = CheckpointTable(Limits(max_checkpoint_bytes=8))
    record = Record(big.id, big.execution_id, big.node_name, 0, 0, None, EMPTY_MAP,
                    DEFAULT_CODEC.encode(big.state))
    from_python = outcome(lambda: table.save(record))
    assert from_lua == from_python
    assert from_lua[0] == "error" and from_lua[1] == "StoreFull"


# -- queries: find, purge, copy --------------------------------------------------------------

def fill(store: BaseStore) -> None:
    """run/a: s1 <- s2 <- s3, logs under s1 and s3; run/b: s1; other: x."""
    for execution, cid, node, parent, meta in [
        ("run/a", "a1", "step", None, {"run": "r1", "source": "input"}),
        ("run/a", "a1-log1", "log", "a1", {}),
        ("run/a", "a2", "step", "a1", {"run": "r2", "source": "loop"}),
        ("run/a", "a1-log2", "log", "a1", {}),
        ("run/a", "a3", "step", "a2", {"run": "r2", "source": "loop", "n": 1.0}),
        ("run/a", "a3-log", "log", "a3", {}),
        ("run/b", "b1", "step", None, {"run": "r1", "source": "input", "n": 1}),
        ("run/b", "b0", "step", "b1", {"run": "r1"}),
        ("other", "x1", "step", "run/a-x", {"run": "r1"}),
    ]:
        store.save(Checkpoint(execution_id=execution, id=cid, node_name=node, parent_id=parent,
                              state=cid, metadata=meta))


scope_st = st.sampled_from([(["run/a"], False), (["run/a", "run/b", "nope"], False),
                            (["run/"], True), (["run/", "oth"], True), ([""], True)])
where_st = st.sampled_from([None, {"run": "r2"}, {"run": OneOf("r1", "r2")},
                            {"n": 1}, {"source": None}, {"missing": None}])
node_st = st.sampled_from([None, "step", "log"])


@SETTINGS
@given(scope=scope_st, node=node_st, where=where_st,
       before=st.sampled_from([None, "a2", "b1", "z"]), limit=st.sampled_from([None, 0, 1, 2, 4]),
       only=st.sampled_from([None, "a2", "b1", "gone"]), children=st.sampled_from([None, "log"]),
       by_id=st.booleans())
def test_find_agrees(pair: Pair, scope: tuple[list[str], bool], node: str | None,
                     where: dict[str, Any] | None, before: str | None, limit: int | None,
                     only: str | None, children: str | None, by_id: bool) -> None:
    memory, redis = pair(Limits())

    def find(store: BaseStore) -> Any:
        found = store.find(scope[0], prefix=scope[1], node_name=node, where=where,
                           before_id=before, limit=limit, checkpoint_id=only,
                           children=children, by_id=by_id)
        return [(c.id, c.version, [k.id for k in kids]) for c, kids in found]

    fill(memory)
    fill(redis)
    assert outcome(find, redis) == outcome(find, memory)


@SETTINGS
@given(scope=scope_st, node=node_st, where=where_st, keep=st.integers(0, 3),
       children=st.sampled_from([None, "log"]))
def test_purge_agrees(pair: Pair, scope: tuple[list[str], bool], node: str | None,
                      where: dict[str, Any] | None, keep: int, children: str | None) -> None:
    memory, redis = pair(Limits())
    fill(memory)
    fill(redis)

    def purge(store: BaseStore) -> Any:
        return store.purge(scope[0], prefix=scope[1], node_name=node, where=where, keep=keep,
                           children=children)

    assert outcome(purge, redis) == outcome(purge, memory)
    assert held(redis) == held(memory)


NEW_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}")


def named(store: BaseStore) -> list[tuple[Any, ...]]:
    """The store's records with the new ids `copy` made (UUIDv7s) numbered in order of
    first appearance, so that the copies of two stores compare."""
    names: dict[str, str] = {}

    def name(cid: str | None) -> str | None:
        if cid is None or not NEW_ID.fullmatch(cid):
            return cid
        return names.setdefault(cid, f"new-{len(names)}")

    return [(c.execution_id, c.version, name(c.id), c.node_name, name(c.parent_id), c.state)
            for execution in store.executions() for c in store.list(execution)]


@SETTINGS
@given(source=st.sampled_from(["run/a", "run/", "run", "other", "none"]),
       target=st.sampled_from(["copy", "run/a", "a", "run/c"]), prefix=st.booleans(),
       max_checkpoints=st.sampled_from([None, 12, 20]))
def test_copy_agrees(pair: Pair, source: str, target: str, prefix: bool,
                     max_checkpoints: int | None) -> None:
    memory, redis = pair(Limits(max_checkpoints=max_checkpoints))
    fill(memory)
    fill(redis)
    assert outcome(lambda: redis.copy(source, target, prefix=prefix)) == \
        outcome(lambda: memory.copy(source, target, prefix=prefix))
    assert named(redis) == named(memory)
