"""`ShmstoreSaver` shared by several processes through one server (spawned children).

- A graph interrupted in one process is resumed in another with ``Command(resume=...)``.
- Four processes run graphs on their own threads at once; every thread's history is
  complete, ordered and linked.
"""

from __future__ import annotations

import itertools
import operator
import os
from typing import Annotated, Any, TypedDict

import pytest

pytest.importorskip("langgraph.graph", reason="needs the [langgraph] extra")

from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, interrupt

import shmstore
from shmstore.integrations.langgraph import ShmstoreSaver

from .helpers import SPAWN, reaped

NODES = 10
RUNS = 3  # invocations per thread in the concurrent test


class Log(TypedDict):
    log: Annotated[list[str], operator.add]


def _step(name: str) -> Any:
    def node(state: Log) -> dict[str, list[str]]:
        return {"log": [f"{name}@{os.getpid()}"]}
    return node


def _ask(state: Log) -> dict[str, list[str]]:
    answer = interrupt("approve?")
    return {"log": [f"ask:{answer}@{os.getpid()}"]}


def interrupted_app(saver: ShmstoreSaver) -> Any:
    graph = StateGraph(Log)
    graph.add_node("a", _step("a"))
    graph.add_node("ask", _ask)
    graph.add_node("b", _step("b"))
    graph.add_edge(START, "a")
    graph.add_edge("a", "ask")
    graph.add_edge("ask", "b")
    graph.add_edge("b", END)
    return graph.compile(checkpointer=saver)


def chain_app(saver: ShmstoreSaver) -> Any:
    graph = StateGraph(Log)
    names = [f"n{i}" for i in range(NODES)]
    for name in names:
        graph.add_node(name, _step(name))
    for first, second in zip([START, *names], [*names, END], strict=True):
        graph.add_edge(first, second)
    return graph.compile(checkpointer=saver)


def _run_until_interrupt(thread: str) -> None:
    with ShmstoreSaver() as saver:  # the server exported by serve() in the parent
        out = interrupted_app(saver).invoke({"log": []}, {"configurable": {"thread_id": thread}})
    if [i.value for i in out.get("__interrupt__", [])] != ["approve?"]:
        raise SystemExit(f"expected an interrupt, got {out!r}")


def _resume(thread: str, answer: str) -> None:
    with ShmstoreSaver() as saver:
        out = interrupted_app(saver).invoke(Command(resume=answer),
                                            {"configurable": {"thread_id": thread}})
    if len(out["log"]) != 3:
        raise SystemExit(f"expected three log lines, got {out!r}")


def _run_chain(thread: str, barrier: Any) -> None:
    with ShmstoreSaver() as saver:
        app = chain_app(saver)
        barrier.wait(60)  # all four start their graphs together
        for _ in range(RUNS):
            app.invoke({"log": []}, {"configurable": {"thread_id": thread}})


def test_a_graph_interrupted_in_one_process_is_resumed_in_another() -> None:
    with shmstore.serve() as server:
        first = SPAWN.Process(target=_run_until_interrupt, args=("review-1",))
        with reaped(first):
            pass
        assert first.exitcode == 0
        store = server.connect()
        saver = ShmstoreSaver(store)
        waiting = interrupted_app(saver).get_state({"configurable": {"thread_id": "review-1"}})
        assert waiting.next == ("ask",)
        assert waiting.values["log"] == [f"a@{first.pid}"]

        second = SPAWN.Process(target=_resume, args=("review-1", "yes"))
        with reaped(second):
            pass
        assert second.exitcode == 0
        done = interrupted_app(saver).get_state({"configurable": {"thread_id": "review-1"}})
        assert done.next == ()
        assert done.values["log"] == [f"a@{first.pid}", f"ask:yes@{second.pid}",
                                      f"b@{second.pid}"]
        steps = [t.metadata["step"] for t in saver.list({"configurable": {
            "thread_id": "review-1", "checkpoint_ns": ""}})]
        assert steps == [3, 2, 1, 0, -1]  # a resume adds no input checkpoint


def test_four_processes_run_graphs_at_once_and_every_history_is_complete() -> None:
    threads = [f"worker-{i}" for i in range(4)]
    with shmstore.serve() as server:
        barrier = SPAWN.Barrier(len(threads))
        procs = [SPAWN.Process(target=_run_chain, args=(t, barrier)) for t in threads]
        with reaped(*procs, timeout=90):
            pass
        assert [p.exitcode for p in procs] == [0] * len(threads)
        store = server.connect()
        saver = ShmstoreSaver(store)
        assert store.executions() == [f"langgraph/{t}/" for t in threads]
        per_run = NODES + 2  # the input checkpoint, START's, then one per node
        for thread, proc in zip(threads, procs, strict=True):
            conf = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
            history = list(saver.list(conf))
            assert len(history) == RUNS * per_run
            # Newest first, each checkpoint the child of the next one down.
            ids = [t.config["configurable"]["checkpoint_id"] for t in history]
            assert ids == sorted(ids, reverse=True)
            for newer, older in itertools.pairwise(history):
                assert newer.parent_config is not None
                assert newer.parent_config["configurable"]["checkpoint_id"] == older.config[
                    "configurable"]["checkpoint_id"]
            steps = [t.metadata["step"] for t in reversed(history)]
            assert steps == list(range(-1, RUNS * per_run - 1))
            final = chain_app(saver).get_state(conf).values["log"]
            assert final == [f"n{i}@{proc.pid}" for i in range(NODES)] * RUNS
