"""`ShmstoreSaver` in one process: the mapping onto the store, real graphs, edge cases.

The conformance suite (test_langgraph_conformance.py) checks LangGraph's contract; these
check what it does not: ids with awkward characters, metadata our codec cannot encode,
the bytes freed with a thread, one round trip per call, real ``StateGraph`` runs.
"""

from __future__ import annotations

import asyncio
import itertools
import operator
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest

pytest.importorskip("langgraph.graph", reason="needs the [langgraph] extra")

from langgraph.checkpoint.base import empty_checkpoint
from langgraph.checkpoint.serde.types import ERROR, INTERRUPT
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

import shmstore
from shmstore import BaseStore, ConfigError, MemoryStore
from shmstore.integrations.langgraph import CHECKPOINT_NODE, WRITE_NODE, ShmstoreSaver

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["memory", "shared", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[BaseStore]:
    if request.param == "memory":
        with MemoryStore() as memory:
            yield memory
        return
    if request.param == "redis":
        redis_server = request.getfixturevalue("redis_server")
        redis_server.flush()
        with shmstore.RedisStore(redis_server.url, timeout=10.0) as on_redis:
            yield on_redis
        return
    with shmstore.serve(export=False) as server, server.connect(timeout=10.0) as shared:
        yield shared


@pytest.fixture
def saver(store: BaseStore) -> ShmstoreSaver:
    return ShmstoreSaver(store)


def config(thread: Any, ns: str = "", checkpoint_id: str | None = None) -> dict[str, Any]:
    conf: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ns}
    if checkpoint_id is not None:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


def put(saver: ShmstoreSaver, thread: Any, ns: str = "", parent: dict[str, Any] | None = None,
        values: dict[str, Any] | None = None, **metadata: Any) -> dict[str, Any]:
    cp = empty_checkpoint()
    cp["channel_values"] = dict(values or {})
    cp["channel_versions"] = dict.fromkeys(cp["channel_values"], 1)
    conf = config(thread, ns, parent["configurable"]["checkpoint_id"] if parent else None)
    return saver.put(conf, cp, {"source": "loop", "step": 0, **metadata},  # type: ignore[arg-type,typeddict-item]
                     dict(cp["channel_versions"]))


# -- a real graph --------------------------------------------------------------------------


class Log(TypedDict):
    log: Annotated[list[str], operator.add]


def ask(state: Log) -> dict[str, list[str]]:
    return {"log": [f"answer:{interrupt('question?')}"]}


def interrupted_graph() -> StateGraph[Log]:
    graph = StateGraph(Log)
    graph.add_node("a", lambda s: {"log": ["a"]})
    graph.add_node("ask", ask)
    graph.add_node("b", lambda s: {"log": ["b"]})
    graph.add_edge(START, "a")
    graph.add_edge("a", "ask")
    graph.add_edge("ask", "b")
    graph.add_edge("b", END)
    return graph


def test_a_graph_with_an_interrupt_resumes_and_its_history_is_complete(
        saver: ShmstoreSaver, store: BaseStore) -> None:
    app = interrupted_graph().compile(checkpointer=saver)
    conf = {"configurable": {"thread_id": "t1"}}
    first = app.invoke({"log": []}, conf)
    assert first["log"] == ["a"] and first["__interrupt__"][0].value == "question?"
    # The interrupt is a pending write of the latest checkpoint, in the store.
    latest = saver.get_tuple(conf)
    assert latest is not None and latest.pending_writes is not None
    assert INTERRUPT in {channel for _, channel, _ in latest.pending_writes}
    assert app.invoke(Command(resume="yes"), conf) == {"log": ["a", "answer:yes", "b"]}
    history = list(saver.list(conf))
    assert [t.metadata["step"] for t in history] == [3, 2, 1, 0, -1]
    for newer, older in itertools.pairwise(history):
        assert newer.parent_config is not None
        assert newer.parent_config["configurable"]["checkpoint_id"] == older.config[
            "configurable"]["checkpoint_id"]
    assert app.get_state(conf).values == {"log": ["a", "answer:yes", "b"]}
    assert store.executions() == ["langgraph/t1/"]


