"""Where the data plane starts to pay: socket path against data plane, 16 KiB to 1 MiB.

One ``shmstore.serve()`` server and two clients of it: one with ``data_plane=False``
(every byte on the socket) and one with ``data_plane_threshold=1`` (every state as a
sealed memory segment).  The state is a dict holding one float64 numpy array, as in
``bench/shared_memory.py``.  For each size, both clients save and load in interleaved
rounds (the order shuffled in each round, so a noisy machine hurts both alike); a load
also reads the array (its sum), so the plane's page faults are counted.

Reported: median and p10-p90 per size and op, and the plane's median as a ratio to the
socket path's; the default threshold (``segment.DEFAULT_THRESHOLD``) should sit where the
ratio falls below 1.  Run ``python bench/threshold.py`` (``--json FILE`` to keep the
figures, ``--rounds N``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Any

import numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shmstore
from shmstore import Checkpoint
from shmstore.core import segment

KIB = 1024
SIZES = [16 * KIB, 32 * KIB, 64 * KIB, 128 * KIB, 256 * KIB, 512 * KIB, 1024 * KIB]
REPS = 20  # calls per contender, size and round


def label(size: int) -> str:
    return f"{size // KIB}KiB" if size < 1024 * KIB else f"{size // (1024 * KIB)}MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    if not segment.available():
        sys.exit("this system has no sealed memory files (memfd): no data plane to measure")
    results: dict[str, list[float]] = {}
    with shmstore.serve(export=False) as server:
        stores = {"socket": server.connect(data_plane=False),
                  "plane": server.connect(data_plane_threshold=1)}
        for size in SIZES:
            state = {"weights": numpy.random.default_rng(size).random(size // 8)}
            kept = {n: s.save(Checkpoint(execution_id=f"k-{n}", state=state)).id
                    for n, s in stores.items()}
            for _ in range(args.rounds):
                order = list(stores)
                random.shuffle(order)
                for name in order:
                    store = stores[name]
                    for _ in range(REPS):
                        t0 = time.perf_counter()
                        cp = store.save(Checkpoint(execution_id=f"s-{name}", state=state))
                        t1 = time.perf_counter()
                        store.load(kept[name]).state["weights"].sum()
                        t2 = time.perf_counter()
                        store.delete(cp.id)
                        results.setdefault(f"{label(size)} save {name}", []).append(t1 - t0)
                        results.setdefault(f"{label(size)} load+read {name}", []).append(
                            t2 - t1)
            for name, store in stores.items():
                store.delete(kept[name])
        for store in stores.values():
            store.close()

    print(f"\nshmstore bench/threshold.py — python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores, {args.rounds} interleaved rounds of {REPS} calls, "
          f"default threshold {label(segment.DEFAULT_THRESHOLD)}\n")
    print("| size | op | socket | plane | plane ÷ socket |")
    print("|---|---|---:|---:|---:|")
    summary: dict[str, Any] = {}
    for size in SIZES:
        for op in ("save", "load+read"):
            row = []
            for name in ("socket", "plane"):
                samples = sorted(results[f"{label(size)} {op} {name}"])
                n = len(samples)
                med = statistics.median(samples)
                p10, p90 = samples[int(0.1 * (n - 1))], samples[int(0.9 * (n - 1))]
                row.append((med, p10, p90))
                summary[f"{label(size)} {op} {name}"] = {
                    "median_s": med, "p10_s": p10, "p90_s": p90, "samples": n}
            (sm, s10, s90), (pm, p10, p90) = row
            print(f"| {label(size)} | {op} | {sm * 1e6:.0f} µs ({s10 * 1e6:.0f}–{s90 * 1e6:.0f}) "
                  f"| {pm * 1e6:.0f} µs ({p10 * 1e6:.0f}–{p90 * 1e6:.0f}) | {pm / sm:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
