"""Latency of single and batched operations: SharedStore against what a user would pick.

Compared in the same run, interleaved round by round so that a noisy machine hurts every
contender alike:

- raw: a bare ``multiprocessing.connection`` round trip over an authenticated unix socket
  (the floor: the same bytes, no store behind them);
- shared: ``SharedStore`` on a ``shmstore.serve()`` server;
- syncmgr: a ``SyncManager().dict()`` proxy (pickle, no versions, no snapshots of reads);
- memory: ``MemoryStore`` in this process (the codec's cost alone).

Run ``python bench/ops.py`` (``--quick`` for a short run, ``--json FILE`` to keep the
figures).  Reported: median and p99 per operation in microseconds, and each median as a
ratio to the raw round trip of the same size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
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
    """Answer each message: a short ack for a big request, a big reply for a short one."""
    with Listener(address, authkey=authkey) as listener:
        ready.set()
        conn = listener.accept()
        replies: dict[int, bytes] = {}
        while True:
            try:
                msg = conn.recv_bytes()
            except EOFError:
                return
            if msg[:1] == b"L":  # "load": answer with a payload of the asked size
                size = int(msg[1:])
                reply = replies.setdefault(size, os.urandom(size))
                conn.send_bytes(reply)
            else:
                conn.send_bytes(b"ok")


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

    def record(key: str, system: str, samples: list[float]) -> None:
        results.setdefault(key, {}).setdefault(system, []).extend(samples)

    try:
        for label in args.sizes.split(","):
            size = SIZES[label]
            state = make_state(size)
            payload = os.urandom(len(shmstore.codec.DEFAULT_CODEC.encode(state)))
            per_round = max(3, min(400, 4_000_000 // max(size, 1) // 10))
            batch_rounds = max(1, per_round // BATCH * 2)
            saved_shared = shared.save(Checkpoint(execution_id=f"e-{label}", state=state))
            saved_mem = memory.save(Checkpoint(execution_id=f"e-{label}", state=state))
            sync_dict[saved_shared.id] = state
            load_req = b"L%d" % len(payload)
            batch = [Checkpoint(execution_id=f"b-{label}", state=state) for _ in range(BATCH)]
            batch_ids = [c.id for c in shared.save_many(batch)]
            mem_ids = [c.id for c in memory.save_many(batch)]

            def raw_save() -> None:
                raw.send_bytes(payload)
                raw.recv_bytes()

            def raw_load() -> None:
                raw.send_bytes(load_req)
                raw.recv_bytes()

            systems: dict[str, dict[str, Callable[[], Any]]] = {
                "raw": {"save": raw_save, "load": raw_load},
                "shared": {
                    "save": lambda: shared.save(Checkpoint(execution_id=f"s-{label}",
                                                           state=state)),
                    "load": lambda: shared.load(saved_shared.id),
                    "list10": lambda: shared.list(f"e-{label}", limit=10),
                },
                "syncmgr": {
                    "save": lambda: sync_dict.__setitem__(saved_shared.id, state),
                    "load": lambda: sync_dict[saved_shared.id],
                },
                "memory": {
                    "save": lambda: memory.save(Checkpoint(execution_id=f"s-{label}",
                                                           state=state)),
                    "load": lambda: memory.load(saved_mem.id),
                },
            }
            batches: dict[str, dict[str, Callable[[], Any]]] = {
                "shared": {
                    "save_many": lambda: shared.save_many(
                        [Checkpoint(execution_id=f"m-{label}", state=state)
                         for _ in range(BATCH)]),
                    "load_many": lambda: shared.load_many(batch_ids),
                },
                "memory": {
                    "save_many": lambda: memory.save_many(
                        [Checkpoint(execution_id=f"m-{label}", state=state)
                         for _ in range(BATCH)]),
                    "load_many": lambda: memory.load_many(mem_ids),
                },
            }
            for system in systems.values():  # warm up every path once
                for fn in system.values():
                    fn()
            for _ in range(rounds):
                for name, ops in systems.items():
                    for op, fn in ops.items():
                        record(f"{label} {op}", name, timed(fn, per_round))
                for name, ops in batches.items():
                    for op, fn in ops.items():
                        samples = timed(fn, batch_rounds)
                        record(f"{label} {op}/ckpt", name, [s / BATCH for s in samples])
                shared.clear(f"s-{label}")
                shared.clear(f"m-{label}")
                memory.clear(f"s-{label}")
                memory.clear(f"m-{label}")
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
          f"{rounds} interleaved rounds\n")
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