def test_an_async_graph_runs_through_the_async_twins(saver: ShmstoreSaver) -> None:
    app = interrupted_graph().compile(checkpointer=saver)
    conf = {"configurable": {"thread_id": "async"}}

    async def run() -> dict[str, Any]:
        await app.ainvoke({"log": []}, conf)
        out = await app.ainvoke(Command(resume="ok"), conf)
        history = [t async for t in saver.alist(conf)]
        assert len(history) == 5
        await saver.adelete_thread("async")
        assert await saver.aget_tuple(conf) is None
        return out

    assert asyncio.run(run()) == {"log": ["a", "answer:ok", "b"]}


# -- mapping -------------------------------------------------------------------------------


@pytest.mark.parametrize("thread", ["a/b", "50%#x", "t#1/", "ünï", 42])
def test_awkward_thread_ids_and_namespaces_stay_apart(saver: ShmstoreSaver, thread: Any) -> None:
    near = f"{thread}/"  # would share a prefix without escaping
    put(saver, thread, values={"x": "mine"})
    put(saver, thread, ns="sub:1|x/y#z", values={"x": "sub"})
    put(saver, near, values={"x": "near"})
    mine = saver.get_tuple(config(thread))
    assert mine is not None and mine.checkpoint["channel_values"] == {"x": "mine"}
    sub = saver.get_tuple(config(thread, "sub:1|x/y#z"))
    assert sub is not None and sub.config["configurable"]["checkpoint_ns"] == "sub:1|x/y#z"
    every_ns = list(saver.list({"configurable": {"thread_id": thread}}))
    assert [t.config["configurable"]["checkpoint_ns"] for t in every_ns] == ["", "sub:1|x/y#z"]
    saver.delete_thread(thread)
    assert saver.get_tuple(config(thread)) is None
    assert saver.get_tuple(config(thread, "sub:1|x/y#z")) is None
    assert saver.get_tuple(config(near)) is not None


def test_list_across_threads_and_namespaces_filters_before_and_limit(
        saver: ShmstoreSaver) -> None:
    first = put(saver, "t1", step=0, kind="x")
    put(saver, "t1", ns="child:1", step=0, kind="y")
    second = put(saver, "t1", parent=first, step=1, kind="x")
    put(saver, "t2", step=0, kind="x")
    everything = list(saver.list(None))
    assert [(t.config["configurable"]["thread_id"], t.config["configurable"]["checkpoint_ns"])
            for t in everything] == [("t1", ""), ("t1", ""), ("t1", "child:1"), ("t2", "")]
    assert len(list(saver.list(None, filter={"kind": "x"}))) == 3
    assert len(list(saver.list(None, filter={"kind": "x"}, limit=2))) == 2
    cut = second["configurable"]["checkpoint_id"]
    before = [t.config["configurable"]["checkpoint_id"]
              for t in saver.list(None, before=config("t1", checkpoint_id=cut))]
    assert cut not in before and first["configurable"]["checkpoint_id"] in before
    assert len(before) == 2  # t1's first and t1/child:1's; t2's came later
    only = list(saver.list({"configurable": {"thread_id": "t1"}},
                           before=config("t1", checkpoint_id=cut), limit=1))
    assert len(only) == 1
    assert list(saver.list(config("t1"), limit=0)) == []
    one = list(saver.list(config("t1", checkpoint_id=first["configurable"]["checkpoint_id"])))
    assert [t.metadata["step"] for t in one] == [0]


