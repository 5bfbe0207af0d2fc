"""Latency of single and batched operations: SharedStore against what a user would pick.

Compared in the same run, interleaved round by round so that a noisy machine hurts every
contender alike:

- raw: a bare ``multiprocessing.connection`` round trip over an authenticated unix socket
  (the floor: the same bytes, no store behind them);
- shared: ``SharedStore`` on a ``shmstore.serve()`` server;
- syncmgr: a ``SyncManager().dict()`` proxy (pickle, no versions, no snapshots of reads);
- memory: ``MemoryStore`` in this process (the codec's cost alone).

On a small shared machine, a round trip's time depends mostly on where the scheduler
wakes the two processes: the same cross-process echo measures 15 µs or 45 µs from one
run to the next.  So by default every process of the benchmark (client, every server
and every server thread) is pinned to one CPU, which leaves the software's own cost as
the difference between contenders (``--no-pin`` to measure the unpinned mix).

Run ``python bench/ops.py`` (``--quick`` for a short run, ``--json FILE`` to keep the
figures).  Reported: median and p99 per operation in microseconds, and each median as a
ratio to the raw round trip of the same size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Listener
from multiprocessing.managers import SyncManager
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shmstore
from shmstore import Checkpoint

SIZES = {"100B": 100, "1KiB": 1024, "64KiB": 64 * 1024, "1MiB": 1024 * 1024}
BATCH = 100


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated sizes")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to a CPU")
    args = parser.parse_args()
    rounds = 5 if args.quick else 15

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
    memory = shmstore.MemoryStore()
    manager = SyncManager(ctx=ctx)
    manager.start()
    sync_dict = manager.dict()

    results: dict[str, dict[str, list[float]]] = {}
    pinned = not args.no_pin and hasattr(os, "sched_setaffinity")
    if pinned:
        cpu = min(os.sched_getaffinity(0))
        server_pids = [echo.pid, server.pid, manager._process.pid]  # type: ignore[attr-defined]
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
            payload = os.urandom(len(shmstore.codec.DEFAULT_CODEC.encode(state)))
            per_round = max(4, min(2000, 40_000_000 // size // rounds))
            chunk = min(10, per_round)
            saved_shared = shared.save(Checkpoint(execution_id=f"e-{label}", state=state))
            saved_mem = memory.save(Checkpoint(execution_id=f"e-{label}", state=state))
            for _ in range(10):
                shared.save(Checkpoint(execution_id=f"e-{label}", state=state))
            sync_dict[saved_shared.id] = state
            load_req = b"L%d" % len(payload)
            batch = [Checkpoint(execution_id=f"b-{label}", state=state) for _ in range(BATCH)]
            batch_ids = [c.id for c in shared.save_many(batch)]
            mem_ids = [c.id for c in memory.save_many(batch)]
            # Checkpoints are made before the clock starts: what is timed is the store.
            fresh = iter([Checkpoint(execution_id=f"s-{label}", state=state)
                          for _ in range(2 * per_round * rounds + 10)])

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
            batches: dict[tuple[str, str], Callable[[], Any]] = {
                ("save_many", "shared"): lambda: shared.save_many(batch),
                ("load_many", "shared"): lambda: shared.load_many(batch_ids),
                ("save_many", "memory"): lambda: memory.save_many(batch),
                ("load_many", "memory"): lambda: memory.load_many(mem_ids),
            }
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
            shared.clear(f"s-{label}")
            memory.clear(f"s-{label}")
    finally:
        shared.close()
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
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=2)


if __name__ == "__main__":
    main()
