"""What ``stats()`` costs as the number of executions grows (100 to 100,000).

One ``shmstore.serve()`` server per count, each holding that many executions of one
1 KiB checkpoint (saved with ``save_many``); then ``stats()`` is called on each server
in interleaved rounds (the order shuffled per round), and, after each call, one save to
a random execution so that the largest-executions index has changed since the last read
(the case a sampling monitor sees).  Reported: the median ``stats()`` round trip and its
p10-p90 per count, and each median as a ratio to the 100-execution server's.

Run ``python bench/stats_cost.py`` (``--rounds N``, ``--counts 100,10000,100000``).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shmstore
from shmstore import Checkpoint

REPS = 20  # stats() calls per server and round


def fill(store: shmstore.SharedStore, count: int) -> None:
    state = {"blob": b"x" * 1000}
    for start in range(0, count, 500):
        store.save_many(Checkpoint(execution_id=f"e{i}", state=state)
                        for i in range(start, min(count, start + 500)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--counts", default="100,10000,100000")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    servers = {c: shmstore.serve(export=False) for c in counts}
    try:
        stores = {c: s.connect() for c, s in servers.items()}
        for c, store in stores.items():
            print(f"filling {c:,} executions ...", file=sys.stderr, flush=True)
            fill(store, c)
        times: dict[int, list[float]] = {c: [] for c in counts}
        rng = random.Random(0)
        state = {"blob": b"y" * 2000}
        for _ in range(args.rounds):
            order = counts[:]
            rng.shuffle(order)
            for c in order:
                store = stores[c]
                for _ in range(REPS):
                    store.save(Checkpoint(execution_id=f"e{rng.randrange(c)}", state=state))
                    t0 = time.perf_counter()
                    stats = store.stats()
                    times[c].append(time.perf_counter() - t0)
                assert stats.executions == c
        for store in stores.values():
            store.close()
    finally:
        for s in servers.values():
            s.shutdown()
    base = statistics.median(times[counts[0]])
    print(f"\nshmstore bench/stats_cost.py — python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores, {args.rounds} interleaved rounds of {REPS} calls\n")
    print("| executions | stats() median | p10–p90 | ÷ the smallest |")
    print("|---:|---:|---:|---:|")
    for c in counts:
        ordered = sorted(times[c])
        n = len(ordered)
        med = statistics.median(ordered)
        print(f"| {c:,} | {med * 1e6:.0f} µs | {ordered[int(0.1 * (n - 1))] * 1e6:.0f}–"
              f"{ordered[int(0.9 * (n - 1))] * 1e6:.0f} µs | {med / base:.2f} |")


if __name__ == "__main__":
    main()