class Opaque:
    """Metadata no msgpack codec knows (LangGraph's serde pickles it when told to)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque)

    __hash__ = object.__hash__


def test_metadata_our_codec_cannot_encode_is_kept_in_the_state(saver: ShmstoreSaver,
                                                               store: BaseStore) -> None:
    from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

    saver.serde = JsonPlusSerializer(pickle_fallback=True)
    stored = put(saver, "t", thing=Opaque(), plain="yes")
    tup = saver.get_tuple(stored)
    assert tup is not None
    assert tup.metadata["thing"] == Opaque() and tup.metadata["plain"] == "yes"
    [(record, _)] = store.find("langgraph/t/")
    assert "thing" not in record.metadata and record.metadata["plain"] == "yes"
    assert len(list(saver.list(config("t"), filter={"plain": "yes"}))) == 1


def test_regular_writes_keep_the_first_and_special_ones_the_last(saver: ShmstoreSaver) -> None:
    stored = put(saver, "t")
    saver.put_writes(stored, [("a", 1), ("b", 2)], "task-1", "path")
    saver.put_writes(stored, [("a", 10), ("b", 20)], "task-1", "path")
    saver.put_writes(stored, [(ERROR, "first")], "task-2")
    saver.put_writes(stored, [(ERROR, "last")], "task-2")
    saver.put_writes(stored, [], "task-3")
    tup = saver.get_tuple(stored)
    assert tup is not None
    assert tup.pending_writes == [("task-2", ERROR, "last"), ("task-1", "a", 1),
                                  ("task-1", "b", 2)]


def test_pending_writes_come_in_langgraph_order(saver: ShmstoreSaver) -> None:
    stored = put(saver, "t")
    saver.put_writes(stored, [("x", "b-0"), ("y", "b-1")], "task-b", "~path:2")
    saver.put_writes(stored, [("x", "a")], "task-a", "~path:1")
    saver.put_writes(stored, [("x", "input")], "task-z")
    tup = saver.get_tuple(stored)
    assert tup is not None and tup.pending_writes is not None
    assert [v for _, _, v in tup.pending_writes] == ["input", "a", "b-0", "b-1"]


def test_delete_thread_frees_checkpoints_and_writes_together(saver: ShmstoreSaver,
                                                             store: BaseStore) -> None:
    app = interrupted_graph().compile(checkpointer=saver)
    for thread in ("keep", "drop"):
        app.invoke({"log": []}, {"configurable": {"thread_id": thread}})
    kept = store.stats()
    saver.delete_thread("drop")
    after = store.stats()
    assert after.checkpoints == kept.checkpoints // 2 and after.executions == 1
    assert after.payload_bytes == sum(
        len(store.codec.encode(cp.state)) for cp, _ in store.find("langgraph/keep/"))
    nodes = {cp.node_name for cp, _ in store.find("langgraph/", prefix=True)}
    assert nodes == {CHECKPOINT_NODE, WRITE_NODE}
    saver.delete_thread("keep")
    assert store.stats().checkpoints == 0 and store.stats().payload_bytes == 0


def test_prune_keeps_the_latest_checkpoint_and_its_writes_only(saver: ShmstoreSaver,
                                                               store: BaseStore) -> None:
    app = interrupted_graph().compile(checkpointer=saver)
    conf = {"configurable": {"thread_id": "t"}}
    app.invoke({"log": []}, conf)
    latest = saver.get_tuple(conf)
    saver.prune(["t"])
    assert store.stats().checkpoints == 1 + len(latest.pending_writes or [])  # type: ignore[union-attr]
    assert saver.get_tuple(conf) == latest
    assert app.invoke(Command(resume="after prune"), conf)["log"][-1] == "b"
    saver.prune(["t"], strategy="delete")
    assert store.stats().checkpoints == 0
    with pytest.raises(ConfigError):
        saver.prune(["t"], strategy="keep_some")


def test_copy_thread_gives_an_independent_thread_that_resumes(saver: ShmstoreSaver) -> None:
    app = interrupted_graph().compile(checkpointer=saver)
    app.invoke({"log": []}, {"configurable": {"thread_id": "src"}})
    saver.copy_thread("src", "dst")
    saver.copy_thread("src", "src")  # nothing to do
    dst = app.invoke(Command(resume="copy"), {"configurable": {"thread_id": "dst"}})
    assert dst == {"log": ["a", "answer:copy", "b"]}
    src = app.get_state({"configurable": {"thread_id": "src"}})
    assert src.next == ("ask",)  # still waiting for its own answer
    assert len(list(saver.list(config("src")))) == 3
    assert len(list(saver.list(config("dst")))) == 5


def test_each_langgraph_call_is_one_round_trip(store: BaseStore) -> None:
    calls: list[str] = []
    real = store._backend

    class Counting:
        """The store's backend, noting the name of every operation called."""

        def __getattr__(self, op: str) -> Any:
            calls.append(op)
            return getattr(real, op)

    store._backend = Counting()  # type: ignore[assignment]
    saver = ShmstoreSaver(store)
    stored = put(saver, "t", values={"a": 1}, run_id="r")
    saver.put_writes(stored, [("a", 2), ("b", 3)], "task")
    saver.get_tuple(stored)
    list(saver.list(None, filter={"run_id": "r"}, limit=1))
    saver.copy_thread("t", "u")
    saver.delete_for_runs(["r", "other"])
    saver.prune(["t", "u"])
    saver.delete_thread("t")
    calls.remove("limits")  # a store asks for its limits once, on its first save
    assert calls == ["save", "save_new", "find", "find", "copy", "purge", "purge", "purge"]


