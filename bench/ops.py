"""Latency of single and batched operations: SharedStore against what a user would pick.

Compared in the same run, interleaved round by round so that a noisy machine hurts every
contender alike:

- raw: a bare ``multiprocessing.connection`` round trip over an authenticated unix socket
  (the floor: the same bytes, no store behind them);
- shared: ``SharedStore`` on a ``shmstore.serve()`` server (from 256 KiB its states
  travel through the data plane, as sealed memory files);
- shared-socket: the same server, a client with ``data_plane=False``: every byte on the
  socket (shown from 1 MiB, where the two differ);
- syncmgr: a ``SyncManager().dict()`` proxy (pickle, no versions, no snapshots of reads);
- memory: ``MemoryStore`` in this process (the codec's cost alone);
- redis: ``RedisStore`` on a ``redis-server`` of the benchmark's own (unix socket), the
  same contract across machines;
- redis-raw: redis-py ``SET``/``GET`` (``MSET``/``MGET`` for batches) of the same
  encoded bytes: what a Redis user would write by hand (no versions, no index, no
  atomic checks), the floor of any store on Redis.

Then the concurrent part: 4 spawned processes at once, each alternating save and load of
1 KiB checkpoints, against the shared server, RedisStore and raw redis-py, a few rounds
each, interleaved; reported as total throughput and per-call median and p99.

On a small shared machine, a round trip's time depends mostly on where the scheduler
wakes the two processes: the same cross-process echo measures 15 µs or 45 µs from one
run to the next.  So by default every process of the benchmark (client, every server
and every server thread) is pinned to one CPU, which leaves the software's own cost as
the difference between contenders (``--no-pin`` to measure the unpinned mix).

Run ``python bench/ops.py`` (``--quick`` for a short run, ``--json FILE`` to keep the
figures; ``--no-redis`` without Redis, which is also skipped when ``redis-server`` is not
on PATH).  Reported: median and p99 per operation in microseconds, and each median as a
ratio to the raw round trip of the same size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Listener
from multiprocessing.managers import SyncManager
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _redis import start_redis  # bench/, first on sys.path when a script runs

import shmstore
from shmstore import Checkpoint
from shmstore.core.codec import DEFAULT_CODEC

SIZES = {"100B": 100, "1KiB": 1024, "64KiB": 64 * 1024, "1MiB": 1024 * 1024,
         "16MiB": 16 * 1024 * 1024}
BATCH = 100
BATCH_BELOW = 16 * 1024 * 1024  # a batch of 100 states of 16 MiB is 1.6 GiB: singles only
CONCURRENT_PROCS = 4
CONCURRENT_SIZE = 1024


class _RawRedis:
    """redis-py by hand, as a worker process rebuilds it (a client does not pickle)."""

    def __init__(self, sock: str) -> None:
        self.sock = sock
        self.client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"sock": self.sock, "client": None}


def _concurrent_worker(store: Any, name: str, n: int, ready: Any, start: Any, out: Any) -> None:
    """Alternate save and load ``n`` times once ``start`` is set; send the latencies."""
    state = make_state(CONCURRENT_SIZE)
    payload = DEFAULT_CODEC.encode(state)
    fresh = [Checkpoint(execution_id=f"c-{os.getpid()}", state=state) for _ in range(n)]
    if isinstance(store, _RawRedis):
        import redis

        client = redis.Redis(unix_socket_path=store.sock)
        key = f"c-{os.getpid()}".encode()
        client.set(key, payload)

        def save(i: int) -> None:
            client.set(key + b"%d" % i, payload)

        def load(i: int) -> None:
            client.get(key)
    else:
        first = store.save(fresh[0])

        def save(i: int) -> None:
            store.save(fresh[i])

        def load(i: int) -> None:
            store.load(first.id)
    ready.put(os.getpid())
    start.wait(60)
    clock = time.perf_counter
    saves, loads = [], []
    for i in range(n):
        t0 = clock()
        save(i)
        t1 = clock()
        load(i)
        t2 = clock()
        saves.append(t1 - t0)
        loads.append(t2 - t1)
    out.put((name, saves, loads))


def run_concurrent(ctx: Any, systems: dict[str, Any], n: int, rounds: int
                   ) -> dict[str, dict[str, Any]]:
    """Each system in turn: CONCURRENT_PROCS processes at once; figures per system."""
    figures: dict[str, dict[str, Any]] = {
        name: {"walls": [], "saves": [], "loads": []} for name in systems}
    for _ in range(rounds):
        order = list(systems.items())
        random.shuffle(order)
        for name, store in order:
            start, ready, out = ctx.Event(), ctx.Queue(), ctx.Queue()
            procs = [ctx.Process(target=_concurrent_worker,
                                 args=(store, name, n, ready, start, out))
                     for _ in range(CONCURRENT_PROCS)]
            for proc in procs:
                proc.start()
            for _ in procs:  # every worker imported, connected and ready: start together
                ready.get(timeout=120)
            t0 = time.perf_counter()
            start.set()
            got: list[Any] = []
            while len(got) < len(procs):
                try:
                    got.append(out.get(timeout=1.0))
                except queue.Empty:
                    if any(p.exitcode not in (None, 0) for p in procs):
                        for proc in procs:
                            proc.kill()
                        raise RuntimeError(f"a {name} worker failed") from None
            figures[name]["walls"].append(time.perf_counter() - t0)
            for proc in procs:
                proc.join(30)
            for _, saves, loads in got:
                figures[name]["saves"].extend(saves)
                figures[name]["loads"].extend(loads)
    return figures


def make_state(size: int) -> dict[str, Any]:
    """A dict state whose encoded size is close to ``size`` bytes."""
    return {"step": 7, "node": "transform", "text": "x" * max(0, size - 30)}


def _echo_server(address: str, authkey: bytes, ready: Any) -> None:
    """Answer each message: a short ack for a big request, a big reply for a short one.

    A thread serves the connection, as in the shmstore server and SyncManager.
    """
    with Listener(address, authkey=authkey) as listener:
        ready.set()
        conn = listener.accept()
        replies: dict[int, bytes] = {}

        def serve() -> None:
            while True:
                try:
                    msg = conn.recv_bytes()
                except EOFError:
                    return
                if msg[:1] == b"L":  # "load": answer with a payload of the asked size
                    size = int(msg[1:])
                    if size not in replies:
                        replies[size] = os.urandom(size)
                    conn.send_bytes(replies[size])
                else:
                    conn.send_bytes(b"ok")

        thread = threading.Thread(target=serve)
        thread.start()
        thread.join()


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    clock = time.perf_counter
    for _ in range(n):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


ASYNC_TASKS = 100


def async_section(rounds: int, n: int, pinned: bool) -> dict[str, list[float]]:
    """The async client against the sync one, in the same run, interleaved.

    Latency: a 1 KiB save and load, one call at a time, `AsyncSharedStore` (in one event
    loop) against `SharedStore`; and the floor, a bare 1 KiB round trip to an echo
    process (`_echo_server`) on the same socket, blocking (``multiprocessing.connection``)
    against the least an asyncio loop does (a reader callback, ``recv_into`` a buffer, a
    future): what any asyncio client pays over a blocking one.  Throughput:
    `ASYNC_TASKS` tasks on one async store against as many threads on one sync store,
    each doing save+load pairs; calls/s.
    """
    import asyncio
    import socket

    import shmstore.aio

    tmp = tempfile.mkdtemp(prefix="shmstore-bench-")
    raw_addr, authkey = os.path.join(tmp, "raw.sock"), os.urandom(32)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    echo = ctx.Process(target=_echo_server, args=(raw_addr, authkey, ready), daemon=True)
    echo.start()
    ready.wait()
    raw = Client(raw_addr, authkey=authkey)
    server = shmstore.serve(export=False)
    sync_store = server.connect(data_plane=False)
    state = make_state(1024)
    if pinned:
        cpu = min(os.sched_getaffinity(0))
        for pid in (os.getpid(), server.pid, echo.pid):
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), {cpu})
    out: dict[str, list[float]] = {k: [] for k in (
        "save sync", "save async", "load sync", "load async", "floor sync", "floor async",
        "tasks async", "threads sync")}
    payload = b"S" + os.urandom(1023)

    def floor_sync() -> None:
        raw.send_bytes(payload)
        raw.recv_bytes()

    async def floor_async(n: int) -> list[float]:
        """``n`` bare round trips on the echo connection, driven by the loop."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(fileno=os.dup(raw.fileno()))
        sock.setblocking(False)  # (the descriptor's, shared with ``raw``: undone below)
        buf = memoryview(bytearray(65536))
        frame = len(payload).to_bytes(4, "big") + payload
        reply = 4 + 2  # b"ok", framed
        got, waiter = 0, loop.create_future()

        def readable() -> None:
            nonlocal got
            got += sock.recv_into(buf[got:])
            if got >= reply and not waiter.done():
                waiter.set_result(None)

        loop.add_reader(sock.fileno(), readable)
        samples = []
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                got, waiter = 0, loop.create_future()
                os.write(sock.fileno(), frame)
                await waiter
                samples.append(time.perf_counter() - t0)
        finally:
            loop.remove_reader(sock.fileno())
            sock.setblocking(True)
            sock.close()
        return samples
    per_worker = max(2, n // ASYNC_TASKS)

    def threads_round() -> float:
        barrier = threading.Barrier(ASYNC_TASKS + 1)

        def work(w: int) -> None:
            barrier.wait()
            for _ in range(per_worker):
                saved = sync_store.save(Checkpoint(execution_id=f"t{w}", state=state))
                sync_store.load(saved.id)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(ASYNC_TASKS)]
        for t in threads:
            t.start()
        t0 = time.perf_counter()
        barrier.wait()
        for t in threads:
            t.join()
        return 2 * ASYNC_TASKS * per_worker / (time.perf_counter() - t0)

    async def run() -> None:
        astore = await shmstore.aio.connect(server.url, authkey=server.authkey,
                                            data_plane=False, max_connections=16)
        clock = time.perf_counter

        async def atimed(call: Callable[[], Any]) -> list[float]:
            samples = []
            for _ in range(n):
                t0 = clock()
                await call()
                samples.append(clock() - t0)
            return samples

        async def work(w: int) -> None:
            for _ in range(per_worker):
                saved = await astore.save(Checkpoint(execution_id=f"a{w}", state=state))
                await astore.load(saved.id)

        cp = Checkpoint(execution_id="lat", state=state)
        sync_id = sync_store.save(cp).id
        await astore.save(cp)
        await asyncio.gather(*[work(w) for w in range(ASYNC_TASKS)])  # warm the pool
        for _ in range(rounds):
            out["floor sync"] += timed(floor_sync, n)
            out["floor async"] += await floor_async(n)
            out["save sync"] += timed(lambda: sync_store.save(cp), n)
            out["save async"] += await atimed(lambda: astore.save(cp))
            out["load sync"] += timed(lambda: sync_store.load(sync_id), n)
            out["load async"] += await atimed(lambda: astore.load(sync_id))
            t0 = clock()
            await asyncio.gather(*[work(w) for w in range(ASYNC_TASKS)])
            out["tasks async"].append(2 * ASYNC_TASKS * per_worker / (clock() - t0))
            out["threads sync"].append(threads_round())
            for name in await astore.executions():
                await astore.clear(name)
        await astore.aclose()

    try:
        asyncio.run(run())
    finally:
        sync_store.close()
        server.shutdown()
        raw.close()
        echo.join(10)
        if echo.is_alive():
            echo.kill()
            echo.join()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def print_async(out: dict[str, list[float]], rounds: int, pinned: bool) -> dict[str, Any]:
    print(f"\nshmstore bench/ops.py async rows — python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores, {rounds} interleaved rounds, "
          f"{'pinned to one CPU' if pinned else 'not pinned'}\n")
    print("| 1 KiB | system | median µs | p10 µs | p90 µs | p99 µs | async ÷ sync |")
    print("|---|---|---:|---:|---:|---:|---:|")
    summary: dict[str, Any] = {}
    for op in ("floor", "save", "load"):
        sync_med = statistics.median(out[f"{op} sync"])
        for system in ("sync", "async"):
            samples = out[f"{op} {system}"]
            med = statistics.median(samples)
            print(f"| {op} | {system} | {med * 1e6:.1f} | {pct(samples, 0.1) * 1e6:.1f} | "
                  f"{pct(samples, 0.9) * 1e6:.1f} | {pct(samples, 0.99) * 1e6:.1f} | "
                  f"{med / sync_med:.2f} |")
            summary[f"1KiB {op} {system}"] = {"median_us": med * 1e6,
                                              "p99_us": pct(samples, 0.99) * 1e6}
    print("\nfloor: a bare 1 KiB round trip to an echo process, blocking against an asyncio "
          "reader callback (what any asyncio client pays)")
    print(f"\n| {ASYNC_TASKS} at once, 1 KiB save+load | median calls/s | min | max | "
          "÷ threads |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(out["threads sync"])
    for key, label in (("threads sync", f"{ASYNC_TASKS} threads, one SharedStore"),
                       ("tasks async", f"{ASYNC_TASKS} tasks, one AsyncSharedStore")):
        samples = out[key]
        med = statistics.median(samples)
        print(f"| {label} | {med:.0f} | {min(samples):.0f} | {max(samples):.0f} | "
              f"{med / base:.2f} |")
        summary[key] = {"median_calls_s": med, "min": min(samples), "max": max(samples)}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only-async", action="store_true",
                        help="only the async rows (shmstore.aio against the sync client)")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated sizes")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to a CPU")
    parser.add_argument("--no-redis", action="store_true", help="leave Redis out")
    args = parser.parse_args()
    rounds = 5 if args.quick else 15
    if args.only_async:
        pinned = not args.no_pin and hasattr(os, "sched_setaffinity")
        summary = print_async(async_section(rounds, 200 if args.quick else 1000, pinned),
                              rounds, pinned)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(summary, fh, indent=2)
        return

    ctx = multiprocessing.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="shmstore-bench-")
    raw_addr = os.path.join(tmp, "raw.sock")
    authkey = os.urandom(32)
    ready = ctx.Event()
    echo = ctx.Process(target=_echo_server, args=(raw_addr, authkey, ready), daemon=True)
    echo.start()
    ready.wait(30)
    raw = Client(raw_addr, authkey=authkey)

    server = shmstore.serve(export=False)
    shared = server.connect()
    shared_socket = server.connect(data_plane=False)
    memory = shmstore.MemoryStore()
    manager = SyncManager(ctx=ctx)
    manager.start()
    sync_dict = manager.dict()
    redis_proc: subprocess.Popen[bytes] | None = None
    started = None if args.no_redis else start_redis(tmp, "hz 100\n")
    rstore: Any = None
    rraw: Any = None
    redis_sock = ""
    if started is None and not args.no_redis:
        print("redis-server is not on PATH: Redis is left out of this run", file=sys.stderr)
    if started is not None:
        import redis

        redis_proc, redis_sock = started
        rstore = shmstore.RedisStore(f"redis+unix://{redis_sock}")
        rraw = redis.Redis(unix_socket_path=redis_sock)

    results: dict[str, dict[str, list[float]]] = {}
    pinned = not args.no_pin and hasattr(os, "sched_setaffinity")
    if pinned:
        cpu = min(os.sched_getaffinity(0))
        server_pids = [echo.pid, server.pid, manager._process.pid]  # type: ignore[attr-defined]
        if redis_proc is not None:
            server_pids.append(redis_proc.pid)
        # Threads made later inherit their creator's mask; pin the ones there are now.
        for pid in [os.getpid(), *server_pids]:
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.sched_setaffinity(int(tid), {cpu})

    def record(key: str, system: str, samples: list[float]) -> None:
        results.setdefault(key, {}).setdefault(system, []).extend(samples)

    try:
        for label in args.sizes.split(","):
            size = SIZES[label]
            state = make_state(size)
            payload = os.urandom(len(DEFAULT_CODEC.encode(state)))
            per_round = max(4, min(2000, 40_000_000 // size // rounds))
            chunk = min(10, per_round)
            saved_shared = shared.save(Checkpoint(execution_id=f"e-{label}", state=state))
            saved_mem = memory.save(Checkpoint(execution_id=f"e-{label}", state=state))
            for _ in range(10):
                shared.save(Checkpoint(execution_id=f"e-{label}", state=state))
            saved_socket = shared_socket.save(Checkpoint(execution_id=f"e-{label}", state=state))
            sync_dict[saved_shared.id] = state
            load_req = b"L%d" % len(payload)
            batched = size < BATCH_BELOW
            batch = [Checkpoint(execution_id=f"b-{label}", state=state)
                     for _ in range(BATCH if batched else 0)]
            batch_ids = [c.id for c in shared.save_many(batch)] if batched else []
            mem_ids = [c.id for c in memory.save_many(batch)] if batched else []
            raw_keys = [f"raw-{label}-{i}".encode() for i in range(BATCH)]
            raw_batch = dict.fromkeys(raw_keys, payload)
            # Checkpoints are made before the clock starts: what is timed is the store.
            fresh = iter([Checkpoint(execution_id=f"s-{label}", state=state)
                          for _ in range(3 * per_round * rounds + 10)])

            def raw_save() -> None:
                raw.send_bytes(payload)
                raw.recv_bytes()

            def raw_load() -> None:
                raw.send_bytes(load_req)
                raw.recv_bytes()

            singles: dict[tuple[str, str], Callable[[], Any]] = {
                ("save", "raw"): raw_save,
                ("load", "raw"): raw_load,
                ("save", "shared"): lambda: shared.save(next(fresh)),
                ("load", "shared"): lambda: shared.load(saved_shared.id),
                ("list10", "shared"): lambda: shared.list(f"e-{label}", limit=10),
                ("save", "syncmgr"): lambda: sync_dict.__setitem__(saved_shared.id, state),
                ("load", "syncmgr"): lambda: sync_dict[saved_shared.id],
                ("save", "memory"): lambda: memory.save(next(fresh)),
                ("load", "memory"): lambda: memory.load(saved_mem.id),
            }
            if size >= 1024 * 1024:
                singles.update({
                    ("save", "shared-socket"): lambda: shared_socket.save(next(fresh)),
                    ("load", "shared-socket"): lambda: shared_socket.load(saved_socket.id),
                })
            batches: dict[tuple[str, str], Callable[[], Any]] = {
                ("save_many", "shared"): lambda: shared.save_many(batch),
                ("load_many", "shared"): lambda: shared.load_many(batch_ids),
                ("save_many", "memory"): lambda: memory.save_many(batch),
                ("load_many", "memory"): lambda: memory.load_many(mem_ids),
            } if batched else {}
            if rstore is not None:
                saved_redis = rstore.save(Checkpoint(execution_id=f"e-{label}", state=state))
                for _ in range(10):
                    rstore.save(Checkpoint(execution_id=f"e-{label}", state=state))
                redis_ids = [c.id for c in rstore.save_many(batch)] if batched else []
                raw_key = f"raw-{label}".encode()
                rraw.set(raw_key, payload)
                if batched:
                    rraw.mset(raw_batch)
                singles.update({
                    ("save", "redis"): lambda: rstore.save(next(fresh)),
                    ("load", "redis"): lambda: rstore.load(saved_redis.id),
                    ("list10", "redis"): lambda: rstore.list(f"e-{label}", limit=10),
                    ("save", "redis-raw"): lambda: rraw.set(raw_key, payload),
                    ("load", "redis-raw"): lambda: rraw.get(raw_key),
                })
                if batched:
                    batches.update({
                        ("save_many", "redis"): lambda: rstore.save_many(batch),
                        ("load_many", "redis"): lambda: rstore.load_many(redis_ids),
                        ("save_many", "redis-raw"): lambda: rraw.mset(raw_batch),
                        ("load_many", "redis-raw"): lambda: rraw.mget(raw_keys),
                    })
                fresh = iter([Checkpoint(execution_id=f"s-{label}", state=state)
                              for _ in range(4 * per_round * rounds + 10)])
            for fn in [*singles.values(), *batches.values()]:  # warm every path once
                fn()
            batch_reps = max(1, per_round // BATCH)
            # Fine interleaving: a few calls of each contender in turn, in a shuffled order,
            # so that the machine's moods fall on all of them alike.
            for _ in range(rounds):
                for _ in range(max(1, per_round // chunk)):
                    order = list(singles.items())
                    random.shuffle(order)
                    for (op, name), fn in order:
                        record(f"{label} {op}", name, timed(fn, chunk))
                for (op, name), fn in batches.items():
                    samples = timed(fn, batch_reps)
                    record(f"{label} {op}/ckpt", name, [s / BATCH for s in samples])
                shared.clear(f"b-{label}")
                memory.clear(f"b-{label}")
                if rstore is not None:
                    rstore.clear(f"b-{label}")
            shared.clear(f"s-{label}")
            memory.clear(f"s-{label}")
            if rstore is not None:
                rstore.clear(f"s-{label}")
                rstore.clear(f"e-{label}")
        concurrent: dict[str, dict[str, Any]] = {}
        systems: dict[str, Any] = {"shared": shared}
        if rstore is not None:
            systems.update({"redis": rstore, "redis-raw": _RawRedis(redis_sock)})
        concurrent = run_concurrent(ctx, systems, 200 if args.quick else 1000,
                                    2 if args.quick else 4)
    finally:
        if rstore is not None:
            rstore.close()
            rraw.close()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        shared.close()
        shared_socket.close()
        server.shutdown()
        manager.shutdown()
        raw.close()
        echo.join(5)
        if echo.is_alive():
            echo.kill()
        memory.close()

    rows = []
    summary: dict[str, Any] = {}
    for key, by_system in results.items():
        label, op = key.split(" ", 1)
        base_op = op.replace("_many/ckpt", "")
        floor = results.get(f"{label} {base_op}", {}).get("raw")
        floor_med = statistics.median(floor) if floor else None
        single = results.get(f"{label} {base_op}", {}).get("shared")
        single_med = statistics.median(single) if single else None
        for system, samples in by_system.items():
            med = statistics.median(samples)
            p99 = pct(samples, 0.99)
            ratio = med / floor_med if floor_med else float("nan")
            vs_single = med / single_med if (single_med and "/ckpt" in op) else None
            rows.append((label, op, system, med * 1e6, p99 * 1e6, ratio, vs_single))
            summary[f"{key} {system}"] = {"median_us": med * 1e6, "p99_us": p99 * 1e6,
                                          "ratio_to_raw": ratio, "ratio_to_single": vs_single}

    print(f"\nshmstore bench/ops.py — python {sys.version.split()[0]}, {os.cpu_count()} cores, "
          f"{rounds} interleaved rounds, {'pinned to one CPU' if pinned else 'not pinned'}\n")
    print("| size | op | system | median µs | p99 µs | × raw | × single call |")
    print("|---|---|---|---:|---:|---:|---:|")
    for label, op, system, med, p99, ratio, vs_single in rows:
        single_txt = f"{vs_single:.3f}" if vs_single is not None else ""
        ratio_txt = "" if ratio != ratio else f"{ratio:.2f}"
        print(f"| {label} | {op} | {system} | {med:.1f} | {p99:.1f} | {ratio_txt} | "
              f"{single_txt} |")
    medians = {(key, system): statistics.median(samples)
               for key, by_system in results.items() for system, samples in by_system.items()}
    if any(system == "redis" for _, system in medians):
        print("\nRedisStore against the shared server and against raw redis-py (medians):\n")
        print("| size | op | shared µs | redis µs | redis-raw µs | redis ÷ shared | "
              "redis ÷ redis-raw |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for key in results:
            if (key, "redis") not in medians or (key, "shared") not in medians:
                continue
            label, op = key.split(" ", 1)
            red, sh = medians[(key, "redis")], medians[(key, "shared")]
            rr = medians.get((key, "redis-raw"))
            rr_txt = f"{rr * 1e6:.1f}" if rr else ""
            vs_raw = f"{red / rr:.2f}" if rr else ""
            print(f"| {label} | {op} | {sh * 1e6:.1f} | {red * 1e6:.1f} | {rr_txt} | "
                  f"{red / sh:.2f} | {vs_raw} |")
            summary[f"{key} redis_vs_shared"] = red / sh
    if concurrent:
        print(f"\n{CONCURRENT_PROCS} processes at once, each alternating save and load of "
              f"{CONCURRENT_SIZE} B checkpoints:\n")
        print("| system | ops/s (median round) | save median µs | save p99 µs | "
              "load median µs | load p99 µs |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, fig in concurrent.items():
            n_ops = len(fig["saves"]) * 2 // len(fig["walls"])
            rate = n_ops / statistics.median(fig["walls"])
            saves, loads = fig["saves"], fig["loads"]
            print(f"| {name} | {rate:,.0f} | {statistics.median(saves) * 1e6:.1f} | "
                  f"{pct(saves, 0.99) * 1e6:.1f} | {statistics.median(loads) * 1e6:.1f} | "
                  f"{pct(loads, 0.99) * 1e6:.1f} |")
            summary[f"concurrent {name}"] = {
                "ops_per_s": rate, "save_median_us": statistics.median(saves) * 1e6,
                "save_p99_us": pct(saves, 0.99) * 1e6,
                "load_median_us": statistics.median(loads) * 1e6,
                "load_p99_us": pct(loads, 0.99) * 1e6}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
