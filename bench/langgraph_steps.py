"""Graph steps per second of a 10-node LangGraph graph: ShmstoreSaver against the savers a
user would pick, in the same run.

Contenders, one graph (``START -> n0 -> ... -> n9 -> END``, a small state: a counter and
``--state-bytes`` of text), each invocation on a fresh thread:

- ``shmstore-shared``: `ShmstoreSaver` over a ``shmstore.serve()`` server (the point of
  it: every process that connects shares the threads);
- ``shmstore-memory``: `ShmstoreSaver` over an in-process `MemoryStore`;
- ``inmemory``: LangGraph's ``InMemorySaver`` (one process only);
- ``sqlite-memory``: ``SqliteSaver`` on ``:memory:`` (one process only);
- ``sqlite-file``: ``SqliteSaver`` on a file in a temporary directory (shareable by
  processes, and on disk).

Both LangGraph durability modes are measured: ``async`` (LangGraph's default: a step's
checkpoint is saved in the background while the next step runs) and ``sync`` (each step
waits for its checkpoint).  Rounds are interleaved, contenders shuffled within a round, so
that a noisy machine hurts all alike.  As in bench/ops.py, every process (this one, the
server and their threads) is pinned to one CPU by default: on a small shared machine a
cross-process round trip's time otherwise depends mostly on where the scheduler wakes
the two processes (``--no-pin`` measures the unpinned mix).

``--procs N`` adds a shared section: N processes run graphs at once for a few seconds
against one server, and against one SQLite file (each process its own connection), not
pinned; reported as total steps per second.

Run ``python bench/langgraph_steps.py`` (``--quick`` for a short run, ``--json FILE`` to
keep the figures).  A step is one node run; steps/s of an invocation is 10 / its time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from typing import Any, TypedDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import END, START, StateGraph

import shmstore
from shmstore.integrations.langgraph import ShmstoreSaver

NODES = 10
MODES = ("async", "sync")


class State(TypedDict):
    n: int
    text: str


def _node(state: State) -> dict[str, Any]:
    return {"n": state["n"] + 1}


def build(checkpointer: Any) -> Any:
    """The 10-node chain, compiled with ``checkpointer``."""
    graph = StateGraph(State)
    names = [f"n{i}" for i in range(NODES)]
    for name in names:
        graph.add_node(name, _node)
    for first, second in zip([START, *names], [*names, END], strict=True):
        graph.add_edge(first, second)
    return graph.compile(checkpointer=checkpointer)


def invoke_once(app: Any, text: str, durability: str) -> float:
    """Seconds for one invocation on a fresh thread."""
    conf = {"configurable": {"thread_id": uuid.uuid4().hex}}
    start = time.perf_counter()
    out = app.invoke({"n": 0, "text": text}, conf, durability=durability)
    elapsed = time.perf_counter() - start
    assert out["n"] == NODES
    return elapsed


async def ainvoke_once(app: Any, text: str, durability: str) -> float:
    """Seconds for one ``ainvoke`` in the running loop."""
    conf = {"configurable": {"thread_id": uuid.uuid4().hex}}
    start = time.perf_counter()
    out = await app.ainvoke({"n": 0, "text": text}, conf, durability=durability)
    elapsed = time.perf_counter() - start
    assert out["n"] == NODES
    return elapsed


def async_section(rounds: int, per_round: int, text: str, pinned: bool,
                  ) -> dict[str, dict[str, list[float]]]:
    """Steps/s of ``ainvoke``: the saver's async methods natively on an async store
    (``native``) against the sync call on a worker thread (``threads``, before
    shmstore.aio), interleaved in one event loop; InMemorySaver for scale."""
    server = shmstore.serve(export=False)
    shared, memory = server.connect(), shmstore.MemoryStore()
    if pinned:
        cpu = min(os.sched_getaffinity(0))
        for tid in os.listdir(f"/proc/{server.pid}/task"):
            os.sched_setaffinity(int(tid), {cpu})
    savers = {
        "shmstore-shared threads": ShmstoreSaver(shared, native_async=False),
        "shmstore-shared native": ShmstoreSaver(shared),
        "shmstore-memory threads": ShmstoreSaver(memory, native_async=False),
        "shmstore-memory native": ShmstoreSaver(memory),
        "inmemory": InMemorySaver(),
    }
    apps = {name: build(saver) for name, saver in savers.items()}
    results: dict[str, dict[str, list[float]]] = {m: {n: [] for n in apps} for m in MODES}

    async def run() -> None:
        for mode in MODES:
            for app in apps.values():
                await ainvoke_once(app, text, mode)
        for _ in range(rounds):
            for mode in MODES:
                order = list(apps.items())
                random.shuffle(order)
                for name, app in order:
                    for _ in range(per_round):
                        results[mode][name].append(NODES / await ainvoke_once(app, text, mode))
        for saver in savers.values():
            if isinstance(saver, ShmstoreSaver):
                await saver.__aexit__(None, None, None)

    try:
        asyncio.run(run())
    finally:
        shared.close()
        memory.close()
        server.shutdown()
    return results


def sqlite_file_saver(path: str) -> SqliteSaver:
    conn = sqlite3.connect(path, check_same_thread=False, timeout=30)
    return SqliteSaver(conn)


def _shared_worker(kind: str, target: str, text: str, seconds: float, barrier: Any,
                   out: Any) -> None:
    saver: Any = ShmstoreSaver() if kind == "shmstore-shared" else sqlite_file_saver(target)
    app = build(saver)
    invoke_once(app, text, "async")  # warm up
    barrier.wait(60)
    steps = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        invoke_once(app, text, "async")
        steps += NODES
    out.put((kind, steps / seconds))


def shared_section(procs: int, text: str, seconds: float, tmp: str) -> dict[str, float]:
    """Total steps/s of ``procs`` processes at once, on one server and on one SQLite file."""
    ctx = multiprocessing.get_context("spawn")
    totals: dict[str, float] = {}
    path = os.path.join(tmp, "shared.sqlite")
    SqliteSaver(sqlite3.connect(path)).setup()
    with shmstore.serve():  # exported to the children
        for kind in ("shmstore-shared", "sqlite-file"):
            barrier = ctx.Barrier(procs)
            out = ctx.Queue()
            workers = [ctx.Process(target=_shared_worker,
                                   args=(kind, path, text, seconds, barrier, out))
                       for _ in range(procs)]
            for w in workers:
                w.start()
            rates = [out.get(timeout=120)[1] for _ in workers]
            for w in workers:
                w.join(30)
                if w.is_alive():
                    w.kill()
                    w.join(5)
            totals[kind] = sum(rates)
    return totals


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 12, quick 4)")
    parser.add_argument("--per-round", type=int, default=15,
                        help="invocations per contender per round")
    parser.add_argument("--state-bytes", type=int, default=1024, help="size of the state text")
    parser.add_argument("--procs", type=int, default=0,
                        help="also run N processes at once on one server / one SQLite file")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the shared run")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to a CPU")
    parser.add_argument("--only-async", action="store_true",
                        help="only the ainvoke section (native async store against threads)")
    args = parser.parse_args()
    rounds = args.rounds or (4 if args.quick else 12)
    text = "x" * args.state_bytes
    if args.only_async:
        print_async(async_section(rounds, args.per_round, text,
                                  not args.no_pin and hasattr(os, "sched_setaffinity")),
                    rounds, args.per_round, args.json)
        return

    tmp = tempfile.mkdtemp(prefix="shmstore-lg-bench-")
    server = shmstore.serve(export=False)
    shared_store = server.connect()
    memory_store = shmstore.MemoryStore()
    savers: dict[str, Any] = {
        "shmstore-shared": ShmstoreSaver(shared_store),
        "shmstore-memory": ShmstoreSaver(memory_store),
        "inmemory": InMemorySaver(),
        "sqlite-memory": SqliteSaver(sqlite3.connect(":memory:", check_same_thread=False)),
        "sqlite-file": sqlite_file_saver(os.path.join(tmp, "bench.sqlite")),
    }
    apps = {name: build(saver) for name, saver in savers.items()}

    pinned = not args.no_pin and hasattr(os, "sched_setaffinity")
    if pinned:
        cpu = min(os.sched_getaffinity(0))
        for pid in (os.getpid(), server.pid):
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), {cpu})

    results: dict[str, dict[str, list[float]]] = {m: {n: [] for n in apps} for m in MODES}
    try:
        for mode in MODES:
            for app in apps.values():  # warm every path once
                invoke_once(app, text, mode)
        for _ in range(rounds):
            for mode in MODES:
                order = list(apps.items())
                random.shuffle(order)
                for name, app in order:
                    results[mode][name].extend(
                        NODES / invoke_once(app, text, mode) for _ in range(args.per_round))
        stored = shared_store.stats()
    finally:
        shared_store.close()
        server.shutdown()
        memory_store.close()

    shared_totals = shared_section(args.procs, text, args.seconds, tmp) if args.procs else {}

    print(f"\nshmstore bench/langgraph_steps.py — python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores, {rounds} interleaved rounds × {args.per_round} "
          f"invocations, {NODES}-node graph, {args.state_bytes} B state text, "
          f"{'pinned to one CPU' if pinned else 'not pinned'}\n")
    summary: dict[str, Any] = {"shared_server_after": str(stored).splitlines()[0]}
    for mode in MODES:
        meds = {name: statistics.median(s) for name, s in results[mode].items()}
        base = meds["shmstore-shared"]
        print(f"durability={mode}\n")
        print("| saver | median steps/s | p10 steps/s | p90 steps/s | shmstore-shared ÷ it |")
        print("|---|---:|---:|---:|---:|")
        for name, samples in results[mode].items():
            print(f"| {name} | {meds[name]:.0f} | {pct(samples, 0.1):.0f} | "
                  f"{pct(samples, 0.9):.0f} | {base / meds[name]:.2f} |")
            summary[f"{mode} {name}"] = {"median_steps_s": meds[name],
                                         "p10": pct(samples, 0.1), "p90": pct(samples, 0.9),
                                         "shared_over_it": base / meds[name]}
        print()
    if shared_totals:
        print(f"{args.procs} processes at once for {args.seconds} s (not pinned), total:\n")
        print("| saver | total steps/s | ÷ sqlite-file |")
        print("|---|---:|---:|")
        for name, total in shared_totals.items():
            print(f"| {name} | {total:.0f} | {total / shared_totals['sqlite-file']:.2f} |")
            summary[f"{args.procs} procs {name}"] = {"total_steps_s": total}
        print()
    print(f"shared server after the run: {summary['shared_server_after']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)


def print_async(results: dict[str, dict[str, list[float]]], rounds: int, per_round: int,
                json_path: str | None) -> None:
    print(f"\nshmstore bench/langgraph_steps.py --only-async — python "
          f"{sys.version.split()[0]}, {os.cpu_count()} cores, {rounds} interleaved rounds × "
          f"{per_round} ainvoke, {NODES}-node graph\n")
    summary: dict[str, Any] = {}
    for mode in MODES:
        meds = {name: statistics.median(s) for name, s in results[mode].items()}
        print(f"durability={mode}\n")
        print("| saver (ainvoke) | median steps/s | p10 | p90 | × its threads row |")
        print("|---|---:|---:|---:|---:|")
        for name, samples in results[mode].items():
            base = meds.get(name.replace(" native", " threads"), meds[name])
            print(f"| {name} | {meds[name]:.0f} | {pct(samples, 0.1):.0f} | "
                  f"{pct(samples, 0.9):.0f} | {meds[name] / base:.2f} |")
            summary[f"{mode} {name}"] = {"median_steps_s": meds[name],
                                         "p10": pct(samples, 0.1), "p90": pct(samples, 0.9),
                                         "over_threads": meds[name] / base}
        print()
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