def test_invocations_over_a_server_reuse_a_few_connections() -> None:
    # LangGraph runs each invocation on new threads; a connection per thread would leave
    # a socket and a server thread behind for every one of them.  The store's pool holds
    # as many as calls ran at once (LangGraph overlaps a few writes with the next step).
    psutil = pytest.importorskip("psutil")
    with shmstore.serve(export=False) as server, server.connect() as store, \
            ShmstoreSaver(store) as saver:
        app = interrupted_graph().compile(checkpointer=saver)
        app.invoke({"log": []}, {"configurable": {"thread_id": "warm-up"}})
        threads = psutil.Process(server.pid).num_threads()
        for i in range(20):
            app.invoke({"log": []}, {"configurable": {"thread_id": f"t{i}"}})
        assert psutil.Process(server.pid).num_threads() <= threads + 4
        assert len(store._conns) <= 5
        assert len(store.executions()) == 21


def test_bad_arguments_are_refused_clearly() -> None:
    with pytest.raises(ConfigError):
        ShmstoreSaver({"not": "a store"})  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        ShmstoreSaver()  # no store given and none in the environment


def test_with_no_store_it_connects_to_the_server_of_the_environment() -> None:
    with shmstore.serve() as server:  # exports SHMSTORE_URL / SHMSTORE_AUTHKEY
        with ShmstoreSaver() as saver:
            put(saver, "env")
            assert server.connect().executions() == ["langgraph/env/"]
        assert saver.store._closed  # type: ignore[attr-defined]


def test_importing_shmstore_does_not_import_langgraph() -> None:
    code = "import sys, shmstore; shmstore.MemoryStore; print('langgraph' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "False"


# -- the same order and the same writes as LangGraph's InMemorySaver -------------------------


def _put_with_id(saver: Any, thread: str, checkpoint_id: str, parent: str | None,
                 step: int) -> None:
    cp = empty_checkpoint()
    cp["id"] = checkpoint_id
    conf = config(thread, "", parent)
    saver.put(conf, cp, {"source": "loop", "step": step}, {})


def _ids(tuples: Any) -> list[str]:
    return [t.config["configurable"]["checkpoint_id"] for t in tuples]


ORDER = [2, 0, 3, 1]  # positions in id order, in the order they are put: a newer id first


def _out_of_order(saver: Any, thread: str, ids: list[str]) -> None:
    """Put checkpoints ``ids`` (sorted) in an order that is not their id order."""
    for step, position in enumerate(ORDER):
        _put_with_id(saver, thread, ids[position], ids[position - 1] if position else None,
                     step)


def _fresh_ids() -> list[str]:
    return sorted(empty_checkpoint()["id"] for _ in range(len(ORDER)))


def test_list_and_get_tuple_order_by_checkpoint_id_as_in_memory_saver(
        saver: ShmstoreSaver) -> None:
    from langgraph.checkpoint.memory import InMemorySaver

    reference = InMemorySaver()
    ids = _fresh_ids()
    _out_of_order(saver, "t", ids)
    _out_of_order(reference, "t", ids)
    before = config("t", checkpoint_id=ids[2])
    for args in [(config("t"), {}), (config("t"), {"limit": 2}),
                 (config("t"), {"before": before}), (config("t"), {"before": before,
                                                                   "limit": 1}),
                 (None, {"limit": 2}), ({"configurable": {"thread_id": "t"}}, {})]:
        want = _ids(reference.list(args[0], **args[1]))
        assert _ids(saver.list(args[0], **args[1])) == want, args
    assert _ids(saver.list(config("t"))) == ids[::-1]
    assert _ids(saver.list(config("t"), before=before)) == [ids[1], ids[0]]
    for tup in (saver.get_tuple(config("t")), reference.get_tuple(config("t"))):
        assert tup is not None and tup.config["configurable"]["checkpoint_id"] == ids[-1]


