"""What sampling many registered clients costs an idle server (issue 15: 1000 clients
under 2% of a CPU at the default interval).

The clients are the threads of one helper process (``--clients`` of them, default
1000): each thread has its own id in ``/proc``, so the server reads each as it would a
client process (RSS from its statm, PSS from its smaps_rollup), without starting 1000
interpreters.  A server with them registered and one with none, both at the default
0.5 s interval, idle (no calls), in interleaved rounds: the CPU time the server process
spends over ``--seconds``, as a share of one CPU.

Run ``python bench/sampler_clients.py`` (``--clients N``, ``--seconds S``, ``--rounds R``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shmstore


def idle_threads(count: int, stop: threading.Event) -> list[int]:
    """Start ``count`` threads that wait on ``stop``; their native ids."""
    ids: list[int] = []
    lock = threading.Lock()
    started = threading.Semaphore(0)

    def idle() -> None:
        with lock:
            ids.append(threading.get_native_id())
        started.release()
        stop.wait()

    for _ in range(count):
        threading.Thread(target=idle, daemon=True).start()
    for _ in range(count):
        started.acquire()
    return ids


def server_cpu(clients: list[int], seconds: float) -> float:
    """Share of one CPU an idle server with these clients registered spends."""
    with shmstore.serve(export=False) as server, server.connect() as store:
        for tid in clients:
            store._backend.register_client(tid, f"thread-{tid}")
        proc = psutil.Process(server.pid)
        store.stats()  # every client registered and read once before the clock starts
        c0, t0 = sum(proc.cpu_times()[:2]), time.monotonic()
        time.sleep(seconds)  # the measured stretch itself (idle), not a synchronisation
        c1, t1 = sum(proc.cpu_times()[:2]), time.monotonic()
        return (c1 - c0) / (t1 - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    stop = threading.Event()
    ids = idle_threads(args.clients, stop)
    shares: dict[int, list[float]] = {0: [], args.clients: []}
    try:
        for _ in range(args.rounds):
            for n in (args.clients, 0):
                shares[n].append(server_cpu(ids[:n], args.seconds))
    finally:
        stop.set()
    print(f"\nshmstore bench/sampler_clients.py — python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores, {args.rounds} interleaved rounds of {args.seconds:g} s, "
          "default interval 0.5 s, idle server\n")
    print("| registered clients | server CPU (share of one CPU), median | rounds |")
    print("|---:|---:|---|")
    for n, values in shares.items():
        print(f"| {n:,} | {statistics.median(values):.2%} | "
              f"{', '.join(f'{v:.2%}' for v in values)} |")


if __name__ == "__main__":
    main()