def test_a_copied_thread_keeps_checkpoint_id_order(saver: ShmstoreSaver) -> None:
    ids = _fresh_ids()
    _out_of_order(saver, "src", ids)
    saver.copy_thread("src", "dst")
    assert _ids(saver.list(config("dst"))) == sorted(ids, reverse=True)
    latest = saver.get_tuple(config("dst"))
    assert latest is not None and latest.config["configurable"]["checkpoint_id"] == ids[-1]


@pytest.mark.parametrize("backend", ["memory", "shared"])
def test_put_writes_mixing_special_and_regular_channels_as_in_memory_saver(
        backend: str) -> None:
    from langgraph.checkpoint.memory import InMemorySaver

    calls = [
        ([("a", 1), (ERROR, "boom")], "task-1"),
        ([("a", 10), (ERROR, "again"), (INTERRUPT, "ask")], "task-1"),
        ([(INTERRUPT, "ask twice"), ("b", 2)], "task-1"),
        ([("c", 3)], "task-2"),
        ([(ERROR, "e2"), ("c", 30)], "task-2"),
    ]

    def run(saver: Any) -> list[Any]:
        cp = empty_checkpoint()
        cp["id"] = "1f000000-0000-6000-8000-000000000001"
        stored = saver.put(config("t"), cp, {"source": "loop", "step": 0}, {})
        for writes, task in calls:
            saver.put_writes(stored, writes, task, "path")
        tup = saver.get_tuple(stored)
        assert tup is not None
        return sorted(tup.pending_writes, key=repr)

    expected = run(InMemorySaver())
    assert ("task-1", ERROR, "again") in expected  # the reference replaced it
    if backend == "memory":
        with MemoryStore() as memory:
            assert run(ShmstoreSaver(memory)) == expected
    else:
        with shmstore.serve(export=False) as server, server.connect(timeout=10.0) as shared:
            assert run(ShmstoreSaver(shared)) == expected


def test_async_methods_run_on_an_async_twin_of_the_store_not_on_threads(
        store: BaseStore) -> None:
    from shmstore.aio import AsyncMemoryStore, AsyncSharedStore

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with ShmstoreSaver(store) as saver:
            twin = saver._async_store()
            if isinstance(store, shmstore.SharedStore):
                assert isinstance(twin, AsyncSharedStore)
            elif isinstance(store, MemoryStore):
                assert isinstance(twin, AsyncMemoryStore)
            else:  # Redis: no async twin yet, the sync call on a worker thread
                assert twin is None
            checkpoint = empty_checkpoint()
            named = await saver.aput(config("async"), checkpoint, {"step": 1}, {})
            await saver.aput_writes(named, [("a", 1), (ERROR, "boom")], "task")
            got = await saver.aget_tuple(named)
            assert got is not None and got.checkpoint["id"] == checkpoint["id"]
            assert sorted(w[1] for w in got.pending_writes or []) == ["__error__", "a"]
            assert [t.checkpoint["id"] async for t in saver.alist(config("async"))] == \
                [checkpoint["id"]]
            assert saver.get_tuple(named) is not None  # the sync path sees the same
            await saver.adelete_thread("async")
            assert await saver.aget_tuple(named) is None
            # No call ran on a worker thread: asyncio makes its executor on first use, and
            # a shared twin used it only for its one connection's handshake.
            if isinstance(twin, AsyncMemoryStore):
                assert loop._default_executor is None  # type: ignore[attr-defined]
            if isinstance(twin, AsyncSharedStore):
                assert twin.connections == 1

    asyncio.run(main())
